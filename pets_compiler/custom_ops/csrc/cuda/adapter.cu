// pets::adapter: the end of a BERT sublayer, LN_t(h + residual), with slot t's bottleneck adapter where AdapterHub
// places it. Rows that fit in registers (row_regs.cuh) take the fast path below; others the one-kernel version of
// adapter_fused.cuh.
#include "../adapter/adapter.h"
#include "../common/task_groups.h"
#include "adapter_activation.cuh"
#include "adapter_fused.cuh"
#include "common.cuh"
#include "ops.h"
#include "row_regs.cuh"
#include "slot_gemm.h"

#include <algorithm>
#include <type_traits>

namespace pets::cuda {
namespace {

constexpr int kThreads = 256;  // 8 warps: one per token
static_assert(kThreads >= kRowVecs, "fetch_slot_rows: a vector of each row per thread");

// The tensor-core path (rows_fit): adapter_in_kernel, the down projection as per-slot matmuls (slot_gemm.h: each
// row reads its own slot's table in place), adapter_act_kernel (+ the down bias), the up projection likewise,
// adapter_out_kernel. Intermediates are rounded to the input dtype where the CPU kernel's matmuls and adds round
// them.

// adapter_in and adapter_out are one warp per token, 8 tokens a block, and load every row a token needs before using
// any: rows that do not depend on the task id before it, the others as soon as the config says which are needed
// (all its columns read at once). The block's slot rows (the LayerNorm's, up_b) are staged once in shared memory
// (fetch_slot_rows); a warp of another slot (a block across batch rows) reads its own from global memory.
// Before (profiled on the H200, bert-base, fp16): adapter_out 23.3 us against a ~12 us floor, adapter_in 14.3
// against ~9, with chains of dependent loads (task id -> config -> config -> rows -> residual -> 4 rounds of LN
// rows) and 128 registers in adapter_out. Now (nvcc 13, sm_90, fp16/bf16): 80 and 64 registers (were 128 and 76),
// no spills, 16-byte loads and stores only. With h_bias (the kBias instances): 88 and 64 registers, no spills.
// adapter_out over busy groups (below): 118-128 registers (2 blocks an SM), 8 bytes spilled in the fp16/bf16 kBias
// instances.

// LN_t(h + residual) per token: the output of rows without an adapter; else the adapter input a_in. The residual
// is not read where the adapter takes h itself. kBias: h_bias is given, and h + h_bias[t] (rounded) stands for h;
// the block slot's h_bias row is staged with its LayerNorm rows (a token of another slot reads its own after the
// barrier, as for the LayerNorm rows).
template <typename scalar_t, bool kBias>
__global__ void __launch_bounds__(kThreads)
    adapter_in_kernel(const scalar_t* __restrict__ h, const scalar_t* __restrict__ residual,
                      const int64_t* __restrict__ task_ids, const scalar_t* __restrict__ ln_weight,
                      const scalar_t* __restrict__ ln_bias, const scalar_t* __restrict__ ln_weight_delta,
                      const scalar_t* __restrict__ ln_bias_delta, double eps, const int64_t* __restrict__ config,
                      const scalar_t* __restrict__ h_bias, int64_t slots, scalar_t* __restrict__ out,
                      scalar_t* __restrict__ a_in, int64_t rows, int64_t tokens, int64_t hidden) {
  using acc = acc_t<scalar_t>;
  constexpr int V = RowRegs<scalar_t>::V;
  constexpr int kRows = kBias ? 5 : 4;  // the LayerNorm's rows (and the h_bias row)
  __shared__ SlotRows<kRows> ln;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * (kThreads / kWarp);
  const int64_t m = m0 + threadIdx.x / kWarp;
  const int64_t nvec = hidden / V;
  RowRegs<scalar_t> v, res;
  if (m < rows) v.load(h + m * hidden, nvec);
  const TokenSlots slots_of = token_slots(task_ids, m, m0, rows, tokens, slots);
  const int64_t t = slots_of.t, tb = slots_of.tb;  // tb: the block's slot (its first token's)
  const int64_t ts = max64(tb, 0);
  const scalar_t* wd = ln_weight_delta + ts * hidden;
  const scalar_t* bd = ln_bias_delta + ts * hidden;
  const SlotRowsFetch<kRows> rows_ln = [&] {
    if constexpr (kBias) {
      return fetch_slot_rows<5, scalar_t>({ln_weight, ln_bias, wd, bd, h_bias + ts * hidden}, nvec, tb >= 0);
    } else {
      return fetch_slot_rows<4, scalar_t>({ln_weight, ln_bias, wd, bd}, nvec, tb >= 0);
    }
  }();
  bool enabled = false, copy = false;  // copy: the adapter takes h itself (no LN before it)
  if (t >= 0) {
    const int64_t* c = config + t * kAdapterConfigColumns;
    enabled = c[kAdapterEnabled] != 0;
    copy = enabled & (c[kAdapterOriginalLnBefore] == 0);  // both loads at once
    if (!copy) res.load(residual + m * hidden, nvec);
  }
  put_slot_rows(ln, rows_ln);
  if (t < 0) return;
  if constexpr (kBias) v.add_row_slot(nvec, t == tb, ln.v[4], h_bias + t * hidden);  // as pets::bias_delta rounds
  if (copy) {
    v.store(a_in + m * hidden, nvec);
    return;
  }
  v.add(res, nvec);  // h + residual in scalar_t, as the backbone's add
  acc mean, rstd;
  v.ln_stats(nvec, hidden, eps, mean, rstd);
  v.ln_apply_slot(nvec, mean, rstd, t == tb, ln.v, ln_weight, ln_bias, ln_weight_delta + t * hidden,
                  ln_bias_delta + t * hidden);
  v.store((enabled ? a_in : out) + m * hidden, nvec);
}

// In place on down [rows, R]: act_t(d) for the slot's first r units, 0 beyond (and for rows without an adapter).
template <typename scalar_t>
__global__ void adapter_act_kernel(scalar_t* __restrict__ down, const scalar_t* __restrict__ down_b,
                                   const int64_t* __restrict__ task_ids, const int64_t* __restrict__ config,
                                   int64_t slots, int64_t total, int64_t tokens, int64_t padded) {
  using acc = acc_t<scalar_t>;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int64_t m = i / padded, u = i % padded;
  const int64_t t = slot_of(task_ids, m / tokens, slots);
  if (t < 0) return;
  const int64_t* c = config + t * kAdapterConfigColumns;
  const int64_t act = c[kAdapterActivation];
  CUDA_KERNEL_ASSERT(act >= 0 && act < kAdapterActivationCount && "pets: unknown adapter activation code");
  const bool keep = c[kAdapterEnabled] != 0 && u < c[kAdapterBottleneck];
  // The down matmul's output (rounded by cuBLAS) plus the slot's bias, rounded as the bias add would be.
  const acc z = static_cast<acc>(
      static_cast<scalar_t>(static_cast<acc>(down[i]) + static_cast<acc>(down_b[t * padded + u])));
  down[i] = keep ? static_cast<scalar_t>(activate(z, act)) : scalar_t(0);
}

template <int64_t kCode>
using Act = std::integral_constant<int64_t, kCode>;

// The same a 16-byte vector per thread (R a multiple of a vector, down_b aligned): one task id and config read per
// vector instead of per element (the element kernel: 4.7 us for 1 MiB in and out, profiled on the H200 at R 64), the
// activation chosen once. Not yet run or timed.
template <typename scalar_t>
__global__ void adapter_act_vec_kernel(scalar_t* __restrict__ down, const scalar_t* __restrict__ down_b,
                                       const int64_t* __restrict__ task_ids, const int64_t* __restrict__ config,
                                       int64_t slots, int64_t vecs, int64_t tokens, int64_t padded) {
  using acc = acc_t<scalar_t>;
  constexpr int V = vec_elems<scalar_t>();
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= vecs) return;
  const int64_t pv = padded / V, m = i / pv, u0 = (i % pv) * V;
  acc z[V];
  unpack<scalar_t>(raw_vec(down, i), z);  // before the task id: it does not depend on it
  const int64_t t = slot_of(task_ids, m / tokens, slots);
  if (t < 0) return;
  const uint4 bq = raw_vec(down_b + t * padded, u0 / V);  // with the config, before its check
  const int64_t* c = config + t * kAdapterConfigColumns;
  const int64_t act = c[kAdapterActivation];
  const bool enabled = c[kAdapterEnabled] != 0;
  const int64_t r = c[kAdapterBottleneck];
  CUDA_KERNEL_ASSERT(act >= 0 && act < kAdapterActivationCount && "pets: unknown adapter activation code");
  acc b[V];
  unpack<scalar_t>(bq, b);
#pragma unroll
  for (int e = 0; e < V; ++e) {
    // The down matmul's output (rounded by cuBLAS) plus the slot's bias, rounded as the bias add would be.
    z[e] = static_cast<acc>(static_cast<scalar_t>(z[e] + b[e]));
  }
  const auto apply = [&](auto code) {  // code: a constant, so activate() folds to its one formula
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const bool keep = enabled && u0 + e < r;
      z[e] = keep ? static_cast<acc>(static_cast<scalar_t>(activate(z[e], code.value))) : acc(0);
    }
  };
  switch (act) {
    case kActRelu: apply(Act<kActRelu>{}); break;
    case kActSilu: apply(Act<kActSilu>{}); break;
    case kActGelu: apply(Act<kActGelu>{}); break;
    case kActGeluTanh: apply(Act<kActGeluTanh>{}); break;
    case kActTanh: apply(Act<kActTanh>{}); break;
    case kActSigmoid: apply(Act<kActSigmoid>{}); break;
    case kActLeakyRelu: apply(Act<kActLeakyRelu>{}); break;
    default: apply(Act<kActIdentity>{}); break;
  }
  reinterpret_cast<uint4*>(down)[i] = pack<scalar_t>(z);
}

// adapter_out runs only the groups of kThreads / kWarp tokens that hold a row with an adapter, spread evenly over a
// grid the GPU holds at once: each block first lists the batch rows with an adapter (kScanRows at most; past that
// every row counts), then takes busy groups blockIdx.x, blockIdx.x + gridDim.x, ... One block a group (1,024 blocks
// at bs64 s128, 2 resident an SM at 88 registers) took 10.7 us with 4 of 5 rows without an adapter (H200): blocks
// with nothing to do held the SMs for their task id -> config chain, wave after wave; 4 consecutive groups a block
// took 18.3 us against adapter_in's 15.9 (H100): the groups of one row are all busy or all idle, and ran one after
// another.
constexpr int kScanRows = 2048;

struct BusyRows {
  int list[kScanRows];  // the busy rows, ascending
  unsigned bits[kScanRows / 32];
  int count;
  int warp_count[kThreads / kWarp];
};

// Every thread of the block: fills `busy` for the batch's rows (all of them busy where there are more than
// kScanRows).
__device__ __forceinline__ void list_busy_rows(BusyRows& busy, const int64_t* __restrict__ task_ids,
                                               const int64_t* __restrict__ config, int64_t slots, int64_t batch) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const bool all = batch > kScanRows;
  int base = 0;
  for (int64_t r0 = 0; r0 < min64(batch, kScanRows); r0 += kThreads) {
    const int64_t r = r0 + threadIdx.x;
    bool on = false;
    if (r < batch) {
      const int64_t t = slot_of(task_ids, r, slots);
      on = all || (t >= 0 && config[t * kAdapterConfigColumns + kAdapterEnabled] != 0);
    }
    const unsigned mask = __ballot_sync(0xffffffffu, on);
    if (lane == 0) {
      busy.warp_count[warp] = __popc(mask);
      if (r - lane < kScanRows) busy.bits[(r - lane) / 32] = mask;
    }
    __syncthreads();
    int before = base;
    for (int w = 0; w < warp; ++w) before += busy.warp_count[w];
    if (on) busy.list[before + __popc(mask & ((1u << lane) - 1u))] = static_cast<int>(r);
    for (int w = 0; w < kThreads / kWarp; ++w) base += busy.warp_count[w];
    __syncthreads();  // warp_count is read before the next round writes it
  }
  if (threadIdx.x == 0) busy.count = base;
  __syncthreads();
}

// z = (up + up_b[t]) * scaling[t] + res, then LN_t(z + residual) when ln_after; rows without an adapter are done.
// kBias: h_bias is given; where res is h, it is h + h_bias[t] (rounded), the block slot's row staged with the others.
// One group of tokens from m0; every thread of the block calls it (it has a barrier).
template <typename scalar_t, bool kBias, int kRows>
__device__ __forceinline__ void adapter_out_group(
    SlotRows<kRows>& sr, const int64_t m0, const scalar_t* __restrict__ h, const scalar_t* __restrict__ residual,
    const int64_t* __restrict__ task_ids, const scalar_t* __restrict__ ln_weight, const scalar_t* __restrict__ ln_bias,
    const scalar_t* __restrict__ ln_weight_delta, const scalar_t* __restrict__ ln_bias_delta, double eps,
    const scalar_t* __restrict__ up_b, const scalar_t* __restrict__ scaling, const int64_t* __restrict__ config,
    const scalar_t* __restrict__ h_bias, int64_t slots, const scalar_t* __restrict__ a_in,
    const scalar_t* __restrict__ up, scalar_t* __restrict__ out, int64_t rows, int64_t tokens, int64_t hidden) {
  using acc = acc_t<scalar_t>;
  constexpr int V = RowRegs<scalar_t>::V;
  const int64_t m = m0 + threadIdx.x / kWarp;
  const int64_t nvec = hidden / V;
  const TokenSlots slots_of = token_slots(task_ids, m, m0, rows, tokens, slots);
  const int64_t t = slots_of.t, tb = slots_of.tb;  // tb: the block's slot (its first token's)
  const int64_t ts = max64(tb, 0);
  const scalar_t* ub = up_b + ts * hidden;
  const scalar_t* wd = ln_weight_delta + ts * hidden;
  const scalar_t* bd = ln_bias_delta + ts * hidden;
  const SlotRowsFetch<kRows> rows_slot = [&] {
    if constexpr (kBias) {
      return fetch_slot_rows<6, scalar_t>({ub, ln_weight, ln_bias, wd, bd, h_bias + ts * hidden}, nvec, tb >= 0);
    } else {
      return fetch_slot_rows<5, scalar_t>({ub, ln_weight, ln_bias, wd, bd}, nvec, tb >= 0);
    }
  }();
  bool enabled = false, ln_after = false, res_h = false;
  acc scale = 0;
  RowRegs<scalar_t> z, res, r2;
  if (t >= 0) {
    const int64_t* c = config + t * kAdapterConfigColumns;  // every column at once
    enabled = c[kAdapterEnabled] != 0;
    res_h = (c[kAdapterOriginalLnBefore] != 0) & (c[kAdapterResidualBeforeLn] != 0);
    ln_after = c[kAdapterOriginalLnAfter] != 0;
    scale = static_cast<acc>(scaling[t]);
    if (enabled) {
      z.load(up + m * hidden, nvec);
      res.load((res_h ? h : a_in) + m * hidden, nvec);
      if (ln_after) r2.load(residual + m * hidden, nvec);
    }
  }
  put_slot_rows(sr, rows_slot);
  if (!enabled) return;
  if constexpr (kBias) {
    if (res_h) res.add_row_slot(nvec, t == tb, sr.v[5], h_bias + t * hidden);  // as pets::bias_delta rounds
  }
  const auto add_up = [&](const auto* ub) {  // ub: the slot's up_b, staged or in global memory
#pragma unroll
    for (int i = 0; i < kMaxVec; ++i) {
      if (!z.has(i, nvec)) continue;
      acc x[V], u[V], r[V];
      z.get(i, x);
      unpack<scalar_t>(raw_vec(ub, z.index(i)), u);
      res.get(i, r);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const acc up_t = static_cast<acc>(static_cast<scalar_t>(x[e] + u[e]));  // the up matmul's output
        x[e] = r[e] + up_t * scale;
      }
      z.set(i, x);  // rounded
    }
  };
  if (t == tb) {
    add_up(sr.v[0]);
  } else {
    add_up(up_b + t * hidden);
  }
  if (ln_after) {
    z.add(r2, nvec);  // rounded
    acc mean, rstd;
    z.ln_stats(nvec, hidden, eps, mean, rstd);
    z.ln_apply_slot(nvec, mean, rstd, t == tb, sr.v + 1, ln_weight, ln_bias, ln_weight_delta + t * hidden,
                    ln_bias_delta + t * hidden);
  }
  z.store(out + m * hidden, nvec);
}

template <typename scalar_t, bool kBias>
__global__ void __launch_bounds__(kThreads)
    adapter_out_kernel(const scalar_t* __restrict__ h, const scalar_t* __restrict__ residual,
                       const int64_t* __restrict__ task_ids, const scalar_t* __restrict__ ln_weight,
                       const scalar_t* __restrict__ ln_bias, const scalar_t* __restrict__ ln_weight_delta,
                       const scalar_t* __restrict__ ln_bias_delta, double eps, const scalar_t* __restrict__ up_b,
                       const scalar_t* __restrict__ scaling, const int64_t* __restrict__ config,
                       const scalar_t* __restrict__ h_bias, int64_t slots, const scalar_t* __restrict__ a_in,
                       const scalar_t* __restrict__ up, scalar_t* __restrict__ out, int64_t rows, int64_t tokens,
                       int64_t hidden) {
  constexpr int kRows = kBias ? 6 : 5;
  constexpr int64_t kGroup = kThreads / kWarp;
  __shared__ SlotRows<kRows> sr;  // up_b, then the LayerNorm's rows (and the h_bias row)
  __shared__ BusyRows busy;
  const int64_t batch = rows / tokens;
  list_busy_rows(busy, task_ids, config, slots, batch);
  const auto run = [&](int64_t m0) {
    adapter_out_group<scalar_t, kBias, kRows>(sr, m0, h, residual, task_ids, ln_weight, ln_bias, ln_weight_delta,
                                              ln_bias_delta, eps, up_b, scaling, config, h_bias, slots, a_in, up,
                                              out, rows, tokens, hidden);
    __syncthreads();  // the group's staged rows are read before the next group's overwrite them
  };
  if (tokens % kGroup == 0 && batch <= kScanRows) {  // a group within one row: the k-th busy group is direct
    const int64_t per_row = tokens / kGroup, total = busy.count * per_row;
    for (int64_t k = blockIdx.x; k < total; k += gridDim.x) {
      run(busy.list[k / per_row] * tokens + (k % per_row) * kGroup);
    }
    return;
  }
  const int64_t groups = ceil_div(rows, kGroup);
  for (int64_t g = blockIdx.x; g < groups; g += gridDim.x) {  // a group across rows runs if one of them is busy
    const int64_t first = g * kGroup / tokens, last = (min64((g + 1) * kGroup, rows) - 1) / tokens;
    bool any = batch > kScanRows;
    for (int64_t r = first; r <= last && !any; ++r) any = (busy.bits[r / 32] >> (r % 32)) & 1u;
    if (any) run(g * kGroup);
  }
}

}  // namespace

at::Tensor adapter(const at::Tensor& h, const at::Tensor& residual, const at::Tensor& task_ids,
                   const at::Tensor& ln_weight, const at::Tensor& ln_bias, const at::Tensor& ln_weight_delta,
                   const at::Tensor& ln_bias_delta, double eps, const at::Tensor& down_w, const at::Tensor& down_b,
                   const at::Tensor& up_w, const at::Tensor& up_b, const at::Tensor& scaling,
                   const at::Tensor& config, const std::optional<at::Tensor>& h_bias) {
  check_adapter_inputs(h, residual, task_ids, ln_weight, ln_bias, ln_weight_delta, ln_bias_delta, down_w, down_b,
                       up_w, up_b, scaling, config, h_bias);
  const c10::cuda::OptionalCUDAGuard guard(h.device());
  const at::Tensor h3 = as_rows(h).contiguous(), res3 = as_rows(residual).contiguous();
  const at::Tensor ids = task_ids.contiguous(), cfg = config.contiguous();
  const at::Tensor lw = ln_weight.contiguous(), lb = ln_bias.contiguous();
  const at::Tensor lwd = ln_weight_delta.contiguous(), lbd = ln_bias_delta.contiguous();
  const at::Tensor dw = down_w.contiguous(), db = down_b.contiguous(), uw = up_w.contiguous();
  const at::Tensor ub = up_b.contiguous(), sc = scaling.contiguous();
  const at::Tensor hb = h_bias.has_value() ? h_bias->contiguous() : at::Tensor();
  // The slot count the kernels check task ids against: every table's (the config's, and h_bias's where given).
  const int64_t slots = hb.defined() ? std::min(cfg.size(0), hb.size(0)) : cfg.size(0);
  at::Tensor out = at::empty(h.sizes(), h.options());
  if (out.numel() == 0) return out;
  const int64_t tokens = h3.size(1), hidden = h3.size(2), padded = dw.size(1);
  const at::ScalarType dtype = h.scalar_type();
  const bool fit = rows_fit(hidden, {&h3, &res3, &lw, &lb, &lwd, &lbd, &ub, &out}) &&
                   (!hb.defined() || vectorizable(hb, hidden));
  if (padded > 0 && fit) {
    const int64_t rows = h3.size(0) * tokens;
    const unsigned blocks = static_cast<unsigned>(ceil_div(rows, kThreads / kWarp));
    at::Tensor a_in = at::empty_like(h3);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "pets::adapter", [&] {
      const auto kernel = hb.defined() ? adapter_in_kernel<scalar_t, true> : adapter_in_kernel<scalar_t, false>;
      kernel<<<blocks, kThreads, 0, stream()>>>(
          h3.const_data_ptr<scalar_t>(), res3.const_data_ptr<scalar_t>(), ids.const_data_ptr<int64_t>(),
          lw.const_data_ptr<scalar_t>(), lb.const_data_ptr<scalar_t>(), lwd.const_data_ptr<scalar_t>(),
          lbd.const_data_ptr<scalar_t>(), eps, cfg.const_data_ptr<int64_t>(), data_or_null<scalar_t>(hb), slots,
          out.mutable_data_ptr<scalar_t>(), a_in.mutable_data_ptr<scalar_t>(), rows, tokens, hidden);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    // A task id outside the tables trips slot_gemm's device assert, like the kernels'.
    at::Tensor down = at::empty({h3.size(0), tokens, padded}, h3.options());
    at::Tensor up = at::empty_like(h3);  // [B, N, H]
    // Each row times its own slot's down_w, read in place; rows without an adapter are left out (the activation
    // writes zeros over their `down` rows without reading them into anything kept). Then every row for the up
    // projection: rows without an adapter read `down`'s zeros and their `up` rows are never read. Leaving them out
    // made it slower (8.2 us against 7.4 at bert-base sizes, bs64 s128, 4 of 5 rows without an adapter, profiled on
    // the H200: their writes all go to one shared output), while the down projection went from 8.1 to 5.7 us. One
    // pointer kernel for both (slot_gemms; two took 1.2 us each).
    const SlotSkip no_adapter{cfg.const_data_ptr<int64_t>() + kAdapterEnabled, kAdapterConfigColumns};
    const auto activation = [&](size_t gemm) {
      if (gemm != 0) return;
      const int64_t total = down.numel();
      const bool act_vec = vectorizable(down, padded) && vectorizable(db, padded);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "pets::adapter", [&] {
        if (act_vec) {
          const int64_t vecs = total / vec_elems<scalar_t>();
          adapter_act_vec_kernel<scalar_t><<<static_cast<unsigned>(ceil_div(vecs, 256)), 256, 0, stream()>>>(
              down.mutable_data_ptr<scalar_t>(), db.const_data_ptr<scalar_t>(), ids.const_data_ptr<int64_t>(),
              cfg.const_data_ptr<int64_t>(), cfg.size(0), vecs, tokens, padded);
        } else {
          adapter_act_kernel<scalar_t><<<static_cast<unsigned>(ceil_div(total, 256)), 256, 0, stream()>>>(
              down.mutable_data_ptr<scalar_t>(), db.const_data_ptr<scalar_t>(), ids.const_data_ptr<int64_t>(),
              cfg.const_data_ptr<int64_t>(), cfg.size(0), total, tokens, padded);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    };
    slot_gemms(ids, {{a_in, dw, down, no_adapter}, {down, uw, up}}, activation);
    // adapter_out's grid: as many blocks as the GPU holds at once (2 an SM at its registers), at most one a group
    const unsigned out_blocks = static_cast<unsigned>(std::min<int64_t>(blocks, 2 * multiprocessor_count()));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "pets::adapter", [&] {
      const auto kernel = hb.defined() ? adapter_out_kernel<scalar_t, true> : adapter_out_kernel<scalar_t, false>;
      kernel<<<out_blocks, kThreads, 0, stream()>>>(
          h3.const_data_ptr<scalar_t>(), res3.const_data_ptr<scalar_t>(), ids.const_data_ptr<int64_t>(),
          lw.const_data_ptr<scalar_t>(), lb.const_data_ptr<scalar_t>(), lwd.const_data_ptr<scalar_t>(),
          lbd.const_data_ptr<scalar_t>(), eps, ub.const_data_ptr<scalar_t>(), sc.const_data_ptr<scalar_t>(),
          cfg.const_data_ptr<int64_t>(), data_or_null<scalar_t>(hb), slots, a_in.const_data_ptr<scalar_t>(),
          up.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), rows, tokens, hidden);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return out;
  }
  const dim3 grid(static_cast<unsigned>(h3.size(0)),
                  static_cast<unsigned>(ceil_div(tokens, adapter_fused::kTokens)));
  TORCH_CHECK(grid.y <= 65535, "pets::adapter: ", tokens, " tokens per row is more than the kernel's ",
              65535 * adapter_fused::kTokens);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "pets::adapter", [&] {
    const size_t shared = static_cast<size_t>(adapter_fused::kTokens) * (hidden + padded) * sizeof(acc_t<scalar_t>);
    allow_shared_memory("pets::adapter", adapter_fused::kernel<scalar_t>, shared, "the hidden size and bottleneck");
    adapter_fused::kernel<scalar_t><<<grid, adapter_fused::kThreads, shared, stream()>>>(
        h3.const_data_ptr<scalar_t>(), res3.const_data_ptr<scalar_t>(), ids.const_data_ptr<int64_t>(),
        lw.const_data_ptr<scalar_t>(), lb.const_data_ptr<scalar_t>(), lwd.const_data_ptr<scalar_t>(),
        lbd.const_data_ptr<scalar_t>(), eps, dw.const_data_ptr<scalar_t>(), db.const_data_ptr<scalar_t>(),
        uw.const_data_ptr<scalar_t>(), ub.const_data_ptr<scalar_t>(), sc.const_data_ptr<scalar_t>(),
        cfg.const_data_ptr<int64_t>(), data_or_null<scalar_t>(hb), slots, padded, out.mutable_data_ptr<scalar_t>(),
        tokens, hidden);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace pets::cuda
