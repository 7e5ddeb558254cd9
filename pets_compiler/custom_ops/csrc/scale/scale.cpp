#include "scale.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "../common/acc_type.h"
#include "../common/checks.h"
#include "../common/task_groups.h"

namespace pets {

void check_scale_table(const char* op, const char* name, const at::Tensor& y, const at::Tensor& delta) {
  check_table(op, name, delta, 2, "y", y);
  TORCH_CHECK(delta.size(1) == y.size(-1), op, ": ", name, " has features ", delta.size(1), ", y has ", y.size(-1),
              " (", name, " ", delta.sizes(), ", y ", y.sizes(), ")");
}

void check_scale_inputs(const at::Tensor& y, const at::Tensor& task_ids, const at::Tensor& delta) {
  constexpr const char* op = "pets::scale";
  check_batch_tensor(op, "y", y);
  check_task_ids(op, task_ids, "y", y);
  check_scale_table(op, "delta", y, delta);
}

void scale_rows_cpu(at::Tensor out3, const at::Tensor& y3, const at::Tensor& task_ids, const at::Tensor& delta) {
  const at::Tensor d = delta.contiguous();
  const at::Tensor ids = task_ids.contiguous();
  const int64_t tokens = y3.size(1);
  const int64_t features = y3.size(2);
  const int64_t rows = y3.size(0) * tokens;
  // One product per element, in the accumulation type and rounded once: y * (1 + 0) is y exactly, so the rows
  // of a zero slot come out bitwise equal to y (signed zeros and NaNs included).
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y3.scalar_type(), "pets::scale", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const scalar_t* yp = y3.const_data_ptr<scalar_t>();
    const scalar_t* dp = d.const_data_ptr<scalar_t>();
    const int64_t* tp = ids.const_data_ptr<int64_t>();
    scalar_t* op = out3.mutable_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(features, 1));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* yr = yp + r * features;
        const scalar_t* dr = dp + tp[r / tokens] * features;
        scalar_t* outr = op + r * features;
        for (int64_t j = 0; j < features; ++j) {
          outr[j] = static_cast<scalar_t>(static_cast<acc_t>(yr[j]) * (acc_t(1) + static_cast<acc_t>(dr[j])));
        }
      }
    });
  });
}

at::Tensor scale_cpu(const at::Tensor& y, const at::Tensor& task_ids, const at::Tensor& delta) {
  constexpr const char* op = "pets::scale";
  check_scale_inputs(y, task_ids, delta);
  check_task_id_range(op, task_ids, delta.size(0), "delta");

  at::Tensor out = at::empty(y.sizes(), y.options());
  scale_rows_cpu(as_rows(out), as_rows(y).contiguous(), task_ids, delta);
  return out;
}

}  // namespace pets
