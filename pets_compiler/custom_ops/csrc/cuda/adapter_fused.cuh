// pets::adapter in one kernel, for rows that do not fit the fast path of adapter.cu (hidden not a multiple of 16
// bytes, or above 1024 half features): a block takes kTokens tokens of one batch row (one slot). Warp per token for
// the LayerNorms; the down projection has one warp per bottleneck unit (lanes across H, the weight row read once per
// block for all its tokens), the up projection one thread per hidden feature. Intermediates stay in shared memory in
// acc. With h_bias, h + h_bias[t] (rounded) is formed wherever h is read.
#pragma once

#include "../adapter/adapter.h"
#include "adapter_activation.cuh"
#include "common.cuh"
#include "layer_norm.cuh"

namespace pets::cuda::adapter_fused {

constexpr int kTokens = 8;
constexpr int kChunk = 8;      // weights loaded together before use
constexpr int kThreads = 256;  // kTokens warps: one per token in the LayerNorm phases

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    kernel(const scalar_t* __restrict__ h, const scalar_t* __restrict__ residual,
                   const int64_t* __restrict__ task_ids, const scalar_t* __restrict__ ln_weight,
                   const scalar_t* __restrict__ ln_bias, const scalar_t* __restrict__ ln_weight_delta,
                   const scalar_t* __restrict__ ln_bias_delta, double eps, const scalar_t* __restrict__ down_w,
                   const scalar_t* __restrict__ down_b, const scalar_t* __restrict__ up_w,
                   const scalar_t* __restrict__ up_b, const scalar_t* __restrict__ scaling,
                   const int64_t* __restrict__ config, const scalar_t* __restrict__ h_bias, int64_t slots,
                   int64_t padded, scalar_t* __restrict__ out, int64_t tokens, int64_t hidden) {
  using acc = acc_t<scalar_t>;
  extern __shared__ __align__(16) unsigned char shared_raw[];
  acc* s_a = reinterpret_cast<acc*>(shared_raw);  // [kTokens][hidden]: the adapter's input, later z (+ residual)
  acc* s_d = s_a + kTokens * hidden;               // [kTokens][padded]: the activated bottleneck

  const int64_t row = blockIdx.x;
  const int64_t tok0 = static_cast<int64_t>(blockIdx.y) * kTokens;
  const int count = static_cast<int>(min64(kTokens, tokens - tok0));
  const int64_t m0 = row * tokens + tok0;
  const int64_t t = slot_of(task_ids, row, slots);
  if (t < 0) return;
  const int64_t* c = config + t * kAdapterConfigColumns;
  const bool enabled = c[kAdapterEnabled] != 0, ln_before = c[kAdapterOriginalLnBefore] != 0;
  const bool res_h = ln_before && c[kAdapterResidualBeforeLn] != 0, ln_after = c[kAdapterOriginalLnAfter] != 0;
  const int64_t act = c[kAdapterActivation];
  CUDA_KERNEL_ASSERT(act >= 0 && act < kAdapterActivationCount && "pets: unknown adapter activation code");
  const int64_t r = min64(max64(c[kAdapterBottleneck], 0), padded);
  CUDA_KERNEL_ASSERT(c[kAdapterBottleneck] >= 0 && c[kAdapterBottleneck] <= padded && "pets: bottleneck outside [0, R]");
  const scalar_t* wd = ln_weight_delta + t * hidden;
  const scalar_t* bd = ln_bias_delta + t * hidden;
  const scalar_t* hb = h_bias == nullptr ? nullptr : h_bias + t * hidden;  // null: no h_bias
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;

  // 1. LN_t(h + residual): the output itself without an adapter, else the adapter's input when ln_before.
  if (warp < count) {
    const int64_t m = m0 + warp;
    const scalar_t* hr = h + m * hidden;
    const scalar_t* rr = residual + m * hidden;
    acc* a = s_a + warp * hidden;
    scalar_t* outr = out + m * hidden;
    // (h + h_bias[t]) + residual, each sum rounded to scalar_t as pets::bias_delta and the backbone's add round it:
    // rows without an adapter are then bitwise pets::layer_norm(h + h_bias[t], residual).
    const auto load = [&](int64_t j) { return add_terms<acc>(hr[j], hb, rr, j); };
    if (!enabled) {
      warp_layer_norm<acc>(load, [&](int64_t j, acc v) { outr[j] = static_cast<scalar_t>(v); }, hidden,
                           static_cast<acc>(eps), ln_weight, ln_bias, wd, bd);
    } else if (ln_before) {
      warp_layer_norm<acc>(load, [&](int64_t j, acc v) { a[j] = v; }, hidden, static_cast<acc>(eps), ln_weight,
                           ln_bias, wd, bd);
    } else {
      for (int64_t j = lane; j < hidden; j += kWarp) a[j] = add_terms<acc, scalar_t>(hr[j], hb, nullptr, j);
    }
  }
  if (!enabled) return;  // the same for the whole block: one slot
  __syncthreads();

  // 2. d = act(a @ down_w[t, :r].T + down_b[t, :r]): one warp per unit, all the block's tokens at once.
  for (int64_t u = warp; u < r; u += blockDim.x / kWarp) {
    const scalar_t* w = down_w + (t * padded + u) * hidden;
    acc part[kTokens];
#pragma unroll
    for (int tm = 0; tm < kTokens; ++tm) part[tm] = 0;
    for (int64_t j0 = lane; j0 < hidden; j0 += kWarp * kChunk) {
      acc wv[kChunk];  // kChunk strided weights in flight together
#pragma unroll
      for (int e = 0; e < kChunk; ++e) {
        const int64_t j = j0 + e * kWarp;
        wv[e] = j < hidden ? static_cast<acc>(w[j]) : acc(0);
      }
#pragma unroll
      for (int tm = 0; tm < kTokens; ++tm) {
        if (tm < count) {
#pragma unroll
          for (int e = 0; e < kChunk; ++e) {
            const int64_t j = j0 + e * kWarp;
            if (j < hidden) part[tm] += s_a[tm * hidden + j] * wv[e];
          }
        }
      }
    }
    const acc bias_u = static_cast<acc>(down_b[t * padded + u]);
#pragma unroll
    for (int tm = 0; tm < kTokens; ++tm) {
      if (tm < count) {
        const acc v = warp_sum(part[tm]);
        if (lane == 0) s_d[tm * padded + u] = activate(v + bias_u, act);
      }
    }
  }
  __syncthreads();

  // 3. z = (d @ up_w[t, :, :r].T + up_b[t]) * scaling[t] + res; then z + residual into s_a for the last LN.
  const acc scale = static_cast<acc>(scaling[t]);
  for (int64_t j = threadIdx.x; j < hidden; j += blockDim.x) {
    const scalar_t* w = up_w + (t * hidden + j) * padded;
    acc sum[kTokens];
#pragma unroll
    for (int tm = 0; tm < kTokens; ++tm) sum[tm] = 0;
    for (int64_t u0 = 0; u0 < r; u0 += kChunk) {
      // The chunk's weights first (independent loads in flight together), then the products.
      const int64_t uc = min64(kChunk, r - u0);
      acc wv[kChunk];
#pragma unroll
      for (int e = 0; e < kChunk; ++e) wv[e] = e < uc ? static_cast<acc>(w[u0 + e]) : acc(0);
#pragma unroll
      for (int tm = 0; tm < kTokens; ++tm) {
        if (tm < count) {
          const acc* d = s_d + tm * padded + u0;
#pragma unroll
          for (int e = 0; e < kChunk; ++e) {
            if (e < uc) sum[tm] += d[e] * wv[e];
          }
        }
      }
    }
    const acc bias_j = static_cast<acc>(up_b[t * hidden + j]);
    for (int tm = 0; tm < count; ++tm) {
      const int64_t i = (m0 + tm) * hidden + j;
      const acc res = res_h ? add_terms<acc, scalar_t>(h[i], hb, nullptr, j) : s_a[tm * hidden + j];
      const acc z = (sum[tm] + bias_j) * scale + res;
      if (ln_after) {
        // rounded as the CPU kernel rounds: z, then z + residual
        const acc zr = static_cast<acc>(static_cast<scalar_t>(z));
        s_a[tm * hidden + j] = static_cast<acc>(static_cast<scalar_t>(zr + static_cast<acc>(residual[i])));
      } else {
        out[i] = static_cast<scalar_t>(z);
      }
    }
  }
  if (!ln_after) return;
  __syncthreads();

  // 4. LN_t(z + residual).
  if (warp < count) {
    const acc* a = s_a + warp * hidden;
    scalar_t* outr = out + (m0 + warp) * hidden;
    warp_layer_norm<acc>([&](int64_t j) { return a[j]; }, [&](int64_t j, acc v) { outr[j] = static_cast<scalar_t>(v); },
                         hidden, static_cast<acc>(eps), ln_weight, ln_bias, wd, bd);
  }
}

}  // namespace pets::cuda::adapter_fused
