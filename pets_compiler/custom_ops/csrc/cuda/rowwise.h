// Shared by the CUDA kernels of bias_delta and linear_delta (a site with a bias delta and no LoRA).
#pragma once

#include <ATen/ATen.h>

namespace pets::cuda {

// y + bias[task_ids] on every token of each row; inputs already checked by the caller, whose name is `op`.
at::Tensor add_row_bias(const char* op, const at::Tensor& y, const at::Tensor& task_ids, const at::Tensor& bias);

}  // namespace pets::cuda
