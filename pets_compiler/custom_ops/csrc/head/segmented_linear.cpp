#include "head.h"

#include <vector>

#include "../common/checks.h"
#include "../common/task_groups.h"

namespace pets {

at::Tensor segmented_linear_cpu(const at::Tensor& x, const at::Tensor& task_ids, const at::Tensor& weight,
                                const at::Tensor& bias) {
  constexpr const char* op = "pets::segmented_linear";
  check_batch_tensor(op, "x", x);
  check_task_ids(op, task_ids, "x", x);
  check_table(op, "weight", weight, 3, "x", x);
  check_table(op, "bias", bias, 2, "x", x);
  TORCH_CHECK(weight.size(2) == x.size(-1), op, ": weight has in_features ", weight.size(2), ", x has ",
              x.size(-1), " (weight ", weight.sizes(), ", x ", x.sizes(), ")");
  TORCH_CHECK(bias.size(0) == weight.size(0) && bias.size(1) == weight.size(1), op,
              ": bias must be [T, L] matching weight [T, L, in], got bias ", bias.sizes(), ", weight ",
              weight.sizes());
  check_task_id_range(op, task_ids, weight.size(0), "weight");

  const int64_t labels = weight.size(1);
  std::vector<int64_t> out_sizes = x.sizes().vec();
  out_sizes.back() = labels;
  at::Tensor out = at::empty(out_sizes, x.options());
  const at::Tensor x3 = as_rows(x);
  const at::Tensor out3 = as_rows(out);
  const int64_t tokens = x3.size(1);
  const int64_t in_features = x3.size(2);

  const TaskGroups groups = group_rows_by_task(task_ids);
  for (const TaskSegment& seg : groups.segments) {
    const at::Tensor w_t = weight.select(0, seg.slot).t();  // [in, L]
    const at::Tensor b_t = bias.select(0, seg.slot);         // [L]
    const int64_t rows = seg.count * tokens;
    if (groups.sorted()) {
      at::Tensor target = out3.narrow(0, seg.begin, seg.count).view({rows, labels});
      at::addmm_out(target, b_t, x3.narrow(0, seg.begin, seg.count).reshape({rows, in_features}), w_t);
    } else {
      const at::Tensor index = groups.rows(seg);
      const at::Tensor xs = x3.index_select(0, index).view({rows, in_features});
      out3.index_copy_(0, index, at::addmm(b_t, xs, w_t).view({seg.count, tokens, labels}));
    }
  }
  return out;
}

}  // namespace pets
