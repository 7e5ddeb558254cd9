// The shrink of the split LoRA path for fp16 and bf16 (lora_split.cuh): h = x @ A[t].T on tensor cores, h [B, N, R]
// rounded to the input dtype, for tables of padded rank R <= 16 with 16-byte-aligned rows. A block owns
// kShrinkTokens tokens of one batch row, so one slot; a slot without LoRA here (rank or scale 0) returns at once,
// reading no x and writing no h (the expand reads no h for it). Its warps split in_features in chunks of 32 and each
// computes h.T for all the block's tokens over its chunks (mma.sync m16n8k16: M = the 16 ranks, N = 8 tokens, K =
// 16 features, fp32), then the block sums the warps' partial products in a fixed order.
// Each lane loads whole 16-byte vectors straight from global memory: lane (g, q) of a chunk reads features
// 8q .. 8q + 7 of token g's x row and of A's rows g and g + 8. The mma's K order is a permutation of the features,
// the same for both operands, so the first mma of a chunk takes each lane's words 0-1 and the second words 2-3.
// Rows of A from the slot's rank r on count as zeros (table padding never reaches h).
// __launch_bounds__(256, 2) leaves it the registers to hold a round's 18 vectors a lane: with 80 registers nvcc
// interleaved the loads with the mmas, several dependent steps (ncu: 80% of issue slots idle on L1TEX waits).
// Times in the mix_dense program at bert-base sizes, bs64 s128, H200 (2 rows in 5 with LoRA): cuBLAS's pointer-array
// GEMM plus its pointer kernel, every row: 5.6 + 1.3 us a site; this kernel with interleaved loads 5.6; now 4.8.
#pragma once

#include "lora_split.cuh"

namespace pets::cuda::split_lora {

constexpr int kShrinkTokens = 32;  // tokens a block: 4 mma column groups of 8
constexpr int kShrinkWarps = 8;    // warps a block, across in_features
constexpr int kChunk = 32;         // features a warp takes at once: 4 lanes x 8
constexpr int kShrinkUnroll = 3;   // chunks whose loads a warp issues before their mmas (3 x 8 x 32 = 768)
constexpr int kGroups = kShrinkTokens / 8;

template <typename scalar_t>
__global__ void __launch_bounds__(kShrinkWarps* kWarp, 2)
    shrink_mma_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ task_ids,
                      const scalar_t* __restrict__ lora_a, const scalar_t* __restrict__ lora_scale,
                      const int64_t* __restrict__ lora_rank, int64_t lora_slots, int64_t table_rank,
                      scalar_t* __restrict__ h, int64_t tokens, int64_t in_features) {
  static_assert(kVecBytes / sizeof(scalar_t) == 8 && kChunk == 4 * 8 && kMaxRank == 16, "shrink: lane vectors");
  // Each warp's partial h.T; rows padded by 8 floats: the fragment stores of a warp's 8 ranks fall in distinct banks.
  __shared__ float partial[kShrinkWarps][kMaxRank][kShrinkTokens + 8];

  const int64_t ttiles = ceil_div(tokens, kShrinkTokens);
  const int64_t row = blockIdx.x / ttiles, m0 = row * tokens + (blockIdx.x % ttiles) * kShrinkTokens;
  const int count = static_cast<int>(min64(kShrinkTokens, (row + 1) * tokens - m0));
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, g = lane / 4, q = lane % 4;
  const scalar_t* xg = x + (m0 + g) * in_features;  // token g of group 0; group n is 8n tokens further
  float d[kGroups][4] = {};
  // Every warp runs the same number of rounds (the first at least): a round's loads are all issued before its mmas.
  // The first issues x's loads before it reads the task id (x needs no slot; the id's device assert is a call the
  // compiler moves no load across), then A's (rows below the table's padded rank; those from the slot's rank on are
  // zeroed after) before the slot's rank and scale have come.
  const int64_t chunks = ceil_div(in_features, kChunk);
  const int64_t rounds = max64(1, ceil_div(chunks, kShrinkWarps * kShrinkUnroll));
  int64_t t = -1;
  int r = 0;
  for (int64_t round = 0; round < rounds; ++round) {
    const int64_t c0 = round * kShrinkWarps * kShrinkUnroll + warp;
    Bits av[kShrinkUnroll][2], xv[kShrinkUnroll][kGroups];
#pragma unroll
    for (int u = 0; u < kShrinkUnroll; ++u) {
      const int64_t k = (c0 + u * kShrinkWarps) * kChunk + q * 8;
#pragma unroll
      for (int n = 0; n < kGroups; ++n) {  // in_features is a multiple of 8: a vector is all in or all out
        xv[u][n] = k < in_features && 8 * n + g < count
                       ? load_vec<uint32_t>(reinterpret_cast<const uint32_t*>(xg + 8 * n * in_features + k), 0)
                       : Bits{};
      }
    }
    if (round == 0) t = slot_of(task_ids, row, lora_slots);
    const scalar_t* a_lo = lora_a + (max64(t, 0) * table_rank + g) * in_features;  // ranks g and g + 8
    const scalar_t* a_hi = a_lo + 8 * in_features;
#pragma unroll
    for (int u = 0; u < kShrinkUnroll; ++u) {
      const int64_t k = (c0 + u * kShrinkWarps) * kChunk + q * 8;
      const bool in = k < in_features && t >= 0;
      av[u][0] = in && g < table_rank ? load_vec<uint32_t>(reinterpret_cast<const uint32_t*>(a_lo + k), 0) : Bits{};
      av[u][1] = in && g + 8 < table_rank ? load_vec<uint32_t>(reinterpret_cast<const uint32_t*>(a_hi + k), 0) : Bits{};
    }
    if (round == 0) {
      float s;
      r = slot_rank(t, lora_scale, lora_rank, table_rank, s);
      if (r == 0) return;  // the same in the whole block: no h for it (the expand reads none)
    }
#pragma unroll
    for (int u = 0; u < kShrinkUnroll; ++u) {
      if (g >= r) av[u][0] = Bits{};
      if (g + 8 >= r) av[u][1] = Bits{};
    }
#pragma unroll
    for (int u = 0; u < kShrinkUnroll; ++u) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int w = 2 * half;  // this mma's words of each lane's vectors
        const uint32_t a[4] = {av[u][0].v[w], av[u][1].v[w], av[u][0].v[w + 1], av[u][1].v[w + 1]};
#pragma unroll
        for (int n = 0; n < kGroups; ++n) mma_16816<scalar_t>(d[n], a, xv[u][n].v[w], xv[u][n].v[w + 1]);
      }
    }
  }
  // d[n]: ranks g (0, 1) and g + 8 (2, 3) of tokens 8n + 2q and 8n + 2q + 1.
#pragma unroll
  for (int n = 0; n < kGroups; ++n) {
    const int tm = 8 * n + 2 * q;
    *reinterpret_cast<float2*>(&partial[warp][g][tm]) = make_float2(d[n][0], d[n][1]);
    *reinterpret_cast<float2*>(&partial[warp][g + 8][tm]) = make_float2(d[n][2], d[n][3]);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kShrinkTokens * kMaxRank; i += blockDim.x) {
    const int j = i / kShrinkTokens, tm = i % kShrinkTokens;  // lanes across tokens: conflict-free reads
    if (tm >= count || j >= table_rank) continue;
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kShrinkWarps; ++w) sum += partial[w][j][tm];
    h[(m0 + tm) * table_rank + j] = static_cast<scalar_t>(sum);
  }
}

}  // namespace pets::cuda::split_lora
