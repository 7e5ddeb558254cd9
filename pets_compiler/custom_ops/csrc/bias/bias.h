// Per-task bias deltas (BitFit) at a linear site: y + bias[t] for every token of a row, t = task_ids[row].
#pragma once

#include <ATen/ATen.h>

namespace pets {

// bias [T, out] in the dtype and on the device of y [B, ..., out].
void check_bias_table(const char* op, const at::Tensor& y, const at::Tensor& bias);

// out3 = y3 + bias[task_ids] broadcast over the N tokens of each row; out3 [B, N, out] may be y3 itself.
void add_bias_cpu(at::Tensor out3, const at::Tensor& y3, const at::Tensor& task_ids, const at::Tensor& bias);

// Every check of pets::bias_delta but the task id range.
void check_bias_delta_inputs(const at::Tensor& y, const at::Tensor& task_ids, const at::Tensor& bias);
at::Tensor bias_delta_cpu(const at::Tensor& y, const at::Tensor& task_ids, const at::Tensor& bias);

}  // namespace pets
