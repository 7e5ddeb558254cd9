// Per-task classification heads: one [L, in] linear per slot, label columns zero-padded to a common L.
#pragma once

#include <ATen/ATen.h>

namespace pets {

at::Tensor segmented_linear_cpu(const at::Tensor& x, const at::Tensor& task_ids, const at::Tensor& weight,
                                const at::Tensor& bias);

}  // namespace pets
