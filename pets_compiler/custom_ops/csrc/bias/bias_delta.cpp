#include "bias.h"

#include "../common/checks.h"
#include "../common/task_groups.h"

namespace pets {

void check_bias_table(const char* op, const at::Tensor& y, const at::Tensor& bias) {
  check_table(op, "bias", bias, 2, "y", y);
  TORCH_CHECK(bias.size(1) == y.size(-1), op, ": bias has out_features ", bias.size(1), ", y has ",
              y.size(-1), " (bias ", bias.sizes(), ", y ", y.sizes(), ")");
}

void add_bias_cpu(at::Tensor out3, const at::Tensor& y3, const at::Tensor& task_ids, const at::Tensor& bias) {
  // One gather of B bias rows, then one broadcast add: no per-task work at all.
  at::add_out(out3, y3, bias.index_select(0, task_ids).unsqueeze(1));
}

void check_bias_delta_inputs(const at::Tensor& y, const at::Tensor& task_ids, const at::Tensor& bias) {
  constexpr const char* op = "pets::bias_delta";
  check_batch_tensor(op, "y", y);
  check_task_ids(op, task_ids, "y", y);
  check_bias_table(op, y, bias);
}

at::Tensor bias_delta_cpu(const at::Tensor& y, const at::Tensor& task_ids, const at::Tensor& bias) {
  constexpr const char* op = "pets::bias_delta";
  check_bias_delta_inputs(y, task_ids, bias);
  check_task_id_range(op, task_ids, bias.size(0), "bias");

  at::Tensor out = at::empty(y.sizes(), y.options());
  add_bias_cpu(as_rows(out), as_rows(y), task_ids, bias);
  return out;
}

}  // namespace pets
