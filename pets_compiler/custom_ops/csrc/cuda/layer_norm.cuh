// LayerNorm of one token by one warp, with a slot's affine deltas: the device routine of pets::layer_norm, also
// used by the adapter kernel for the sublayer's LayerNorm; and the rounded sum of the terms before it.
#pragma once

#include "common.cuh"

namespace pets::cuda {

// x + b[j], then + r[j] (b or r may be null: that term is absent), each sum rounded to scalar_t as pets::bias_delta
// and aten.add round it: the value a materialized sum would hold, as acc.
template <typename acc, typename scalar_t>
__device__ __forceinline__ acc add_terms(scalar_t x, const scalar_t* b, const scalar_t* r, int64_t j) {
  acc v = static_cast<acc>(x);
  if (b != nullptr) v = static_cast<acc>(static_cast<scalar_t>(v + static_cast<acc>(b[j])));
  if (r != nullptr) v = static_cast<acc>(static_cast<scalar_t>(v + static_cast<acc>(r[j])));
  return v;
}

// out(j, LN_t(v)_j) for j in [0, hidden): mean, then the variance as a second pass (no cancellation when
// |mean| >> std), both in acc. `load(j)` gives v_j as acc; the affine is (weight + wd) and (bias + bd), wd and bd
// being the slot's rows of the delta tables.
template <typename acc, typename scalar_t, typename Load, typename Store>
__device__ __forceinline__ void warp_layer_norm(const Load& load, const Store& store, int64_t hidden, acc eps,
                                                const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias,
                                                const scalar_t* __restrict__ wd, const scalar_t* __restrict__ bd) {
  const int lane = threadIdx.x % kWarp;
  acc sum = 0;
  for (int64_t j = lane; j < hidden; j += kWarp) sum += load(j);
  const acc mean = warp_sum(sum) / static_cast<acc>(hidden);
  acc squares = 0;
  for (int64_t j = lane; j < hidden; j += kWarp) {
    const acc d = load(j) - mean;
    squares += d * d;
  }
  const acc rstd = acc(1) / sqrt(warp_sum(squares) / static_cast<acc>(hidden) + eps);
  for (int64_t j = lane; j < hidden; j += kWarp) {
    const acc gamma = static_cast<acc>(weight[j]) + static_cast<acc>(wd[j]);
    const acc beta = static_cast<acc>(bias[j]) + static_cast<acc>(bd[j]);
    store(j, (load(j) - mean) * rstd * gamma + beta);
  }
}

}  // namespace pets::cuda
