// Per-task sparse weight deltas (diff-pruning, MaskBERT) as one CSR matrix D_t per slot whose nonzeros all live
// in one pool: the entries of row o of D_t are pool[row_ptr[t, o] .. row_ptr[t, o + 1]), each a column col[k]
// and a value val[k]. Offsets are absolute, so tasks can be added to (or compacted out of) the pool without
// touching the others; a slot with no nonzeros has row_ptr[t, :] all equal (any value in [0, P]).
#pragma once

#include <ATen/ATen.h>

namespace pets {

// What a pool's rows and columns are, for messages: row_ptr is [T, rows + 1] and the columns are in [0, cols);
// each has a name and the expression its size comes from ("out", "y.size(-1)").
struct PoolExtent {
  int64_t rows;
  const char* rows_name;
  const char* rows_source;
  int64_t cols;
  const char* cols_name;
  const char* cols_source;
};

// row_ptr int64 [T, rows + 1], col int64 [P] and val [P] (dtype and device of `ref`): what can be checked without
// reading the tables (the CUDA kernels' checks; they guard every index they read on the device).
void check_pool_layout(const char* op, const at::Tensor& row_ptr, const at::Tensor& col, const at::Tensor& val,
                       const PoolExtent& extent, const char* ref_name, const at::Tensor& ref);

// check_pool_layout; task_ids in [0, T); and for every slot some row uses: offsets within [0, P] and
// non-decreasing, the columns of its entries in [0, cols).
void check_pool(const char* op, const at::Tensor& task_ids, const at::Tensor& row_ptr, const at::Tensor& col,
                const at::Tensor& val, const PoolExtent& extent, const char* ref_name, const at::Tensor& ref);

// Every check of pets::sparse_delta that does not read task_ids or the tables.
void check_sparse_delta_inputs(const at::Tensor& y, const at::Tensor& x, const at::Tensor& task_ids,
                               const at::Tensor& row_ptr, const at::Tensor& col, const at::Tensor& val);

// Every check of pets::embedding_delta that does not read ids, task_ids or the tables; returns V.
int64_t check_embedding_delta_inputs(const at::Tensor& y, const at::Tensor& ids, const at::Tensor& task_ids,
                                     const at::Tensor& row_ptr, const at::Tensor& col, const at::Tensor& val);

at::Tensor sparse_delta_cpu(const at::Tensor& y, const at::Tensor& x, const at::Tensor& task_ids,
                            const at::Tensor& row_ptr, const at::Tensor& col, const at::Tensor& val);

at::Tensor embedding_delta_cpu(const at::Tensor& y, const at::Tensor& ids, const at::Tensor& task_ids,
                               const at::Tensor& row_ptr, const at::Tensor& col, const at::Tensor& val);

}  // namespace pets
