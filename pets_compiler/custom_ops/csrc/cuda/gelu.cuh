// GELU in the accumulation type, written as aten's CUDA kernel writes it (ActivationGeluKernel.cu: the same
// operations in the same order), so that a row without task terms comes out as aten.gelu's, bit for bit.
#pragma once

#include <cmath>

namespace pets::cuda {

// x * Phi(x) = x / 2 * (1 + erf(x / sqrt(2))): aten.gelu(x, approximate="none").
template <typename acc>
__device__ __forceinline__ acc gelu_erf(acc x) {
  constexpr acc kAlpha = M_SQRT1_2;
  return x * acc(0.5) * (acc(1) + ::erf(x * kAlpha));
}

// x / 2 * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 x^3))): aten.gelu(x, approximate="tanh").
template <typename acc>
__device__ __forceinline__ acc gelu_tanh(acc x) {
  constexpr acc kBeta = M_SQRT2 * M_2_SQRTPI * acc(0.5);
  constexpr acc kKappa = 0.044715;
  const acc cube = x * x * x;
  return acc(0.5) * x * (acc(1) + ::tanh(kBeta * (x + kKappa * cube)));
}

}  // namespace pets::cuda
