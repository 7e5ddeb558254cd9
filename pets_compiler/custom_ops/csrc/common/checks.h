// Input checks shared by every pets op. Each message starts with the op name and names the offending
// tensor with its shape, dtype or device, so a caller can tell which argument was wrong without a debugger.
#pragma once

#include <ATen/ATen.h>

namespace pets {

// A batch tensor has the batch as dim 0 and features as the last dim ([B, F] or [B, S, F]).
inline void check_batch_tensor(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() >= 2, op, ": ", name, " must be [B, ..., features] (at least 2-D), got shape ",
              t.sizes());
}

// `a` and `b` agree on every dim but the last (same batch and tokens, possibly different features).
inline void check_same_rows(const char* op, const char* a_name, const at::Tensor& a, const char* b_name,
                            const at::Tensor& b) {
  TORCH_CHECK(a.dim() == b.dim() && a.sizes().slice(0, a.dim() - 1) == b.sizes().slice(0, b.dim() - 1), op,
              ": ", a_name, " and ", b_name, " must have the same dims but the last, got ", a_name, " ",
              a.sizes(), " and ", b_name, " ", b.sizes());
}

inline void check_dtype(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                        const at::Tensor& ref) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), ", ",
              ref_name, " has ", ref.scalar_type(), "; they must match");
}

inline void check_device(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                         const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), ", ", ref_name, " is on ",
              ref.device(), "; they must be on one device");
}

// A per-slot table: `dim` dims with the slot as dim 0, in the dtype and on the device of `ref`.
inline void check_table(const char* op, const char* name, const at::Tensor& t, int64_t dim,
                        const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be a ", dim,
              "-D table with the task slot as dim 0, got shape ", t.sizes());
  check_dtype(op, name, t, ref_name, ref);
  check_device(op, name, t, ref_name, ref);
}

// A per-slot table of rows [T, F] with F = ref.size(-1), in the dtype and on the device of `ref`.
inline void check_feature_table(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                                const at::Tensor& ref) {
  check_table(op, name, t, 2, ref_name, ref);
  TORCH_CHECK(t.size(1) == ref.size(-1), op, ": ", name, " must be [T, H] with H = ", ref_name, ".size(-1) = ",
              ref.size(-1), ", got shape ", t.sizes());
}

// A tensor added to `ref` elementwise (a residual): ref's shape, dtype and device.
inline void check_like(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                       const at::Tensor& ref) {
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", name, " must have the shape of ", ref_name, ", got ", name, " ",
              t.sizes(), " and ", ref_name, " ", ref.sizes());
  check_dtype(op, name, t, ref_name, ref);
  check_device(op, name, t, ref_name, ref);
}

// task_ids: int64 [B] on the device of `ref` whose dim 0 is the batch.
inline void check_task_ids(const char* op, const at::Tensor& task_ids, const char* ref_name,
                           const at::Tensor& ref) {
  TORCH_CHECK(task_ids.scalar_type() == at::kLong, op, ": task_ids must be int64, got ",
              task_ids.scalar_type());
  TORCH_CHECK(task_ids.dim() == 1 && task_ids.size(0) == ref.size(0), op,
              ": task_ids must be [B] with B = ", ref_name, ".size(0) = ", ref.size(0), ", got shape ",
              task_ids.sizes());
  check_device(op, "task_ids", task_ids, ref_name, ref);
}

}  // namespace pets
