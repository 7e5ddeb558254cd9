// Pooled-CSR sparse deltas. sparse_delta (diff-pruning, MaskBERT at a linear site): a block takes kTile tokens of
// one batch row (one slot) and stages their activations in shared memory token-minor ([in][kTile]), so each
// nonzero (col, val) of the slot's matrix is read once per block and applied to all its tokens with one vector
// load; threads take the matrix's rows (output features). embedding_delta: one warp per token, lanes across the
// hidden features, each summing its own column's entries of the token's row (a repeated column adds up).
#include "../common/task_groups.h"
#include "../lora/lora.h"
#include "../sparse/sparse.h"
#include "common.cuh"
#include "ops.h"

namespace pets::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kTileBytes = 32;  // one staged column: kTile tokens of sizeof(scalar_t) bytes
constexpr int kUnroll = 4;      // CSR entries in flight per thread

template <typename scalar_t>
constexpr int tile_tokens() {
  return kTileBytes / static_cast<int>(sizeof(scalar_t));
}

// The offsets [k0, k1) of a CSR row, if they lie within the pool in order (else asserts and gives an empty row).
__device__ __forceinline__ void row_range(const int64_t* p, int64_t pool, int64_t& k0, int64_t& k1) {
  k0 = p[0];
  k1 = p[1];
  const bool ok = k0 >= 0 && k0 <= k1 && k1 <= pool;
  CUDA_KERNEL_ASSERT(ok && "pets: CSR offsets outside the pool or decreasing");
  if (!ok) k1 = k0 = 0;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, 4)
    sparse_delta_kernel(const scalar_t* __restrict__ y, const scalar_t* __restrict__ x,
                        const int64_t* __restrict__ task_ids, const int64_t* __restrict__ row_ptr,
                        const int64_t* __restrict__ col, const scalar_t* __restrict__ val, int64_t slots,
                        int64_t pool, scalar_t* __restrict__ out, int64_t tokens, int64_t in_features,
                        int64_t out_features) {
  using acc = acc_t<scalar_t>;
  constexpr int kTile = tile_tokens<scalar_t>();
  extern __shared__ __align__(16) unsigned char shared_raw[];
  scalar_t* xs = reinterpret_cast<scalar_t*>(shared_raw);  // [in_features][kTile]

  const int64_t row = blockIdx.x;
  const int64_t tok0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int count = static_cast<int>(min64(kTile, tokens - tok0));
  const int64_t m0 = row * tokens + tok0;
  const int64_t t = slot_of(task_ids, row, slots);
  const int64_t* p = row_ptr + max64(t, 0) * (out_features + 1);
  const bool empty = t < 0 || p[0] == p[out_features];

  if (!empty) {
    // Thread k gathers column k of the tile (coalesced reads across threads) and stores it as two 16-byte vectors.
    for (int64_t k = threadIdx.x; k < in_features; k += blockDim.x) {
      uint4 raw[2];
      scalar_t* column = reinterpret_cast<scalar_t*>(raw);
#pragma unroll
      for (int tm = 0; tm < kTile; ++tm) column[tm] = tm < count ? x[(m0 + tm) * in_features + k] : scalar_t(0);
      uint4* dst = reinterpret_cast<uint4*>(xs + k * kTile);
      dst[0] = raw[0];
      dst[1] = raw[1];
    }
  }
  __syncthreads();

  for (int64_t o = threadIdx.x; o < out_features; o += blockDim.x) {
    int64_t k0 = 0, k1 = 0;
    if (!empty) row_range(p + o, pool, k0, k1);
    acc sum[kTile];
#pragma unroll
    for (int tm = 0; tm < kTile; ++tm) sum[tm] = 0;
    // kUnroll entries' (col, val) loaded together, then applied: the loads of a row are independent.
    for (int64_t k = k0; k < k1; k += kUnroll) {
      int64_t c[kUnroll];
      acc v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const bool in = k + u < k1;
        c[u] = in ? col[k + u] : 0;
        v[u] = in ? static_cast<acc>(val[k + u]) : acc(0);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        CUDA_KERNEL_ASSERT(c[u] >= 0 && c[u] < in_features && "pets: a sparse_delta column is outside [0, in)");
        if (c[u] < 0 || c[u] >= in_features || k + u >= k1) continue;
        // kTile * sizeof(scalar_t) = 32 bytes: two 16-byte loads of one staged column.
        const uint4* src = reinterpret_cast<const uint4*>(xs + c[u] * kTile);
        uint4 raw[2] = {src[0], src[1]};
        const scalar_t* xv = reinterpret_cast<const scalar_t*>(raw);
#pragma unroll
        for (int tm = 0; tm < kTile; ++tm) sum[tm] += v[u] * static_cast<acc>(xv[tm]);
      }
    }
    // The tile's y column: kTile independent loads in flight together, then the stores. An empty row stores y
    // itself (y + 0 would turn -0 into +0).
    scalar_t yv[kTile];
#pragma unroll
    for (int tm = 0; tm < kTile; ++tm) yv[tm] = tm < count ? y[(m0 + tm) * out_features + o] : scalar_t(0);
    const bool term = k0 != k1;
#pragma unroll
    for (int tm = 0; tm < kTile; ++tm) {
      if (tm < count) {
        out[(m0 + tm) * out_features + o] = term ? static_cast<scalar_t>(static_cast<acc>(yv[tm]) + sum[tm]) : yv[tm];
      }
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    embedding_delta_kernel(const scalar_t* __restrict__ y, const int64_t* __restrict__ ids,
                           const int64_t* __restrict__ task_ids, const int64_t* __restrict__ row_ptr,
                           const int64_t* __restrict__ col, const scalar_t* __restrict__ val, int64_t slots,
                           int64_t pool, scalar_t* __restrict__ out, int64_t rows, int64_t tokens, int64_t vocab,
                           int64_t hidden) {
  using acc = acc_t<scalar_t>;
  const int64_t m = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  if (m >= rows) return;
  const int64_t t = slot_of(task_ids, m / tokens, slots);
  const int64_t id = ids[m];
  CUDA_KERNEL_ASSERT(id >= 0 && id < vocab && "pets: an embedding_delta id is outside [0, V)");
  int64_t k0 = 0, k1 = 0;
  if (t >= 0 && id >= 0 && id < vocab) row_range(row_ptr + t * (vocab + 1) + id, pool, k0, k1);
  const scalar_t* yr = y + m * hidden;
  scalar_t* outr = out + m * hidden;
  for (int64_t j = threadIdx.x % kWarp; j < hidden; j += kWarp) {
    if (k0 == k1) {
      outr[j] = yr[j];
      continue;
    }
    acc sum = static_cast<acc>(yr[j]);
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t c = col[k];
      CUDA_KERNEL_ASSERT(c >= 0 && c < hidden && "pets: an embedding_delta column is outside [0, H)");
      if (c == j) sum += static_cast<acc>(val[k]);
    }
    outr[j] = static_cast<scalar_t>(sum);
  }
}

}  // namespace

at::Tensor sparse_delta(const at::Tensor& y, const at::Tensor& x, const at::Tensor& task_ids,
                        const at::Tensor& row_ptr, const at::Tensor& col, const at::Tensor& val) {
  check_sparse_delta_inputs(y, x, task_ids, row_ptr, col, val);
  const c10::cuda::OptionalCUDAGuard guard(y.device());
  const at::Tensor y3 = as_rows(y).contiguous(), x3 = as_rows(x).contiguous();
  const at::Tensor ids = task_ids.contiguous();
  const at::Tensor rp = row_ptr.contiguous(), cols = col.contiguous(), vals = val.contiguous();
  at::Tensor out = at::empty(y.sizes(), y.options());
  if (out.numel() == 0) return out;
  const int64_t tokens = y3.size(1), in_features = x3.size(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "pets::sparse_delta", [&] {
    constexpr int kTile = tile_tokens<scalar_t>();
    const dim3 grid(static_cast<unsigned>(y3.size(0)), static_cast<unsigned>(ceil_div(tokens, kTile)));
    TORCH_CHECK(grid.y <= 65535, "pets::sparse_delta: ", tokens, " tokens per row is more than the kernel's ",
                65535 * kTile);
    const size_t shared = static_cast<size_t>(in_features) * kTileBytes;
    allow_shared_memory("pets::sparse_delta", sparse_delta_kernel<scalar_t>, shared, "x's in_features");
    sparse_delta_kernel<scalar_t><<<grid, kThreads, shared, stream()>>>(
        y3.const_data_ptr<scalar_t>(), x3.const_data_ptr<scalar_t>(), ids.const_data_ptr<int64_t>(),
        rp.const_data_ptr<int64_t>(), cols.const_data_ptr<int64_t>(), vals.const_data_ptr<scalar_t>(), rp.size(0),
        cols.size(0), out.mutable_data_ptr<scalar_t>(), tokens, in_features, y3.size(2));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor embedding_delta(const at::Tensor& y, const at::Tensor& ids, const at::Tensor& task_ids,
                           const at::Tensor& row_ptr, const at::Tensor& col, const at::Tensor& val) {
  const int64_t vocab = check_embedding_delta_inputs(y, ids, task_ids, row_ptr, col, val);
  const c10::cuda::OptionalCUDAGuard guard(y.device());
  const at::Tensor y3 = as_rows(y).contiguous();
  const at::Tensor idc = ids.contiguous(), tids = task_ids.contiguous();
  const at::Tensor rp = row_ptr.contiguous(), cols = col.contiguous(), vals = val.contiguous();
  at::Tensor out = at::empty(y.sizes(), y.options());
  if (out.numel() == 0) return out;
  const int64_t rows = y3.size(0) * y3.size(1);
  const int64_t warps = kThreads / kWarp;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "pets::embedding_delta", [&] {
    embedding_delta_kernel<scalar_t><<<static_cast<unsigned>(ceil_div(rows, warps)), kThreads, 0, stream()>>>(
        y3.const_data_ptr<scalar_t>(), idc.const_data_ptr<int64_t>(), tids.const_data_ptr<int64_t>(),
        rp.const_data_ptr<int64_t>(), cols.const_data_ptr<int64_t>(), vals.const_data_ptr<scalar_t>(), rp.size(0),
        cols.size(0), out.mutable_data_ptr<scalar_t>(), rows, y3.size(1), vocab, y3.size(2));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace pets::cuda
