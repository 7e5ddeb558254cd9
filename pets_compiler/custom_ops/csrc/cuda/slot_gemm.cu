// cublasGemmBatchedEx over per-row pointers (see slot_gemm.h). Row-major [N, K] x and [F, K] w are, to cuBLAS's
// column-major view, K x N and K x F; out[b]^T (F x N, column-major = row-major [N, F]) = w_t^T-op * x_b.
#include <ATen/cuda/CUDAContext.h>
#include <cublas_v2.h>

#include "common.cuh"
#include "slot_gemm.h"

namespace pets::cuda {
namespace {

// Rows left out (SlotSkip) read `spare_x` and write `spare_out` instead of their own rows.
template <typename scalar_t>
__global__ void slot_pointers_kernel(const scalar_t* x, const scalar_t* w, const int64_t* task_ids, scalar_t* out,
                                     int64_t batch, int64_t slots, int64_t x_stride, int64_t w_stride,
                                     int64_t out_stride, SlotSkip skip, const scalar_t* spare_x,
                                     scalar_t* spare_out, void** ptrs) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  const int64_t t = slot_of(task_ids, b, slots);
  const bool left_out = skip.flags != nullptr && t >= 0 && skip.flags[t * skip.stride] == 0;
  ptrs[b] = const_cast<scalar_t*>(w + max64(t, 0) * w_stride);  // cuBLAS reads it as const
  ptrs[batch + b] = const_cast<scalar_t*>(left_out ? spare_x : x + b * x_stride);
  ptrs[2 * batch + b] = left_out ? spare_out : out + b * out_stride;
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

void slot_gemm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& task_ids, at::Tensor& out,
               SlotSkip skip) {
  const int64_t batch = x.size(0), n = x.size(1), k = x.size(2), f = w.size(1);
  if (batch == 0 || n == 0 || f == 0) return;
  TORCH_CHECK(n <= INT32_MAX && k <= INT32_MAX && f <= INT32_MAX && batch <= INT32_MAX,
              "pets: a per-slot matmul of ", batch, " x ", n, " x ", k, " x ", f, " is beyond cuBLAS's int sizes");
  if (k == 0) {
    out.zero_();
    return;
  }
  at::Tensor ptrs = at::empty({3 * batch}, x.options().dtype(at::kLong));
  // The left-out rows' shared input and output (their values are never read back).
  const at::Tensor spare_x = skip.flags != nullptr ? at::empty({n, k}, x.options()) : at::Tensor();
  at::Tensor spare_out = skip.flags != nullptr ? at::empty({n, f}, x.options()) : at::Tensor();
  void** p = reinterpret_cast<void**>(ptrs.mutable_data_ptr<int64_t>());
  const void* const* in_ptrs = p;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pets::slot_gemm", [&] {
    using C = CublasType<scalar_t>;
    slot_pointers_kernel<scalar_t><<<static_cast<unsigned>(ceil_div(batch, 128)), 128, 0, stream()>>>(
        x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), task_ids.const_data_ptr<int64_t>(),
        out.mutable_data_ptr<scalar_t>(), batch, w.size(0), n * k, f * k, n * f, skip,
        skip.flags != nullptr ? spare_x.const_data_ptr<scalar_t>() : nullptr,
        skip.flags != nullptr ? spare_out.mutable_data_ptr<scalar_t>() : nullptr, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const typename C::alpha one = 1, zero = 0;
    cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();  // bound to the current stream
    TORCH_CUDABLAS_CHECK(cublasGemmBatchedEx(
        handle, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(f), static_cast<int>(n), static_cast<int>(k), &one, in_ptrs,
        C::data, static_cast<int>(k), in_ptrs + batch, C::data, static_cast<int>(k), &zero, p + 2 * batch, C::data,
        static_cast<int>(f), static_cast<int>(batch), C::compute, CUBLAS_GEMM_DEFAULT));
  });
}

}  // namespace pets::cuda
