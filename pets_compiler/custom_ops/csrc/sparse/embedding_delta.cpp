#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <sstream>
#include <vector>

#include "../common/acc_type.h"
#include "../common/checks.h"
#include "../common/task_groups.h"
#include "sparse.h"

namespace pets {
namespace {

// "[i, s]": the index of flat position `flat` in a tensor of `sizes`, for messages.
std::string index_string(int64_t flat, at::IntArrayRef sizes) {
  std::vector<int64_t> index(sizes.size());
  for (int64_t d = static_cast<int64_t>(sizes.size()) - 1; d >= 0; --d) {
    index[d] = flat % sizes[d];
    flat /= sizes[d];
  }
  std::ostringstream s;
  s << "[";
  for (size_t d = 0; d < index.size(); ++d) s << (d ? ", " : "") << index[d];
  s << "]";
  return s.str();
}

// out[r, :] = y[r, :] + row ids[r] of the row's slot matrix: y's row and then the entries, in pool order, are
// summed into an accumulator row and rounded once (a repeated column adds up). A token whose row of D_t is
// empty copies y bitwise. Like sparse_delta, a row's result depends only on that row and its slot's matrix.
template <typename scalar_t>
void embedding_delta_rows(const scalar_t* y, const int64_t* ids, const int64_t* task_ids, const int64_t* row_ptr,
                          const int64_t* col, const scalar_t* val, scalar_t* out, int64_t rows, int64_t tokens,
                          int64_t vocab, int64_t hidden) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(hidden, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(hidden);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t* p = row_ptr + task_ids[r / tokens] * (vocab + 1) + ids[r];
      const scalar_t* yr = y + r * hidden;
      scalar_t* outr = out + r * hidden;
      if (p[0] == p[1]) {
        std::copy(yr, yr + hidden, outr);
        continue;
      }
      for (int64_t j = 0; j < hidden; ++j) acc[j] = static_cast<acc_t>(yr[j]);
      for (int64_t k = p[0]; k < p[1]; ++k) acc[col[k]] += static_cast<acc_t>(val[k]);
      for (int64_t j = 0; j < hidden; ++j) outr[j] = static_cast<scalar_t>(acc[j]);
    }
  });
}

PoolExtent embedding_extent(const at::Tensor& y, int64_t vocab) {
  return {vocab, "V", "row_ptr.size(1) - 1", y.size(-1), "H", "y.size(-1)"};
}

}  // namespace

int64_t check_embedding_delta_inputs(const at::Tensor& y, const at::Tensor& ids, const at::Tensor& task_ids,
                                     const at::Tensor& row_ptr, const at::Tensor& col, const at::Tensor& val) {
  constexpr const char* op = "pets::embedding_delta";
  check_batch_tensor(op, "y", y);
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.sizes() == y.sizes().slice(0, y.dim() - 1), op,
              ": ids must be int64 with the shape of y without its last dim, ", y.sizes().slice(0, y.dim() - 1),
              ", got ", ids.scalar_type(), " ", ids.sizes());
  check_device(op, "ids", ids, "y", y);
  check_task_ids(op, task_ids, "y", y);
  TORCH_CHECK(row_ptr.dim() == 2 && row_ptr.size(1) >= 1, op,
              ": row_ptr must be an int64 [T, V + 1] table (V = the embedding's rows), got shape ", row_ptr.sizes());
  const int64_t vocab = row_ptr.size(1) - 1;
  check_pool_layout(op, row_ptr, col, val, embedding_extent(y, vocab), "y", y);
  return vocab;

}

at::Tensor embedding_delta_cpu(const at::Tensor& y, const at::Tensor& ids, const at::Tensor& task_ids,
                               const at::Tensor& row_ptr, const at::Tensor& col, const at::Tensor& val) {
  constexpr const char* op = "pets::embedding_delta";
  const int64_t vocab = check_embedding_delta_inputs(y, ids, task_ids, row_ptr, col, val);
  check_pool(op, task_ids, row_ptr, col, val, embedding_extent(y, vocab), "y", y);
  const at::Tensor idc = ids.contiguous();
  const int64_t* idp = idc.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < idc.numel(); ++i) {
    TORCH_CHECK(idp[i] >= 0 && idp[i] < vocab, op, ": ids", index_string(i, idc.sizes()), " = ", idp[i],
                " is not a row of the embedding delta, which has V = ", vocab, " rows (row_ptr ", row_ptr.sizes(),
                "); ids must be in [0, ", vocab, ")");
  }

  const at::Tensor y3 = as_rows(y).contiguous();
  const at::Tensor tids = task_ids.contiguous();
  const at::Tensor rp = row_ptr.contiguous(), cols = col.contiguous(), vals = val.contiguous();
  at::Tensor out = at::empty(y.sizes(), y.options());
  const int64_t tokens = y3.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "pets::embedding_delta", [&] {
    embedding_delta_rows<scalar_t>(y3.const_data_ptr<scalar_t>(), idp, tids.const_data_ptr<int64_t>(),
                                   rp.const_data_ptr<int64_t>(), cols.const_data_ptr<int64_t>(),
                                   vals.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                                   y3.size(0) * tokens, tokens, vocab, y3.size(2));
  });
  return out;
}

}  // namespace pets
