// Per-row-slot matmuls through cuBLAS's pointer-array batched GEMM: batch row b multiplies its own table slot,
// read in place (no gathered copy of the tables), and the pointers are written on the device (no host read of
// task_ids), so the call captures in a CUDA graph.
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <initializer_list>

namespace pets::cuda {

// Batch rows whose slot has no term at the call (a row without LoRA at a LoRA site, without an adapter at an adapter
// site): row b is left out where flags[task_ids[b] * stride] == 0. Its GEMM still runs (the batch size is the
// host's), but on a shared [N, K] input and into a shared [N, F] output that stay in L2, so the call's memory
// traffic is that of the rows with the term alone; its rows of `out` are not written.
struct SlotSkip {
  const int64_t* flags = nullptr;  // nullptr: no row is left out
  int64_t stride = 1;
};

// out[b] = x[b] @ w[task_ids[b]].T for x [B, N, K], w [T, F, K], out [B, N, F] (all contiguous, one dtype,
// fp32 accumulation for the half types), for the rows `skip` does not leave out. Inputs already checked by the
// caller; a task id outside [0, T) asserts on the device and its row reads slot 0.
void slot_gemm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& task_ids, at::Tensor& out,
               SlotSkip skip = {});

// One of several per-slot matmuls of the same batch rows (slot_gemms).
struct SlotGemm {
  const at::Tensor& x;
  const at::Tensor& w;
  at::Tensor& out;
  SlotSkip skip = {};
};

// slot_gemm for each of `gemms` in order (one dtype, the same batch size), with one pointer kernel for all, and
// `after(j)` (if given) launched after matmul j: the adapter's down projection, its activation, its up projection
// (which reads the down projection's output: the pointers are only addresses).
void slot_gemms(const at::Tensor& task_ids, std::initializer_list<SlotGemm> gemms,
                const std::function<void(size_t)>& after = {});

}  // namespace pets::cuda
