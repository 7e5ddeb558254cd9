#include "lora.h"

#include "../common/checks.h"

namespace pets {

void check_site_inputs(const char* op, const at::Tensor& y, const at::Tensor& x, const at::Tensor& task_ids) {
  check_batch_tensor(op, "y", y);
  check_batch_tensor(op, "x", x);
  check_same_rows(op, "y", y, "x", x);
  check_dtype(op, "y", y, "x", x);
  check_device(op, "y", y, "x", x);
  check_task_ids(op, task_ids, "x", x);
}

void check_lora_tables(const char* op, const at::Tensor& y, const at::Tensor& x, const at::Tensor& lora_a,
                       const at::Tensor& lora_b, const at::Tensor& scale, const at::Tensor& rank) {
  check_table(op, "lora_a", lora_a, 3, "x", x);
  TORCH_CHECK(rank.dim() == 1 && rank.scalar_type() == at::kLong && rank.size(0) == lora_a.size(0), op,
              ": rank must be an int64 [T] table with T = ", lora_a.size(0), ", got ", rank.scalar_type(), " ",
              rank.sizes());
  TORCH_CHECK(rank.device() == x.device(), op, ": rank is on ", rank.device(), ", x on ", x.device());
  check_table(op, "lora_b", lora_b, 3, "x", x);
  check_table(op, "scale", scale, 1, "x", x);
  TORCH_CHECK(lora_a.size(2) == x.size(-1), op, ": lora_a has in_features ", lora_a.size(2), ", x has ",
              x.size(-1), " (lora_a ", lora_a.sizes(), ", x ", x.sizes(), ")");
  TORCH_CHECK(lora_b.size(1) == y.size(-1), op, ": lora_b has out_features ", lora_b.size(1), ", y has ",
              y.size(-1), " (lora_b ", lora_b.sizes(), ", y ", y.sizes(), ")");
  TORCH_CHECK(lora_b.size(2) == lora_a.size(1), op, ": lora_b has rank ", lora_b.size(2),
              ", lora_a has rank ", lora_a.size(1), " (lora_a ", lora_a.sizes(), ", lora_b ", lora_b.sizes(),
              ")");
  TORCH_CHECK(lora_b.size(0) == lora_a.size(0) && scale.size(0) == lora_a.size(0), op,
              ": lora_a, lora_b and scale must have one slot count T, got lora_a ", lora_a.sizes(),
              ", lora_b ", lora_b.sizes(), ", scale ", scale.sizes());
}

void add_lora_cpu_(const at::Tensor& out3, const at::Tensor& x3, const TaskGroups& groups,
                   const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& scale,
                   const at::Tensor& rank) {
  if (lora_a.size(1) == 0) return;  // rank 0: no term at all
  const int64_t tokens = x3.size(1);
  const int64_t in_features = x3.size(2);
  const int64_t out_features = out3.size(2);
  const at::Tensor scale_host = scale.to(at::kDouble).contiguous();  // T scalars, read once
  const double* scales = scale_host.data_ptr<double>();
  const at::Tensor rank_host = rank.to(at::kCPU).contiguous();
  const int64_t* ranks = rank_host.data_ptr<int64_t>();
  const int64_t table_rank = lora_a.size(1);

  for (const TaskSegment& seg : groups.segments) {
    const double alpha = scales[seg.slot];
    const int64_t r = ranks[seg.slot];
    TORCH_CHECK(r >= 0 && r <= table_rank, "pets LoRA: rank[", seg.slot, "] = ", r, " is outside [0, ",
                table_rank, "]");
    if (alpha == 0.0 || r == 0) continue;  // a slot without LoRA at this site: its rows stay exactly y
    const at::Tensor a_t = lora_a.select(0, seg.slot).narrow(0, 0, r).t();  // [in, r]
    const at::Tensor b_t = lora_b.select(0, seg.slot).narrow(1, 0, r).t();  // [r, out]
    const int64_t rows = seg.count * tokens;
    if (groups.sorted()) {
      const at::Tensor xs = x3.narrow(0, seg.begin, seg.count).reshape({rows, in_features});
      out3.narrow(0, seg.begin, seg.count).view({rows, out_features}).addmm_(at::mm(xs, a_t), b_t, 1, alpha);
    } else {
      const at::Tensor index = groups.rows(seg);
      const at::Tensor xs = x3.index_select(0, index).view({rows, in_features});
      const at::Tensor delta = at::mm(at::mm(xs, a_t), b_t);
      out3.index_add_(0, index, delta.view({seg.count, tokens, out_features}), alpha);
    }
  }
}

at::Tensor lora_delta_cpu(const at::Tensor& y, const at::Tensor& x, const at::Tensor& task_ids,
                          const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& scale,
                          const at::Tensor& rank) {
  constexpr const char* op = "pets::lora_delta";
  check_site_inputs(op, y, x, task_ids);
  check_lora_tables(op, y, x, lora_a, lora_b, scale, rank);
  check_task_id_range(op, task_ids, lora_a.size(0), "lora_a");

  at::Tensor out = y.clone(at::MemoryFormat::Contiguous);
  add_lora_cpu_(as_rows(out), as_rows(x), group_rows_by_task(task_ids), lora_a, lora_b, scale, rank);
  return out;
}

}  // namespace pets
