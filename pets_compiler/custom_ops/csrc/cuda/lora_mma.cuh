// The tensor-core path of linear_delta for fp16 and bf16 (SGMV on WMMA 16x16x16 fragments, fp32 accumulation):
// a block takes 16 tokens of one batch row (one slot). Phase 1, h = x @ A[t, :r].T: x and A are staged in K slices
// into shared memory (rows beyond the tile, ranks beyond r and features beyond in are zeros), each warp multiplies
// its k-steps, the warps' partial fragments are summed and h is rounded to the input dtype (as a matmul in that
// dtype would). Phase 2, out = y + scale * h @ B[t, :, :r].T (+ bias): warps take 16-feature output tiles, stage the
// slot's B tile (zeros beyond r), multiply, and write y + the term.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include "common.cuh"

namespace pets::cuda {

template <typename scalar_t>
struct MmaType;
template <>
struct MmaType<at::Half> {
  using type = __half;
};
template <>
struct MmaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

namespace mma_lora {

constexpr int kTile = 16;    // tokens per block = the fragments' M; also their N and K
constexpr int kSlice = 256;  // in_features staged per step: 16 k-steps, two per warp
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * kWarp;
constexpr int kMaxRank = 128;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    kernel(const scalar_t* __restrict__ y, const scalar_t* __restrict__ x, const int64_t* __restrict__ task_ids,
           const scalar_t* __restrict__ lora_a, const scalar_t* __restrict__ lora_b,
           const scalar_t* __restrict__ lora_scale, const int64_t* __restrict__ lora_rank, int64_t lora_slots,
           int64_t table_rank, SiteTerms<scalar_t> terms, scalar_t* __restrict__ out, int64_t tokens,
           int64_t in_features, int64_t out_features, bool vec) {
  using namespace nvcuda;
  constexpr int V = kVecBytes / sizeof(scalar_t);  // 8 elements a vector
  using T = typename MmaType<scalar_t>::type;  // the same bits as scalar_t
  __shared__ __align__(32) scalar_t xs[kTile * kSlice];     // x slice, [token][k]
  __shared__ __align__(32) scalar_t as[kTile * kSlice];     // A chunk slice, [rank][k]
  __shared__ __align__(32) float red[kWarps][kTile * kTile];  // per-warp fragments
  __shared__ __align__(32) scalar_t hs[kTile * kMaxRank];   // h, [token][rank], rounded
  __shared__ __align__(32) scalar_t bs[kWarps][kTile * kTile];  // per-warp B tile, [out][rank]

  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t row = blockIdx.x;
  const int64_t tok0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int count = static_cast<int>(min64(kTile, tokens - tok0));
  const int64_t m0 = row * tokens + tok0;

  const int64_t t = slot_of(task_ids, row, lora_slots);
  int r = 0;
  float s = 0.f;
  if (t >= 0) {
    const int64_t rk = lora_rank[t];
    CUDA_KERNEL_ASSERT(rk >= 0 && rk <= table_rank && "pets: a LoRA rank is outside [0, R]");
    r = static_cast<int>(max64(0, min64(min64(rk, table_rank), kMaxRank)));
    s = static_cast<float>(lora_scale[t]);
    if (s == 0.f) r = 0;
  }
  const int64_t t_bias = terms.bias != nullptr ? slot_of(task_ids, row, terms.bias_slots) : -1;
  const int64_t t_scale = terms.scale != nullptr ? slot_of(task_ids, row, terms.scale_slots) : -1;
  const int chunks = (r + kTile - 1) / kTile;
  const scalar_t* a = lora_a + max64(t, 0) * table_rank * in_features;

  for (int c = 0; c < chunks; ++c) {
    wmma::fragment<wmma::accumulator, kTile, kTile, kTile, float> acc;
    wmma::fill_fragment(acc, 0.f);
    for (int64_t k0 = 0; k0 < in_features; k0 += kSlice) {
      if (vec) {
        // 16-byte vectors, all of a thread's loads in flight before its stores.
        constexpr int kPer = kTile * kSlice / V / kThreads;  // vectors per thread per array: 2
        Vec<scalar_t> xv[kPer], av[kPer];
#pragma unroll
        for (int u = 0; u < kPer; ++u) {
          const int q = threadIdx.x + u * kThreads, rr = q / (kSlice / V);
          const int64_t kk = k0 + (q % (kSlice / V)) * V;
          const int j = c * kTile + rr;
          xv[u] = (kk < in_features && rr < count) ? load_vec<scalar_t>(x + (m0 + rr) * in_features + kk, 0)
                                                   : Vec<scalar_t>{};
          av[u] = (kk < in_features && j < r) ? load_vec<scalar_t>(a + j * in_features + kk, 0) : Vec<scalar_t>{};
        }
#pragma unroll
        for (int u = 0; u < kPer; ++u) {
          const int q = threadIdx.x + u * kThreads;
          reinterpret_cast<Vec<scalar_t>*>(xs)[q] = xv[u];
          reinterpret_cast<Vec<scalar_t>*>(as)[q] = av[u];
        }
      } else {
        for (int i = threadIdx.x; i < kTile * kSlice; i += kThreads) {
          const int rr = i / kSlice, k = i % kSlice;
          const int64_t kk = k0 + k;
          const bool in_k = kk < in_features;
          xs[i] = (in_k && rr < count) ? x[(m0 + rr) * in_features + kk] : scalar_t(0.f);
          const int j = c * kTile + rr;
          as[i] = (in_k && j < r) ? a[j * in_features + kk] : scalar_t(0.f);
        }
      }
      __syncthreads();
      for (int step = warp; step < kSlice / kTile; step += kWarps) {
        wmma::fragment<wmma::matrix_a, kTile, kTile, kTile, T, wmma::row_major> fx;
        wmma::fragment<wmma::matrix_b, kTile, kTile, kTile, T, wmma::col_major> fa;
        wmma::load_matrix_sync(fx, reinterpret_cast<const T*>(xs) + step * kTile, kSlice);
        wmma::load_matrix_sync(fa, reinterpret_cast<const T*>(as) + step * kTile, kSlice);
        wmma::mma_sync(acc, fx, fa, acc);
      }
      __syncthreads();
    }
    wmma::store_matrix_sync(red[warp], acc, kTile, wmma::mem_row_major);
    __syncthreads();
    for (int i = threadIdx.x; i < kTile * kTile; i += kThreads) {
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) sum += red[w][i];
      hs[(i / kTile) * kMaxRank + c * kTile + i % kTile] = static_cast<scalar_t>(sum);
    }
    __syncthreads();
  }

  const scalar_t* b = lora_b + max64(t, 0) * out_features * table_rank;
  const scalar_t* bt = t_bias >= 0 ? terms.bias + t_bias * out_features : nullptr;
  const scalar_t* st = t_scale >= 0 ? terms.scale + t_scale * out_features : nullptr;
  for (int64_t o0 = static_cast<int64_t>(warp) * kTile; o0 < out_features; o0 += kWarps * kTile) {
    // The epilogue's y (and bias) vectors are loaded first, so they are in flight during the B tile and the mma.
    const int e_tm = lane / 2, e_oo = (lane % 2) * V;
    const bool e_in = vec && e_tm < count && o0 + e_oo < out_features;
    const int64_t e_idx = (m0 + e_tm) * out_features + o0 + e_oo;
    Vec<scalar_t> yv{}, bias_v{}, scale_v{};
    if (e_in) {
      yv = load_vec<scalar_t>(y + e_idx, 0);
      if (bt != nullptr) bias_v = load_vec<scalar_t>(bt + o0 + e_oo, 0);
      if (st != nullptr) scale_v = load_vec<scalar_t>(st + o0 + e_oo, 0);
    }
    if (chunks > 0) {
      wmma::fragment<wmma::accumulator, kTile, kTile, kTile, float> acc;
      wmma::fill_fragment(acc, 0.f);
      for (int c = 0; c < chunks; ++c) {
        if (vec) {  // lane: output o0 + lane / 2, ranks j0 .. j0 + 7 of the chunk
          const int o = lane / 2, j0 = c * kTile + (lane % 2) * V;
          Vec<scalar_t> bv{};
          if (o0 + o < out_features) {
            const scalar_t* src = b + (o0 + o) * table_rank + j0;
            if (j0 + V <= r) {
              bv = load_vec<scalar_t>(src, 0);
            } else {
#pragma unroll
              for (int e = 0; e < V; ++e) bv.v[e] = j0 + e < r ? src[e] : scalar_t(0.f);
            }
          }
          reinterpret_cast<Vec<scalar_t>*>(bs[warp])[lane] = bv;
        } else {
          for (int i = lane; i < kTile * kTile; i += kWarp) {
            const int o = i / kTile, j = c * kTile + i % kTile;
            bs[warp][i] = (o0 + o < out_features && j < r) ? b[(o0 + o) * table_rank + j] : scalar_t(0.f);
          }
        }
        __syncwarp();
        wmma::fragment<wmma::matrix_a, kTile, kTile, kTile, T, wmma::row_major> fh;
        wmma::fragment<wmma::matrix_b, kTile, kTile, kTile, T, wmma::col_major> fb;
        wmma::load_matrix_sync(fh, reinterpret_cast<const T*>(hs) + c * kTile, kMaxRank);
        wmma::load_matrix_sync(fb, reinterpret_cast<const T*>(bs[warp]), kTile);
        wmma::mma_sync(acc, fh, fb, acc);
        __syncwarp();
      }
      wmma::store_matrix_sync(red[warp], acc, kTile, wmma::mem_row_major);
      __syncwarp();
    }
    if (vec) {  // lane: token lane / 2, outputs o0 + (lane % 2) * 8 .. + 7: one vector load and store
      if (e_in) {
        Vec<scalar_t> ov = yv;  // bitwise y when there is no term
        if (chunks > 0 || bt != nullptr) {
#pragma unroll
          for (int e = 0; e < V; ++e) {
            float v = static_cast<float>(yv.v[e]);
            if (chunks > 0) v += s * red[warp][e_tm * kTile + e_oo + e];
            if (bt != nullptr) v += static_cast<float>(bias_v.v[e]);
            ov.v[e] = static_cast<scalar_t>(v);
          }
        }
        if (st != nullptr) {
#pragma unroll
          for (int e = 0; e < V; ++e) ov.v[e] = scale_out(ov.v[e], static_cast<float>(scale_v.v[e]));
        }
        reinterpret_cast<Vec<scalar_t>*>(out + e_idx)[0] = ov;
      }
    } else {
      for (int i = lane; i < kTile * kTile; i += kWarp) {
        const int tm = i / kTile, o = i % kTile;
        if (tm >= count || o0 + o >= out_features) continue;
        const int64_t idx = (m0 + tm) * out_features + o0 + o;
        scalar_t v = y[idx];  // bitwise y when there is no term
        if (chunks > 0 || bt != nullptr) {
          float z = static_cast<float>(v);
          if (chunks > 0) z += s * red[warp][i];
          if (bt != nullptr) z += static_cast<float>(bt[o0 + o]);
          v = static_cast<scalar_t>(z);
        }
        out[idx] = st != nullptr ? scale_out(v, static_cast<float>(st[o0 + o])) : v;
      }
    }
    __syncwarp();
  }
}

}  // namespace mma_lora
}  // namespace pets::cuda
