// Per-task feature scales (IA3) on a batch tensor: y * (1 + delta[t]) for every token of a row, t = task_ids[row].
// A scale l is stored as delta = l - 1, so an all-zero slot is the identity (bitwise) and tables pad with zeros.
#pragma once

#include <ATen/ATen.h>

namespace pets {

// A scale table [T, F] (l - 1) in the dtype and on the device of y [B, ..., F]; `name` is its argument's name.
void check_scale_table(const char* op, const char* name, const at::Tensor& y, const at::Tensor& delta);

// out3 = y3 * (1 + delta[task_ids]) over the N tokens of each row, one product in the accumulation type rounded
// once; y3 and out3 [B, N, F] contiguous, out3 may be y3 itself.
void scale_rows_cpu(at::Tensor out3, const at::Tensor& y3, const at::Tensor& task_ids, const at::Tensor& delta);

// Every check of pets::scale but the task id range.
void check_scale_inputs(const at::Tensor& y, const at::Tensor& task_ids, const at::Tensor& delta);
at::Tensor scale_cpu(const at::Tensor& y, const at::Tensor& task_ids, const at::Tensor& delta);

}  // namespace pets
