// Per-row table terms around a batch tensor, for every token of a row with t = task_ids[row]:
// act(y + bias[t]) * (1 + scale[t]) + residual, each term only where it is given. pets::gelu_delta is the form with
// act = aten.gelu (a BERT FFN's activation), pets::row_delta the one with the identity and a residual (a linear
// site's BitFit bias, IA3 output scale and the sublayer's residual add). One pass over the activation instead of
// one per term.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace pets {

// y [B, ..., F] a batch tensor, task_ids its int64 [B] slots, bias and scale (either may be absent) [T, F] tables in
// y's dtype and on its device; every check but the task id range.
void check_row_tables(const char* op, const at::Tensor& y, const at::Tensor& task_ids,
                      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale);

// Raises unless every task id is a slot of each table given.
void check_row_table_slots(const char* op, const at::Tensor& task_ids, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& scale);

// act(y + bias[t]) * (1 + scale[t]) + residual on the CPU, act = aten.gelu(approximate) where `gelu` is given, else
// the identity; inputs checked. It does the unfused ops' arithmetic, in place on one output (the bias add as
// pets::bias_delta rounds it, aten's own gelu, the scale as pets::scale computes it, the residual add as aten.add),
// so on the CPU fusing the ops changes no result.
at::Tensor row_terms_cpu(const at::Tensor& y, const at::Tensor& task_ids, const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& residual,
                         std::optional<c10::string_view> gelu);

// Every check of pets::row_delta but the task id range: those of check_row_tables, at least one of bias and scale,
// residual of y's shape, dtype and device.
void check_row_delta_inputs(const at::Tensor& y, const at::Tensor& task_ids, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& residual);
at::Tensor row_delta_cpu(const at::Tensor& y, const at::Tensor& task_ids, const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& residual);

}  // namespace pets
