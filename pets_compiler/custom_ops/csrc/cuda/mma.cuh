// Tensor-core building blocks shared by the kernels (PTX ldmatrix and mma.sync m16n8k16, fp32 accumulation).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "common.cuh"

namespace pets::cuda {

// Four 8x8 blocks of 16-bit values from shared memory; lanes 8i .. 8i + 7 give the rows of block i.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&m)[4], const void* rows) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(m[0]), "=r"(m[1]), "=r"(m[2]), "=r"(m[3])
               : "r"(static_cast<uint32_t>(__cvta_generic_to_shared(rows))));
}

// The same four blocks transposed: lane 4 g + q gets elements (2 q, g) and (2 q + 1, g) of each block, so rows
// given by the lanes are an mma operand's K and their 8 contiguous values its N (or M).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&m)[4], const void* rows) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(m[0]), "=r"(m[1]), "=r"(m[2]), "=r"(m[3])
               : "r"(static_cast<uint32_t>(__cvta_generic_to_shared(rows))));
}

// d += a @ b on tensor cores, fp32: a 16x16 (row-major), b 16x8 (col-major), fp16 or bf16 (PTX mma.m16n8k16).
// Lane 4 g + q holds a's (g, 2q..2q+1), (g + 8, 2q..), (g, 2q + 8..), (g + 8, 2q + 8..); b's (2q..2q+1, g),
// (2q + 8.., g); d's (g, 2q..2q+1), (g + 8, 2q..2q+1).
template <typename scalar_t>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  constexpr bool half = std::is_same_v<scalar_t, at::Half>;
  if constexpr (half) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

}  // namespace pets::cuda
