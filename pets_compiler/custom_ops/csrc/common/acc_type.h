// The accumulation type of the hand-written CPU loops: double for float and double inputs (fp32 sums and
// products exact to one final rounding at no real cost), float for half types (like torch's opmath).
#pragma once

#include <ATen/ATen.h>

#include <type_traits>

namespace pets {

template <typename scalar_t>
using acc_type_t =
    std::conditional_t<std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>, float,
                       double>;

}  // namespace pets
