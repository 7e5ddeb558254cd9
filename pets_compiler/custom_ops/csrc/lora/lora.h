// LoRA at a linear site, per row: y + scale[t] * (x @ A[t].T) @ B[t].T with t = task_ids[row], and the fused
// linear_delta (LoRA + bias delta + IA3 output scale of one site in one output).
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "../common/task_groups.h"

namespace pets {

// y [B, ..., out] and x [B, ..., in] of one linear site, with task_ids [B].
void check_site_inputs(const char* op, const at::Tensor& y, const at::Tensor& x, const at::Tensor& task_ids);

// lora_a [T, R, in], lora_b [T, out, R], scale [T], rank int64 [T] matching the site inputs (checked first).
void check_lora_tables(const char* op, const at::Tensor& y, const at::Tensor& x, const at::Tensor& lora_a,
                       const at::Tensor& lora_b, const at::Tensor& scale, const at::Tensor& rank);

// out3 [B, N, out] (contiguous) += the LoRA term of x3 [B, N, in], one matmul pair per slot present.
// Only the first rank[t] rows of lora_a[t] (columns of lora_b[t]) take part, so a task's result does not
// depend on the table's padded rank R (which grows when a task of higher rank is added).
void add_lora_cpu_(const at::Tensor& out3, const at::Tensor& x3, const TaskGroups& groups,
                   const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& scale,
                   const at::Tensor& rank);

at::Tensor lora_delta_cpu(const at::Tensor& y, const at::Tensor& x, const at::Tensor& task_ids,
                          const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& scale,
                          const at::Tensor& rank);

// Every check of pets::linear_delta but the task id range (which reads the ids, so it is the CPU kernel's).
void check_linear_delta_inputs(const at::Tensor& y, const at::Tensor& x, const at::Tensor& task_ids,
                               const std::optional<at::Tensor>& lora_a, const std::optional<at::Tensor>& lora_b,
                               const std::optional<at::Tensor>& lora_scale,
                               const std::optional<at::Tensor>& lora_rank, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& out_scale);

at::Tensor linear_delta_cpu(const at::Tensor& y, const at::Tensor& x, const at::Tensor& task_ids,
                            const std::optional<at::Tensor>& lora_a, const std::optional<at::Tensor>& lora_b,
                            const std::optional<at::Tensor>& lora_scale,
                            const std::optional<at::Tensor>& lora_rank, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& out_scale);

}  // namespace pets
