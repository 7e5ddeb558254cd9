// LayerNorm with per-task affine deltas (BitFit on LayerNorm weight and bias).
#pragma once

#include <ATen/ATen.h>

namespace pets {

at::Tensor layer_norm_cpu(const at::Tensor& x, const at::Tensor& task_ids, const at::Tensor& weight,
                          const at::Tensor& bias, const at::Tensor& weight_delta,
                          const at::Tensor& bias_delta, double eps);

}  // namespace pets
