#include "gelu.h"

#include "../bias/bias.h"
#include "../common/checks.h"
#include "../common/task_groups.h"
#include "../scale/scale.h"

namespace pets {

bool gelu_is_tanh(const char* op, c10::string_view approximate) {
  TORCH_CHECK(approximate == "none" || approximate == "tanh", op, ": approximate must be \"none\" or \"tanh\" ",
              "(aten.gelu's), got \"", approximate, "\"");
  return approximate == "tanh";
}

void check_gelu_delta_inputs(const at::Tensor& y, const at::Tensor& task_ids, const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& scale, c10::string_view approximate) {
  constexpr const char* op = "pets::gelu_delta";
  check_batch_tensor(op, "y", y);
  check_task_ids(op, task_ids, "y", y);
  if (bias.has_value()) check_bias_table(op, y, *bias);
  if (scale.has_value()) check_scale_table(op, "scale", y, *scale);
  gelu_is_tanh(op, approximate);
}

at::Tensor gelu_delta_cpu(const at::Tensor& y, const at::Tensor& task_ids, const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& scale, c10::string_view approximate) {
  constexpr const char* op = "pets::gelu_delta";
  check_gelu_delta_inputs(y, task_ids, bias, scale, approximate);
  if (bias.has_value()) check_task_id_range(op, task_ids, bias->size(0), "bias");
  if (scale.has_value()) check_task_id_range(op, task_ids, scale->size(0), "scale");

  // The unfused ops' arithmetic, in place on one output: the bias add as bias_delta rounds it, aten's own gelu
  // (its CPU erf is a vectorized approximation that only calling it reproduces), the scale as pets::scale computes
  // it. A row of a zero slot is then aten.gelu(y) bit for bit, and on the CPU the fusion changes no result.
  at::Tensor out = at::empty(y.sizes(), y.options());
  at::Tensor out3 = as_rows(out);
  const at::Tensor y3 = as_rows(y);
  if (bias.has_value()) {
    add_bias_cpu(out3, y3, task_ids, *bias);
    at::gelu_(out3, approximate);
  } else {
    at::gelu_out(out3, y3, approximate);
  }
  if (scale.has_value()) scale_rows_cpu(out3, out3, task_ids, *scale);
  return out;
}

}  // namespace pets
