// The task ops of one linear site fused into one call: a single output, each term added into it in place.
#include "../bias/bias.h"
#include "../common/checks.h"
#include "../scale/scale.h"
#include "lora.h"

namespace pets {

void check_linear_delta_inputs(const at::Tensor& y, const at::Tensor& x, const at::Tensor& task_ids,
                               const std::optional<at::Tensor>& lora_a, const std::optional<at::Tensor>& lora_b,
                               const std::optional<at::Tensor>& lora_scale,
                               const std::optional<at::Tensor>& lora_rank, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& out_scale) {
  constexpr const char* op = "pets::linear_delta";
  const bool has_lora = lora_a.has_value();
  TORCH_CHECK(lora_b.has_value() == has_lora && lora_scale.has_value() == has_lora &&
                  lora_rank.has_value() == has_lora,
              op, ": lora_a, lora_b, lora_scale and lora_rank must be given together or all be None, got lora_a ",
              has_lora ? "given" : "None", ", lora_b ", lora_b.has_value() ? "given" : "None",
              ", lora_scale ", lora_scale.has_value() ? "given" : "None", ", lora_rank ",
              lora_rank.has_value() ? "given" : "None");
  check_site_inputs(op, y, x, task_ids);
  if (has_lora) check_lora_tables(op, y, x, *lora_a, *lora_b, *lora_scale, *lora_rank);
  if (bias.has_value()) check_bias_table(op, y, *bias);
  if (out_scale.has_value()) check_scale_table(op, "out_scale", y, *out_scale);
}

at::Tensor linear_delta_cpu(const at::Tensor& y, const at::Tensor& x, const at::Tensor& task_ids,
                            const std::optional<at::Tensor>& lora_a, const std::optional<at::Tensor>& lora_b,
                            const std::optional<at::Tensor>& lora_scale,
                            const std::optional<at::Tensor>& lora_rank, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& out_scale) {
  constexpr const char* op = "pets::linear_delta";
  const bool has_lora = lora_a.has_value();
  check_linear_delta_inputs(y, x, task_ids, lora_a, lora_b, lora_scale, lora_rank, bias, out_scale);
  if (has_lora) check_task_id_range(op, task_ids, lora_a->size(0), "lora_a");
  if (bias.has_value()) check_task_id_range(op, task_ids, bias->size(0), "bias");
  if (out_scale.has_value()) check_task_id_range(op, task_ids, out_scale->size(0), "out_scale");

  // Each term in place on one output, rounded as the unfused ops (lora_delta, bias_delta, scale) round theirs, so
  // on the CPU fusing them changes no result.
  at::Tensor out;
  if (!has_lora && bias.has_value()) {  // y + bias in one pass, without first copying y
    out = at::empty(y.sizes(), y.options());
    add_bias_cpu(as_rows(out), as_rows(y), task_ids, *bias);
  } else if (!has_lora && out_scale.has_value()) {  // y * (1 + l) likewise
    out = at::empty(y.sizes(), y.options());
    scale_rows_cpu(as_rows(out), as_rows(y).contiguous(), task_ids, *out_scale);
    return out;
  } else {
    out = y.clone(at::MemoryFormat::Contiguous);
    const at::Tensor out3 = as_rows(out);
    if (has_lora) add_lora_cpu_(out3, as_rows(x), group_rows_by_task(task_ids), *lora_a, *lora_b, *lora_scale,
                               *lora_rank);
    if (bias.has_value()) add_bias_cpu(out3, out3, task_ids, *bias);
  }
  if (out_scale.has_value()) scale_rows_cpu(as_rows(out), as_rows(out), task_ids, *out_scale);
  return out;
}

}  // namespace pets
