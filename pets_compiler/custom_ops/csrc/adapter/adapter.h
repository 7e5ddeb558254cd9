// Bottleneck adapters (AdapterHub `seq_bn` / `double_seq_bn`) fused with the end of a BERT sublayer: the residual
// add and LayerNorm that follow dense + dropout, with a per-task adapter placed where AdapterHub places it.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace pets {

// Activation codes of config[:, kAdapterActivation]. reference.py exports the same table to Python as
// ADAPTER_ACTIVATIONS (AdapterHub's non_linearity names -> code); keep the two in step.
enum AdapterActivation : int64_t {
  kActIdentity = 0,   // "identity", "linear"
  kActRelu = 1,       // "relu"
  kActSilu = 2,       // "swish", "silu"
  kActGelu = 3,       // "gelu" (erf)
  kActGeluTanh = 4,   // "gelu_new", "gelu_pytorch_tanh" (tanh approximation)
  kActTanh = 5,       // "tanh"
  kActSigmoid = 6,    // "sigmoid"
  kActLeakyRelu = 7,  // "leakyrelu", "leaky_relu" (negative slope 0.01)
};
constexpr int64_t kAdapterActivationCount = 8;

// Columns of the int64 config [T, 6] table; reference.py exports their names as ADAPTER_CONFIG_COLUMNS.
// The first four are 0/1 flags; a slot with enabled = 0 (an all-zero row) has no adapter.
enum AdapterConfigColumn : int64_t {
  kAdapterEnabled = 0,
  kAdapterOriginalLnBefore = 1,
  kAdapterResidualBeforeLn = 2,
  kAdapterOriginalLnAfter = 3,
  kAdapterActivation = 4,
  kAdapterBottleneck = 5,  // the slot's own bottleneck size r <= R (the tables' padded size)
};
constexpr int64_t kAdapterConfigColumns = 6;

// Every check of pets::adapter that does not read task_ids or config (the CPU kernel also checks those); h_bias, where
// given, [T, H] in h's dtype and on its device.
void check_adapter_inputs(const at::Tensor& h, const at::Tensor& residual, const at::Tensor& task_ids,
                          const at::Tensor& ln_weight, const at::Tensor& ln_bias, const at::Tensor& ln_weight_delta,
                          const at::Tensor& ln_bias_delta, const at::Tensor& down_w, const at::Tensor& down_b,
                          const at::Tensor& up_w, const at::Tensor& up_b, const at::Tensor& scaling,
                          const at::Tensor& config, const std::optional<at::Tensor>& h_bias);

// With h_bias, h + h_bias[t] (pets::bias_delta's sum, rounded to h's dtype) stands for h everywhere: the adapter's
// input, the residual taken from h, the LayerNorm's input. On the CPU that is bitwise pets::adapter of
// pets::bias_delta(h, task_ids, h_bias).
at::Tensor adapter_cpu(const at::Tensor& h, const at::Tensor& residual, const at::Tensor& task_ids,
                       const at::Tensor& ln_weight, const at::Tensor& ln_bias, const at::Tensor& ln_weight_delta,
                       const at::Tensor& ln_bias_delta, double eps, const at::Tensor& down_w,
                       const at::Tensor& down_b, const at::Tensor& up_w, const at::Tensor& up_b,
                       const at::Tensor& scaling, const at::Tensor& config, const std::optional<at::Tensor>& h_bias);

}  // namespace pets
