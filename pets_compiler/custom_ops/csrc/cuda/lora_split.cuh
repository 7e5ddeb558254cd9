// Low-rank linear_delta as two streaming steps, for tables of padded rank R <= 16 with 16-byte-aligned rows: the
// fused one-block-per-16-tokens kernels are bound by their chains of dependent loads (profiled on the H200: 46 us
// at bert-base sizes, r 8, against a 9 us floor), and a CUDA-core shrink costs 2 * in * R fp32 instructions per
// token (measured: 40 us at r 8, 62 at r 16). shrink (lora.cu): h = x @ A[t].T on tensor cores through cuBLAS
// (slot_gemm.h), rounded to the input dtype. expand (here): out = y + scale[t] * h[:, :r] @ B[t, :, :r].T
// (+ bias[t]). A block owns a tile of kTileTokens tokens of one row by kTileCols output features: it issues its
// y loads first (16-byte vectors, in flight while it stages), stages its slice of B[t] transposed ([r][cols]) and
// its tokens' scaled h in shared memory, then each thread adds the term to its column vector of several tokens.
// (The first expand staged all of B[t] for every 16 tokens: 23.8 us of the 28.6 at r 8, profiled on the H200.)
// A slot's rank r bounds the expand, so table padding beyond r never reaches the output.
#pragma once

#include "common.cuh"

namespace pets::cuda::split_lora {

constexpr int kMaxRank = 16;
constexpr int kThreads = 256;
constexpr int kTileTokens = 32;   // tokens of one row per block (expand; 64 takes 128 registers a thread)
constexpr int kTileCols = 128;    // output features per block (expand)

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
  constexpr int kColVecs = kTileCols / V;         // threads across a token's columns
  constexpr int kTokLanes = kThreads / kColVecs;  // threads across tokens
  constexpr int kPer = kTileTokens / kTokLanes;   // tokens per thread
  static_assert(kThreads % kColVecs == 0 && kTileTokens % kTokLanes == 0, "expand tile");
  __shared__ acc hs[kTileTokens][kMaxRank];                 // scale * h, 0 past the tile's tokens
  __shared__ __align__(kVecBytes) scalar_t bt[kMaxRank][kTileCols];  // B[t] transposed, this tile's columns

  const int64_t ttiles = ceil_div(tokens, kTileTokens);
  const int64_t row = blockIdx.x / ttiles;
  const int64_t tok0 = (blockIdx.x % ttiles) * kTileTokens;
  const int count = static_cast<int>(min64(kTileTokens, tokens - tok0));
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kTileCols;
  const int cols = static_cast<int>(min64(kTileCols, out_features - c0));  // a multiple of V (16-byte rows)
  const int64_t m0 = row * tokens + tok0;
  const int lane_c = threadIdx.x % kColVecs, lane_t = threadIdx.x / kColVecs;
  const bool col_ok = lane_c * V < cols;
  const int64_t ov = c0 / V + lane_c;  // this thread's vector of each token's output row

  Vec<scalar_t> yv[kPer];  // every y load first: in flight while the block stages its tables
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    const int tm = lane_t + k * kTokLanes;
    yv[k] = (col_ok && tm < count) ? load_vec<scalar_t>(y + (m0 + tm) * out_features, ov) : Vec<scalar_t>{};
  }
  float s;
  const int r = slot_rank(slot_of(task_ids, row, lora_slots), lora_scale, lora_rank, table_rank, s);
  const int64_t t = r > 0 ? task_ids[row] : 0;
  const int64_t t_bias = bias != nullptr ? slot_of(task_ids, row, bias_slots) : -1;
  const scalar_t* bias_t = t_bias >= 0 ? bias + t_bias * out_features : nullptr;
  const Vec<scalar_t> bv = (col_ok && bias_t != nullptr) ? load_vec<scalar_t>(bias_t, ov) : Vec<scalar_t>{};

  if (r > 0) {
    for (int i = threadIdx.x; i < kTileTokens * r; i += kThreads) {
      const int tm = i / r, j = i % r;
      hs[tm][j] = tm < count ? static_cast<acc>(s) * static_cast<acc>(h[(m0 + tm) * table_rank + j]) : acc(0);
    }
    // This tile's rows of B[t] are one contiguous [cols, R] block; ranks below r, transposed.
    const scalar_t* b = lora_b + (t * out_features + c0) * table_rank;
    for (int i = threadIdx.x; i < cols * r; i += kThreads) {
      const int j = i / cols, c = i % cols;
      bt[j][c] = b[c * table_rank + j];
    }
  }
  __syncthreads();
  if (!col_ok) return;

  acc z[kPer][V];
#pragma unroll
  for (int k = 0; k < kPer; ++k)
#pragma unroll
    for (int e = 0; e < V; ++e) z[k][e] = 0;
  for (int j = 0; j < r; ++j) {
    const Vec<scalar_t> bj = *reinterpret_cast<const Vec<scalar_t>*>(&bt[j][lane_c * V]);
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      const acc hj = hs[lane_t + k * kTokLanes][j];
#pragma unroll
      for (int e = 0; e < V; ++e) z[k][e] += hj * static_cast<acc>(bj.v[e]);
    }
  }
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    const int tm = lane_t + k * kTokLanes;
    if (tm >= count) break;
    Vec<scalar_t> o = yv[k];  // bitwise y when there is no term
    if (r > 0 || bias_t != nullptr) {
#pragma unroll
      for (int e = 0; e < V; ++e) {
        acc v = static_cast<acc>(yv[k].v[e]) + z[k][e];
        if (bias_t != nullptr) v += static_cast<acc>(bv.v[e]);
        o.v[e] = static_cast<scalar_t>(v);
      }
    }
    reinterpret_cast<Vec<scalar_t>*>(out + (m0 + tm) * out_features)[ov] = o;
  }
}

}  // namespace pets::cuda::split_lora
