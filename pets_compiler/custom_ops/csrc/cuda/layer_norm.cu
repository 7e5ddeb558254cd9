// pets::layer_norm: one warp per token, the slot's affine deltas applied in the same pass, and the terms summed
// into its input (x_bias[t], residual) in the same pass too.
#include "../common/task_groups.h"
#include "../layer_norm/layer_norm.h"
#include "layer_norm.cuh"
#include "row_regs.cuh"
#include "ops.h"

#include <algorithm>
#include <type_traits>

namespace pets::cuda {
namespace {

constexpr int kThreads = 256;

// x_bias and residual may be null (absent): the LayerNorm's input is then x + x_bias[t] + residual, each sum rounded
// (add_terms), recomputed from memory each time the routine reads it.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    layer_norm_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ task_ids,
                      const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias,
                      const scalar_t* __restrict__ weight_delta, const scalar_t* __restrict__ bias_delta,
                      const scalar_t* __restrict__ x_bias, const scalar_t* __restrict__ residual, int64_t slots,
                      scalar_t* __restrict__ out, int64_t rows, int64_t tokens, int64_t hidden, double eps) {
  using acc = acc_t<scalar_t>;
  const int64_t m = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  if (m >= rows) return;
  const int64_t t = slot_of(task_ids, m / tokens, slots);
  if (t < 0) return;
  const scalar_t* xr = x + m * hidden;
  const scalar_t* xb = x_bias == nullptr ? nullptr : x_bias + t * hidden;
  const scalar_t* rr = residual == nullptr ? nullptr : residual + m * hidden;
  scalar_t* outr = out + m * hidden;
  warp_layer_norm<acc>([&](int64_t j) { return add_terms<acc>(xr[j], xb, rr, j); },
                       [&](int64_t j, acc v) { outr[j] = static_cast<scalar_t>(v); }, hidden, static_cast<acc>(eps),
                       weight, bias, weight_delta + t * hidden, bias_delta + t * hidden);
}

// The same, with the row in registers (rows_fit): one read of x, one write of out. x is loaded before the task id
// (it does not depend on it), and the block's slot rows are staged in shared memory once (fetch_slot_rows); a warp
// of another slot (a block across batch rows) reads its own from global memory. Before: 8.4 us against a 6.0 us
// floor (profiled on the H200, bert-base, fp16), x loaded only after the task id and the LN rows reloaded per token
// after the reductions, a round trip per vector. Now 58 registers (were 64), no spills (nvcc 13, sm_90, fp16);
// with x_bias and the residual, 13.8 us a layer in the mix_dense program (H200, bs64 s128, cf9e7b6).
// kBias / kResidual: x_bias and residual are given, and summed into the row in registers before the statistics
// (x_bias first). The residual row is loaded with x, before the task id; the block slot's x_bias row is staged with
// its LayerNorm rows (a 5th SlotRows row: 4 registers a thread where a row per token would take 16). No load waits
// on another beyond the task id, as before, but a token of another slot than its block's (a block across batch rows),
// which reads its x_bias row after the barrier. 64 registers with both (fp16), no spills. Compile-checked only: not
// yet run or timed on a GPU.
template <typename scalar_t, bool kBias, bool kResidual>
__global__ void __launch_bounds__(kThreads)
    layer_norm_regs_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ task_ids,
                           const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias,
                           const scalar_t* __restrict__ weight_delta, const scalar_t* __restrict__ bias_delta,
                           const scalar_t* __restrict__ x_bias, const scalar_t* __restrict__ residual, int64_t slots,
                           scalar_t* __restrict__ out, int64_t rows, int64_t tokens, int64_t hidden, double eps) {
  using acc = acc_t<scalar_t>;
  static_assert(kThreads >= kRowVecs, "fetch_slot_rows: a vector of each row per thread");
  constexpr int kRows = kBias ? 5 : 4;  // weight, bias, the slot's deltas (and its x_bias row)
  __shared__ SlotRows<kRows> ln;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * (kThreads / kWarp);
  const int64_t m = m0 + threadIdx.x / kWarp;
  const int64_t nvec = hidden / vec_elems<scalar_t>();
  RowRegs<scalar_t> row, res;
  if (m < rows) {
    row.load(x + m * hidden, nvec);
    if constexpr (kResidual) res.load(residual + m * hidden, nvec);
  }
  const TokenSlots slots_of = token_slots(task_ids, m, m0, rows, tokens, slots);
  const int64_t t = slots_of.t, tb = slots_of.tb;  // tb: the block's slot (its first token's)
  const int64_t ts = max64(tb, 0);
  const scalar_t* wd = weight_delta + ts * hidden;
  const scalar_t* bd = bias_delta + ts * hidden;
  const SlotRowsFetch<kRows> fetched = [&] {
    if constexpr (kBias) {
      return fetch_slot_rows<5, scalar_t>({weight, bias, wd, bd, x_bias + ts * hidden}, nvec, tb >= 0);
    } else {
      return fetch_slot_rows<4, scalar_t>({weight, bias, wd, bd}, nvec, tb >= 0);
    }
  }();
  put_slot_rows(ln, fetched);
  if (t < 0) return;
  if constexpr (kBias) row.add_row_slot(nvec, t == tb, ln.v[4], x_bias + t * hidden);
  if constexpr (kResidual) row.add(res, nvec);
  acc mean, rstd;
  row.ln_stats(nvec, hidden, eps, mean, rstd);
  row.ln_apply_slot(nvec, mean, rstd, t == tb, ln.v, weight, bias, weight_delta + t * hidden, bias_delta + t * hidden);
  row.store(out + m * hidden, nvec);
}

}  // namespace

at::Tensor layer_norm(const at::Tensor& x, const at::Tensor& task_ids, const at::Tensor& weight,
                      const at::Tensor& bias, const at::Tensor& weight_delta, const at::Tensor& bias_delta,
                      double eps, const std::optional<at::Tensor>& x_bias, const std::optional<at::Tensor>& residual) {
  check_layer_norm_inputs(x, task_ids, weight, bias, weight_delta, bias_delta, x_bias, residual);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const at::Tensor x3 = as_rows(x).contiguous();
  const at::Tensor ids = task_ids.contiguous();
  const at::Tensor w = weight.contiguous(), b = bias.contiguous();
  const at::Tensor wd = weight_delta.contiguous(), bd = bias_delta.contiguous();
  const at::Tensor xb = x_bias.has_value() ? x_bias->contiguous() : at::Tensor();
  const at::Tensor r3 = residual.has_value() ? as_rows(*residual).contiguous() : at::Tensor();
  const int64_t slots = xb.defined() ? std::min(wd.size(0), xb.size(0)) : wd.size(0);
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t rows = x3.size(0) * x3.size(1), hidden = x3.size(2);
  if (out.numel() == 0) return out;
  const int64_t warps = kThreads / kWarp;
  const bool fit = rows_fit(hidden, {&x3, &w, &b, &wd, &bd, &out}) &&
                   (!xb.defined() || vectorizable(xb, hidden)) && (!r3.defined() || vectorizable(r3, hidden));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pets::layer_norm", [&] {
    const auto run = [&](auto bias_given, auto residual_given) {
      constexpr bool kB = decltype(bias_given)::value, kR = decltype(residual_given)::value;
      const auto kernel = fit ? layer_norm_regs_kernel<scalar_t, kB, kR> : layer_norm_kernel<scalar_t>;
      kernel<<<static_cast<unsigned>(ceil_div(rows, warps)), kThreads, 0, stream()>>>(
          x3.const_data_ptr<scalar_t>(), ids.const_data_ptr<int64_t>(), w.const_data_ptr<scalar_t>(),
          b.const_data_ptr<scalar_t>(), wd.const_data_ptr<scalar_t>(), bd.const_data_ptr<scalar_t>(),
          data_or_null<scalar_t>(xb), data_or_null<scalar_t>(r3), slots, out.mutable_data_ptr<scalar_t>(), rows,
          x3.size(1), hidden, eps);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (xb.defined() && r3.defined()) {
      run(std::true_type{}, std::true_type{});
    } else if (xb.defined()) {
      run(std::true_type{}, std::false_type{});
    } else if (r3.defined()) {
      run(std::false_type{}, std::true_type{});
    } else {
      run(std::false_type{}, std::false_type{});
    }
  });
  return out;
}

}  // namespace pets::cuda
