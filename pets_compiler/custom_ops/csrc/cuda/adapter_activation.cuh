// The adapter activations by code (AdapterActivation in ../adapter/adapter.h), in the accumulation type.
#pragma once

#include "../adapter/adapter.h"
#include "common.cuh"

namespace pets::cuda {

template <typename acc>
__device__ __forceinline__ acc activate(acc v, int64_t code) {
  switch (code) {
    case kActRelu:
      return v > acc(0) ? v : acc(0);
    case kActSilu:
      return v / (acc(1) + exp(-v));
    case kActGelu:
      return acc(0.5) * v * (acc(1) + erf(v * acc(M_SQRT1_2)));
    case kActGeluTanh: {
      const acc k = acc(0.7978845608028654);  // sqrt(2 / pi)
      return acc(0.5) * v * (acc(1) + tanh(k * (v + acc(0.044715) * v * v * v)));
    }
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
