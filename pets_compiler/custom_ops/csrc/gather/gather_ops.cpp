// CUDA implementations of the dense task ops built from ATen calls: each row gathers its slot's table rows and one
// batched matmul serves the whole batch (BGMV style), with no host synchronisation and no loop over tasks. A
// stopgap until the fused single-launch kernels of issue 4 (they replace these registrations). Task ids are not
// range-checked on the host here, since reading them would synchronise: an id outside the tables trips a
// device-side index assert. Shapes and dtypes are checked as on the CPU.
#ifdef PETS_WITH_CUDA

#include <torch/library.h>

#include "../bias/bias.h"
#include "../head/head.h"
#include "../common/checks.h"
#include "../common/task_groups.h"
#include "../layer_norm/layer_norm.h"
#include "../lora/lora.h"
#include "../scale/scale.h"

namespace pets {
namespace {

// scale[t] * (x @ A[t, :r].T) @ B[t, :, :r].T for every row, as [B, N, out].
at::Tensor lora_term(const at::Tensor& x3, const at::Tensor& ids, const at::Tensor& a, const at::Tensor& b,
                     const at::Tensor& scale, const at::Tensor& rank) {
  const int64_t r = a.size(1);
  at::Tensor h = at::bmm(x3, a.index_select(0, ids).transpose(1, 2));  // [B, N, R]
  const at::Tensor keep = at::arange(r, rank.options()).unsqueeze(0) < rank.index_select(0, ids).unsqueeze(1);
  const at::Tensor gain = keep.to(h.scalar_type()) * scale.index_select(0, ids).unsqueeze(1);  // [B, R]
  h.mul_(gain.unsqueeze(1));
  return at::bmm(h, b.index_select(0, ids).transpose(1, 2));  // [B, N, out]
}

at::Tensor lora_delta_cuda(const at::Tensor& y, const at::Tensor& x, const at::Tensor& task_ids,
                           const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& scale,
                           const at::Tensor& rank) {
  constexpr const char* op = "pets::lora_delta";
  check_site_inputs(op, y, x, task_ids);
  check_lora_tables(op, y, x, lora_a, lora_b, scale, rank);
  at::Tensor out = y.clone(at::MemoryFormat::Contiguous);
  if (lora_a.size(1) > 0) as_rows(out).add_(lora_term(as_rows(x), task_ids, lora_a, lora_b, scale, rank));
  return out;
}

at::Tensor linear_delta_cuda(const at::Tensor& y, const at::Tensor& x, const at::Tensor& task_ids,
                             const std::optional<at::Tensor>& lora_a, const std::optional<at::Tensor>& lora_b,
                             const std::optional<at::Tensor>& lora_scale, const std::optional<at::Tensor>& lora_rank,
                             const std::optional<at::Tensor>& bias) {
  check_linear_delta_inputs(y, x, task_ids, lora_a, lora_b, lora_scale, lora_rank, bias);
  at::Tensor out = y.clone(at::MemoryFormat::Contiguous);
  at::Tensor out3 = as_rows(out);
  if (lora_a.has_value() && lora_a->size(1) > 0) {
    out3.add_(lora_term(as_rows(x), task_ids, *lora_a, *lora_b, *lora_scale, *lora_rank));
  }
  if (bias.has_value()) add_bias_cpu(out3, out3, task_ids, *bias);  // a gather and a broadcast add: any device
  return out;
}

at::Tensor bias_delta_cuda(const at::Tensor& y, const at::Tensor& task_ids, const at::Tensor& bias) {
  check_bias_delta_inputs(y, task_ids, bias);
  at::Tensor out = at::empty(y.sizes(), y.options());
  add_bias_cpu(as_rows(out), as_rows(y), task_ids, bias);
  return out;
}

at::Tensor scale_cuda(const at::Tensor& y, const at::Tensor& task_ids, const at::Tensor& delta) {
  check_scale_inputs(y, task_ids, delta);
  // y * (1 + 0) is y exactly, so rows of slots without a scale are unchanged bit for bit.
  return (as_rows(y) * (delta.index_select(0, task_ids) + 1).unsqueeze(1)).reshape(y.sizes());
}

at::Tensor segmented_linear_cuda(const at::Tensor& x, const at::Tensor& task_ids, const at::Tensor& weight,
                                 const at::Tensor& bias) {
  check_segmented_linear_inputs(x, task_ids, weight, bias);
  const at::Tensor x3 = as_rows(x);
  at::Tensor out = at::baddbmm(bias.index_select(0, task_ids).unsqueeze(1), x3,
                               weight.index_select(0, task_ids).transpose(1, 2));  // [B, N, L]
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = weight.size(1);
  return out.reshape(sizes);
}

at::Tensor layer_norm_cuda(const at::Tensor& x, const at::Tensor& task_ids, const at::Tensor& weight,
                           const at::Tensor& bias, const at::Tensor& weight_delta, const at::Tensor& bias_delta,
                           double eps) {
  check_layer_norm_inputs(x, task_ids, weight, bias, weight_delta, bias_delta);
  const int64_t hidden = x.size(-1);
  const at::Tensor normed = as_rows(at::layer_norm(x, {hidden}, std::nullopt, std::nullopt, eps));
  const at::Tensor w = (weight_delta.index_select(0, task_ids) + weight).unsqueeze(1);  // [B, 1, H]
  const at::Tensor b = (bias_delta.index_select(0, task_ids) + bias).unsqueeze(1);
  return at::addcmul(b, normed, w).reshape(x.sizes());
}

}  // namespace
}  // namespace pets

TORCH_LIBRARY_IMPL(pets, CUDA, m) {
  m.impl("lora_delta", &pets::lora_delta_cuda);
  m.impl("linear_delta", &pets::linear_delta_cuda);
  m.impl("bias_delta", &pets::bias_delta_cuda);
  m.impl("scale", &pets::scale_cuda);
  m.impl("segmented_linear", &pets::segmented_linear_cuda);
  m.impl("layer_norm", &pets::layer_norm_cuda);
}

#endif  // PETS_WITH_CUDA
