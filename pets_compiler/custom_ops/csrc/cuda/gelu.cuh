// GELU in the accumulation type, written as aten's CUDA kernel writes it (ActivationGeluKernel.cu: the same
// operations in the same order), so that a row without task terms comes out as aten.gelu's, bit for bit; and
// gelu_erf_for<scalar_t>: for outputs rounded to 16 bits, a cheaper exact-GELU (gelu_erf_fast) instead.
#pragma once

#include <cmath>

namespace pets::cuda {

// x * Phi(x) = x / 2 * (1 + erf(x / sqrt(2))): aten.gelu(x, approximate="none").
template <typename acc>
__device__ __forceinline__ acc gelu_erf(acc x) {
  constexpr acc kAlpha = M_SQRT1_2;
  return x * acc(0.5) * (acc(1) + ::erf(x * kAlpha));
}

// x * Phi(x) for an output rounded to fp16 / bf16: Phi(x) = erfc(-x / sqrt(2)) / 2 from erfc's rational
// approximation t (a1 + t (a2 + t (a3 + t (a4 + t a5)))) exp(-a^2), t = 1 / (1 + p a), a = |x| / sqrt(2)
// (Abramowitz and Stegun 7.1.26: |error| <= 1.5e-7), the reciprocal and the exponential on the MUFU unit; for x < 0
// erfc is taken directly (no 1 + erf cancellation). Over every finite fp16 / bf16 input the rounded result is within
// one unit in the last place of aten.gelu's (float32 numpy emulation; the GPU tests bound it the same way). erff's
// two polynomials and their selects made gelu_delta over bert-base's FFN (8192 x 3072, fp16) instruction-bound:
// 42.7 us against aten.gelu's 36.4 and a DRAM floor of 24.6 (H200). With this: 920 SASS instructions a 32-element
// step of the fixed kernel against 1280 (nvcc 13, sm_90), 43.2 -> 31.8 us a call in the mix_dense program (518 ->
// 382 us a forward, H200, 8e1f79c).
__device__ __forceinline__ float gelu_erf_fast(float x) {
  constexpr float kP = 0.3275911f;
  // A&S's a1..a5, halved: the polynomial gives erfc(a) / 2 directly
  constexpr float kH1 = 0.127414796f, kH2 = -0.142248368f, kH3 = 0.7107068705f, kH4 = -0.7265760135f,
                  kH5 = 0.5307027145f;
  constexpr float kMinusHalfLog2e = -0.5f * 1.4426950408889634f;  // exp(-a^2) = 2^(x^2 * this)
  float t, e;
  // 1 + p a >= 1 and x^2 * kMinusHalfLog2e <= 0: the approximate instructions' ftz forms are exact enough here
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(t) : "f"(fmaf(kP * float(M_SQRT1_2), fabsf(x), 1.0f)));
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(x * x * kMinusHalfLog2e));
  const float poly = t * fmaf(t, fmaf(t, fmaf(t, fmaf(t, kH5, kH4), kH3), kH2), kH1);
  const float q = poly * e;  // Phi(-|x|)
  return x * (x < 0.0f ? q : 1.0f - q);
}

template <typename scalar_t, typename acc>
__device__ __forceinline__ acc gelu_erf_for(acc x) {
  if constexpr (sizeof(scalar_t) == 2) {
    return gelu_erf_fast(x);
  } else {
    return gelu_erf(x);
  }
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
