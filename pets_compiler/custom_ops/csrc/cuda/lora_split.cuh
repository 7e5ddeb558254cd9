// Low-rank linear_delta as two streaming steps, for tables of padded rank R <= 16 with 16-byte-aligned rows: the fused
// one-block-per-16-tokens kernels are bound by their chains of dependent loads (profiled on the H200: 46 us at
// bert-base sizes, r 8, against a 9 us floor), and a CUDA-core shrink costs 2 * in * R fp32 instructions per token
// (measured: 40 us at r 8, 62 at r 16). shrink: h = x @ A[t].T on tensor cores, rounded to the input dtype (fp16 and
// bf16: lora_shrink.cuh; float: cuBLAS's pointer-array GEMM, slot_gemm.h). expand (here): out = y + scale[t] * h[:, :r]
// @ B[t, :, :r].T (+ bias[t]); fp16 and bf16 on tensor cores (expand_mma_kernel), float on CUDA cores (expand_kernel).
// In expand_kernel a block owns a tile of kTileTokens tokens of one row by kTileCols output features: it issues its y
// loads first (16-byte vectors, in flight while it stages), stages its slice of B[t] transposed ([r][cols]) and its
// tokens' scaled h in shared memory, then each thread adds the term to its column vector of several tokens. (The first
// expand staged all of B[t] for every 16 tokens: 23.8 us of the 28.6 at r 8, profiled on the H200; this one, for fp16,
// 15.0 us at r 8 and 21.8 at r 16 against a 5.2 us streaming kernel, profiled on the H200.) A slot's rank r bounds the
// expand, so table padding beyond r never reaches the output.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

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
  s = static_cast<float>(lora_scale[t]);  // loaded before the check, with the rank
  CUDA_KERNEL_ASSERT(rk >= 0 && rk <= table_rank && "pets: a LoRA rank is outside [0, R]");
  return s == 0.f ? 0 : static_cast<int>(max64(0, min64(rk, table_rank)));
}

// A block's tile of an expand grid: blockIdx.x = (batch row, token tile), blockIdx.y = column tile.
struct Tile {
  int64_t row, c0, m0;  // the batch row, the first output feature, the first token's flat index
  int count, cols;      // tokens and output features in the tile (cols a multiple of V: 16-byte rows)
};

template <int kTokens, int kCols>
__device__ __forceinline__ Tile tile_of(int64_t tokens, int64_t out_features) {
  const int64_t ttiles = ceil_div(tokens, kTokens);
  const int64_t row = blockIdx.x / ttiles;
  const int64_t tok0 = (blockIdx.x % ttiles) * kTokens;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kCols;
  return {row, c0, row * tokens + tok0, static_cast<int>(min64(kTokens, tokens - tok0)),
          static_cast<int>(min64(kCols, out_features - c0))};
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    expand_kernel(const scalar_t* __restrict__ y, const scalar_t* __restrict__ h,
                  const int64_t* __restrict__ task_ids, const scalar_t* __restrict__ lora_b,
                  const scalar_t* __restrict__ lora_scale, const int64_t* __restrict__ lora_rank, int64_t lora_slots,
                  int64_t table_rank, SiteTerms<scalar_t> terms, scalar_t* __restrict__ out, int64_t tokens,
                  int64_t out_features) {
  using acc = acc_t<scalar_t>;
  constexpr int V = kVecBytes / sizeof(scalar_t);
  constexpr int kColVecs = kTileCols / V;         // threads across a token's columns
  constexpr int kTokLanes = kThreads / kColVecs;  // threads across tokens
  constexpr int kPer = kTileTokens / kTokLanes;   // tokens per thread
  static_assert(kThreads % kColVecs == 0 && kTileTokens % kTokLanes == 0, "expand tile");
  __shared__ acc hs[kTileTokens][kMaxRank];                 // scale * h, 0 past the tile's tokens
  __shared__ __align__(kVecBytes) scalar_t bt[kMaxRank][kTileCols];  // B[t] transposed, this tile's columns

  const Tile tile = tile_of<kTileTokens, kTileCols>(tokens, out_features);
  const int64_t row = tile.row, c0 = tile.c0, m0 = tile.m0;
  const int count = tile.count, cols = tile.cols;
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
  const int64_t t_bias = terms.bias != nullptr ? slot_of(task_ids, row, terms.bias_slots) : -1;
  const scalar_t* bias_t = t_bias >= 0 ? terms.bias + t_bias * out_features : nullptr;
  const Vec<scalar_t> bv = (col_ok && bias_t != nullptr) ? load_vec<scalar_t>(bias_t, ov) : Vec<scalar_t>{};
  const int64_t t_scale = terms.scale != nullptr ? slot_of(task_ids, row, terms.scale_slots) : -1;
  const scalar_t* scale_t = t_scale >= 0 ? terms.scale + t_scale * out_features : nullptr;
  const Vec<scalar_t> sv = (col_ok && scale_t != nullptr) ? load_vec<scalar_t>(scale_t, ov) : Vec<scalar_t>{};

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
    if (scale_t != nullptr) {
#pragma unroll
      for (int e = 0; e < V; ++e) o.v[e] = scale_out(o.v[e], static_cast<acc>(sv.v[e]));
    }
    reinterpret_cast<Vec<scalar_t>*>(out + (m0 + tm) * out_features)[ov] = o;
  }
}

// The expand on tensor cores for fp16 and bf16: a block (4 warps) owns kFrags x kMmaTokens tokens of one row by
// kMmaCols output features, a warp kFrags x 16 of its tokens by all of them (mma.sync m16n8k16, K = the 16 ranks,
// fp32), one fragment of 16 tokens after the other. Every load that needs no slot goes first (each lane's y vectors,
// the tile's h rows), then all the task id gives (B[t]'s rows of the tile, the bias, rank and scale) before the rank
// is waited for: one dependent step. h and B are staged zero-padded to 16 ranks with zeros from r on in both (table
// padding, even inf or nan, never reaches the output) and unscaled; a warp stores h @ B.T in fp32 to its own shared
// rows, and each lane writes y + scale * that (+ bias) for 4 tokens with 16-byte vectors: the scale applied to the
// fp32 product (one fma), not folded into h. PTX mma and ldmatrix, not wmma: wmma's bf16 fragment loads compiled to
// generic 4-byte loads (64-bit addresses). kFrags 1: 64 registers, 22 KiB of static shared memory, 8 blocks an SM;
// kFrags 2 (rows of more than 64 tokens): 80 registers, 24 KiB, 6 blocks an SM: bs64 s128 at bert-base sizes (768
// blocks) in one wave on 132 SMs. With the scale: 8 and 16 bytes spilled. On the H200 at bs64 s128 in the mix_dense
// program: 8.7 us a site (blocks of 8 warps over 128 features: 9.8 with two fragments, 3 blocks an SM; 9.8 with one,
// 4 an SM). Whole linear_delta calls (scripts/lora_call.py, 8192 tokens, H200): LoRA on 2 rows in 5 with bias and
// scale rows, 22.3 us at bs64 s128 (two fragments) against 19.8 at bs128 s64 (one); LoRA on every row 21.7 / 21.4.
constexpr int kFrag = 16;                                           // the mma's M and K
constexpr int kWarpCols = 64;                                       // output features per warp
constexpr int kMmaThreads = 128;                                    // 4 warps, each on a tile's 64 features
constexpr int kMmaTokens = kFrag * (kMmaThreads / kWarp);           // 64: tokens a block per fragment
constexpr int kMmaCols = kWarpCols;                                 // 64
constexpr int kMmaMaxFrags = 2;
// Blocks an SM holds (the launch bound: 64 registers a thread for one fragment, 80 for two).
constexpr int mma_blocks(int frags) { return frags == 1 ? 8 : 6; }
constexpr int kZLd = kWarpCols + 8;  // fp32 row stride of a warp's results: fragment stores free of bank conflicts

// 16-byte vectors of fp16 or bf16 held as 4 words (with Vec<at::Half> here, nvcc kept the halves in separate
// registers and stored them one by one).
using Bits = Vec<uint32_t>;

// A word's two fp16 or bf16 values (the lower address in x) as fp32, and back rounded to nearest even (as the
// casts of at::Half and at::BFloat16).
template <typename scalar_t>
__device__ __forceinline__ float2 unpack2(uint32_t w) {
  if constexpr (std::is_same_v<scalar_t, at::Half>) {
    return __half22float2(*reinterpret_cast<const __half2*>(&w));
  } else {  // exact: a bf16 is the upper half of its fp32 (on 32-bit words: __bfloat1622float2 split the vectors
            // into 16-bit registers, and the kernel spilled)
    return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
  }
}
template <typename scalar_t>
__device__ __forceinline__ uint32_t pack2(float2 f) {
  if constexpr (std::is_same_v<scalar_t, at::Half>) {
    const __half2 p = __floats2half2_rn(f.x, f.y);
    return *reinterpret_cast<const uint32_t*>(&p);
  } else {
    const __nv_bfloat162 p = __floats2bfloat162_rn(f.x, f.y);
    return *reinterpret_cast<const uint32_t*>(&p);
  }
}

// Ranks j0 .. j0 + 7 of a table row of R 16-bit entries (zeros from R on); one vector load when `vec` (R a
// multiple of 8, so rows are 16-byte aligned).
__device__ __forceinline__ Bits load_ranks(const void* row, int j0, int64_t R, bool vec) {
  Bits v{};
  if (j0 >= R) return v;
  const uint16_t* e = static_cast<const uint16_t*>(row) + j0;
  if (vec) return load_vec<uint32_t>(reinterpret_cast<const uint32_t*>(e), 0);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    if (j0 + i < R) v.v[i / 2] |= static_cast<uint32_t>(e[i]) << (16 * (i % 2));
  }
  return v;
}

// v (ranks j0 .. j0 + 7) with the ranks from r on set to 0.
__device__ __forceinline__ Bits below_rank(Bits v, int j0, int r) {
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    const int j = j0 + 2 * w;
    v.v[w] &= j + 1 < r ? 0xffffffffu : (j < r ? 0xffffu : 0u);
  }
  return v;
}

// Where a warp's result column c (of kWarpCols) is in its shared rows: the two float4 halves of each 8 columns
// from 32 on swapped, so the 8 lanes reading one token's 64 results as float4s hit distinct banks.
__device__ __forceinline__ int zcol(int c) { return c ^ ((c & 32) >> 3); }

// Four 8x8 blocks of 16-bit values from shared memory; lanes 8i .. 8i + 7 give the rows of block i.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&m)[4], const void* rows) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(m[0]), "=r"(m[1]), "=r"(m[2]), "=r"(m[3])
               : "r"(static_cast<uint32_t>(__cvta_generic_to_shared(rows))));
}

// d += a @ b on tensor cores, fp32: a 16x16 (row-major), b 16x8 (col-major), fp16 or bf16 (PTX mma.m16n8k16).
template <typename scalar_t>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  constexpr bool half = std::is_same_v<scalar_t, at::Half>;
  if constexpr (half) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// kScale: the site has an output scale table (a template argument: the kernel without one is the same as before it
// existed).
template <typename scalar_t, bool kScale, int kFrags>
__global__ void __launch_bounds__(kMmaThreads, mma_blocks(kFrags))
    expand_mma_kernel(const scalar_t* __restrict__ y, const scalar_t* __restrict__ h,
                      const int64_t* __restrict__ task_ids, const scalar_t* __restrict__ lora_b,
                      const scalar_t* __restrict__ lora_scale, const int64_t* __restrict__ lora_rank,
                      int64_t lora_slots, int64_t table_rank, SiteTerms<scalar_t> terms, scalar_t* __restrict__ out,
                      int64_t tokens, int64_t out_features) {
  constexpr int V = kVecBytes / sizeof(scalar_t);  // 8 features or ranks a vector
  constexpr int kVecs = kWarpCols / V;             // lanes across a warp's features: 8
  constexpr int kRows = kWarp / kVecs;             // tokens a warp writes at once: 4
  constexpr int kPer = kFrag / kRows;              // y vectors per lane: 4
  constexpr int kTileTok = kFrags * kMmaTokens;
  constexpr int kHRows = kTileTok * 2 / kMmaThreads;  // h rank vectors a thread stages
  static_assert(V == 8 && kMaxRank == kFrag && kMmaThreads == 2 * kMmaCols && kHRows * kMmaThreads == 2 * kTileTok,
                "expand_mma: one rank vector of B and kHRows of h per thread");
  __shared__ __align__(32) scalar_t hs[kTileTok][kMaxRank];    // h, 0 from r on and past the tile's tokens
  __shared__ __align__(32) scalar_t bs[kMmaCols][kMaxRank];    // the tile's rows of B[t], 0 from r on and past cols
  __shared__ __align__(32) float zs[kMmaThreads / kWarp][kFrag * kZLd];  // each warp's h @ B.T

  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const Tile tile = tile_of<kTileTok, kMmaCols>(tokens, out_features);
  const int64_t row = tile.row, c0 = tile.c0, m0 = tile.m0;
  const int count = tile.count, cols = tile.cols;
  const int wt = warp * kFrags * kFrag;  // the warp's first token (each warp takes all of the tile's features)
  const int lt = wt + lane / kVecs, lc = (lane % kVecs) * V;  // the lane's first token, its features
  const bool col_ok = lc < cols;
  // The lane's vector of token lt; its vector of token lt + i is i * out_features further.
  const int64_t lane_off = (m0 + lt) * out_features + c0 + lc;

  // Tokens lt + f * kFrag + k * kRows at [f * kPer + k]: in flight while the block stages and multiplies.
  Bits yv[kFrags * kPer];
#pragma unroll
  for (int i = 0; i < kFrags * kPer; ++i) {
    const int dt = (i / kPer) * kFrag + (i % kPer) * kRows;
    yv[i] = (col_ok && lt + dt < count)
                ? load_vec<uint32_t>(reinterpret_cast<const uint32_t*>(y + lane_off + dt * out_features), 0)
                : Bits{};
  }
  // This thread's rank vector (ranks sj .. sj + 7) of tokens so, so + kMmaCols, .. of h and of one tile row of B[t].
  const bool vec = table_rank % V == 0;
  const int sj = (threadIdx.x % 2) * V, so = threadIdx.x / 2;
  Bits hv[kHRows];
#pragma unroll
  for (int i = 0; i < kHRows; ++i) {
    const int tm = so + i * kMmaCols;
    hv[i] = tm < count ? load_ranks(h + (m0 + tm) * table_rank, sj, table_rank, vec) : Bits{};
  }
  // Everything the task id gives is loaded before the rank is checked: one dependent step.
  const int64_t t = slot_of(task_ids, row, lora_slots);
  const int64_t t_bias = terms.bias != nullptr ? slot_of(task_ids, row, terms.bias_slots) : -1;
  const Bits bv = (t >= 0 && so < cols)
                      ? load_ranks(lora_b + (t * out_features + c0 + so) * table_rank, sj, table_rank, vec)
                      : Bits{};
  const bool has_bias = t_bias >= 0;
  Bits bias_v{};
  if (col_ok && has_bias) {
    bias_v = load_vec<uint32_t>(reinterpret_cast<const uint32_t*>(terms.bias + t_bias * out_features + c0 + lc), 0);
  }
  // kScale: the tile's columns of the slot's output scale, staged in shared memory by the block's first threads and
  // read back in the epilogue (held in registers through the mma they spilled; loaded from global memory after it,
  // the scaled expand took 10.2 us against 8.2 unscaled at bert-base sizes, bs64 s128, on the H200).
  __shared__ __align__(16) scalar_t ss[kScale ? kMmaCols : V];
  const int64_t t_scale = kScale ? slot_of(task_ids, row, terms.scale_slots) : -1;
  const bool has_scale = kScale && t_scale >= 0;
  const bool stages_scale = has_scale && threadIdx.x * V < cols;
  const Bits scale_in = stages_scale ? load_vec<uint32_t>(reinterpret_cast<const uint32_t*>(
                                           terms.scale + t_scale * out_features + c0 + threadIdx.x * V), 0)
                                     : Bits{};
  // The rank and scale loads go out before the staging store waits for the scale row (after it, they made a third
  // dependent step).
  float s;
  const int r = slot_rank(t, lora_scale, lora_rank, table_rank, s);
  if (stages_scale) *reinterpret_cast<Bits*>(&ss[threadIdx.x * V]) = scale_in;

  float* z = zs[warp];
  if (kScale && r == 0) __syncthreads();  // the staged scale (the branch below has its own barrier)
  if (r > 0) {  // the same in the whole block (one row)
#pragma unroll
    for (int i = 0; i < kHRows; ++i) *reinterpret_cast<Bits*>(&hs[so + i * kMmaCols][sj]) = below_rank(hv[i], sj, r);
    *reinterpret_cast<Bits*>(&bs[so][sj]) = below_rank(bv, sj, r);
    __syncthreads();
  }
  const Bits scale_v = (has_scale && col_ok) ? *reinterpret_cast<const Bits*>(&ss[lc]) : Bits{};

#pragma unroll
  for (int f = 0; f < kFrags; ++f) {
    const int ft = wt + f * kFrag;  // the fragment's first token
    if (r > 0 && ft < count) {
      const int g = lane / 4, q = lane % 4;  // the fragments' row and column pair
      uint32_t a[4];  // h of tokens ft .. ft + 15: 8x8 blocks (tokens 0-7, ranks 0-7), (8-15, 0-7), (0-7, 8-15), ..
      ldmatrix_x4(a, &hs[ft + lane % 16][(lane / 16) * 8]);
#pragma unroll
      for (int n = 0; n < kWarpCols / kFrag; ++n) {
        const int n0 = n * kFrag;
        if (n0 >= cols) break;
        // B[t] rows n0 .. n0 + 15 ([feature][rank]: the col-major rank x feature operand): 8x8 blocks (features
        // 0-7, ranks 0-7), (0-7, 8-15), (8-15, 0-7), (8-15, 8-15).
        uint32_t b[4];
        ldmatrix_x4(b, &bs[n0 + lane % 8 + (lane / 16) * 8][((lane / 8) % 2) * 8]);
#pragma unroll
        for (int i = 0; i < 2; ++i) {  // features n0 + 8i .. + 7; this lane: tokens g, g + 8, features 2q, 2q + 1
          float d[4] = {};
          mma_16816<scalar_t>(d, a, b[2 * i], b[2 * i + 1]);
          float* zd = z + g * kZLd + zcol(n0 + 8 * i + 2 * q);
          *reinterpret_cast<float2*>(zd) = make_float2(d[0], d[1]);
          *reinterpret_cast<float2*>(zd + 8 * kZLd) = make_float2(d[2], d[3]);
        }
      }
    }
    __syncwarp();
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      const int dt = f * kFrag + k * kRows, tm = lt + dt;
      if (!col_ok || tm >= count) break;
      const Bits yk = yv[f * kPer + k];
      Bits o = yk;  // bitwise y when there is no term
      if (r > 0 || has_bias) {
        float4 lo = make_float4(0.f, 0.f, 0.f, 0.f), hi = lo;
        if (r > 0) {
          const float* zr = z + (tm - ft) * kZLd;
          lo = *reinterpret_cast<const float4*>(zr + zcol(lc));
          hi = *reinterpret_cast<const float4*>(zr + zcol(lc + 4));
        }
        const float2 zv[4] = {{lo.x, lo.y}, {lo.z, lo.w}, {hi.x, hi.y}, {hi.z, hi.w}};
#pragma unroll
        for (int w = 0; w < 4; ++w) {
          float2 v = unpack2<scalar_t>(yk.v[w]);
          if (r > 0) v = make_float2(v.x + s * zv[w].x, v.y + s * zv[w].y);  // fmas
          if (has_bias) {
            const float2 b = unpack2<scalar_t>(bias_v.v[w]);
            v = make_float2(v.x + b.x, v.y + b.y);
          }
          o.v[w] = pack2<scalar_t>(v);
        }
      }
      if (has_scale) {  // on the rounded result, as pets::scale after it: y * (1 + 0) is y exactly
#pragma unroll
        for (int w = 0; w < 4; ++w) {
          const float2 v = unpack2<scalar_t>(o.v[w]), l = unpack2<scalar_t>(scale_v.v[w]);
          o.v[w] = pack2<scalar_t>(make_float2(v.x * (1.f + l.x), v.y * (1.f + l.y)));
        }
      }
      // __stwb (a plain store): storing a Bits or uint4 compiled to four 4-byte stores.
      __stwb(reinterpret_cast<uint4*>(out + lane_off + dt * out_features),
             make_uint4(o.v[0], o.v[1], o.v[2], o.v[3]));
    }
    __syncwarp();  // the next fragment's products overwrite z
  }
}

// The expand of a dtype (both kernels take the same arguments): tensor cores for fp16 and bf16, else CUDA cores.
template <typename scalar_t>
constexpr bool kExpandMma = std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>;
// Tokens a block of the expand takes for rows of `tokens` tokens (its grid: batch x ceil(tokens / this) x column
// tiles).
template <typename scalar_t>
int64_t expand_tile_tokens(int64_t tokens) {
  if constexpr (kExpandMma<scalar_t>) {
    return tokens > kMmaTokens ? kMmaMaxFrags * kMmaTokens : kMmaTokens;
  } else {
    return kTileTokens;
  }
}
template <typename scalar_t>
auto expand(bool scaled, int64_t tokens) {
  if constexpr (kExpandMma<scalar_t>) {
    constexpr int kTwo = kMmaMaxFrags;
    if (expand_tile_tokens<scalar_t>(tokens) > kMmaTokens) {
      return scaled ? expand_mma_kernel<scalar_t, true, kTwo> : expand_mma_kernel<scalar_t, false, kTwo>;
    }
    return scaled ? expand_mma_kernel<scalar_t, true, 1> : expand_mma_kernel<scalar_t, false, 1>;
  } else {
    return expand_kernel<scalar_t>;
  }
}

}  // namespace pets::cuda::split_lora
