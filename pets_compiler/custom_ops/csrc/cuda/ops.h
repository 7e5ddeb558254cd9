// The CUDA kernels of the pets ops (csrc/cuda/*.cu), registered for the CUDA dispatch key in register.cpp. Each
// checks shapes, dtypes and devices as its CPU kernel does (the same check functions); what only reading the data
// can tell (task ids and table indices in range) is checked on the device, where each kernel reads it.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace pets::cuda {

at::Tensor lora_delta(const at::Tensor& y, const at::Tensor& x, const at::Tensor& task_ids, const at::Tensor& lora_a,
                      const at::Tensor& lora_b, const at::Tensor& scale, const at::Tensor& rank);
at::Tensor linear_delta(const at::Tensor& y, const at::Tensor& x, const at::Tensor& task_ids,
                        const std::optional<at::Tensor>& lora_a, const std::optional<at::Tensor>& lora_b,
                        const std::optional<at::Tensor>& lora_scale, const std::optional<at::Tensor>& lora_rank,
                        const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& out_scale);
at::Tensor bias_delta(const at::Tensor& y, const at::Tensor& task_ids, const at::Tensor& bias);
at::Tensor scale(const at::Tensor& y, const at::Tensor& task_ids, const at::Tensor& delta);
at::Tensor gelu_delta(const at::Tensor& y, const at::Tensor& task_ids, const std::optional<at::Tensor>& bias,
                      const std::optional<at::Tensor>& scale, c10::string_view approximate);
at::Tensor row_delta(const at::Tensor& y, const at::Tensor& task_ids, const std::optional<at::Tensor>& bias,
                     const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& residual);
at::Tensor layer_norm(const at::Tensor& x, const at::Tensor& task_ids, const at::Tensor& weight,
                      const at::Tensor& bias, const at::Tensor& weight_delta, const at::Tensor& bias_delta,
                      double eps, const std::optional<at::Tensor>& x_bias, const std::optional<at::Tensor>& residual);
at::Tensor segmented_linear(const at::Tensor& x, const at::Tensor& task_ids, const at::Tensor& weight,
                            const at::Tensor& bias);
at::Tensor sparse_delta(const at::Tensor& y, const at::Tensor& x, const at::Tensor& task_ids,
                        const at::Tensor& row_ptr, const at::Tensor& col, const at::Tensor& val);
at::Tensor embedding_delta(const at::Tensor& y, const at::Tensor& ids, const at::Tensor& task_ids,
                           const at::Tensor& row_ptr, const at::Tensor& col, const at::Tensor& val);
at::Tensor adapter(const at::Tensor& h, const at::Tensor& residual, const at::Tensor& task_ids,
                   const at::Tensor& ln_weight, const at::Tensor& ln_bias, const at::Tensor& ln_weight_delta,
                   const at::Tensor& ln_bias_delta, double eps, const at::Tensor& down_w, const at::Tensor& down_b,
                   const at::Tensor& up_w, const at::Tensor& up_b, const at::Tensor& scaling,
                   const at::Tensor& config, const std::optional<at::Tensor>& h_bias);

}  // namespace pets::cuda
