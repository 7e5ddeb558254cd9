// Per-task classification heads: one [L, in] linear per slot, label columns zero-padded to a common L.
#pragma once

#include <ATen/ATen.h>

namespace pets {

// Every check of pets::segmented_linear but the task id range.
void check_segmented_linear_inputs(const at::Tensor& x, const at::Tensor& task_ids, const at::Tensor& weight,
                                   const at::Tensor& bias);
at::Tensor segmented_linear_cpu(const at::Tensor& x, const at::Tensor& task_ids, const at::Tensor& weight,
                                const at::Tensor& bias);

}  // namespace pets
