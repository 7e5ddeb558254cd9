// A BERT FFN's activation with the per-row table terms around it: gelu(y + bias[t]) * (1 + scale[t]) for every
// token of a row, t = task_ids[row]. bias is BitFit's delta of the intermediate linear's bias, scale IA3's input
// scale of the output linear (stored as l - 1); either may be absent. One pass over the activation instead of one
// per term: the row terms of row/row.h with act = aten.gelu.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace pets {

// Whether `approximate` (aten.gelu's argument) asks for the tanh approximation; raises unless "none" or "tanh".
bool gelu_is_tanh(const char* op, c10::string_view approximate);

// Every check of pets::gelu_delta but the task id range.
void check_gelu_delta_inputs(const at::Tensor& y, const at::Tensor& task_ids, const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& scale, c10::string_view approximate);
at::Tensor gelu_delta_cpu(const at::Tensor& y, const at::Tensor& task_ids, const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& scale, c10::string_view approximate);

}  // namespace pets
