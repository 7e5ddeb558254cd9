// Pooled-CSR sparse deltas. The estimates below were written before the kernel ran; tests/custom_ops/test_gpu_ops.py
// runs it on the GPU, and bench.throughput / bench.breakdown record its measured times against its floor.
//
// sparse_delta (diff-pruning, MaskBERT at a linear site): out[m, o] = y[m, o] + sum_k val[k] * x[m, col[k]] over the
// entries k of row o of the batch row's slot matrix D_t. Each (token, entry) pair is one fp32 FMA on one x value
// read from shared memory; random columns give no reuse, so the bounds are shared-memory bandwidth (128 B a clock
// an SM: 64 fp16 pairs) and issue (a convert and an FMA a pair). The previous kernel (16 tokens a block, a thread
// an output row) re-read the slot's whole CSR (10 B an entry) from L2 for every 16 tokens, put 4-8 random 32-byte
// columns in each shared-memory wavefront (bank conflicts), diverged on rows of different lengths, and was measured
// instruction/latency bound (H200, fp16, 64 x 128 tokens: 31 / 119 us at 1% for 768x768 / out 768 x in 3072, 110 /
// 493 us at 5%; floors 8.9 / 17.8 us).
//
// Design:
//  * An item takes kT tokens of one batch row (a tile) and some of its output rows; its block stages the tile's x
//    token-minor: column c's kT tokens are one kColBytes line (128 B where in_features allows and the row has more
//    than 32 fp16/bf16 tokens: 64 tokens, 32 fp32; else 64 B or 32 B lines, e.g. 32 fp16 tokens at in 3072 or in
//    rows of 32 tokens). 16 warps (8 where shared memory is short), one block an SM, each taking the launch's
//    items in turn: the tiles of rows whose slot has entries, split over output chunks where they are fewer than
//    the blocks, then copies of the other rows' tiles (SparsePlan).
//  * A group of kG lanes reads one entry's whole line with 16-byte loads, so an entry is fetched once per kT
//    tokens, and a wavefront serves two entries at disjoint banks: with 128-byte lines the two groups of a phase
//    read opposite halves of their lines, then swap (no bank conflicts); 64-byte lines collide half the time (1.5
//    wavefronts on average, in_features > ~1300 fp16); 32-byte lines more (in_features > ~3500 fp16).
//  * Rows: a slot averaging under 16 entries a row runs a group a row (8 rows at once a warp, no reduction); else
//    two groups a row take alternate entries and meet in one xor-shuffle (a reduce-scatter). A row's entries come in
//    windows of two per lane (one 16-byte col load, one val load), packed (column slot | fp16 value) in one word and
//    broadcast by shuffle; the next window (or next row's first) is loaded while the current one is applied. Per
//    entry and lane (fp16, 128-byte lines): 2 shifts/logic, 1 convert, 2 LDS.128, 16 converts, 16 FFMA (39 SASS
//    instructions for 16 pairs) plus about 65 per window of 8 steps and 40-70 per round of rows.
//  * A warp's sums go to its own fp32 rows in shared memory (16 output rows x kT, padded and swizzled: the stores
//    and the reads below are free of bank conflicts); the warp then writes those 16 outputs for all the tile's tokens
//    (fp16/bf16: words of two outputs, 32 contiguous bytes a token) as y + sum in fp32 rounded once; an empty row's
//    output is y's bits. Warps take 16-row chunks from a shared counter; no block barrier after the staging one.
//  * Column c is staged at slot c ^ ((c >> 3) & (128 / kColBytes - 1)) (the staging stores of a phase hit distinct
//    banks; a gather reads whole lines, unaffected). One zero line (slot in_pad) stands for padding entries and bad
//    columns: 0 * 0 adds +0, never NaN, and fp32 sums never hold -0.
//  Estimated traffic per call (bert-base, 64 x 128 tokens, 32 slots, nnz at random positions as op_times makes them):
//    768x768 1% (5.4k entries a slot):   CSR from L2 128 blocks x 54 KB = 7 MB (was 28 MB); 44M pairs
//    768x768 5% (29k):                   37 MB (was 149 MB); 239M pairs
//    out 768 x in 3072 1% (23k, 32-token tiles): 59 MB (was 118 MB); 189M pairs
//    out 768 x in 3072 5% (118k):        301 MB (was 602 MB); 963M pairs
//    shared memory: x staged once a block (= x's bytes), 2 B a pair gathered (conflict-free at 128-byte lines),
//    8 B an output through the fp32 rows. DRAM: x + y + out once (the floors), the CSR once a slot.
//  Expected (issue-bound estimates at ~1.75 GHz, one block an SM): 768x768 ~10-12 us at 1% (staging x, ~3 us, is
//  not overlapped with compute), ~30 us at 5%; 768x3072 ~40 us at 1% (x staging ~12 us of it), ~110-130 us at 5%.
//  Registers (nvcc 13, sm_90, 512-thread bound): 118-121 fp16/bf16, 101-107 fp32, 108-114 fp64; no spills.
//  Table checks: slot ids, row offsets (in the pool, non-decreasing) and columns ([0, in)) are asserted where read
//  (CUDA_KERNEL_ASSERT), and a bad one reads nothing outside the tables (its row or entry counts as empty).
// embedding_delta: one warp per token, lanes across the hidden features, each summing its own column's entries of
// the token's row (a repeated column adds up).
#include <type_traits>

#include "../common/task_groups.h"
#include "../lora/lora.h"
#include "../sparse/sparse.h"
#include "common.cuh"
#include "ops.h"

namespace pets::cuda {
namespace {

constexpr int kThreads = 256;  // embedding_delta's block

// The offsets [k0, k1) of a CSR row, if they lie within the pool in order (else asserts and gives an empty row).
__device__ __forceinline__ void row_range(const int64_t* p, int64_t pool, int64_t& k0, int64_t& k1) {
  k0 = p[0];
  k1 = p[1];
  const bool ok = k0 >= 0 && k0 <= k1 && k1 <= pool;
  CUDA_KERNEL_ASSERT(ok && "pets: CSR offsets outside the pool or decreasing");
  if (!ok) k1 = k0 = 0;
}

// ---------------------------------------------------------------------------------------------------------------
// sparse_delta

constexpr int kSparseMaxWarps = 16;  // warps of a block (fewer where shared memory is short)
constexpr int kChunkRows = 16;       // output rows a warp takes at a time

template <typename scalar_t, int kColBytes>
struct SparseLayout {
  static constexpr int kVE = kVecBytes / static_cast<int>(sizeof(scalar_t));  // tokens in a 16-byte chunk
  static constexpr int kChunks = kColBytes / kVecBytes;                       // chunks of a staged column line
  static constexpr int kT = kChunks * kVE;                                    // tokens of a block's tile
  static constexpr int kCPL = kChunks == 8 ? 2 : 1;                           // chunks a lane reads per entry
  static constexpr int kG = kChunks / kCPL;                // lanes of a group: together one entry's whole line
  static constexpr int kSlotXor = 128 / kColBytes - 1;     // column slot permutation (staging bank spread)
  static constexpr int kSStride = kT + 1;                  // fp32 row stride of a warp's sums
  static constexpr int kPassCols = 8 * (kWarp / kChunks);  // columns a warp stages per pass (8 a lane)
  static constexpr int kSegWords = 8 * static_cast<int>(sizeof(scalar_t)) / 4;  // words of 8 elements
  static_assert(kChunks == 8 || kChunks == 4 || kChunks == 2, "128-, 64- or 32-byte column lines");
  static_assert(kVE >= 2, "layout");
};

template <typename scalar_t>
constexpr bool kIs16 = sizeof(scalar_t) == 2;

// A table value as loaded: the raw bits for the 16-bit types (packed next to the column slot), else the value.
template <typename scalar_t>
using RawVal = std::conditional_t<kIs16<scalar_t>, uint16_t, scalar_t>;

// fp16 / bf16 halves of a 32-bit word as floats.
template <typename scalar_t>
__device__ __forceinline__ void halves_to_float(uint32_t w, float& lo, float& hi) {
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    lo = __uint_as_float(w << 16);
    hi = __uint_as_float(w & 0xffff0000u);
  } else {
    asm("{\n.reg .f16 l, h;\nmov.b32 {l, h}, %2;\ncvt.f32.f16 %0, l;\ncvt.f32.f16 %1, h;\n}"
        : "=f"(lo), "=f"(hi)
        : "r"(w));
  }
}

template <typename scalar_t>
__device__ __forceinline__ float low_half_to_float(uint32_t w) {
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    return __uint_as_float(w << 16);
  } else {
    float f;
    asm("{\n.reg .f16 l, h;\nmov.b32 {l, h}, %1;\ncvt.f32.f16 %0, l;\n}" : "=f"(f) : "r"(w));
    return f;
  }
}

// The kVE token values of a staged 16-byte chunk, in the accumulator type.
template <typename scalar_t>
__device__ __forceinline__ void chunk_values(const uint4 q, acc_t<scalar_t> (&v)[kVecBytes / sizeof(scalar_t)]) {
  if constexpr (kIs16<scalar_t>) {
    halves_to_float<scalar_t>(q.x, v[0], v[1]);
    halves_to_float<scalar_t>(q.y, v[2], v[3]);
    halves_to_float<scalar_t>(q.z, v[4], v[5]);
    halves_to_float<scalar_t>(q.w, v[6], v[7]);
  } else if constexpr (sizeof(scalar_t) == 4) {
    v[0] = __uint_as_float(q.x);
    v[1] = __uint_as_float(q.y);
    v[2] = __uint_as_float(q.z);
    v[3] = __uint_as_float(q.w);
  } else {
    v[0] = __hiloint2double(static_cast<int>(q.y), static_cast<int>(q.x));
    v[1] = __hiloint2double(static_cast<int>(q.w), static_cast<int>(q.z));
  }
}

__device__ __forceinline__ float fma_acc(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_acc(double a, double b, double c) { return __fma_rn(a, b, c); }

// One entry as the groups take it: the staged line (slot) of its column and its value. 16-bit types pack both in
// one word, slot in the high half (slot < 2^16: shared memory holds fewer than 2^16 lines), so a lane gets an
// entry with one shuffle and unpacks it with a shift and a convert.
template <typename scalar_t, bool = kIs16<scalar_t>>
struct Entry {
  uint32_t w;
  __device__ __forceinline__ static Entry make(uint32_t slot, RawVal<scalar_t> v) {
    return {(slot << 16) | static_cast<uint32_t>(v)};
  }
  __device__ __forceinline__ Entry from(int src) const { return {__shfl_sync(0xffffffffu, w, src)}; }
  __device__ __forceinline__ uint32_t slot() const { return w >> 16; }
  __device__ __forceinline__ float value() const { return low_half_to_float<scalar_t>(w); }
};

template <typename scalar_t>
struct Entry<scalar_t, false> {
  uint32_t s;
  scalar_t v;
  __device__ __forceinline__ static Entry make(uint32_t slot, scalar_t v) { return {slot, v}; }
  __device__ __forceinline__ Entry from(int src) const {
    return {__shfl_sync(0xffffffffu, s, src), __shfl_sync(0xffffffffu, v, src)};
  }
  __device__ __forceinline__ uint32_t slot() const { return s; }
  __device__ __forceinline__ scalar_t value() const { return v; }
};

// A row's entries [k0, k1) as windows see them: from base = k0 rounded down to even (pair loads stay 16-byte
// aligned), entry base + i for i in [lo, hi) (lo = k0 - base: 0 or 1); an empty row has hi = 0. 32-bit offsets:
// a row of more than 2^30 entries (more than any table here holds) asserts and is cut there.
template <typename scalar_t>
struct RowEntries {
  const int64_t* col;
  const RawVal<scalar_t>* val;
  int lo, hi;
};

template <typename scalar_t>
__device__ __forceinline__ RowEntries<scalar_t> row_entries(const int64_t* __restrict__ col,
                                                            const RawVal<scalar_t>* __restrict__ val, int64_t k0,
                                                            int64_t k1) {
  const int64_t base = k0 & ~int64_t(1);
  CUDA_KERNEL_ASSERT(k1 - base <= (int64_t(1) << 30) && "pets: a sparse_delta row has more than 2^30 entries");
  return {col + base, val + base, static_cast<int>(k0 - base),
          k1 > k0 ? static_cast<int>(min64(k1 - base, int64_t(1) << 30)) : 0};
}

// Entries i and i + 1 (i even) of a row as loaded (before the checks), and which of them are the row's.
template <typename scalar_t>
struct EntryPair {
  int64_t c[2];
  RawVal<scalar_t> v[2];
  int in;  // bit u: entry i + u is the row's
};

// One vector load each for col and val when both entries are the row's and the tables allow it (`vec`: col
// 16-byte and val 2-element aligned), else the row's entries one by one.
template <typename scalar_t>
__device__ __forceinline__ EntryPair<scalar_t> load_pair(const RowEntries<scalar_t>& row, int i, bool vec) {
  EntryPair<scalar_t> e;
  const bool in0 = i >= row.lo && i < row.hi, in1 = i + 1 < row.hi;
  e.in = (in0 ? 1 : 0) | (in1 ? 2 : 0);
  if (vec && in0 && in1) {
    const longlong2 c = *reinterpret_cast<const longlong2*>(row.col + i);
    e.c[0] = c.x;
    e.c[1] = c.y;
    if constexpr (kIs16<scalar_t>) {
      const uint32_t v = *reinterpret_cast<const uint32_t*>(row.val + i);
      e.v[0] = static_cast<uint16_t>(v & 0xffffu);
      e.v[1] = static_cast<uint16_t>(v >> 16);
    } else if constexpr (sizeof(scalar_t) == 4) {
      const float2 v = *reinterpret_cast<const float2*>(row.val + i);
      e.v[0] = v.x;
      e.v[1] = v.y;
    } else {
      const double2 v = *reinterpret_cast<const double2*>(row.val + i);
      e.v[0] = v.x;
      e.v[1] = v.y;
    }
  } else {
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const bool in = u == 0 ? in0 : in1;
      e.c[u] = in ? row.col[i + u] : 0;
      e.v[u] = in ? row.val[i + u] : RawVal<scalar_t>(0);
    }
  }
  return e;
}

// Elements [kb, kb + 8) of a row of x (zero past in_features, or all zero for a null row) as 32-bit words.
template <typename scalar_t>
__device__ __forceinline__ void load_segment(const scalar_t* __restrict__ xr, int kb, int in_features, bool vec,
                                             uint32_t (&w)[8 * sizeof(scalar_t) / 4]) {
  constexpr int kVE = kVecBytes / static_cast<int>(sizeof(scalar_t));
  if (xr != nullptr && vec) {
#pragma unroll
    for (int v = 0; v < 8 / kVE; ++v) {
      const uint4 q = kb + v * kVE < in_features ? *reinterpret_cast<const uint4*>(xr + kb + v * kVE)
                                                 : make_uint4(0, 0, 0, 0);
      w[4 * v] = q.x;
      w[4 * v + 1] = q.y;
      w[4 * v + 2] = q.z;
      w[4 * v + 3] = q.w;
    }
  } else if constexpr (kIs16<scalar_t>) {
    const uint16_t* xb = reinterpret_cast<const uint16_t*>(xr);
#pragma unroll
    for (int e = 0; e < 8; e += 2) {
      const uint32_t lo = xr != nullptr && kb + e < in_features ? xb[kb + e] : 0u;
      const uint32_t hi = xr != nullptr && kb + e + 1 < in_features ? xb[kb + e + 1] : 0u;
      w[e / 2] = lo | (hi << 16);
    }
  } else if constexpr (sizeof(scalar_t) == 4) {
    const uint32_t* xb = reinterpret_cast<const uint32_t*>(xr);
#pragma unroll
    for (int e = 0; e < 8; ++e) w[e] = xr != nullptr && kb + e < in_features ? xb[kb + e] : 0u;
  } else {
    const uint2* xb = reinterpret_cast<const uint2*>(xr);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const uint2 d = xr != nullptr && kb + e < in_features ? xb[kb + e] : make_uint2(0, 0);
      w[2 * e] = d.x;
      w[2 * e + 1] = d.y;
    }
  }
}

// Column c of kVE loaded segments (one a token): the kVE tokens' values of that column, one 16-byte chunk.
template <typename scalar_t, int kVE, int kSegWords>
__device__ __forceinline__ uint4 segment_column(const uint32_t (&seg)[kVE][kSegWords], int c) {
  if constexpr (kIs16<scalar_t>) {
    const uint32_t sel = (c & 1) ? 0x7632u : 0x5410u;  // the high or the low halves of two words
    return make_uint4(__byte_perm(seg[0][c / 2], seg[1][c / 2], sel), __byte_perm(seg[2][c / 2], seg[3][c / 2], sel),
                      __byte_perm(seg[4][c / 2], seg[5][c / 2], sel), __byte_perm(seg[6][c / 2], seg[7][c / 2], sel));
  } else if constexpr (sizeof(scalar_t) == 4) {
    return make_uint4(seg[0][c], seg[1][c], seg[2][c], seg[3][c]);
  } else {
    return make_uint4(seg[0][2 * c], seg[0][2 * c + 1], seg[1][2 * c], seg[1][2 * c + 1]);
  }
}

// The maximum of a non-negative int over the warp.
__device__ __forceinline__ int warp_max(int v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return static_cast<int>(__reduce_max_sync(0xffffffffu, static_cast<unsigned>(v)));
#else
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v = max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
#endif
}

// A token's column in a warp's fp32 rows: tokens 32-63 swap 4-float halves (bank-conflict-free reduce stores).
__device__ __forceinline__ int sum_col(int tok) { return tok ^ (((tok >> 5) & 1) << 2); }

// Two fp32 values rounded to one word of fp16 / bf16 (first in the low half).
template <typename scalar_t>
__device__ __forceinline__ uint32_t float2_to_halves(float lo, float hi) {
  uint32_t w;
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(w) : "f"(hi), "f"(lo));
  } else {
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(w) : "f"(hi), "f"(lo));
  }
  return w;
}

// A warp's chunk of outputs for 16-bit types with an even out_features (y, out 4-byte aligned): lane (rp, hq) =
// (lane % 8, lane / 8) writes outputs o0 + 2 rp, + 1 (one word) of tokens tb + ch + 2 u, ch = (hq & 1) + 16 (hq /
// 2), u < 8: per store 4 tokens x 32 contiguous bytes, and the fp32 sums read at banks 2 rp + ch + 2 u (+ 1): all
// distinct. kFull: the tile has all kT tokens (kT a multiple of 32), no per-token checks. An empty row's half is
// y's bits.
template <typename scalar_t, typename L, bool kFull>
__device__ __forceinline__ void write_pairs(const scalar_t* __restrict__ y, scalar_t* __restrict__ out,
                                            const acc_t<scalar_t>* sums, int64_t m0, int count, int64_t o0,
                                            int64_t out_features, int lane, unsigned nonempty) {
  if constexpr (kIs16<scalar_t>) {
    const int r0 = 2 * (lane % 8), hq = lane / 8;
    const int ch = (hq & 1) + 16 * (hq >> 1);
    const int64_t o = o0 + r0;
    if (o >= out_features) return;  // out_features even: o + 1 is an output too
    // byte_perm(sum, y): each half from the sums' word if its row has entries, else from y's.
    const uint32_t sel =
        (((nonempty >> r0) & 1u) ? 0x0010u : 0x0054u) | (((nonempty >> (r0 + 1)) & 1u) ? 0x3200u : 0x7600u);
    const float* s0 = sums + r0 * L::kSStride + ch;
    const float* s1 = s0 + L::kSStride;
    const uint32_t* yw = reinterpret_cast<const uint32_t*>(y);
    uint32_t* ow = reinterpret_cast<uint32_t*>(out);
    const int64_t base = ((m0 + ch) * out_features + o) / 2;  // in words
    const int64_t stride = out_features;                       // two tokens, in words
#pragma unroll
    for (int tb = 0; tb < (L::kT < 32 ? 32 : L::kT); tb += 32) {
      uint32_t yv[8];
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const bool in = kFull || tb + ch + 2 * u < count;
        yv[u] = in ? yw[base + (tb / 2 + u) * stride] : 0u;
      }
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        if (kFull || tb + ch + 2 * u < count) {
          const int sc = tb + 2 * (tb >= 32 ? u ^ 2 : u);  // sum_col of token tb + ch + 2 u, less ch
          float a, b;
          halves_to_float<scalar_t>(yv[u], a, b);
          const uint32_t v = float2_to_halves<scalar_t>(a + s0[sc], b + s1[sc]);
          ow[base + (tb / 2 + u) * stride] = __byte_perm(v, yv[u], sel);
        }
      }
    }
  }
}

// The general case: lane (r, h) = (lane % 16, lane / 16) writes output o0 + r of tokens tb + 16 h + u.
template <typename scalar_t, typename L>
__device__ __forceinline__ void write_scalars(const scalar_t* __restrict__ y, scalar_t* __restrict__ out,
                                              const acc_t<scalar_t>* sums, int64_t m0, int count, int64_t o0,
                                              int64_t out_features, int lane, unsigned nonempty) {
  using acc = acc_t<scalar_t>;
  const int r = lane % kChunkRows, h = lane / kChunkRows;
  const int64_t o = o0 + r;
  if (o >= out_features) return;
  const bool has = (nonempty >> r) & 1u;
  const acc* srow = sums + r * L::kSStride;
#pragma unroll 1
  for (int tb = 0; tb < L::kT; tb += 2 * kChunkRows) {
    const int64_t base = (m0 + tb + h * kChunkRows) * out_features + o;
    scalar_t yv[kChunkRows];
#pragma unroll
    for (int u = 0; u < kChunkRows; ++u) {
      const int tok = tb + h * kChunkRows + u;
      yv[u] = tok < count ? y[base + u * out_features] : scalar_t(0);
    }
#pragma unroll
    for (int u = 0; u < kChunkRows; ++u) {
      const int tok = tb + h * kChunkRows + u;
      if (tok < count) {
        out[base + u * out_features] =
            has ? static_cast<scalar_t>(static_cast<acc>(yv[u]) + srow[sum_col(tok)]) : yv[u];
      }
    }
  }
}

struct SparseFlags {
  bool vec_x;        // x rows as 16-byte vectors
  bool vec_entries;  // col pairs as 16-byte vectors, val pairs as one load
  bool vec_y;        // y / out tiles as 16-byte vectors (the empty-slot copy)
  bool pairs;        // 16-bit y / out as words of two outputs (write_pairs)
};

// The fp32 sums of a warp's chunk of kChunkRows rows (lane r < kChunkRows holds row r's entries [rk0, rk1), an
// empty row 0, 0): into the warp's rows `sums` (row stride kSStride, token tok at sum_col(tok)); empty rows are not
// written. kGroupsPerRow groups share a row: 1 (short rows: no reduction, kGroups rows at once) or 2 (two groups
// take alternate entry pairs and meet in one exchange; half the window overhead per entry on long rows).
template <typename scalar_t, int kColBytes, int kGroupsPerRow>
__device__ __forceinline__ void chunk_sums(const unsigned char* xs, acc_t<scalar_t>* sums,
                                           const int64_t* __restrict__ col, const RawVal<scalar_t>* __restrict__ val,
                                           int64_t rk0, int64_t rk1, int in_features, int in_pad, bool vec_entries,
                                           int lane) {
  using L = SparseLayout<scalar_t, kColBytes>;
  using acc = acc_t<scalar_t>;
  using E = Entry<scalar_t>;
  constexpr unsigned kFull = 0xffffffffu;
  constexpr int kSub = kGroupsPerRow * L::kG;       // lanes of a row
  constexpr int kRowsPerRound = kWarp / kSub;       // rows a warp runs at once
  constexpr int kRounds = (kChunkRows + kRowsPerRound - 1) / kRowsPerRound;
  constexpr int kWindow = 2 * kSub;                 // entries of a row loaded at a time, two a lane
  constexpr int kSteps = kWindow / kGroupsPerRow;   // steps of a full window
  static_assert(kGroupsPerRow == 1 || kGroupsPerRow == 2, "one or two groups a row");

  const int sub = lane / kSub;                      // the row of a round this lane works on
  const int grp = (lane / L::kG) & 1;               // group parity: which half of a line the lane reads first
  const int rg = kGroupsPerRow == 2 ? grp : 0;      // its group among the row's
  const int gl = lane % L::kG;                      // its place in the group
  const int sub_base = sub * kSub;
  const int pair_idx = 2 * (lane % kSub);           // the entries it loads: window + pair_idx, + 1
  // Its first chunk of an entry's line: gl + 4 g of 8 (groups of a phase read opposite halves, then swap), or gl.
  const int chunk0 = L::kCPL == 2 ? gl + 4 * grp : gl;
  const uint32_t chunk_off = static_cast<uint32_t>(chunk0 * kVecBytes);

  RowEntries<scalar_t> row =
      row_entries<scalar_t>(col, val, __shfl_sync(kFull, rk0, sub), __shfl_sync(kFull, rk1, sub));
  EntryPair<scalar_t> pair = load_pair<scalar_t>(row, pair_idx, vec_entries);
#pragma unroll 1
  for (int round = 0; round < kRounds; ++round) {
    const int r = round * kRowsPerRound + sub;
    const int rn = r + kRowsPerRound;  // next round's row (>= kChunkRows: empty)
    const RowEntries<scalar_t> next_row = row_entries<scalar_t>(col, val, __shfl_sync(kFull, rk0, rn & 31),
                                                                __shfl_sync(kFull, rk1, rn & 31));
    const int max_span = warp_max(row.hi);
    acc sum[L::kCPL][L::kVE];
#pragma unroll
    for (int c = 0; c < L::kCPL; ++c) {
#pragma unroll
      for (int j = 0; j < L::kVE; ++j) sum[c][j] = 0;
    }
#pragma unroll 1
    for (int off = 0; off < max_span; off += kWindow) {
      E w[2];
      bool bad = false;
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        const int64_t c = pair.c[u];
        const bool in = (pair.in >> u) & 1;
        const bool col_ok = static_cast<uint64_t>(c) < static_cast<uint64_t>(in_features);
        bad = bad || (in && !col_ok);
        const bool good = in && col_ok;
        const uint32_t cu = static_cast<uint32_t>(c);
        w[u] = E::make(good ? cu ^ ((cu >> 3) & L::kSlotXor) : static_cast<uint32_t>(in_pad),
                       good ? pair.v[u] : RawVal<scalar_t>(0));
      }
      CUDA_KERNEL_ASSERT(!bad && "pets: a sparse_delta column is outside [0, in)");
      // Prefetch: this row's next window, or the next round's first.
      pair = off + kWindow < max_span ? load_pair<scalar_t>(row, off + kWindow + pair_idx, vec_entries)
                                      : load_pair<scalar_t>(next_row, pair_idx, vec_entries);
      // Step st: group g of the row takes window entry 2 kGroupsPerRow (st / 2) + 2 g + st % 2 (lane
      // kGroupsPerRow (st / 2) + g, word st % 2): entries in window order across the groups, so a window with
      // rem entries left takes about rem / kGroupsPerRow steps (checked every two steps).
      // 16-bit types shuffle the window's entries up front (one convergence check); the two-register entries of
      // wider types one step at a time (registers).
      E en[kIs16<scalar_t> ? kSteps : 1];
      if constexpr (kIs16<scalar_t>) {
#pragma unroll
        for (int st = 0; st < kSteps; ++st) en[st] = w[st & 1].from(sub_base + kGroupsPerRow * (st >> 1) + rg);
      }
      const int rem = max_span - off;
      const int steps = rem >= kWindow ? kSteps
                                       : 2 * (rem / (2 * kGroupsPerRow)) + min(rem % (2 * kGroupsPerRow), 2);
#pragma unroll
      for (int st = 0; st < kSteps; ++st) {
        if (st % 2 == 0 && st >= steps) break;
        // Its chunks of the entry's line (chunk_off < kColBytes: or is add); a second is the line's other half.
        const E e = kIs16<scalar_t> ? en[kIs16<scalar_t> ? st : 0]
                                    : w[st & 1].from(sub_base + kGroupsPerRow * (st >> 1) + rg);
        const uint32_t off0 = (e.slot() * kColBytes) | chunk_off;
        const acc v = e.value();
#pragma unroll
        for (int c = 0; c < L::kCPL; ++c) {
          const uint4 raw = *reinterpret_cast<const uint4*>(xs + (c == 0 ? off0 : off0 ^ 64u));
          acc xv[L::kVE];
          chunk_values<scalar_t>(raw, xv);
#pragma unroll
          for (int j = 0; j < L::kVE; ++j) sum[c][j] = fma_acc(v, xv[j], sum[c][j]);
        }
      }
    }
    if (max_span == 0) pair = load_pair<scalar_t>(next_row, pair_idx, vec_entries);  // no window ran
    const bool store = row.hi > 0 && r < kChunkRows;
    acc* srow = sums + (r < kChunkRows ? r : 0) * L::kSStride;
    if constexpr (kGroupsPerRow == 1) {
      // The lane's own chunks are the row's sums for those tokens: chunk chunk0 (sum[0]) and chunk0 ^ 4 (sum[1]).
#pragma unroll
      for (int c = 0; c < L::kCPL; ++c) {
        const int chunk = c == 0 ? chunk0 : chunk0 ^ 4;
        acc* dst = srow + chunk * L::kVE;
        if (store) {
#pragma unroll
          for (int j = 0; j < L::kVE; ++j) {
            if constexpr (L::kT > 32) {
              dst[j] = chunk >= 4 ? sum[c][j ^ 4] : sum[c][j];  // sum_col: tokens 32-63 swap 4-token halves
            } else {
              dst[j] = sum[c][j];
            }
          }
        }
      }
    } else if constexpr (L::kCPL == 2) {
      // The two groups' sums meet in a reduce-scatter: group g keeps chunk gl + 4 g (its sum[0]) and gets the
      // partner's sum[1], which is that chunk too. One exchange, no selects.
      acc s[L::kVE];
#pragma unroll
      for (int j = 0; j < L::kVE; ++j) s[j] = sum[0][j] + __shfl_xor_sync(kFull, sum[1][j], L::kG);
      acc* dst = srow + chunk0 * L::kVE;
      if (store) {
#pragma unroll
        for (int j = 0; j < L::kVE; ++j) {
          if constexpr (L::kT > 32) {
            dst[j] = grp ? s[j ^ 4] : s[j];  // sum_col: tokens 32-63 (group 1's) swap 4-token halves
          } else {
            dst[j] = s[j];
          }
        }
      }
    } else {
      // One chunk a lane (the same in both groups): each keeps half its tokens.
      constexpr int kHalf = L::kVE / 2;
      static_assert(L::kT <= 32, "sum_col is the identity here");
      acc* dst = srow + gl * L::kVE + grp * kHalf;
#pragma unroll
      for (int j = 0; j < kHalf; ++j) {
        const acc send = grp ? sum[0][j] : sum[0][j + kHalf];
        const acc keep = grp ? sum[0][j + kHalf] : sum[0][j];
        const acc v = keep + __shfl_xor_sync(kFull, send, L::kG);
        if (store) dst[j] = v;
      }
    }
    row = next_row;
  }
}

// n elements of y's bits from src to dst by the block's threads (16-byte vectors where `vec`: both 16-byte aligned
// and n a whole number of vectors).
template <typename scalar_t>
__device__ __forceinline__ void copy_elements(const scalar_t* __restrict__ src, scalar_t* __restrict__ dst, int64_t n,
                                              bool vec) {
  if (vec) {
    const int64_t nv = n * static_cast<int64_t>(sizeof(scalar_t)) / kVecBytes;
    for (int64_t v = threadIdx.x; v < nv; v += blockDim.x) {
      reinterpret_cast<uint4*>(dst)[v] = reinterpret_cast<const uint4*>(src)[v];
    }
  } else {
    for (int64_t v = threadIdx.x; v < n; v += blockDim.x) dst[v] = src[v];
  }
}

// A launch's work, the same in every block: the (batch row, token tile) tiles of rows whose slot has entries ("busy"
// tiles), each split into `splits` items over its output chunks, then the other rows' tiles as copies of y. Blocks
// take items i, i + gridDim.x, ... (a persistent grid of about one block an SM), so the busy tiles of a mixed batch
// (a few rows of diff or mask tasks among many) spread over every SM instead of one block a busy row doing its
// whole slot. Batches of more than kPlanRows rows count every row busy (a block then finds an empty slot itself).
// The split is the one of least estimated time (split_cost). On the H200 (9732c13), splitting every busy tile until
// there were two items a block cost 23.5 -> 39.2 us at bs64 s128 (1%, 768x768; 128 busy tiles in 3 items each):
// each item stages its tile's x again, and an item of few chunks leaves most of its block's warps idle.
constexpr int kPlanRows = 1024;

// The estimated time of busy tiles split `splits` ways, in chunk-steps of a warp: rounds of items over the grid,
// each staging x (stage_steps) and then running its chunks, one a warp at a time. A step is a chunk of the busiest
// slot: in a mixed batch the mask rows' tiles (5% of entries), not the diff rows' (1%), decide when a round ends.
__device__ __forceinline__ float split_cost(int64_t busy_tiles, int64_t splits, int64_t grid, int64_t all_chunks,
                                            int warps, float stage_steps) {
  const int64_t rounds = ceil_div(busy_tiles * splits, grid);
  const int64_t steps = ceil_div(ceil_div(all_chunks, splits), warps);
  return static_cast<float>(rounds) * (static_cast<float>(steps) + stage_steps);
}

// Staging a tile's x in chunk-steps of the busiest slot: a warp stages in_pad / warps columns, each taken as two
// entries' work (an estimate, not measured), against a chunk's max_entries / all_chunks entries. Until 17ee7e6 the
// staging counted in_pad / 1536 steps whatever the density: 2 steps at in 3072, which kept the 73 busy tiles of a
// 256 x 32 mixed batch whole at the FFN output (this counts 0.16 there and splits them in 3; the other sites of
// Fig. 12's batches and the all-busy bs64 s128 batches split as before).
__device__ __forceinline__ float stage_steps(int in_pad, int warps, int64_t max_entries, int64_t all_chunks) {
  const float per_chunk = fmaxf(1.0f, static_cast<float>(max_entries) / static_cast<float>(all_chunks));
  return 2.0f * static_cast<float>(in_pad) / static_cast<float>(warps) / per_chunk;
}

struct SparsePlan {
  int splits;      // items a busy tile is split into
  int busy_items;
  int items;       // busy items, then one copy item a tile of the other rows
};

constexpr int kPlanGroups = kPlanRows / kWarp;  // rows' busy bits: a word a group of 32 rows

// The index of the n-th (from 0) row whose busy bit is `want`, from the rows' busy bits (bits past the last row
// clear) and before[g] = busy rows in the groups before g: the last group with at most n such rows before it (a
// binary search), then the bit within its word. n must be less than the count of such rows.
__device__ __forceinline__ int64_t nth_row(const unsigned* bits, const int* before, int groups, int n, bool want) {
  const auto rows_before = [&](int g) { return want ? before[g] : kWarp * g - before[g]; };
  int lo = 0, hi = groups - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (rows_before(mid) <= n) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const unsigned word = want ? bits[lo] : ~bits[lo];
  return static_cast<int64_t>(kWarp) * lo + __fns(word, 0, n - rows_before(lo) + 1);
}

template <typename scalar_t, int kColBytes>
__global__ void __launch_bounds__(kSparseMaxWarps* kWarp, 1)
    sparse_delta_kernel(const scalar_t* __restrict__ y, const scalar_t* __restrict__ x,
                        const int64_t* __restrict__ task_ids, const int64_t* __restrict__ row_ptr,
                        const int64_t* __restrict__ col, const RawVal<scalar_t>* __restrict__ val, int64_t slots,
                        int64_t pool, scalar_t* __restrict__ out, int64_t rows, int64_t tokens, int in_features,
                        int in_pad, int64_t out_features, SparseFlags flags) {
  using L = SparseLayout<scalar_t, kColBytes>;
  using acc = acc_t<scalar_t>;
  constexpr unsigned kFull = 0xffffffffu;
  extern __shared__ __align__(16) unsigned char shared_raw[];
  __shared__ int next_chunk;
  __shared__ unsigned busy_bits[kPlanGroups];  // bit r % 32 of word r / 32: row r's slot has entries
  __shared__ int busy_before[kPlanGroups + 1];  // busy rows in the groups before g (the last: all)
  __shared__ int max_entries;                   // the most entries of a busy row's slot (capped at 2^31 - 1)

  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const int warp = static_cast<int>(threadIdx.x) / kWarp;
  const int warps = static_cast<int>(blockDim.x) / kWarp;
  const int64_t tiles_per_row = ceil_div(tokens, L::kT);
  const int64_t all_chunks = ceil_div(out_features, kChunkRows);

  // The plan: which rows are busy (their slot's first and last offsets differ), counted in row order. Little
  // static shared memory (the x lines of in 3072 take all but ~2 KB of an SM's at 16 warps).
  const bool planned = rows <= kPlanRows;
  const int groups = static_cast<int>(ceil_div(min64(rows, kPlanRows), kWarp));
  if (threadIdx.x == 0) max_entries = 0;
  __syncthreads();
  if (planned) {
    for (int64_t r0 = static_cast<int64_t>(warp) * kWarp; r0 < rows; r0 += blockDim.x) {
      const int64_t r = r0 + lane;
      bool busy = false;
      int entries = 0;
      if (r < rows) {
        const int64_t t = slot_of(task_ids, r, slots);
        const int64_t* rp = row_ptr + max64(t, 0) * (out_features + 1);
        busy = t >= 0 && rp[0] != rp[out_features];
        entries = busy ? static_cast<int>(min64(max64(rp[out_features] - rp[0], 0), INT32_MAX)) : 0;
      }
      const unsigned ballot = __ballot_sync(kFull, busy);
      const int most = warp_max(entries);
      if (lane == 0) {
        busy_bits[r0 / kWarp] = ballot;
        atomicMax(&max_entries, most);
      }
    }
    __syncthreads();
    if (warp == 0) {  // exclusive scan of the groups' counts (groups <= 32)
      const int count = lane < groups ? __popc(busy_bits[lane]) : 0;
      int inclusive = count;
#pragma unroll
      for (int offset = 1; offset < kWarp; offset *= 2) {
        const int v = __shfl_up_sync(kFull, inclusive, offset);
        if (lane >= offset) inclusive += v;
      }
      if (lane < groups) busy_before[lane] = inclusive - count;
      if (lane == kWarp - 1) busy_before[groups] = inclusive;
    }
    __syncthreads();
  }
  __shared__ SparsePlan plan;  // block-uniform, read from shared memory where used (registers are short)
  if (warp == 0) {
    const int64_t busy_rows = planned ? busy_before[groups] : rows;
    const int64_t busy_tiles = busy_rows * tiles_per_row;
    const int64_t grid = gridDim.x;
    // The fewest splits of least cost, lanes trying s = lane + 1, lane + 33, ... up to about 4 rounds of items.
    int64_t splits = 1;
    if (busy_tiles > 0 && busy_tiles < grid) {
      const int64_t limit = min64(all_chunks, 4 * grid / busy_tiles + 1);
      const float stage = stage_steps(in_pad, warps, max_entries, all_chunks);
      float best = split_cost(busy_tiles, 1, grid, all_chunks, warps, stage);
      for (int64_t s = lane + 1; s <= limit; s += kWarp) {
        const float c = split_cost(busy_tiles, s, grid, all_chunks, warps, stage);
        if (c < best) best = c, splits = s;
      }
      for (int offset = kWarp / 2; offset > 0; offset /= 2) {
        const float other = __shfl_xor_sync(kFull, best, offset);
        const int64_t other_splits = __shfl_xor_sync(kFull, splits, offset);
        if (other < best || (other == best && other_splits < splits)) best = other, splits = other_splits;
      }
    }
    if (lane == 0) {
      plan.splits = static_cast<int>(splits);
      plan.busy_items = static_cast<int>(busy_tiles * splits);
      plan.items = static_cast<int>(busy_tiles * splits + (rows - busy_rows) * tiles_per_row);
    }
  }
  __syncthreads();

  for (int item = blockIdx.x; item < plan.items; item += gridDim.x) {
    __syncthreads();  // the previous item's staged x, sums and chunk counter are free
    if (item >= plan.busy_items) {  // a tile of a row without entries: y itself
      const int c = item - plan.busy_items;
      const int64_t row = nth_row(busy_bits, busy_before, groups, static_cast<int>(c / tiles_per_row), false);
      const int64_t tok0 = (c % tiles_per_row) * L::kT;
      const int64_t n = min64(L::kT, tokens - tok0) * out_features;
      const int64_t at = (row * tokens + tok0) * out_features;
      copy_elements(y + at, out + at, n, flags.vec_y);
      continue;
    }
    const int64_t tile = item / plan.splits, z = item % plan.splits;
    const int64_t row = planned ? nth_row(busy_bits, busy_before, groups, static_cast<int>(tile / tiles_per_row), true)
                                : tile / tiles_per_row;
    const int64_t tok0 = (tile % tiles_per_row) * L::kT;
    const int count = static_cast<int>(min64(L::kT, tokens - tok0));
    const int64_t m0 = row * tokens + tok0;
    const int64_t t = slot_of(task_ids, row, slots);
    const int64_t* p = row_ptr + max64(t, 0) * (out_features + 1);
    // This item's output rows: chunks [c_begin, chunks) of kChunkRows rows, split z of plan.splits (the sums of a
    // row do not depend on the split).
    const int64_t per_split = ceil_div(all_chunks, plan.splits);
    const int64_t c_begin = z * per_split;
    const int64_t chunks = min64(all_chunks, c_begin + per_split);
    if (c_begin >= chunks) continue;  // block-uniform: a split past the last chunk

    // Only in unplanned batches (every row counted busy, so more tiles than blocks and no split): a slot without
    // nonzeros (block-uniform), the tile of y itself.
    if (t < 0 || p[0] == p[out_features]) {
      copy_elements(y + m0 * out_features, out + m0 * out_features, count * out_features, flags.vec_y);
      continue;
    }

    // Stage x: lane (a, b) of a warp loads tokens [a kVE, (a + 1) kVE) x columns [kb, kb + 8) (coalesced: 8 kVE
    // bytes of each token row per lane, kWarp / kChunks lanes side by side) and stores each column's kVE tokens as
    // chunk a of that column's line; a phase's 8 stores go to distinct banks (one line, or lines at different
    // slot residues by the permutation).
    unsigned char* xs = shared_raw;
    {
      const int a = lane % L::kChunks, b = lane / L::kChunks;
      for (int k0 = warp * L::kPassCols; k0 < in_pad; k0 += warps * L::kPassCols) {
        const int kb = k0 + 8 * b;
        if (kb >= in_pad) continue;
        uint32_t seg[L::kVE][L::kSegWords];
#pragma unroll
        for (int tt = 0; tt < L::kVE; ++tt) {
          const int tok = a * L::kVE + tt;
          const scalar_t* xr = tok < count ? x + (m0 + tok) * in_features : nullptr;
          load_segment<scalar_t>(xr, kb, in_features, flags.vec_x, seg[tt]);
        }
        const int sx = (kb >> 3) & L::kSlotXor;
#pragma unroll
        for (int c = 0; c < 8; ++c) {
          *reinterpret_cast<uint4*>(xs + (kb + (c ^ sx)) * kColBytes + a * kVecBytes) =
              segment_column<scalar_t, L::kVE, L::kSegWords>(seg, c);
        }
      }
      if (static_cast<int>(threadIdx.x) < L::kChunks) {  // the zero line of padding entries and bad columns
        *reinterpret_cast<uint4*>(xs + in_pad * kColBytes + threadIdx.x * kVecBytes) = make_uint4(0, 0, 0, 0);
      }
    }
    if (threadIdx.x == 0) next_chunk = warps;
    __syncthreads();

    acc* sums = reinterpret_cast<acc*>(shared_raw + static_cast<size_t>(in_pad + 1) * kColBytes) +
                warp * kChunkRows * L::kSStride;
    // Short rows (a slot's average below 16 entries): a group a row; else two groups a row.
    const bool short_rows = p[out_features] - p[0] < 16 * out_features;

    // Lane l <= kChunkRows of a warp holds row_ptr[t, o0 + l] of its chunk.
    auto chunk_offsets = [&](int64_t chunk) -> int64_t {
      const int64_t o = chunk * kChunkRows + lane;
      return chunk < chunks && lane <= kChunkRows && o <= out_features ? p[o] : 0;
    };
    int64_t chunk = c_begin + warp;
    int64_t q = chunk_offsets(chunk);
    while (chunk < chunks) {
      int64_t next = 0;
      if (lane == 0) next = c_begin + atomicAdd(&next_chunk, 1);
      next = __shfl_sync(kFull, next, 0);
      const int64_t q_next = chunk_offsets(next);  // in flight during this chunk

      const int64_t o0 = chunk * kChunkRows;
      const int64_t q1 = __shfl_down_sync(kFull, q, 1);
      const bool mine = lane < kChunkRows && o0 + lane < out_features;
      const bool ok = q >= 0 && q <= q1 && q1 <= pool;
      CUDA_KERNEL_ASSERT((!mine || ok) && "pets: CSR offsets outside the pool or decreasing");
      const int64_t rk0 = mine && ok ? q : 0, rk1 = mine && ok ? q1 : 0;  // lane r: row o0 + r, else empty

      if (short_rows) {
        chunk_sums<scalar_t, kColBytes, 1>(xs, sums, col, val, rk0, rk1, in_features, in_pad, flags.vec_entries,
                                           lane);
      } else {
        chunk_sums<scalar_t, kColBytes, 2>(xs, sums, col, val, rk0, rk1, in_features, in_pad, flags.vec_entries,
                                           lane);
      }
      __syncwarp();

      // The chunk's outputs (rows o0 .. o0 + 15, all the tile's tokens), coalesced across output features.
      const unsigned nonempty = __ballot_sync(kFull, rk1 > rk0);  // bit r: row o0 + r has entries
      if (flags.pairs) {
        if (L::kT % 32 == 0 && count == L::kT) {
          write_pairs<scalar_t, L, true>(y, out, sums, m0, count, o0, out_features, lane, nonempty);
        } else {
          write_pairs<scalar_t, L, false>(y, out, sums, m0, count, o0, out_features, lane, nonempty);
        }
      } else {
        write_scalars<scalar_t, L>(y, out, sums, m0, count, o0, out_features, lane, nonempty);
      }
      __syncwarp();
      chunk = next;
      q = q_next;
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    embedding_delta_kernel(const scalar_t* __restrict__ y, const int64_t* __restrict__ ids,
                           const int64_t* __restrict__ task_ids, const int64_t* __restrict__ row_ptr,
                           const int64_t* __restrict__ col, const scalar_t* __restrict__ val, int64_t slots,
                           int64_t pool, scalar_t* __restrict__ out, int64_t rows, int64_t tokens, int64_t vocab,
                           int64_t hidden) {
  using acc = acc_t<scalar_t>;
  const int64_t m = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  if (m >= rows) return;
  const int64_t t = slot_of(task_ids, m / tokens, slots);
  const int64_t id = ids[m];
  CUDA_KERNEL_ASSERT(id >= 0 && id < vocab && "pets: an embedding_delta id is outside [0, V)");
  int64_t k0 = 0, k1 = 0;
  if (t >= 0 && id >= 0 && id < vocab) row_range(row_ptr + t * (vocab + 1) + id, pool, k0, k1);
  const scalar_t* yr = y + m * hidden;
  scalar_t* outr = out + m * hidden;
  for (int64_t j = threadIdx.x % kWarp; j < hidden; j += kWarp) {
    if (k0 == k1) {
      outr[j] = yr[j];
      continue;
    }
    acc sum = static_cast<acc>(yr[j]);
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t c = col[k];
      CUDA_KERNEL_ASSERT(c >= 0 && c < hidden && "pets: an embedding_delta column is outside [0, H)");
      if (c == j) sum += static_cast<acc>(val[k]);
    }
    outr[j] = static_cast<scalar_t>(sum);
  }
}

// Shared memory of a sparse_delta block: the staged lines of x (in_pad columns and the zero line) and each warp's
// fp32 sums (kChunkRows rows of kT + 1).
template <typename scalar_t, int kColBytes>
size_t sparse_shared_bytes(int64_t in_pad, int warps) {
  using L = SparseLayout<scalar_t, kColBytes>;
  return static_cast<size_t>(in_pad + 1) * kColBytes +
         static_cast<size_t>(warps) * kChunkRows * L::kSStride * sizeof(acc_t<scalar_t>);
}

template <typename scalar_t, int kColBytes>
void launch_sparse_delta(const at::Tensor& y3, const at::Tensor& x3, const at::Tensor& ids, const at::Tensor& rp,
                         const at::Tensor& cols, const at::Tensor& vals, at::Tensor& out, int warps) {
  using L = SparseLayout<scalar_t, kColBytes>;
  const int64_t tokens = y3.size(1), in_features = x3.size(2), out_features = y3.size(2);
  const int64_t in_pad = ceil_div(in_features, 8) * 8;
  // About one block an SM, each taking the plan's items in turn (sparse_delta_kernel). Splitting few busy tiles over
  // output chunks is what made small batches fast: profiled on the H200 (bench.breakdown, 8 mixed tasks, bs1 s64),
  // without splits (8 or 16 blocks on 132 SMs) 6.4 ms a forward, 87x the op's memory floor; with SMs / tiles splits
  // 1.67 ms, 22x (11cc4b8); four waves of splits, 2 chunks of rows a split at least, 1.93 ms, 25x (44476b4, twice):
  // each split stages all of its tile's x.
  const int64_t rows = y3.size(0), tiles = rows * ceil_div(tokens, L::kT);
  const int64_t all_chunks = ceil_div(out_features, kChunkRows);
  const int64_t items = tiles * all_chunks;  // the most busy items a plan can have
  TORCH_CHECK(items + tiles < (int64_t(1) << 31), "pets::sparse_delta: ", rows, " rows of ", tokens, " tokens and ",
              out_features, " outputs are more tiles than the kernel's int32 plan counts");
  const dim3 grid(static_cast<unsigned>(min64(multiprocessor_count(), items)));
  const size_t shared = sparse_shared_bytes<scalar_t, kColBytes>(in_pad, warps);
  allow_shared_memory("pets::sparse_delta", sparse_delta_kernel<scalar_t, kColBytes>, shared, "x's in_features");
  const int64_t elem = static_cast<int64_t>(sizeof(scalar_t));
  const auto aligned = [](const void* ptr, size_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; };
  SparseFlags flags;
  flags.vec_x = vectorizable(x3, in_features);
  flags.vec_entries = aligned(cols.const_data_ptr(), kVecBytes) && aligned(vals.const_data_ptr(), 2 * elem);
  flags.vec_y = (out_features * elem) % kVecBytes == 0 && aligned(y3.const_data_ptr(), kVecBytes) &&
                aligned(out.const_data_ptr(), kVecBytes);
  flags.pairs =
      elem == 2 && out_features % 2 == 0 && aligned(y3.const_data_ptr(), 4) && aligned(out.const_data_ptr(), 4);
  sparse_delta_kernel<scalar_t, kColBytes><<<grid, warps * kWarp, shared, stream()>>>(
      y3.const_data_ptr<scalar_t>(), x3.const_data_ptr<scalar_t>(), ids.const_data_ptr<int64_t>(),
      rp.const_data_ptr<int64_t>(), cols.const_data_ptr<int64_t>(),
      reinterpret_cast<const RawVal<scalar_t>*>(vals.const_data_ptr<scalar_t>()), rp.size(0), cols.size(0),
      out.mutable_data_ptr<scalar_t>(), rows, tokens, static_cast<int>(in_features), static_cast<int>(in_pad),
      out_features, flags);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Column lines just wide enough for a row's tokens (a tile of 64 fp16 tokens over rows of 32 would run half its
// lanes on zeros), at most 128 bytes, and then the most warps whose shared memory the device gives; narrower lines
// where none fits, and where even 32-byte lines do not, the smallest launch, which then fails
// allow_shared_memory's check with the sizes.
template <typename scalar_t>
void run_sparse_delta(const at::Tensor& y3, const at::Tensor& x3, const at::Tensor& ids, const at::Tensor& rp,
                      const at::Tensor& cols, const at::Tensor& vals, at::Tensor& out) {
  const int64_t in_pad = ceil_div(x3.size(2), 8) * 8;
  const int64_t row_bytes = y3.size(1) * static_cast<int64_t>(sizeof(scalar_t));  // bytes of a row's column
  const size_t limit = shared_memory_optin();
  constexpr size_t kStaticSlack = 512;  // the kernel's static shared memory (~300 B: the plan), with room to spare
  const auto fits = [&](size_t bytes) { return bytes + kStaticSlack <= limit; };
  for (const int warps : {kSparseMaxWarps, kSparseMaxWarps / 2}) {
    if (row_bytes > 64 && fits(sparse_shared_bytes<scalar_t, 128>(in_pad, warps))) {
      return launch_sparse_delta<scalar_t, 128>(y3, x3, ids, rp, cols, vals, out, warps);
    }
  }
  for (const int warps : {kSparseMaxWarps, kSparseMaxWarps / 2}) {
    if (row_bytes > 32 && fits(sparse_shared_bytes<scalar_t, 64>(in_pad, warps))) {
      return launch_sparse_delta<scalar_t, 64>(y3, x3, ids, rp, cols, vals, out, warps);
    }
  }
  const int warps = fits(sparse_shared_bytes<scalar_t, 32>(in_pad, kSparseMaxWarps)) ? kSparseMaxWarps
                                                                                     : kSparseMaxWarps / 2;
  launch_sparse_delta<scalar_t, 32>(y3, x3, ids, rp, cols, vals, out, warps);
}

}  // namespace

at::Tensor sparse_delta(const at::Tensor& y, const at::Tensor& x, const at::Tensor& task_ids,
                        const at::Tensor& row_ptr, const at::Tensor& col, const at::Tensor& val) {
  check_sparse_delta_inputs(y, x, task_ids, row_ptr, col, val);
  const c10::cuda::OptionalCUDAGuard guard(y.device());
  const at::Tensor y3 = as_rows(y).contiguous(), x3 = as_rows(x).contiguous();
  const at::Tensor ids = task_ids.contiguous();
  const at::Tensor rp = row_ptr.contiguous(), cols = col.contiguous(), vals = val.contiguous();
  at::Tensor out = at::empty(y.sizes(), y.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "pets::sparse_delta", [&] {
    run_sparse_delta<scalar_t>(y3, x3, ids, rp, cols, vals, out);
  });
  return out;
}

at::Tensor embedding_delta(const at::Tensor& y, const at::Tensor& ids, const at::Tensor& task_ids,
                           const at::Tensor& row_ptr, const at::Tensor& col, const at::Tensor& val) {
  const int64_t vocab = check_embedding_delta_inputs(y, ids, task_ids, row_ptr, col, val);
  const c10::cuda::OptionalCUDAGuard guard(y.device());
  const at::Tensor y3 = as_rows(y).contiguous();
  const at::Tensor idc = ids.contiguous(), tids = task_ids.contiguous();
  const at::Tensor rp = row_ptr.contiguous(), cols = col.contiguous(), vals = val.contiguous();
  at::Tensor out = at::empty(y.sizes(), y.options());
  if (out.numel() == 0) return out;
  const int64_t rows = y3.size(0) * y3.size(1);
  const int64_t warps = kThreads / kWarp;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "pets::embedding_delta", [&] {
    embedding_delta_kernel<scalar_t><<<static_cast<unsigned>(ceil_div(rows, warps)), kThreads, 0, stream()>>>(
        y3.const_data_ptr<scalar_t>(), idc.const_data_ptr<int64_t>(), tids.const_data_ptr<int64_t>(),
        rp.const_data_ptr<int64_t>(), cols.const_data_ptr<int64_t>(), vals.const_data_ptr<scalar_t>(), rp.size(0),
        cols.size(0), out.mutable_data_ptr<scalar_t>(), rows, y3.size(1), vocab, y3.size(2));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace pets::cuda
