#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "../common/acc_type.h"
#include "../common/checks.h"
#include "../common/task_groups.h"
#include "../lora/lora.h"
#include "sparse.h"

namespace pets {
namespace {

// out[r, o] = y[r, o] + sum_k val[k] * x[r, col[k]] over the entries k of row o of the row's slot, in pool order.
// Each output element is one sum in a fixed order over its own entries only, so a row's result depends on
// nothing but that row and its slot's matrix: not on the batch, not on the other slots in the pool.
template <typename scalar_t>
void sparse_delta_rows(const scalar_t* y, const scalar_t* x, const int64_t* task_ids, const int64_t* row_ptr,
                       const int64_t* col, const scalar_t* val, scalar_t* out, int64_t rows, int64_t tokens,
                       int64_t in_features, int64_t out_features) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(out_features, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t* p = row_ptr + task_ids[r / tokens] * (out_features + 1);
      const scalar_t* xr = x + r * in_features;
      const scalar_t* yr = y + r * out_features;
      scalar_t* outr = out + r * out_features;
      if (p[0] == p[out_features]) {  // a slot without nonzeros: y itself
        std::copy(yr, yr + out_features, outr);
        continue;
      }
      for (int64_t o = 0; o < out_features; ++o) {
        if (p[o] == p[o + 1]) {
          outr[o] = yr[o];  // bitwise y (y + 0 would turn -0 into +0)
          continue;
        }
        acc_t acc = 0;
        for (int64_t k = p[o]; k < p[o + 1]; ++k) {
          acc += static_cast<acc_t>(val[k]) * static_cast<acc_t>(xr[col[k]]);
        }
        outr[o] = static_cast<scalar_t>(static_cast<acc_t>(yr[o]) + acc);
      }
    }
  });
}

PoolExtent sparse_delta_extent(const at::Tensor& y, const at::Tensor& x) {
  return {y.size(-1), "out", "y.size(-1)", x.size(-1), "in", "x.size(-1)"};
}

}  // namespace

void check_sparse_delta_inputs(const at::Tensor& y, const at::Tensor& x, const at::Tensor& task_ids,
                               const at::Tensor& row_ptr, const at::Tensor& col, const at::Tensor& val) {
  constexpr const char* op = "pets::sparse_delta";
  check_site_inputs(op, y, x, task_ids);
  check_pool_layout(op, row_ptr, col, val, sparse_delta_extent(y, x), "x", x);
}

at::Tensor sparse_delta_cpu(const at::Tensor& y, const at::Tensor& x, const at::Tensor& task_ids,
                            const at::Tensor& row_ptr, const at::Tensor& col, const at::Tensor& val) {
  check_sparse_delta_inputs(y, x, task_ids, row_ptr, col, val);
  check_pool("pets::sparse_delta", task_ids, row_ptr, col, val, sparse_delta_extent(y, x), "x", x);

  const at::Tensor y3 = as_rows(y).contiguous();
  const at::Tensor x3 = as_rows(x).contiguous();
  const at::Tensor ids = task_ids.contiguous();
  const at::Tensor rp = row_ptr.contiguous(), cols = col.contiguous(), vals = val.contiguous();
  at::Tensor out = at::empty(y.sizes(), y.options());
  const int64_t tokens = y3.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "pets::sparse_delta", [&] {
    sparse_delta_rows<scalar_t>(y3.const_data_ptr<scalar_t>(), x3.const_data_ptr<scalar_t>(),
                                ids.const_data_ptr<int64_t>(), rp.const_data_ptr<int64_t>(),
                                cols.const_data_ptr<int64_t>(), vals.const_data_ptr<scalar_t>(),
                                out.mutable_data_ptr<scalar_t>(), y3.size(0) * tokens, tokens, x3.size(2),
                                y3.size(2));
  });
  return out;
}

}  // namespace pets
