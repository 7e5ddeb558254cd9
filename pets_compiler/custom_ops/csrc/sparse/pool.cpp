#include <vector>

#include "../common/checks.h"
#include "../common/task_groups.h"
#include "sparse.h"

namespace pets {

void check_pool_layout(const char* op, const at::Tensor& row_ptr, const at::Tensor& col, const at::Tensor& val,
                       const PoolExtent& extent, const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK(row_ptr.scalar_type() == at::kLong && row_ptr.dim() == 2 && row_ptr.size(1) == extent.rows + 1, op,
              ": row_ptr must be an int64 [T, ", extent.rows_name, " + 1] table with ", extent.rows_name, " = ",
              extent.rows_source, " = ", extent.rows, ", got ", row_ptr.scalar_type(), " ", row_ptr.sizes());
  TORCH_CHECK(col.scalar_type() == at::kLong && col.dim() == 1, op, ": col must be an int64 [P] pool, got ",
              col.scalar_type(), " ", col.sizes());
  TORCH_CHECK(val.dim() == 1 && val.size(0) == col.size(0), op, ": val must be [P] with P = col.size(0) = ",
              col.size(0), ", got shape ", val.sizes());
  check_dtype(op, "val", val, ref_name, ref);
  check_device(op, "val", val, ref_name, ref);
  check_device(op, "col", col, ref_name, ref);
  check_device(op, "row_ptr", row_ptr, ref_name, ref);
}

void check_pool(const char* op, const at::Tensor& task_ids, const at::Tensor& row_ptr, const at::Tensor& col,
                const at::Tensor& val, const PoolExtent& extent, const char* ref_name, const at::Tensor& ref) {
  check_pool_layout(op, row_ptr, col, val, extent, ref_name, ref);
  const int64_t slots = row_ptr.size(0);
  check_task_id_range(op, task_ids, slots, "row_ptr");

  // Every slot a row uses, once: its offsets, then the columns of its entries.
  const at::Tensor ids = task_ids.contiguous();
  const at::Tensor rp = row_ptr.contiguous();
  const at::Tensor cols = col.contiguous();
  const int64_t* tp = ids.const_data_ptr<int64_t>();
  const int64_t* rpp = rp.const_data_ptr<int64_t>();
  const int64_t* cp = cols.const_data_ptr<int64_t>();
  const int64_t pool = col.size(0);
  const int64_t rows = extent.rows;
  std::vector<char> seen(slots, 0);
  for (int64_t i = 0; i < ids.numel(); ++i) {
    const int64_t t = tp[i];
    if (seen[t]) continue;
    seen[t] = 1;
    const int64_t* p = rpp + t * (rows + 1);
    TORCH_CHECK(p[0] >= 0 && p[0] <= pool, op, ": row_ptr[", t, ", 0] = ", p[0],
                " is outside the pool [0, P] with P = ", pool, " (slot ", t, " is used by batch row ", i, ")");
    for (int64_t o = 0; o < rows; ++o) {
      TORCH_CHECK(p[o + 1] >= p[o], op, ": row_ptr[", t, ", ", o + 1, "] = ", p[o + 1], " is less than row_ptr[", t,
                  ", ", o, "] = ", p[o], "; the offsets of slot ", t, " must be non-decreasing");
      TORCH_CHECK(p[o + 1] <= pool, op, ": row_ptr[", t, ", ", o + 1, "] = ", p[o + 1],
                  " is outside the pool [0, P] with P = ", pool, " (slot ", t, ")");
      for (int64_t k = p[o]; k < p[o + 1]; ++k) {
        TORCH_CHECK(cp[k] >= 0 && cp[k] < extent.cols, op, ": col[", k, "] = ", cp[k], " (slot ", t, ", row ", o,
                    ") is outside [0, ", extent.cols_name, ") with ", extent.cols_name, " = ", extent.cols_source,
                    " = ", extent.cols);
      }
    }
  }
}

}  // namespace pets
