// Per-row table terms applied to every token of a batch row: bias_delta (y + bias[t]) and scale (IA3,
// y * (1 + delta[t])). A block takes kTokens tokens of one row (one slot), threads across features.
#include "../bias/bias.h"
#include "../common/task_groups.h"
#include "../scale/scale.h"
#include "common.cuh"
#include "rowwise.h"
#include "ops.h"

namespace pets::cuda {
namespace {

constexpr int kTokens = 16;
constexpr int kThreads = 256;

enum class RowTerm { kAdd, kScale };

template <typename scalar_t, RowTerm term>
__global__ void __launch_bounds__(kThreads)
    row_term_kernel(const scalar_t* __restrict__ y, const int64_t* __restrict__ task_ids,
                    const scalar_t* __restrict__ table, int64_t slots, scalar_t* __restrict__ out, int64_t tokens,
                    int64_t features) {
  using acc = acc_t<scalar_t>;
  const int64_t row = blockIdx.x;
  const int64_t tok0 = static_cast<int64_t>(blockIdx.y) * kTokens;
  const int64_t count = min64(kTokens, tokens - tok0);
  const int64_t t = slot_of(task_ids, row, slots);
  const int64_t m0 = row * tokens + tok0;
  for (int64_t f = threadIdx.x; f < features; f += blockDim.x) {
    const acc v = t >= 0 ? static_cast<acc>(table[t * features + f]) : acc(0);
    for (int64_t tm = 0; tm < count; ++tm) {
      const int64_t i = (m0 + tm) * features + f;
      const acc yv = static_cast<acc>(y[i]);
      // y * (1 + 0) is y exactly, so rows of slots without a scale are unchanged bit for bit.
      out[i] = static_cast<scalar_t>(term == RowTerm::kAdd ? yv + v : yv * (acc(1) + v));
    }
  }
}

// The same with 16-byte vectors along the features (when vectorizable).
template <typename scalar_t, RowTerm term>
__global__ void __launch_bounds__(kThreads)
    row_term_vec_kernel(const scalar_t* __restrict__ y, const int64_t* __restrict__ task_ids,
                        const scalar_t* __restrict__ table, int64_t slots, scalar_t* __restrict__ out,
                        int64_t tokens, int64_t features) {
  using acc = acc_t<scalar_t>;
  constexpr int V = kVecBytes / sizeof(scalar_t);
  const int64_t row = blockIdx.x;
  const int64_t tok0 = static_cast<int64_t>(blockIdx.y) * kTokens;
  const int64_t count = min64(kTokens, tokens - tok0);
  const int64_t t = slot_of(task_ids, row, slots);
  if (t < 0) return;
  const int64_t m0 = row * tokens + tok0;
  for (int64_t f = threadIdx.x; f < features / V; f += blockDim.x) {
    const Vec<scalar_t> tv = load_vec<scalar_t>(table + t * features, f);
    for (int64_t tm = 0; tm < count; ++tm) {
      const Vec<scalar_t> yv = load_vec<scalar_t>(y + (m0 + tm) * features, f);
      Vec<scalar_t> ov;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const acc a = static_cast<acc>(yv.v[e]), b = static_cast<acc>(tv.v[e]);
        ov.v[e] = static_cast<scalar_t>(term == RowTerm::kAdd ? a + b : a * (acc(1) + b));
      }
      reinterpret_cast<Vec<scalar_t>*>(out + (m0 + tm) * features)[f] = ov;
    }
  }
}

template <RowTerm term>
at::Tensor launch(const char* op, const at::Tensor& y, const at::Tensor& task_ids, const at::Tensor& table) {
  const c10::cuda::OptionalCUDAGuard guard(y.device());
  const at::Tensor y3 = as_rows(y).contiguous();
  const at::Tensor ids = task_ids.contiguous();
  const at::Tensor tab = table.contiguous();
  at::Tensor out = at::empty(y.sizes(), y.options());
  if (out.numel() == 0) return out;
  const int64_t tokens = y3.size(1);
  const dim3 grid(static_cast<unsigned>(y3.size(0)), static_cast<unsigned>(ceil_div(tokens, kTokens)));
  TORCH_CHECK(grid.y <= 65535, op, ": ", tokens, " tokens per row is more than the kernel's ", 65535 * kTokens);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "pets::row_term", [&] {
    const bool vec = vectorizable(y3, y3.size(2)) && vectorizable(tab, tab.size(1)) &&
                     vectorizable(out, y3.size(2));
    const auto kernel = vec ? row_term_vec_kernel<scalar_t, term> : row_term_kernel<scalar_t, term>;
    kernel<<<grid, kThreads, 0, stream()>>>(
        y3.const_data_ptr<scalar_t>(), ids.const_data_ptr<int64_t>(), tab.const_data_ptr<scalar_t>(), tab.size(0),
        out.mutable_data_ptr<scalar_t>(), tokens, y3.size(2));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

at::Tensor add_row_bias(const char* op, const at::Tensor& y, const at::Tensor& task_ids, const at::Tensor& bias) {
  return launch<RowTerm::kAdd>(op, y, task_ids, bias);
}

at::Tensor bias_delta(const at::Tensor& y, const at::Tensor& task_ids, const at::Tensor& bias) {
  check_bias_delta_inputs(y, task_ids, bias);
  return add_row_bias("pets::bias_delta", y, task_ids, bias);
}

at::Tensor scale(const at::Tensor& y, const at::Tensor& task_ids, const at::Tensor& delta) {
  check_scale_inputs(y, task_ids, delta);
  return launch<RowTerm::kScale>("pets::scale", y, task_ids, delta);
}

}  // namespace pets::cuda
