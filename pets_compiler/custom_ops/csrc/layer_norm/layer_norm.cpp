#include "layer_norm.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

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

// out[j] = x[j] + b[j] + r[j], each term only where given (b, r may be null), in aten's arithmetic: each sum in
// opmath and rounded to scalar_t (correctly rounded either way), x + b first as pets::bias_delta adds it.
template <typename scalar_t>
void add_terms(const scalar_t* x, const scalar_t* b, const scalar_t* r, scalar_t* out, int64_t n) {
  using op_t = at::opmath_type<scalar_t>;
  for (int64_t j = 0; j < n; ++j) {
    scalar_t v = x[j];
    if (b != nullptr) v = static_cast<scalar_t>(static_cast<op_t>(v) + static_cast<op_t>(b[j]));
    if (r != nullptr) v = static_cast<scalar_t>(static_cast<op_t>(v) + static_cast<op_t>(r[j]));
    out[j] = v;
  }
}

// Mean and variance are taken in double for float and double inputs (exact to rounding even when
// |mean| >> std, where torch's fp32 kernel loses digits) and in float for half types, like torch's kernel. With
// x_bias or residual (either may be null) a row's sum is formed in a buffer of scalar_t first, so the statistics see
// exactly the values a materialized sum would hold.
template <typename scalar_t>
void layer_norm_rows(const scalar_t* x, const int64_t* task_ids, const scalar_t* weight, const scalar_t* bias,
                     const scalar_t* weight_delta, const scalar_t* bias_delta, const scalar_t* x_bias,
                     const scalar_t* residual, scalar_t* out, int64_t rows, int64_t tokens, int64_t hidden,
                     double eps) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(hidden, 1));
  const bool summed = x_bias != nullptr || residual != nullptr;
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> sum(summed ? hidden : 0);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t slot = task_ids[r / tokens];
      const scalar_t* xr = x + r * hidden;
      const scalar_t* wd = weight_delta + slot * hidden;
      const scalar_t* bd = bias_delta + slot * hidden;
      scalar_t* yr = out + r * hidden;
      if (summed) {
        add_terms(xr, x_bias == nullptr ? nullptr : x_bias + slot * hidden,
                  residual == nullptr ? nullptr : residual + r * hidden, sum.data(), hidden);
        xr = sum.data();
      }

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
  check_feature_table(op, names.weight_delta, weight_delta, x_name, x);
  check_feature_table(op, names.bias_delta, bias_delta, x_name, x);
  TORCH_CHECK(weight_delta.size(0) == bias_delta.size(0), op, ": ", names.weight_delta, " and ",
              names.bias_delta, " must have one slot count T, got ", names.weight_delta, " ",
              weight_delta.sizes(), ", ", names.bias_delta, " ", bias_delta.sizes());
}

at::Tensor layer_norm_unchecked_cpu(const at::Tensor& x, const at::Tensor& task_ids, const at::Tensor& weight,
                                    const at::Tensor& bias, const at::Tensor& weight_delta,
                                    const at::Tensor& bias_delta, double eps, const std::optional<at::Tensor>& x_bias,
                                    const std::optional<at::Tensor>& residual) {
  const at::Tensor xc = x.contiguous();
  const at::Tensor ids = task_ids.contiguous();
  const at::Tensor w = weight.contiguous(), b = bias.contiguous();
  const at::Tensor wd = weight_delta.contiguous(), bd = bias_delta.contiguous();
  const at::Tensor xb = x_bias.has_value() ? x_bias->contiguous() : at::Tensor();
  const at::Tensor res = residual.has_value() ? residual->contiguous() : at::Tensor();
  at::Tensor out = at::empty_like(xc);
  const int64_t tokens = tokens_per_row(xc);
  const int64_t rows = xc.size(0) * tokens;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "pets::layer_norm", [&] {
    const auto data = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr; };
    layer_norm_rows<scalar_t>(xc.const_data_ptr<scalar_t>(), ids.const_data_ptr<int64_t>(), data(w), data(b),
                              data(wd), data(bd), data(xb), data(res), out.mutable_data_ptr<scalar_t>(), rows,
                              tokens, xc.size(-1), eps);
  });
  return out;
}

void check_layer_norm_inputs(const at::Tensor& x, const at::Tensor& task_ids, const at::Tensor& weight,
                             const at::Tensor& bias, const at::Tensor& weight_delta, const at::Tensor& bias_delta,
                             const std::optional<at::Tensor>& x_bias, const std::optional<at::Tensor>& residual) {
  constexpr const char* op = "pets::layer_norm";
  check_batch_tensor(op, "x", x);
  check_task_ids(op, task_ids, "x", x);
  check_layer_norm_params(op, "x", x, {"weight", "bias", "weight_delta", "bias_delta"}, weight, bias,
                          weight_delta, bias_delta);
  if (x_bias.has_value()) check_feature_table(op, "x_bias", *x_bias, "x", x);
  if (residual.has_value()) check_like(op, "residual", *residual, "x", x);
}

at::Tensor layer_norm_cpu(const at::Tensor& x, const at::Tensor& task_ids, const at::Tensor& weight,
                          const at::Tensor& bias, const at::Tensor& weight_delta, const at::Tensor& bias_delta,
                          double eps, const std::optional<at::Tensor>& x_bias,
                          const std::optional<at::Tensor>& residual) {
  constexpr const char* op = "pets::layer_norm";
  check_layer_norm_inputs(x, task_ids, weight, bias, weight_delta, bias_delta, x_bias, residual);
  check_task_id_range(op, task_ids, weight_delta.size(0), "weight_delta");
  if (x_bias.has_value()) check_task_id_range(op, task_ids, x_bias->size(0), "x_bias");
  return layer_norm_unchecked_cpu(x, task_ids, weight, bias, weight_delta, bias_delta, eps, x_bias, residual);
}

}  // namespace pets
