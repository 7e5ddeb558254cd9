// pets::segmented_linear (per-task heads): one warp per (token, label), lanes across in_features and a fixed
// reduction order, so a logit depends only on its row and its slot's weights: not on the batch, not on L (other
// tasks' logits stay bitwise equal when a task with more labels widens the table).
#include "../common/task_groups.h"
#include "../head/head.h"
#include "common.cuh"
#include "ops.h"

namespace pets::cuda {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    segmented_linear_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ task_ids,
                            const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias, int64_t slots,
                            scalar_t* __restrict__ out, int64_t rows, int64_t tokens, int64_t in_features,
                            int64_t labels) {
  using acc = acc_t<scalar_t>;
  const int64_t job = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  if (job >= rows * labels) return;
  const int64_t m = job / labels, l = job % labels;
  const int64_t t = slot_of(task_ids, m / tokens, slots);
  if (t < 0) return;
  const scalar_t* xr = x + m * in_features;
  const scalar_t* w = weight + (t * labels + l) * in_features;
  acc sum = 0;
  for (int64_t k = threadIdx.x % kWarp; k < in_features; k += kWarp) {
    sum += static_cast<acc>(xr[k]) * static_cast<acc>(w[k]);
  }
  sum = warp_sum(sum);
  if (threadIdx.x % kWarp == 0) out[m * labels + l] = static_cast<scalar_t>(sum + static_cast<acc>(bias[t * labels + l]));
}

}  // namespace

at::Tensor segmented_linear(const at::Tensor& x, const at::Tensor& task_ids, const at::Tensor& weight,
                            const at::Tensor& bias) {
  check_segmented_linear_inputs(x, task_ids, weight, bias);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const int64_t labels = weight.size(1);
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = labels;
  at::Tensor out = at::empty(sizes, x.options());
  if (out.numel() == 0) return out;
  const at::Tensor x3 = as_rows(x).contiguous();
  const at::Tensor ids = task_ids.contiguous();
  const at::Tensor w = weight.contiguous(), b = bias.contiguous();
  const int64_t rows = x3.size(0) * x3.size(1);
  const int64_t warps = kThreads / kWarp;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pets::segmented_linear", [&] {
    segmented_linear_kernel<scalar_t><<<static_cast<unsigned>(ceil_div(rows * labels, warps)), kThreads, 0, stream()>>>(
        x3.const_data_ptr<scalar_t>(), ids.const_data_ptr<int64_t>(), w.const_data_ptr<scalar_t>(),
        b.const_data_ptr<scalar_t>(), w.size(0), out.mutable_data_ptr<scalar_t>(), rows, x3.size(1), x3.size(2),
        labels);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace pets::cuda
