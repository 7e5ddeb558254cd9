#include "gelu.h"

#include "../row/row.h"

namespace pets {

bool gelu_is_tanh(const char* op, c10::string_view approximate) {
  TORCH_CHECK(approximate == "none" || approximate == "tanh", op, ": approximate must be \"none\" or \"tanh\" ",
              "(aten.gelu's), got \"", approximate, "\"");
  return approximate == "tanh";
}

void check_gelu_delta_inputs(const at::Tensor& y, const at::Tensor& task_ids, const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& scale, c10::string_view approximate) {
  constexpr const char* op = "pets::gelu_delta";
  check_row_tables(op, y, task_ids, bias, scale);
  gelu_is_tanh(op, approximate);
}

at::Tensor gelu_delta_cpu(const at::Tensor& y, const at::Tensor& task_ids, const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& scale, c10::string_view approximate) {
  check_gelu_delta_inputs(y, task_ids, bias, scale, approximate);
  check_row_table_slots("pets::gelu_delta", task_ids, bias, scale);
  return row_terms_cpu(y, task_ids, bias, scale, std::nullopt, approximate);
}

}  // namespace pets
