// The adapter activations by code (AdapterActivation in ../adapter/adapter.h), in the accumulation type.
#pragma once

#include "../adapter/adapter.h"
#include "common.cuh"
#include "gelu.cuh"

namespace pets::cuda {

template <typename acc>
__device__ __forceinline__ acc activate(acc v, int64_t code) {
  switch (code) {
    case kActRelu:
      return v > acc(0) ? v : acc(0);
    case kActSilu:
      return v / (acc(1) + exp(-v));
    case kActGelu:
      return gelu_erf(v);
    case kActGeluTanh:
      return gelu_tanh(v);
    case kActTanh:
      return tanh(v);
    case kActSigmoid:
      return acc(1) / (acc(1) + exp(-v));
    case kActLeakyRelu:
      return v > acc(0) ? v : acc(0.01) * v;
    default:
      return v;  // kActIdentity
  }
}

}  // namespace pets::cuda
