#include "row.h"

#include "../bias/bias.h"
#include "../common/checks.h"
#include "../common/task_groups.h"
#include "../scale/scale.h"

namespace pets {

void check_row_tables(const char* op, const at::Tensor& y, const at::Tensor& task_ids,
                      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale) {
  check_batch_tensor(op, "y", y);
  check_task_ids(op, task_ids, "y", y);
  if (bias.has_value()) check_bias_table(op, y, *bias);
  if (scale.has_value()) check_scale_table(op, "scale", y, *scale);
}

void check_row_table_slots(const char* op, const at::Tensor& task_ids, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& scale) {
  if (bias.has_value()) check_task_id_range(op, task_ids, bias->size(0), "bias");
  if (scale.has_value()) check_task_id_range(op, task_ids, scale->size(0), "scale");
}

at::Tensor row_terms_cpu(const at::Tensor& y, const at::Tensor& task_ids, const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& residual,
                         std::optional<c10::string_view> gelu) {
  at::Tensor out = at::empty(y.sizes(), y.options());
  at::Tensor out3 = as_rows(out);
  const at::Tensor y3 = as_rows(y);
  // Each op's own arithmetic on the output: a row of a zero slot is then what the base computes, bit for bit
  // (aten's CPU erf is a vectorized approximation that only calling aten.gelu reproduces).
  if (bias.has_value()) {
    add_bias_cpu(out3, y3, task_ids, *bias);
    if (gelu.has_value()) at::gelu_(out3, *gelu);
  } else if (gelu.has_value()) {
    at::gelu_out(out3, y3, *gelu);
  } else if (!scale.has_value()) {
    out3.copy_(y3);
  }
  if (scale.has_value()) {
    const bool written = bias.has_value() || gelu.has_value();
    scale_rows_cpu(out3, written ? out3 : y3.contiguous(), task_ids, *scale);
  }
  if (residual.has_value()) out3.add_(as_rows(*residual));
  return out;
}

void check_row_delta_inputs(const at::Tensor& y, const at::Tensor& task_ids, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& residual) {
  constexpr const char* op = "pets::row_delta";
  check_row_tables(op, y, task_ids, bias, scale);
  TORCH_CHECK(bias.has_value() || scale.has_value(), op, ": bias and scale are both None; at least one must be ",
              "given (y + residual alone is aten.add)");
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == y.sizes(), op, ": residual must have the shape of y, got residual ",
                residual->sizes(), " and y ", y.sizes());
    check_dtype(op, "residual", *residual, "y", y);
    check_device(op, "residual", *residual, "y", y);
  }
}

at::Tensor row_delta_cpu(const at::Tensor& y, const at::Tensor& task_ids, const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& residual) {
  constexpr const char* op = "pets::row_delta";
  check_row_delta_inputs(y, task_ids, bias, scale, residual);
  check_row_table_slots(op, task_ids, bias, scale);
  return row_terms_cpu(y, task_ids, bias, scale, residual, std::nullopt);
}

}  // namespace pets
