// Shared by the CUDA kernels of bias_delta and linear_delta (a site with row terms and no LoRA).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace pets::cuda {

// y + bias[task_ids] on every token of each row; inputs already checked by the caller, whose name is `op`.
at::Tensor add_row_bias(const char* op, const at::Tensor& y, const at::Tensor& task_ids, const at::Tensor& bias);

// (y + bias[t]) * (1 + scale[t]), each term where given (one at least): a linear site's row terms without LoRA.
at::Tensor add_row_terms(const char* op, const at::Tensor& y, const at::Tensor& task_ids,
                         const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale);

}  // namespace pets::cuda
