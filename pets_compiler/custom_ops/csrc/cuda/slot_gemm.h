// Per-row-slot matmuls through cuBLAS's pointer-array batched GEMM: batch row b multiplies its own table slot,
// read in place (no gathered copy of the tables), and the pointers are written on the device (no host read of
// task_ids), so the call captures in a CUDA graph.
#pragma once

#include <ATen/ATen.h>

namespace pets::cuda {

// out[b] = x[b] @ w[task_ids[b]].T for x [B, N, K], w [T, F, K], out [B, N, F] (all contiguous, one dtype,
// fp32 accumulation for the half types). Inputs already checked by the caller; a task id outside [0, T) asserts
// on the device and its row reads slot 0.
void slot_gemm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& task_ids, at::Tensor& out);

}  // namespace pets::cuda
