// Per-task feature scales (IA3) on a batch tensor: y * (1 + delta[t]) for every token of a row, t = task_ids[row].
// A scale l is stored as delta = l - 1, so an all-zero slot is the identity (bitwise) and tables pad with zeros.
#pragma once

#include <ATen/ATen.h>

namespace pets {

// Every check of pets::scale but the task id range.
void check_scale_inputs(const at::Tensor& y, const at::Tensor& task_ids, const at::Tensor& delta);
at::Tensor scale_cpu(const at::Tensor& y, const at::Tensor& task_ids, const at::Tensor& delta);

}  // namespace pets
