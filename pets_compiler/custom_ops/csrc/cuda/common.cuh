// Device helpers shared by the CUDA kernels: the slot of a batch row, warp sums, launch shapes. Every kernel reads
// task_ids and the tables on the device (never on the host: reading them there would synchronise and break CUDA
// graph capture), so each index it reads is checked where it is read: CUDA_KERNEL_ASSERT traps on a bad one (the
// stream then reports the error), and the kernel skips the work instead of reading out of bounds.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>

#include <array>
#include <atomic>

namespace pets::cuda {

template <typename scalar_t>
using acc_t = at::opmath_type<scalar_t>;  // float for half types and float, double for double

constexpr int kWarp = 32;

// task_ids[row] if it is a slot of a table with `slots` rows, else -1 (after a device-side assert).
__device__ __forceinline__ int64_t slot_of(const int64_t* task_ids, int64_t row, int64_t slots) {
  const int64_t t = task_ids[row];
  CUDA_KERNEL_ASSERT(t >= 0 && t < slots && "pets: a task id is not a slot of the op's tables");
  return (t >= 0 && t < slots) ? t : -1;
}

// The sum over a warp's 32 lanes, the same on every lane; a fixed butterfly order, so a result never depends on
// anything but the 32 inputs.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// A linear site's per-task row terms besides LoRA (linear_delta): bias[t] added, then the output times
// (1 + scale[t]) (IA3, stored as l - 1); nullptr where absent, `*_slots` the rows of each table.
template <typename scalar_t>
struct SiteTerms {
  const scalar_t* bias;
  int64_t bias_slots;
  const scalar_t* scale;
  int64_t scale_slots;
};

// IA3's output scale on a result already rounded to its dtype, rounded as pets::scale rounds it: y * (1 + 0) is y
// exactly.
template <typename scalar_t, typename acc>
__device__ __forceinline__ scalar_t scale_out(scalar_t v, acc l) {
  return static_cast<scalar_t>(static_cast<acc>(v) * (acc(1) + l));
}

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a < b ? b : a; }

// 16-byte vectors of a row: loads of kVecBytes / sizeof(scalar_t) elements in one instruction.
constexpr int kVecBytes = 16;
template <typename scalar_t>
struct alignas(kVecBytes) Vec {
  scalar_t v[kVecBytes / sizeof(scalar_t)];
};

// The v-th vector of a row starting at `row` (16-byte aligned; see vectorizable).
template <typename scalar_t>
__device__ __forceinline__ Vec<scalar_t> load_vec(const scalar_t* row, int64_t v) {
  return reinterpret_cast<const Vec<scalar_t>*>(row)[v];
}

// Whether rows of `features` elements of contiguous `t` can be read as 16-byte vectors.
inline bool vectorizable(const at::Tensor& t, int64_t features) {
  return (features * static_cast<int64_t>(t.element_size())) % kVecBytes == 0 &&
         reinterpret_cast<uintptr_t>(t.const_data_ptr()) % kVecBytes == 0;
}

// t's data, or nullptr where t is undefined (an absent optional operand).
template <typename scalar_t>
inline const scalar_t* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr;
}

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// An attribute of the current device, queried once per device (`known`: one table per attribute).
inline int device_attribute(std::array<std::atomic<int>, 64>& known, cudaDeviceAttr attr) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  std::atomic<int>& slot = known.at(static_cast<size_t>(device));
  int value = slot.load(std::memory_order_relaxed);  // 0: not queried yet
  if (value == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
    slot.store(value, std::memory_order_relaxed);
  }
  return value;
}

// The current device's largest opt-in shared memory per block.
inline size_t shared_memory_optin() {
  static std::array<std::atomic<int>, 64> known{};
  return static_cast<size_t>(device_attribute(known, cudaDevAttrMaxSharedMemoryPerBlockOptin));
}

// The current device's count of SMs.
inline int64_t multiprocessor_count() {
  static std::array<std::atomic<int>, 64> known{};
  return device_attribute(known, cudaDevAttrMultiProcessorCount);
}

// Dynamic shared memory above the default 48 KiB must be opted into per kernel; fails with the op's name when
// the device cannot give `bytes` at all.
template <typename Kernel>
void allow_shared_memory(const char* op, Kernel kernel, size_t bytes, const char* what) {
  const size_t limit = shared_memory_optin();
  TORCH_CHECK(bytes <= limit, op, ": ", what, " needs ", bytes, " bytes of shared memory per block; this device ",
              "allows ", limit);
  // The default limit (48 KiB) is on static and dynamic shared memory together.
  cudaFuncAttributes attributes{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  TORCH_CHECK(bytes + attributes.sharedSizeBytes <= limit, op, ": ", what, " needs ", bytes, " bytes of shared ",
              "memory per block besides the kernel's own ", attributes.sharedSizeBytes, "; this device allows ", limit);
  if (bytes + attributes.sharedSizeBytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

}  // namespace pets::cuda
