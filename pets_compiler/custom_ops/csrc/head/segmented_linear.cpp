#include "head.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <vector>

#include "../common/checks.h"
#include "../common/task_groups.h"

namespace pets {

void check_segmented_linear_inputs(const at::Tensor& x, const at::Tensor& task_ids, const at::Tensor& weight,
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
}

at::Tensor segmented_linear_cpu(const at::Tensor& x, const at::Tensor& task_ids, const at::Tensor& weight,
                                const at::Tensor& bias) {
  constexpr const char* op = "pets::segmented_linear";
  check_segmented_linear_inputs(x, task_ids, weight, bias);
  check_task_id_range(op, task_ids, weight.size(0), "weight");

  const int64_t labels = weight.size(1);
  std::vector<int64_t> out_sizes = x.sizes().vec();
  out_sizes.back() = labels;
  at::Tensor out = at::empty(out_sizes, x.options());
  const at::Tensor x3 = as_rows(x).contiguous();
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = bias.contiguous();
  const at::Tensor ids = task_ids.contiguous();
  const int64_t tokens = x3.size(1);
  const int64_t in_features = x3.size(2);
  const int64_t rows = x3.size(0) * tokens;

  // One dot product per (row, label), each summed in the same order whatever the batch or the table's label
  // count L: a row's logits do not change when other tasks (with more labels) are added or share its batch.
  // Heads are tiny (rows x L x in), so this costs nothing next to the backbone.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pets_segmented_linear", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x3.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t* bp = b.data_ptr<scalar_t>();
    const int64_t* tp = ids.data_ptr<int64_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t t = tp[r / tokens];
        const scalar_t* xr = xp + r * in_features;
        for (int64_t l = 0; l < labels; ++l) {
          const scalar_t* wr = wp + (t * labels + l) * in_features;
          acc_t acc = 0;
          for (int64_t k = 0; k < in_features; ++k) acc += static_cast<acc_t>(xr[k]) * static_cast<acc_t>(wr[k]);
          op[r * labels + l] = static_cast<scalar_t>(acc + static_cast<acc_t>(bp[t * labels + l]));
        }
      }
    });
  });
  return out;
}

}  // namespace pets
