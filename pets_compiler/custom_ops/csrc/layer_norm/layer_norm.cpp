#include "layer_norm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "../common/acc_type.h"
#include "../common/checks.h"
#include "../common/task_groups.h"

namespace pets {
namespace {

void check_vector(const char* op, const char* name, const at::Tensor& t, const char* x_name,
                  const at::Tensor& x) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(-1), op, ": ", name, " must be [H] with H = ", x_name,
              ".size(-1) = ", x.size(-1), ", got shape ", t.sizes());
  check_dtype(op, name, t, x_name, x);
  check_device(op, name, t, x_name, x);
}

void check_delta_table(const char* op, const char* name, const at::Tensor& t, const char* x_name,
                       const at::Tensor& x) {
  check_table(op, name, t, 2, x_name, x);
  TORCH_CHECK(t.size(1) == x.size(-1), op, ": ", name, " must be [T, H] with H = ", x_name, ".size(-1) = ",
              x.size(-1), ", got shape ", t.sizes());
}

// sum_j f(v[j]) over independent lanes: a single accumulator would make each add wait for the previous one.
template <typename acc_t, typename scalar_t, typename F>
acc_t lane_sum(const scalar_t* v, int64_t n, const F& f) {
  constexpr int64_t kLanes = 8;
  acc_t lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) lanes[k] += f(static_cast<acc_t>(v[j + k]));
  }
  acc_t total = 0;
  for (; j < n; ++j) total += f(static_cast<acc_t>(v[j]));
  for (int64_t k = 0; k < kLanes; ++k) total += lanes[k];
  return total;
}

// Mean and variance are taken in double for float and double inputs (exact to rounding even when
// |mean| >> std, where torch's fp32 kernel loses digits) and in float for half types, like torch's kernel.
template <typename scalar_t>
void layer_norm_rows(const scalar_t* x, const int64_t* task_ids, const scalar_t* weight, const scalar_t* bias,
                     const scalar_t* weight_delta, const scalar_t* bias_delta, scalar_t* out, int64_t rows,
                     int64_t tokens, int64_t hidden, double eps) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(hidden, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t slot = task_ids[r / tokens];
      const scalar_t* xr = x + r * hidden;
      const scalar_t* wd = weight_delta + slot * hidden;
      const scalar_t* bd = bias_delta + slot * hidden;
      scalar_t* yr = out + r * hidden;

      const acc_t mean = lane_sum<acc_t>(xr, hidden, [](acc_t v) { return v; }) / static_cast<acc_t>(hidden);
      // A second pass for the variance: no cancellation when |mean| >> std.
      const acc_t squares = lane_sum<acc_t>(xr, hidden, [mean](acc_t v) { return (v - mean) * (v - mean); });
      const acc_t rstd = acc_t(1) / std::sqrt(squares / static_cast<acc_t>(hidden) + static_cast<acc_t>(eps));
      for (int64_t j = 0; j < hidden; ++j) {
        const acc_t gamma = static_cast<acc_t>(weight[j]) + static_cast<acc_t>(wd[j]);
        const acc_t beta = static_cast<acc_t>(bias[j]) + static_cast<acc_t>(bd[j]);
        yr[j] = static_cast<scalar_t>((static_cast<acc_t>(xr[j]) - mean) * rstd * gamma + beta);
      }
    }
  });
}

}  // namespace

void check_layer_norm_params(const char* op, const char* x_name, const at::Tensor& x,
                             const LayerNormNames& names, const at::Tensor& weight, const at::Tensor& bias,
                             const at::Tensor& weight_delta, const at::Tensor& bias_delta) {
  check_vector(op, names.weight, weight, x_name, x);
  check_vector(op, names.bias, bias, x_name, x);
  check_delta_table(op, names.weight_delta, weight_delta, x_name, x);
  check_delta_table(op, names.bias_delta, bias_delta, x_name, x);
  TORCH_CHECK(weight_delta.size(0) == bias_delta.size(0), op, ": ", names.weight_delta, " and ",
              names.bias_delta, " must have one slot count T, got ", names.weight_delta, " ",
              weight_delta.sizes(), ", ", names.bias_delta, " ", bias_delta.sizes());
}

at::Tensor layer_norm_unchecked_cpu(const at::Tensor& x, const at::Tensor& task_ids, const at::Tensor& weight,
                                    const at::Tensor& bias, const at::Tensor& weight_delta,
                                    const at::Tensor& bias_delta, double eps) {
  const at::Tensor xc = x.contiguous();
  const at::Tensor ids = task_ids.contiguous();
  const at::Tensor w = weight.contiguous(), b = bias.contiguous();
  const at::Tensor wd = weight_delta.contiguous(), bd = bias_delta.contiguous();
  at::Tensor out = at::empty_like(xc);
  const int64_t tokens = tokens_per_row(xc);
  const int64_t rows = xc.size(0) * tokens;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "pets::layer_norm", [&] {
    layer_norm_rows<scalar_t>(xc.const_data_ptr<scalar_t>(), ids.const_data_ptr<int64_t>(),
                              w.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
                              wd.const_data_ptr<scalar_t>(), bd.const_data_ptr<scalar_t>(),
                              out.mutable_data_ptr<scalar_t>(), rows, tokens, xc.size(-1), eps);
  });
  return out;
}

void check_layer_norm_inputs(const at::Tensor& x, const at::Tensor& task_ids, const at::Tensor& weight,
                             const at::Tensor& bias, const at::Tensor& weight_delta, const at::Tensor& bias_delta) {
  constexpr const char* op = "pets::layer_norm";
  check_batch_tensor(op, "x", x);
  check_task_ids(op, task_ids, "x", x);
  check_layer_norm_params(op, "x", x, {"weight", "bias", "weight_delta", "bias_delta"}, weight, bias,
                          weight_delta, bias_delta);
}

at::Tensor layer_norm_cpu(const at::Tensor& x, const at::Tensor& task_ids, const at::Tensor& weight,
                          const at::Tensor& bias, const at::Tensor& weight_delta,
                          const at::Tensor& bias_delta, double eps) {
  constexpr const char* op = "pets::layer_norm";
  check_layer_norm_inputs(x, task_ids, weight, bias, weight_delta, bias_delta);
  check_task_id_range(op, task_ids, weight_delta.size(0), "weight_delta");
  return layer_norm_unchecked_cpu(x, task_ids, weight, bias, weight_delta, bias_delta, eps);
}

}  // namespace pets
