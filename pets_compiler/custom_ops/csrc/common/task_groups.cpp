#include "task_groups.h"

#include <algorithm>
#include <numeric>

namespace pets {

void check_task_id_range(const char* op, const at::Tensor& task_ids, int64_t num_slots, const char* table) {
  const at::Tensor ids = task_ids.contiguous();
  const int64_t* p = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < ids.numel(); ++i) {
    TORCH_CHECK(p[i] >= 0 && p[i] < num_slots, op, ": task_ids[", i, "] = ", p[i], " is not a slot of ",
                table, ", which has T = ", num_slots, " slots (ids must be in [0, ", num_slots, "))");
  }
}

TaskGroups group_rows_by_task(const at::Tensor& task_ids) {
  const at::Tensor ids = task_ids.contiguous();
  const int64_t* p = ids.data_ptr<int64_t>();
  const int64_t batch = ids.numel();
  TaskGroups groups;

  std::vector<int64_t> order(batch);
  std::iota(order.begin(), order.end(), 0);
  if (!std::is_sorted(p, p + batch)) {
    std::stable_sort(order.begin(), order.end(), [p](int64_t a, int64_t b) { return p[a] < p[b]; });
    groups.order = at::tensor(order, ids.options());
  }
  for (int64_t i = 0; i < batch;) {
    const int64_t slot = p[order[i]];
    int64_t j = i + 1;
    while (j < batch && p[order[j]] == slot) ++j;
    groups.segments.push_back({slot, i, j - i});
    i = j;
  }
  return groups;
}

}  // namespace pets
