// Low-rank linear_delta as two streaming steps, for tables of padded rank R <= 16 with 16-byte-aligned rows: the
// fused one-block-per-16-tokens kernels are bound by their chains of dependent loads (profiled on the H200: 46 us
// at bert-base sizes, r 8, against a 9 us floor), and a CUDA-core shrink costs 2 * in * R fp32 instructions per
// token (measured: 40 us at r 8, 62 at r 16). shrink (lora.cu): h = x @ A[t].T on tensor cores through cuBLAS
// (slot_gemm.h), rounded to the input dtype. expand (here): out = y + scale[t] * h[:, :r] @ B[t, :, :r].T
// (+ bias[t]); the block stages the slot's B transposed ([r][out]) and its tokens' scaled h in shared memory, then
// threads stream y and out in 16-byte vectors (kJobs loads in flight each). A slot's rank r bounds the expand, so
// table padding beyond r never reaches the output.
#pragma once

#include "common.cuh"

namespace pets::cuda::split_lora {

constexpr int kMaxRank = 16;
constexpr int kThreads = 256;
constexpr int kExpandTokens = 16;  // per block
constexpr int kJobs = 4;           // y vectors per thread in flight (expand)

// The slot's rank clamped to [0, R] (0 where its scale is 0: no term), after a device-side check.
template <typename scalar_t>
__device__ __forceinline__ int slot_rank(int64_t t, const scalar_t* lora_scale, const int64_t* lora_rank,
                                         int64_t table_rank, float& s) {
  s = 0.f;
  if (t < 0) return 0;
  const int64_t rk = lora_rank[t];
  CUDA_KERNEL_ASSERT(rk >= 0 && rk <= table_rank && "pets: a LoRA rank is outside [0, R]");
  s = static_cast<float>(lora_scale[t]);
  return s == 0.f ? 0 : static_cast<int>(max64(0, min64(rk, table_rank)));
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    expand_kernel(const scalar_t* __restrict__ y, const scalar_t* __restrict__ h,
                  const int64_t* __restrict__ task_ids, const scalar_t* __restrict__ lora_b,
                  const scalar_t* __restrict__ lora_scale, const int64_t* __restrict__ lora_rank, int64_t lora_slots,
                  int64_t table_rank, const scalar_t* __restrict__ bias, int64_t bias_slots,
                  scalar_t* __restrict__ out, int64_t tokens, int64_t out_features) {
  using acc = acc_t<scalar_t>;
  constexpr int V = kVecBytes / sizeof(scalar_t);
  extern __shared__ __align__(16) unsigned char shared_raw[];
  scalar_t* bt = reinterpret_cast<scalar_t*>(shared_raw);  // [r][out_features]: B[t] transposed
  __shared__ acc hs[kExpandTokens][kMaxRank];              // scale * h

  const int64_t row = blockIdx.x;
  const int64_t tok0 = static_cast<int64_t>(blockIdx.y) * kExpandTokens;
  const int count = static_cast<int>(min64(kExpandTokens, tokens - tok0));
  const int64_t m0 = row * tokens + tok0;
  float s;
  const int r = slot_rank(slot_of(task_ids, row, lora_slots), lora_scale, lora_rank, table_rank, s);
  const int64_t t = r > 0 ? task_ids[row] : 0;
  const int64_t t_bias = bias != nullptr ? slot_of(task_ids, row, bias_slots) : -1;
  const scalar_t* bias_t = t_bias >= 0 ? bias + t_bias * out_features : nullptr;

  if (r > 0) {
    for (int i = threadIdx.x; i < count * r; i += kThreads) {
      const int tm = i / r, j = i % r;
      hs[tm][j] = static_cast<acc>(s) * static_cast<acc>(h[(m0 + tm) * table_rank + j]);
    }
    // B[t] is one contiguous [out, R] block: read it in order, keep ranks below r, transposed.
    const scalar_t* b = lora_b + t * out_features * table_rank;
    const int64_t n = out_features * table_rank;
    if (table_rank % V == 0) {
      for (int64_t q = threadIdx.x; q < n / V; q += kThreads) {
        const Vec<scalar_t> bv = load_vec<scalar_t>(b, q);
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const int64_t i = q * V + e, o = i / table_rank, j = i % table_rank;
          if (j < r) bt[j * out_features + o] = bv.v[e];
        }
      }
    } else {
      for (int64_t i = threadIdx.x; i < n; i += kThreads) {
        const int64_t o = i / table_rank, j = i % table_rank;
        if (j < r) bt[j * out_features + o] = b[i];
      }
    }
  }
  __syncthreads();

  const int ovecs = static_cast<int>(out_features / V);
  const int jobs = count * ovecs;
  for (int j0 = threadIdx.x; j0 < jobs; j0 += kThreads * kJobs) {
    Vec<scalar_t> yv[kJobs], bv[kJobs];
#pragma unroll
    for (int u = 0; u < kJobs; ++u) {  // every load of the batch first
      const int job = j0 + u * kThreads;
      const int tm = job / ovecs, ov = job % ovecs;
      yv[u] = job < jobs ? load_vec<scalar_t>(y + (m0 + tm) * out_features, ov) : Vec<scalar_t>{};
      bv[u] = (job < jobs && bias_t != nullptr) ? load_vec<scalar_t>(bias_t, ov) : Vec<scalar_t>{};
    }
#pragma unroll
    for (int u = 0; u < kJobs; ++u) {
      const int job = j0 + u * kThreads;
      if (job >= jobs) break;
      const int tm = job / ovecs, ov = job % ovecs;
      Vec<scalar_t> o = yv[u];  // bitwise y when there is no term
      if (r > 0 || bias_t != nullptr) {
        acc z[V];
#pragma unroll
        for (int e = 0; e < V; ++e) z[e] = 0;
        for (int j = 0; j < r; ++j) {
          const acc hj = hs[tm][j];
          const Vec<scalar_t> bj = load_vec<scalar_t>(bt + j * out_features, ov);
#pragma unroll
          for (int e = 0; e < V; ++e) z[e] += hj * static_cast<acc>(bj.v[e]);
        }
#pragma unroll
        for (int e = 0; e < V; ++e) {
          acc v = static_cast<acc>(yv[u].v[e]) + z[e];
          if (bias_t != nullptr) v += static_cast<acc>(bv[u].v[e]);
          o.v[e] = static_cast<scalar_t>(v);
        }
      }
      reinterpret_cast<Vec<scalar_t>*>(out + (m0 + tm) * out_features)[ov] = o;
    }
  }
}

}  // namespace pets::cuda::split_lora
