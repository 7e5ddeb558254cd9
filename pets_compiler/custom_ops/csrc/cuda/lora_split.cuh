// Low-rank linear_delta as two streaming kernels (shrink, then expand), for tables of padded rank R <= 16 with
// 16-byte-aligned rows: the fused one-block-per-16-tokens kernels are bound by their chains of dependent loads
// (profiled on the H200: 46 us at bert-base sizes, r 8, against a 9 us floor), while each kernel here only streams.
// shrink: h[m, :r] = x[m] @ A[t, :r].T, rounded to the input dtype (as a matmul in that dtype would); a warp takes
// two tokens at a time, lanes across in_features in 16-byte vectors (all of a chunk's x loads in flight), A read
// through L1 (one slot per block). expand: out = y + scale[t] * h @ B[t, :, :r].T (+ bias[t]); the block stages
// the slot's B transposed ([r][out]) and its tokens' scaled h in shared memory, then threads stream y and out in
// 16-byte vectors (kJobs loads in flight each). A slot's rank r bounds both, so table padding is never read.
#pragma once

#include "common.cuh"

namespace pets::cuda::split_lora {

constexpr int kMaxRank = 16;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarp;
constexpr int kShrinkTokens = 32;  // per block: two pairs per warp
constexpr int kExpandTokens = 16;  // per block
constexpr int kChunk = 4;          // x vectors per lane in flight (shrink)
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
    shrink_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ task_ids,
                  const scalar_t* __restrict__ lora_a, const scalar_t* __restrict__ lora_scale,
                  const int64_t* __restrict__ lora_rank, int64_t slots, int64_t table_rank, scalar_t* __restrict__ h,
                  int64_t tokens, int64_t in_features) {
  using acc = acc_t<scalar_t>;
  constexpr int V = kVecBytes / sizeof(scalar_t);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t row = blockIdx.x;
  const int64_t tok0 = static_cast<int64_t>(blockIdx.y) * kShrinkTokens;
  const int count = static_cast<int>(min64(kShrinkTokens, tokens - tok0));
  const int64_t m0 = row * tokens + tok0;
  const int64_t t = slot_of(task_ids, row, slots);
  float s;
  const int r = slot_rank(t, lora_scale, lora_rank, table_rank, s);
  if (r == 0) return;  // expand reads no h for this row
  const scalar_t* a = lora_a + t * table_rank * in_features;
  const int64_t nvec = in_features / V;
  for (int tm = warp * 2; tm < count; tm += kWarps * 2) {
    const bool two = tm + 1 < count;
    const scalar_t* x0 = x + (m0 + tm) * in_features;
    const scalar_t* x1 = two ? x0 + in_features : x0;
    acc p0[kMaxRank], p1[kMaxRank];
#pragma unroll
    for (int j = 0; j < kMaxRank; ++j) p0[j] = p1[j] = acc(0);
    for (int64_t v0 = lane; v0 < nvec; v0 += kWarp * kChunk) {
      Vec<scalar_t> xa[kChunk], xb[kChunk];
#pragma unroll
      for (int u = 0; u < kChunk; ++u) {
        const int64_t v = v0 + u * kWarp;
        xa[u] = v < nvec ? load_vec<scalar_t>(x0, v) : Vec<scalar_t>{};
        xb[u] = v < nvec ? load_vec<scalar_t>(x1, v) : Vec<scalar_t>{};
      }
#pragma unroll
      for (int j = 0; j < kMaxRank; ++j) {
        if (j >= r) break;
#pragma unroll
        for (int u = 0; u < kChunk; ++u) {
          const int64_t v = v0 + u * kWarp;
          if (v >= nvec) break;
          const Vec<scalar_t> av = load_vec<scalar_t>(a + j * in_features, v);
#pragma unroll
          for (int e = 0; e < V; ++e) {
            const acc w = static_cast<acc>(av.v[e]);
            p0[j] += static_cast<acc>(xa[u].v[e]) * w;
            p1[j] += static_cast<acc>(xb[u].v[e]) * w;
          }
        }
      }
    }
    acc h0 = 0, h1 = 0;
#pragma unroll
    for (int j = 0; j < kMaxRank; ++j) {
      if (j >= r) break;
      const acc v0 = warp_sum(p0[j]), v1 = warp_sum(p1[j]);
      if (lane == j) {
        h0 = v0;
        h1 = v1;
      }
    }
    if (lane < r) {
      h[(m0 + tm) * table_rank + lane] = static_cast<scalar_t>(h0);
      if (two) h[(m0 + tm + 1) * table_rank + lane] = static_cast<scalar_t>(h1);
    }
  }
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
