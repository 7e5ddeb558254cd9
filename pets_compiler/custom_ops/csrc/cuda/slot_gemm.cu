// cublasGemmBatchedEx over per-row pointers (see slot_gemm.h). Row-major [N, K] x and [F, K] w are, to cuBLAS's
// column-major view, K x N and K x F; out[b]^T (F x N, column-major = row-major [N, F]) = w_t^T-op * x_b.
#include <ATen/cuda/CUDAContext.h>
#include <cublas_v2.h>

#include <vector>

#include "common.cuh"
#include "slot_gemm.h"

namespace pets::cuda {
namespace {

constexpr int kMaxGemms = 2;  // matmuls one pointer kernel serves

// One matmul's pointer arrays ([3 * batch]: w, x, out per row) and what they are made from. Rows left out (SlotSkip)
// read `spare_x` and write `spare_out` instead of their own rows.
template <typename scalar_t>
struct PointerJob {
  const scalar_t* x;
  const scalar_t* w;
  scalar_t* out;
  int64_t slots, x_stride, w_stride, out_stride;
  SlotSkip skip;
  const scalar_t* spare_x;
  scalar_t* spare_out;
  void** ptrs;
};

template <typename scalar_t>
struct PointerJobs {
  PointerJob<scalar_t> job[kMaxGemms];
  int count;
};

template <typename scalar_t>
__global__ void slot_pointers_kernel(const int64_t* task_ids, int64_t batch, PointerJobs<scalar_t> jobs) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  for (int j = 0; j < jobs.count; ++j) {
    const PointerJob<scalar_t>& p = jobs.job[j];
    const int64_t t = slot_of(task_ids, b, p.slots);
    const bool left_out = p.skip.flags != nullptr && t >= 0 && p.skip.flags[t * p.skip.stride] == 0;
    p.ptrs[b] = const_cast<scalar_t*>(p.w + max64(t, 0) * p.w_stride);  // cuBLAS reads it as const
    p.ptrs[batch + b] = const_cast<scalar_t*>(left_out ? p.spare_x : p.x + b * p.x_stride);
    p.ptrs[2 * batch + b] = left_out ? p.spare_out : p.out + b * p.out_stride;
  }
}

template <typename scalar_t>
struct CublasType;
template <>
struct CublasType<at::Half> {
  static constexpr cudaDataType_t data = CUDA_R_16F;
  static constexpr cublasComputeType_t compute = CUBLAS_COMPUTE_32F;
  using alpha = float;
};
template <>
struct CublasType<at::BFloat16> {
  static constexpr cudaDataType_t data = CUDA_R_16BF;
  static constexpr cublasComputeType_t compute = CUBLAS_COMPUTE_32F;
  using alpha = float;
};
template <>
struct CublasType<float> {
  static constexpr cudaDataType_t data = CUDA_R_32F;
  static constexpr cublasComputeType_t compute = CUBLAS_COMPUTE_32F;
  using alpha = float;
};
template <>
struct CublasType<double> {
  static constexpr cudaDataType_t data = CUDA_R_64F;
  static constexpr cublasComputeType_t compute = CUBLAS_COMPUTE_64F;
  using alpha = double;
};

}  // namespace

void slot_gemms(const at::Tensor& task_ids, std::initializer_list<SlotGemm> gemms,
                const std::function<void(size_t)>& after) {
  TORCH_INTERNAL_ASSERT(gemms.size() <= static_cast<size_t>(kMaxGemms), "pets: slot_gemms takes at most ",
                        kMaxGemms, " matmuls");
  // The matmuls with work (their indices in `gemms`); one with no input features is all zeros.
  const SlotGemm* all = gemms.begin();
  std::vector<size_t> work;
  for (size_t j = 0; j < gemms.size(); ++j) {
    const SlotGemm& g = all[j];
    const int64_t batch = g.x.size(0), n = g.x.size(1), k = g.x.size(2), f = g.w.size(1);
    TORCH_CHECK(n <= INT32_MAX && k <= INT32_MAX && f <= INT32_MAX && batch <= INT32_MAX, "pets: a per-slot matmul of ",
                batch, " x ", n, " x ", k, " x ", f, " is beyond cuBLAS's int sizes");
    if (batch > 0 && n > 0 && f > 0 && k == 0) g.out.zero_();
    if (batch > 0 && n > 0 && f > 0 && k > 0) work.push_back(j);
  }
  const auto run_after = [&](size_t j) {
    if (after) after(j);
  };
  if (work.empty()) {
    for (size_t j = 0; j < gemms.size(); ++j) run_after(j);
    return;
  }
  const at::Tensor& x0 = all[work.front()].x;
  const int64_t batch = x0.size(0);
  at::Tensor ptrs = at::empty({3 * batch * static_cast<int64_t>(work.size())}, x0.options().dtype(at::kLong));
  void** p = reinterpret_cast<void**>(ptrs.mutable_data_ptr<int64_t>());
  std::vector<at::Tensor> spares;  // the left-out rows' shared inputs and outputs (their values are never read back)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "pets::slot_gemm", [&] {
    using C = CublasType<scalar_t>;
    PointerJobs<scalar_t> jobs{};
    jobs.count = static_cast<int>(work.size());
    for (size_t j = 0; j < work.size(); ++j) {
      const SlotGemm& g = all[work[j]];
      TORCH_INTERNAL_ASSERT(g.x.size(0) == batch && g.x.scalar_type() == x0.scalar_type());
      const int64_t n = g.x.size(1), k = g.x.size(2), f = g.w.size(1);
      const scalar_t* spare_x = nullptr;
      scalar_t* spare_out = nullptr;
      if (g.skip.flags != nullptr) {
        spares.push_back(at::empty({n, k}, g.x.options()));
        spare_x = spares.back().const_data_ptr<scalar_t>();
        spares.push_back(at::empty({n, f}, g.x.options()));
        spare_out = spares.back().mutable_data_ptr<scalar_t>();
      }
      jobs.job[j] = {g.x.const_data_ptr<scalar_t>(), g.w.const_data_ptr<scalar_t>(), g.out.mutable_data_ptr<scalar_t>(),
                     g.w.size(0), n * k, f * k, n * f, g.skip, spare_x, spare_out,
                     p + 3 * batch * static_cast<int64_t>(j)};
    }
    slot_pointers_kernel<scalar_t><<<static_cast<unsigned>(ceil_div(batch, 128)), 128, 0, stream()>>>(
        task_ids.const_data_ptr<int64_t>(), batch, jobs);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const typename C::alpha one = 1, zero = 0;
    cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();  // bound to the current stream
    size_t w = 0;  // the next matmul with work
    for (size_t j = 0; j < gemms.size(); ++j) {
      if (w < work.size() && work[w] == j) {
        const SlotGemm& g = all[j];
        const int n = static_cast<int>(g.x.size(1)), k = static_cast<int>(g.x.size(2));
        const int f = static_cast<int>(g.w.size(1));
        void** q = jobs.job[w].ptrs;
        const void* const* in = q;
        TORCH_CUDABLAS_CHECK(cublasGemmBatchedEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, f, n, k, &one, in, C::data, k,
                                                 in + batch, C::data, k, &zero, q + 2 * batch, C::data, f,
                                                 static_cast<int>(batch), C::compute, CUBLAS_GEMM_DEFAULT));
        ++w;
      }
      run_after(j);
    }
  });
}

void slot_gemm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& task_ids, at::Tensor& out,
               SlotSkip skip) {
  slot_gemms(task_ids, {{x, w, out, skip}});
}

}  // namespace pets::cuda
