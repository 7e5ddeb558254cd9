// A token's row held in a warp's registers, for the LayerNorm-bound kernels (pets::layer_norm, the adapter's ends):
// lane l holds the 16-byte vectors l, l + 32, ... of the row (at most kMaxVec of them), so the row is read from
// memory once and the mean, the variance and the output come from registers. Applies when rows_fit().
#pragma once

#include "common.cuh"

namespace pets::cuda {

constexpr int kMaxVec = 4;  // vectors per lane: rows of up to 32 * 4 * 8 = 1024 half or 512 float features

template <typename scalar_t>
constexpr int vec_elems() {
  return kVecBytes / static_cast<int>(sizeof(scalar_t));
}

// Whether every row of `hidden` features of the given tensors (one dtype) can live in registers as 16-byte vectors.
inline bool rows_fit(int64_t hidden, std::initializer_list<const at::Tensor*> tensors) {
  const int64_t row_bytes = hidden * static_cast<int64_t>((*tensors.begin())->element_size());
  if (row_bytes % kVecBytes != 0 || row_bytes / kVecBytes > kWarp * kMaxVec) return false;
  for (const at::Tensor* t : tensors) {
    if (!vectorizable(*t, hidden)) return false;
  }
  return true;
}

template <typename scalar_t>
struct RowRegs {
  static constexpr int V = vec_elems<scalar_t>();
  acc_t<scalar_t> v[kMaxVec][V];

  // Vector i of this lane is vector (lane + 32 * i) of the row, if that is < nvec.
  __device__ __forceinline__ static bool has(int i, int64_t nvec) { return threadIdx.x % kWarp + kWarp * i < nvec; }
  __device__ __forceinline__ static int64_t index(int i) { return threadIdx.x % kWarp + kWarp * i; }

  __device__ __forceinline__ void load(const scalar_t* row, int64_t nvec) {
#pragma unroll
    for (int i = 0; i < kMaxVec; ++i) {
      if (!has(i, nvec)) continue;
      const Vec<scalar_t> q = load_vec<scalar_t>(row, index(i));
#pragma unroll
      for (int e = 0; e < V; ++e) v[i][e] = static_cast<acc_t<scalar_t>>(q.v[e]);
    }
  }
  __device__ __forceinline__ void store(scalar_t* row, int64_t nvec) const {
#pragma unroll
    for (int i = 0; i < kMaxVec; ++i) {
      if (!has(i, nvec)) continue;
      Vec<scalar_t> q;
#pragma unroll
      for (int e = 0; e < V; ++e) q.v[e] = static_cast<scalar_t>(v[i][e]);
      reinterpret_cast<Vec<scalar_t>*>(row)[index(i)] = q;
    }
  }
  // Every value rounded to scalar_t, as a tensor of that dtype would hold it.
  __device__ __forceinline__ void round(int64_t nvec) {
#pragma unroll
    for (int i = 0; i < kMaxVec; ++i) {
#pragma unroll
      for (int e = 0; e < V; ++e) v[i][e] = static_cast<acc_t<scalar_t>>(static_cast<scalar_t>(v[i][e]));
    }
  }

  // In place: LN with the affine (weight + wd, bias + bd); mean, then the variance as a second pass.
  __device__ __forceinline__ void layer_norm(int64_t nvec, int64_t hidden, double eps, const scalar_t* weight,
                                             const scalar_t* bias, const scalar_t* wd, const scalar_t* bd) {
    using acc = acc_t<scalar_t>;
    acc sum = 0;
#pragma unroll
    for (int i = 0; i < kMaxVec; ++i) {
      if (!has(i, nvec)) continue;
#pragma unroll
      for (int e = 0; e < V; ++e) sum += v[i][e];
    }
    const acc mean = warp_sum(sum) / static_cast<acc>(hidden);
    acc squares = 0;
#pragma unroll
    for (int i = 0; i < kMaxVec; ++i) {
      if (!has(i, nvec)) continue;
#pragma unroll
      for (int e = 0; e < V; ++e) squares += (v[i][e] - mean) * (v[i][e] - mean);
    }
    const acc rstd = acc(1) / sqrt(warp_sum(squares) / static_cast<acc>(hidden) + static_cast<acc>(eps));
#pragma unroll
    for (int i = 0; i < kMaxVec; ++i) {
      if (!has(i, nvec)) continue;
      const Vec<scalar_t> w = load_vec<scalar_t>(weight, index(i)), b = load_vec<scalar_t>(bias, index(i));
      const Vec<scalar_t> dw = load_vec<scalar_t>(wd, index(i)), db = load_vec<scalar_t>(bd, index(i));
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const acc gamma = static_cast<acc>(w.v[e]) + static_cast<acc>(dw.v[e]);
        const acc beta = static_cast<acc>(b.v[e]) + static_cast<acc>(db.v[e]);
        v[i][e] = (v[i][e] - mean) * rstd * gamma + beta;
      }
    }
  }
};

}  // namespace pets::cuda
