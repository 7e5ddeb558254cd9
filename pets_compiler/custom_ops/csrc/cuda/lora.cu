// Segmented LoRA (SGMV style) and the fused linear_delta: one launch per kernel serves every task of a batch, whatever
// the mix. Tables of padded rank up to 16 with 16-byte-aligned rows (fp16, bf16, fp32) take the shrink
// (lora_shrink.cuh; cuBLAS for fp32) + expand kernels of lora_split.cuh; other fp16 and bf16 tables with ranks up to
// 128 the tensor-core kernel of lora_mma.cuh. Otherwise (fp64, larger ranks, unaligned rows) linear_delta_kernel below:
// a block takes kTokens tokens of one batch row, so one slot; phase 1 computes h = x @ A[t, :r].T for them into shared
// memory (fp32, one warp per token pair and rank chunk, lanes across in_features), phase 2 writes out = y + scale[t] *
// h @ B[t, :, :r].T (+ bias[t]) with threads across out_features (coalesced y and out). A slot's own rank r bounds both
// phases, so padding of the tables beyond r is never read. Every kernel applies IA3's output scale (1 + out_scale[t])
// to its rounded result, as pets::scale after it would. A site with row terms and no LoRA goes to the row-term kernel
// (rowwise.cu).
#include "../common/task_groups.h"
#include "../lora/lora.h"
#include "common.cuh"
#include "lora_mma.cuh"
#include "lora_shrink.cuh"
#include "lora_split.cuh"
#include "slot_gemm.h"
#include "ops.h"
#include "rowwise.h"

namespace pets::cuda {
namespace {

constexpr int kTokens = 16;     // tokens per block
constexpr int kRankChunk = 16;  // rank components one warp accumulates at once
constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    linear_delta_kernel(const scalar_t* __restrict__ y, const scalar_t* __restrict__ x,
                        const int64_t* __restrict__ task_ids, const scalar_t* __restrict__ lora_a,
                        const scalar_t* __restrict__ lora_b, const scalar_t* __restrict__ lora_scale,
                        const int64_t* __restrict__ lora_rank, int64_t lora_slots, int64_t table_rank,
                        SiteTerms<scalar_t> terms, scalar_t* __restrict__ out, int64_t tokens,
                        int64_t in_features, int64_t out_features, bool vectorized) {
  using acc = acc_t<scalar_t>;
  extern __shared__ unsigned char shared_raw[];
  acc* h = reinterpret_cast<acc*>(shared_raw);  // [kTokens, table_rank]

  const int64_t row = blockIdx.x;
  const int64_t tok0 = static_cast<int64_t>(blockIdx.y) * kTokens;
  const int count = static_cast<int>(min64(kTokens, tokens - tok0));
  const int64_t m0 = row * tokens + tok0;  // the block's first token in the flattened [B * N] rows

  int r = 0;
  acc s = 0;
  const int64_t t_lora = slot_of(task_ids, row, lora_slots);
  if (t_lora >= 0) {
    const int64_t rk = lora_rank[t_lora];
    CUDA_KERNEL_ASSERT(rk >= 0 && rk <= table_rank && "pets: a LoRA rank is outside [0, R]");
    r = static_cast<int>(max64(0, min64(rk, table_rank)));
    s = static_cast<acc>(lora_scale[t_lora]);
    if (s == acc(0)) r = 0;  // a slot without LoRA here: its rows are y (+ bias) exactly
  }
  const int64_t t_bias = terms.bias != nullptr ? slot_of(task_ids, row, terms.bias_slots) : -1;
  const int64_t t_scale = terms.scale != nullptr ? slot_of(task_ids, row, terms.scale_slots) : -1;

  if (r > 0) {
    const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, warps = blockDim.x / kWarp;
    const scalar_t* a = lora_a + t_lora * table_rank * in_features;
    const int chunks = (r + kRankChunk - 1) / kRankChunk;
    const int pairs = (count + 1) / 2;
    // A job: two tokens and one chunk of rank components, so each A element loaded serves two tokens.
    for (int job = warp; job < pairs * chunks; job += warps) {
      const int tm = (job / chunks) * 2, c0 = (job % chunks) * kRankChunk;
      const int rc = min(kRankChunk, r - c0);
      const bool two = tm + 1 < count;
      const scalar_t* x0 = x + (m0 + tm) * in_features;
      const scalar_t* x1 = two ? x0 + in_features : x0;
      acc p0[kRankChunk], p1[kRankChunk];
#pragma unroll
      for (int j = 0; j < kRankChunk; ++j) p0[j] = p1[j] = 0;
      if (vectorized) {
        constexpr int V = kVecBytes / sizeof(scalar_t);
        for (int64_t v = lane; v < in_features / V; v += kWarp) {
          const Vec<scalar_t> xa = load_vec<scalar_t>(x0, v), xb = load_vec<scalar_t>(x1, v);
#pragma unroll
          for (int j = 0; j < kRankChunk; ++j) {
            if (j < rc) {
              const Vec<scalar_t> av = load_vec<scalar_t>(a + (c0 + j) * in_features, v);
#pragma unroll
              for (int e = 0; e < V; ++e) {
                const acc w = static_cast<acc>(av.v[e]);
                p0[j] += static_cast<acc>(xa.v[e]) * w;
                p1[j] += static_cast<acc>(xb.v[e]) * w;
              }
            }
          }
        }
      } else {
        for (int64_t k = lane; k < in_features; k += kWarp) {
          const acc xa = static_cast<acc>(x0[k]), xb = static_cast<acc>(x1[k]);
#pragma unroll
          for (int j = 0; j < kRankChunk; ++j) {
            if (j < rc) {
              const acc w = static_cast<acc>(a[(c0 + j) * in_features + k]);
              p0[j] += xa * w;
              p1[j] += xb * w;
            }
          }
        }
      }
#pragma unroll
      for (int j = 0; j < kRankChunk; ++j) {
        if (j < rc) {
          const acc v0 = warp_sum(p0[j]), v1 = warp_sum(p1[j]);
          if (lane == 0) {
            h[tm * table_rank + c0 + j] = v0;
            if (two) h[(tm + 1) * table_rank + c0 + j] = v1;
          }
        }
      }
    }
  }
  __syncthreads();

  const scalar_t* b = r > 0 ? lora_b + t_lora * out_features * table_rank : nullptr;
  const scalar_t* bt = t_bias >= 0 ? terms.bias + t_bias * out_features : nullptr;
  const scalar_t* st = t_scale >= 0 ? terms.scale + t_scale * out_features : nullptr;
  for (int64_t o = threadIdx.x; o < out_features; o += blockDim.x) {
    acc sum[kTokens];
#pragma unroll
    for (int tm = 0; tm < kTokens; ++tm) sum[tm] = 0;
    for (int c0 = 0; c0 < r; c0 += kRankChunk) {
      // The chunk's B row entries first (independent loads in flight together), then the products.
      const int rc = min(kRankChunk, r - c0);
      acc bv[kRankChunk];
#pragma unroll
      for (int j = 0; j < kRankChunk; ++j) bv[j] = j < rc ? static_cast<acc>(b[o * table_rank + c0 + j]) : acc(0);
#pragma unroll
      for (int tm = 0; tm < kTokens; ++tm) {
        if (tm < count) {
          const acc* hr = h + tm * table_rank + c0;
#pragma unroll
          for (int j = 0; j < kRankChunk; ++j) {
            if (j < rc) sum[tm] += hr[j] * bv[j];
          }
        }
      }
    }
    const acc bias_o = bt != nullptr ? static_cast<acc>(bt[o]) : acc(0);
    const acc scale_o = st != nullptr ? static_cast<acc>(st[o]) : acc(0);
#pragma unroll
    for (int tm = 0; tm < kTokens; ++tm) {
      if (tm < count) {
        const int64_t i = (m0 + tm) * out_features + o;
        scalar_t v = y[i];  // bitwise y when there is no term
        if (r > 0 || bt != nullptr) {
          acc z = static_cast<acc>(v);
          if (r > 0) z += s * sum[tm];
          if (bt != nullptr) z += bias_o;
          v = static_cast<scalar_t>(z);
        }
        out[i] = st != nullptr ? scale_out(v, scale_o) : v;
      }
    }
  }
}

// The bias and output scale tables of a launch (undefined where absent) for its kernels.
template <typename scalar_t>
SiteTerms<scalar_t> site_terms(const at::Tensor& bias, const at::Tensor& out_scale) {
  return {bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr, bias.defined() ? bias.size(0) : 0,
          out_scale.defined() ? out_scale.const_data_ptr<scalar_t>() : nullptr,
          out_scale.defined() ? out_scale.size(0) : 0};
}

// (y + the LoRA term (tables with padded rank R > 0) + the bias term if `bias` is given) * (1 + out_scale[t]) if
// `out_scale` is given.
at::Tensor launch(const at::Tensor& y, const at::Tensor& x, const at::Tensor& task_ids, const at::Tensor& lora_a,
                  const at::Tensor& lora_b, const at::Tensor& lora_scale, const at::Tensor& lora_rank,
                  const at::Tensor* bias, const at::Tensor* out_scale) {
  const c10::cuda::OptionalCUDAGuard guard(y.device());
  const at::Tensor y3 = as_rows(y).contiguous();
  const at::Tensor x3 = as_rows(x).contiguous();
  const at::Tensor ids = task_ids.contiguous();
  at::Tensor out = at::empty(y.sizes(), y.options());
  const int64_t batch = y3.size(0), tokens = y3.size(1);
  if (out.numel() == 0) return out;
  const at::Tensor a = lora_a.contiguous(), b = lora_b.contiguous();
  const at::Tensor sc = lora_scale.contiguous(), rk = lora_rank.contiguous();
  const at::Tensor bs = bias != nullptr ? bias->contiguous() : at::Tensor();
  const at::Tensor os = out_scale != nullptr ? out_scale->contiguous() : at::Tensor();
  const int64_t table_rank = a.size(1);
  const dim3 grid(static_cast<unsigned>(batch), static_cast<unsigned>(ceil_div(tokens, kTokens)));
  TORCH_CHECK(grid.y <= 65535, "pets::linear_delta: ", tokens, " tokens per row is more than the kernel's ",
              65535 * kTokens);
  const at::ScalarType dtype = y.scalar_type();
  const int64_t in_features = x3.size(2), out_features = y3.size(2);
  if (table_rank <= split_lora::kMaxRank && dtype != at::kDouble && vectorizable(x3, in_features) &&
      vectorizable(y3, out_features) && vectorizable(out, out_features) && vectorizable(a, in_features) &&
      vectorizable(b, out_features * table_rank) && (bias == nullptr || vectorizable(bs, out_features)) &&
      (out_scale == nullptr || vectorizable(os, out_features))) {
    // Shrink on tensor cores: h [B, N, R] = each row's x @ its slot's A.T (tables read in place). fp16 and bf16: the
    // shrink kernel (rows of slots without LoRA here skipped); float: cuBLAS over per-row pointers, every row.
    at::Tensor h = at::empty({batch, tokens, table_rank}, y.options());
    if (dtype == at::kHalf || dtype == at::kBFloat16) {
      const int64_t blocks = batch * ceil_div(tokens, split_lora::kShrinkTokens);
      TORCH_CHECK(blocks <= INT32_MAX, "pets::linear_delta: ", batch, " x ", tokens, " tokens are more than the ",
                  "shrink kernel's grid");
      AT_DISPATCH_REDUCED_FLOATING_TYPES(dtype, "pets::linear_delta", [&] {
        split_lora::shrink_mma_kernel<scalar_t>
            <<<static_cast<unsigned>(blocks), split_lora::kShrinkWarps * kWarp, 0, stream()>>>(
                x3.const_data_ptr<scalar_t>(), ids.const_data_ptr<int64_t>(), a.const_data_ptr<scalar_t>(),
                sc.const_data_ptr<scalar_t>(), rk.const_data_ptr<int64_t>(), a.size(0), table_rank,
                h.mutable_data_ptr<scalar_t>(), tokens, in_features);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    } else {
      slot_gemm(x3, a, ids, h);
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "pets::linear_delta", [&] {
      constexpr bool mma = split_lora::kExpandMma<scalar_t>;
      const int64_t tiles = batch * ceil_div(tokens, split_lora::expand_tile_tokens<scalar_t>(tokens));
      const int64_t col_tiles = ceil_div(out_features, mma ? split_lora::kMmaCols : split_lora::kTileCols);
      TORCH_CHECK(tiles <= INT32_MAX && col_tiles <= 65535, "pets::linear_delta: ", batch, " x ", tokens,
                  " tokens and ", out_features, " out_features are more than the kernel's grid");
      const dim3 expand_grid(static_cast<unsigned>(tiles), static_cast<unsigned>(col_tiles));
      const int threads = mma ? split_lora::kMmaThreads : split_lora::kThreads;
      split_lora::expand<scalar_t>(out_scale != nullptr, tokens)<<<expand_grid, threads, 0, stream()>>>(
          y3.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(), ids.const_data_ptr<int64_t>(),
          b.const_data_ptr<scalar_t>(), sc.const_data_ptr<scalar_t>(), rk.const_data_ptr<int64_t>(), a.size(0),
          table_rank, site_terms<scalar_t>(bs, os), out.mutable_data_ptr<scalar_t>(), tokens, out_features);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return out;
  }
  if (table_rank <= mma_lora::kMaxRank && (dtype == at::kHalf || dtype == at::kBFloat16)) {
    AT_DISPATCH_REDUCED_FLOATING_TYPES(dtype, "pets::linear_delta", [&] {
      mma_lora::kernel<scalar_t><<<grid, mma_lora::kThreads, 0, stream()>>>(
          y3.const_data_ptr<scalar_t>(), x3.const_data_ptr<scalar_t>(), ids.const_data_ptr<int64_t>(),
          a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), sc.const_data_ptr<scalar_t>(),
          rk.const_data_ptr<int64_t>(), a.size(0), table_rank,
          site_terms<scalar_t>(bs, os), out.mutable_data_ptr<scalar_t>(), tokens, x3.size(2), y3.size(2),
          vectorizable(x3, x3.size(2)) && vectorizable(y3, y3.size(2)) &&
              vectorizable(out, y3.size(2)) && vectorizable(a, a.size(2)) &&
              vectorizable(b, table_rank) && (bias == nullptr || vectorizable(bs, bs.size(1))) &&
              (out_scale == nullptr || vectorizable(os, os.size(1))));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "pets::linear_delta", [&] {
    const size_t shared = static_cast<size_t>(kTokens) * table_rank * sizeof(acc_t<scalar_t>);
    allow_shared_memory("pets::linear_delta", linear_delta_kernel<scalar_t>, shared, "the LoRA rank");
    linear_delta_kernel<scalar_t><<<grid, kThreads, shared, stream()>>>(
        y3.const_data_ptr<scalar_t>(), x3.const_data_ptr<scalar_t>(), ids.const_data_ptr<int64_t>(),
        a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), sc.const_data_ptr<scalar_t>(),
        rk.const_data_ptr<int64_t>(), a.size(0), table_rank, site_terms<scalar_t>(bs, os),
        out.mutable_data_ptr<scalar_t>(), tokens, x3.size(2), y3.size(2),
        vectorizable(x3, x3.size(2)) && vectorizable(a, a.size(2)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

at::Tensor lora_delta(const at::Tensor& y, const at::Tensor& x, const at::Tensor& task_ids, const at::Tensor& lora_a,
                      const at::Tensor& lora_b, const at::Tensor& scale, const at::Tensor& rank) {
  constexpr const char* op = "pets::lora_delta";
  check_site_inputs(op, y, x, task_ids);
  check_lora_tables(op, y, x, lora_a, lora_b, scale, rank);
  if (lora_a.size(1) == 0) return y.clone(at::MemoryFormat::Contiguous);  // rank 0: no term at all
  return launch(y, x, task_ids, lora_a, lora_b, scale, rank, nullptr, nullptr);
}

at::Tensor linear_delta(const at::Tensor& y, const at::Tensor& x, const at::Tensor& task_ids,
                        const std::optional<at::Tensor>& lora_a, const std::optional<at::Tensor>& lora_b,
                        const std::optional<at::Tensor>& lora_scale, const std::optional<at::Tensor>& lora_rank,
                        const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& out_scale) {
  check_linear_delta_inputs(y, x, task_ids, lora_a, lora_b, lora_scale, lora_rank, bias, out_scale);
  if (lora_a.has_value() && lora_a->size(1) > 0) {
    return launch(y, x, task_ids, *lora_a, *lora_b, *lora_scale, *lora_rank, bias.has_value() ? &*bias : nullptr,
                  out_scale.has_value() ? &*out_scale : nullptr);
  }
  // No LoRA term at this site: the row terms alone (rowwise.cu), or y itself.
  if (bias.has_value() || out_scale.has_value()) {
    return add_row_terms("pets::linear_delta", y, task_ids, bias, out_scale);
  }
  return y.clone(at::MemoryFormat::Contiguous);
}

}  // namespace pets::cuda
