// LayerNorm with per-task affine deltas (BitFit on LayerNorm weight and bias), optionally of a sum: the bias delta
// of the linear before it and the sublayer's residual add, fused into the LayerNorm's one pass over its input.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace pets {

// The argument names a caller gives the four LayerNorm parameters, for its error messages.
struct LayerNormNames {
  const char* weight;
  const char* bias;
  const char* weight_delta;
  const char* bias_delta;
};

// weight and bias [H], weight_delta and bias_delta [T, H] (one T), in the dtype and on the device of x
// [B, ..., H] (called `x_name` in messages). Does not check task_ids.
void check_layer_norm_params(const char* op, const char* x_name, const at::Tensor& x,
                             const LayerNormNames& names, const at::Tensor& weight, const at::Tensor& bias,
                             const at::Tensor& weight_delta, const at::Tensor& bias_delta);

// pets::layer_norm without its checks (callers check): a new contiguous tensor. Each row's result depends on
// that row, its slot and eps only, so every caller gets bitwise the same numbers for the same row.
at::Tensor layer_norm_unchecked_cpu(const at::Tensor& x, const at::Tensor& task_ids, const at::Tensor& weight,
                                    const at::Tensor& bias, const at::Tensor& weight_delta,
                                    const at::Tensor& bias_delta, double eps,
                                    const std::optional<at::Tensor>& x_bias = std::nullopt,
                                    const std::optional<at::Tensor>& residual = std::nullopt);

// Every check of pets::layer_norm but the task id range: x_bias [T, H] and residual x's shape, each in x's dtype and
// on its device, where given.
void check_layer_norm_inputs(const at::Tensor& x, const at::Tensor& task_ids, const at::Tensor& weight,
                             const at::Tensor& bias, const at::Tensor& weight_delta, const at::Tensor& bias_delta,
                             const std::optional<at::Tensor>& x_bias, const std::optional<at::Tensor>& residual);

// LN_t(x + x_bias[t] + residual), x + x_bias[t] first, each sum rounded to x's dtype as pets::bias_delta and
// aten.add round it: on the CPU bitwise pets::layer_norm of the unfused sum (pets::row_delta's, or aten.add's).
at::Tensor layer_norm_cpu(const at::Tensor& x, const at::Tensor& task_ids, const at::Tensor& weight,
                          const at::Tensor& bias, const at::Tensor& weight_delta, const at::Tensor& bias_delta,
                          double eps, const std::optional<at::Tensor>& x_bias,
                          const std::optional<at::Tensor>& residual);

}  // namespace pets
