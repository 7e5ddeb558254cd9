// pets::layer_norm: one warp per token, the slot's affine deltas applied in the same pass.
#include "../common/task_groups.h"
#include "../layer_norm/layer_norm.h"
#include "layer_norm.cuh"
#include "row_regs.cuh"
#include "ops.h"

namespace pets::cuda {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    layer_norm_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ task_ids,
                      const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias,
                      const scalar_t* __restrict__ weight_delta, const scalar_t* __restrict__ bias_delta,
                      int64_t slots, scalar_t* __restrict__ out, int64_t rows, int64_t tokens, int64_t hidden,
                      double eps) {
  using acc = acc_t<scalar_t>;
  const int64_t m = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  if (m >= rows) return;
  const int64_t t = slot_of(task_ids, m / tokens, slots);
  if (t < 0) return;
  const scalar_t* xr = x + m * hidden;
  scalar_t* outr = out + m * hidden;
  warp_layer_norm<acc>([&](int64_t j) { return static_cast<acc>(xr[j]); },
                       [&](int64_t j, acc v) { outr[j] = static_cast<scalar_t>(v); }, hidden, static_cast<acc>(eps),
                       weight, bias, weight_delta + t * hidden, bias_delta + t * hidden);
}

// The same, with the row in registers (rows_fit): one read of x, one write of out. x is loaded before the task id
// (it does not depend on it), and the block's slot rows are staged in shared memory once (fetch_slot_rows); a warp
// of another slot (a block across batch rows) reads its own from global memory. Before: 8.4 us against a 6.0 us
// floor (profiled on the H200, bert-base, fp16), x loaded only after the task id and the LN rows reloaded per token
// after the reductions, a round trip per vector. Now 58 registers (were 64), no spills (nvcc 13, sm_90, fp16);
// compile-checked only, not yet run or timed on a GPU.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    layer_norm_regs_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ task_ids,
                           const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias,
                           const scalar_t* __restrict__ weight_delta, const scalar_t* __restrict__ bias_delta,
                           int64_t slots, scalar_t* __restrict__ out, int64_t rows, int64_t tokens, int64_t hidden,
                           double eps) {
  using acc = acc_t<scalar_t>;
  static_assert(kThreads >= kRowVecs, "fetch_slot_rows: a vector of each row per thread");
  __shared__ SlotRows<4> ln;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * (kThreads / kWarp);
  const int64_t m = m0 + threadIdx.x / kWarp;
  const int64_t nvec = hidden / vec_elems<scalar_t>();
  RowRegs<scalar_t> row;
  if (m < rows) row.load(x + m * hidden, nvec);
  const TokenSlots slots_of = token_slots(task_ids, m, m0, rows, tokens, slots);
  const int64_t t = slots_of.t, tb = slots_of.tb;  // tb: the block's slot (its first token's)
  const int64_t ts = max64(tb, 0);
  put_slot_rows(ln, fetch_slot_rows<4, scalar_t>({weight, bias, weight_delta + ts * hidden, bias_delta + ts * hidden},
                                                nvec, tb >= 0));
  if (t < 0) return;
  acc mean, rstd;
  row.ln_stats(nvec, hidden, eps, mean, rstd);
  row.ln_apply_slot(nvec, mean, rstd, t == tb, ln.v, weight, bias, weight_delta + t * hidden, bias_delta + t * hidden);
  row.store(out + m * hidden, nvec);
}

}  // namespace

at::Tensor layer_norm(const at::Tensor& x, const at::Tensor& task_ids, const at::Tensor& weight,
                      const at::Tensor& bias, const at::Tensor& weight_delta, const at::Tensor& bias_delta,
                      double eps) {
  check_layer_norm_inputs(x, task_ids, weight, bias, weight_delta, bias_delta);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const at::Tensor x3 = as_rows(x).contiguous();
  const at::Tensor ids = task_ids.contiguous();
  const at::Tensor w = weight.contiguous(), b = bias.contiguous();
  const at::Tensor wd = weight_delta.contiguous(), bd = bias_delta.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t rows = x3.size(0) * x3.size(1);
  if (out.numel() == 0) return out;
  const int64_t warps = kThreads / kWarp;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pets::layer_norm", [&] {
    const auto kernel = rows_fit(x3.size(2), {&x3, &w, &b, &wd, &bd, &out}) ? layer_norm_regs_kernel<scalar_t>
                                                                                      : layer_norm_kernel<scalar_t>;
    kernel<<<static_cast<unsigned>(ceil_div(rows, warps)), kThreads, 0, stream()>>>(
        x3.const_data_ptr<scalar_t>(), ids.const_data_ptr<int64_t>(), w.const_data_ptr<scalar_t>(),
        b.const_data_ptr<scalar_t>(), wd.const_data_ptr<scalar_t>(), bd.const_data_ptr<scalar_t>(), wd.size(0),
        out.mutable_data_ptr<scalar_t>(), rows, x3.size(1), x3.size(2), eps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace pets::cuda
