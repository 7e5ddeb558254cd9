// Grouping of batch rows by task slot (CPU): the rows of one slot become one contiguous segment, so each
// slot present in a batch costs one matmul over all its rows (SGMV style) instead of one per row.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace pets {

// The number of tokens per batch row of a [B, ..., F] tensor: the product of the dims between B and F.
inline int64_t tokens_per_row(const at::Tensor& t) {
  int64_t n = 1;
  for (int64_t d = 1; d + 1 < t.dim(); ++d) n *= t.size(d);
  return n;
}

// A [B, ..., F] tensor as [B, N, F] (a view when the layout allows it).
inline at::Tensor as_rows(const at::Tensor& t) {
  return t.reshape({t.size(0), tokens_per_row(t), t.size(-1)});
}

// Rows [begin, begin + count) of the slot-sorted batch all use table slot `slot`.
struct TaskSegment {
  int64_t slot;
  int64_t begin;
  int64_t count;
};

struct TaskGroups {
  // Original row index of each slot-sorted row (int64 [B]); undefined when task_ids is already
  // non-decreasing, in which case the sorted batch is the batch itself and no gather/scatter is needed.
  at::Tensor order;
  std::vector<TaskSegment> segments;  // non-empty segments, by increasing slot

  bool sorted() const { return !order.defined(); }
  // The original row indices of one segment (only when !sorted()).
  at::Tensor rows(const TaskSegment& seg) const { return order.narrow(0, seg.begin, seg.count); }
};

// Raises, naming the first bad row, its id and the table, unless every id is in [0, num_slots).
void check_task_id_range(const char* op, const at::Tensor& task_ids, int64_t num_slots, const char* table);

// Groups the rows of a CPU int64 [B] task_ids (stable: rows of one slot keep their order).
TaskGroups group_rows_by_task(const at::Tensor& task_ids);

}  // namespace pets
