// Per-row table terms applied to every token of a batch row: bias_delta (y + bias[t]), scale (IA3,
// y * (1 + delta[t])) and gelu_delta (gelu(y + bias[t]) * (1 + scale[t]): a BERT FFN's activation with the terms
// around it, in one pass over the activation). A block takes kTokens tokens of one row (one slot), threads across
// features; each element is computed in the accumulation type and rounded once. bias_delta and scale keep their
// single-term kernels (5.2 us at bert-base sizes on the H200; a shared kernel with optional tables measured 10.3).
#include <algorithm>
#include <limits>
#include <type_traits>

#include "../bias/bias.h"
#include "../common/task_groups.h"
#include "../gelu/gelu.h"
#include "../scale/scale.h"
#include "common.cuh"
#include "gelu.cuh"
#include "ops.h"
#include "rowwise.h"

namespace pets::cuda {
namespace {

constexpr int kTokens = 16;
constexpr int kThreads = 256;

enum class RowTerm { kAdd, kScale };

template <typename scalar_t, RowTerm term>
__global__ void __launch_bounds__(kThreads)
    row_term_kernel(const scalar_t* __restrict__ y, const int64_t* __restrict__ task_ids,
                    const scalar_t* __restrict__ table, int64_t slots, scalar_t* __restrict__ out, int64_t tokens,
                    int64_t features) {
  using acc = acc_t<scalar_t>;
  const int64_t row = blockIdx.x;
  const int64_t tok0 = static_cast<int64_t>(blockIdx.y) * kTokens;
  const int64_t count = min64(kTokens, tokens - tok0);
  const int64_t t = slot_of(task_ids, row, slots);
  const int64_t m0 = row * tokens + tok0;
  for (int64_t f = threadIdx.x; f < features; f += blockDim.x) {
    const acc v = t >= 0 ? static_cast<acc>(table[t * features + f]) : acc(0);
    for (int64_t tm = 0; tm < count; ++tm) {
      const int64_t i = (m0 + tm) * features + f;
      const acc yv = static_cast<acc>(y[i]);
      // y * (1 + 0) is y exactly, so rows of slots without a scale are unchanged bit for bit.
      out[i] = static_cast<scalar_t>(term == RowTerm::kAdd ? yv + v : yv * (acc(1) + v));
    }
  }
}

// The same with 16-byte vectors along the features (when vectorizable).
template <typename scalar_t, RowTerm term>
__global__ void __launch_bounds__(kThreads)
    row_term_vec_kernel(const scalar_t* __restrict__ y, const int64_t* __restrict__ task_ids,
                        const scalar_t* __restrict__ table, int64_t slots, scalar_t* __restrict__ out,
                        int64_t tokens, int64_t features) {
  using acc = acc_t<scalar_t>;
  constexpr int V = kVecBytes / sizeof(scalar_t);
  const int64_t row = blockIdx.x;
  const int64_t tok0 = static_cast<int64_t>(blockIdx.y) * kTokens;
  const int64_t count = min64(kTokens, tokens - tok0);
  const int64_t t = slot_of(task_ids, row, slots);
  if (t < 0) return;
  const int64_t m0 = row * tokens + tok0;
  for (int64_t f = threadIdx.x; f < features / V; f += blockDim.x) {
    const Vec<scalar_t> tv = load_vec<scalar_t>(table + t * features, f);
    for (int64_t tm = 0; tm < count; ++tm) {
      const Vec<scalar_t> yv = load_vec<scalar_t>(y + (m0 + tm) * features, f);
      Vec<scalar_t> ov;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const acc a = static_cast<acc>(yv.v[e]), b = static_cast<acc>(tv.v[e]);
        ov.v[e] = static_cast<scalar_t>(term == RowTerm::kAdd ? a + b : a * (acc(1) + b));
      }
      reinterpret_cast<Vec<scalar_t>*>(out + (m0 + tm) * features)[f] = ov;
    }
  }
}

template <RowTerm term>
at::Tensor launch_term(const char* op, const at::Tensor& y, const at::Tensor& task_ids, const at::Tensor& table) {
  const c10::cuda::OptionalCUDAGuard guard(y.device());
  const at::Tensor y3 = as_rows(y).contiguous();
  const at::Tensor ids = task_ids.contiguous();
  const at::Tensor tab = table.contiguous();
  at::Tensor out = at::empty(y.sizes(), y.options());
  if (out.numel() == 0) return out;
  const int64_t tokens = y3.size(1);
  const dim3 grid(static_cast<unsigned>(y3.size(0)), static_cast<unsigned>(ceil_div(tokens, kTokens)));
  TORCH_CHECK(grid.y <= 65535, op, ": ", tokens, " tokens per row is more than the kernel's ", 65535 * kTokens);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "pets::row_term", [&] {
    const bool vec = vectorizable(y3, y3.size(2)) && vectorizable(tab, tab.size(1)) &&
                     vectorizable(out, y3.size(2));
    const auto kernel = vec ? row_term_vec_kernel<scalar_t, term> : row_term_kernel<scalar_t, term>;
    kernel<<<grid, kThreads, 0, stream()>>>(
        y3.const_data_ptr<scalar_t>(), ids.const_data_ptr<int64_t>(), tab.const_data_ptr<scalar_t>(), tab.size(0),
        out.mutable_data_ptr<scalar_t>(), tokens, y3.size(2));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}


enum class Act { kGelu, kGeluTanh };

// The tables of one launch, [T, F] each; an absent one is nullptr. `slots` is the smallest T of those given.
template <typename scalar_t>
struct RowTables {
  const scalar_t* bias;
  const scalar_t* scale;
  int64_t slots;
};

// act(y + b) * (1 + s), each term only where its table is given: without a bias a -0.0 stays -0.0, and
// y * (1 + 0) is y exactly, so rows of slots without a scale are unchanged bit for bit.
template <Act act, typename acc>
__device__ __forceinline__ acc row_term(acc y, acc b, acc s, bool has_bias, bool has_scale) {
  acc z = has_bias ? y + b : y;
  if constexpr (act == Act::kGelu) z = gelu_erf(z);
  if constexpr (act == Act::kGeluTanh) z = gelu_tanh(z);
  return has_scale ? z * (acc(1) + s) : z;
}

template <typename scalar_t, Act act, bool has_bias, bool has_scale>
__global__ void __launch_bounds__(kThreads)
    gelu_term_kernel(const scalar_t* __restrict__ y, const int64_t* __restrict__ task_ids, RowTables<scalar_t> tables,
                    scalar_t* __restrict__ out, int64_t tokens, int64_t features) {
  using acc = acc_t<scalar_t>;
  const int64_t row = blockIdx.x;
  const int64_t tok0 = static_cast<int64_t>(blockIdx.y) * kTokens;
  const int64_t count = min64(kTokens, tokens - tok0);
  const int64_t t = slot_of(task_ids, row, tables.slots);
  const int64_t m0 = row * tokens + tok0;
  for (int64_t f = threadIdx.x; f < features; f += blockDim.x) {
    const acc b = has_bias && t >= 0 ? static_cast<acc>(tables.bias[t * features + f]) : acc(0);
    const acc s = has_scale && t >= 0 ? static_cast<acc>(tables.scale[t * features + f]) : acc(0);
    for (int64_t tm = 0; tm < count; ++tm) {
      const int64_t i = (m0 + tm) * features + f;
      out[i] = static_cast<scalar_t>(row_term<act>(static_cast<acc>(y[i]), b, s, has_bias, has_scale));
    }
  }
}

// The same with 16-byte vectors along the features (when vectorizable).
template <typename scalar_t, Act act, bool has_bias, bool has_scale>
__global__ void __launch_bounds__(kThreads)
    gelu_term_vec_kernel(const scalar_t* __restrict__ y, const int64_t* __restrict__ task_ids,
                        RowTables<scalar_t> tables, scalar_t* __restrict__ out, int64_t tokens, int64_t features) {
  using acc = acc_t<scalar_t>;
  constexpr int V = kVecBytes / sizeof(scalar_t);
  const int64_t row = blockIdx.x;
  const int64_t tok0 = static_cast<int64_t>(blockIdx.y) * kTokens;
  const int64_t count = min64(kTokens, tokens - tok0);
  const int64_t t = slot_of(task_ids, row, tables.slots);
  if (t < 0) return;
  const int64_t m0 = row * tokens + tok0;
  for (int64_t f = threadIdx.x; f < features / V; f += blockDim.x) {
    // The slot's table vectors, read once for the block's tokens.
    acc b[V], s[V];
    const Vec<scalar_t> bv = has_bias ? load_vec<scalar_t>(tables.bias + t * features, f) : Vec<scalar_t>{};
    const Vec<scalar_t> sv = has_scale ? load_vec<scalar_t>(tables.scale + t * features, f) : Vec<scalar_t>{};
#pragma unroll
    for (int e = 0; e < V; ++e) {
      b[e] = static_cast<acc>(bv.v[e]);
      s[e] = static_cast<acc>(sv.v[e]);
    }
    for (int64_t tm = 0; tm < count; ++tm) {
      const Vec<scalar_t> yv = load_vec<scalar_t>(y + (m0 + tm) * features, f);
      Vec<scalar_t> ov;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        ov.v[e] = static_cast<scalar_t>(row_term<act>(static_cast<acc>(yv.v[e]), b[e], s[e], has_bias, has_scale));
      }
      reinterpret_cast<Vec<scalar_t>*>(out + (m0 + tm) * features)[f] = ov;
    }
  }
}

// At least one of bias and scale is given; inputs already checked by the caller, whose name is `op`.
template <Act act>
at::Tensor launch_gelu(const char* op, const at::Tensor& y, const at::Tensor& task_ids,
                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale) {
  const c10::cuda::OptionalCUDAGuard guard(y.device());
  const at::Tensor y3 = as_rows(y).contiguous();
  const at::Tensor ids = task_ids.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor s = scale.has_value() ? scale->contiguous() : at::Tensor();
  int64_t slots = std::numeric_limits<int64_t>::max();
  for (const at::Tensor& table : {b, s}) {
    if (table.defined()) slots = std::min(slots, table.size(0));
  }
  at::Tensor out = at::empty(y.sizes(), y.options());
  if (out.numel() == 0) return out;
  const int64_t tokens = y3.size(1), features = y3.size(2);
  const dim3 grid(static_cast<unsigned>(y3.size(0)), static_cast<unsigned>(ceil_div(tokens, kTokens)));
  TORCH_CHECK(grid.y <= 65535, op, ": ", tokens, " tokens per row is more than the kernel's ", 65535 * kTokens);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "pets::gelu_delta", [&] {
    const bool vec = vectorizable(y3, features) && vectorizable(out, features) &&
                     (!b.defined() || vectorizable(b, features)) && (!s.defined() || vectorizable(s, features));
    const RowTables<scalar_t> tables{b.defined() ? b.const_data_ptr<scalar_t>() : nullptr,
                                     s.defined() ? s.const_data_ptr<scalar_t>() : nullptr, slots};
    // Which tables are given is a template argument: a bias or scale alone runs the single-term kernel.
    const auto run = [&](auto bias_given, auto scale_given) {
      constexpr bool kB = decltype(bias_given)::value, kS = decltype(scale_given)::value;
      const auto kernel = vec ? gelu_term_vec_kernel<scalar_t, act, kB, kS> : gelu_term_kernel<scalar_t, act, kB, kS>;
      kernel<<<grid, kThreads, 0, stream()>>>(y3.const_data_ptr<scalar_t>(), ids.const_data_ptr<int64_t>(), tables,
                                              out.mutable_data_ptr<scalar_t>(), tokens, features);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (b.defined() && s.defined()) {
      run(std::true_type{}, std::true_type{});
    } else if (b.defined()) {
      run(std::true_type{}, std::false_type{});
    } else {
      run(std::false_type{}, std::true_type{});
    }
  });
  return out;
}

}  // namespace

at::Tensor add_row_bias(const char* op, const at::Tensor& y, const at::Tensor& task_ids, const at::Tensor& bias) {
  return launch_term<RowTerm::kAdd>(op, y, task_ids, bias);
}

at::Tensor bias_delta(const at::Tensor& y, const at::Tensor& task_ids, const at::Tensor& bias) {
  check_bias_delta_inputs(y, task_ids, bias);
  return add_row_bias("pets::bias_delta", y, task_ids, bias);
}

at::Tensor scale(const at::Tensor& y, const at::Tensor& task_ids, const at::Tensor& delta) {
  check_scale_inputs(y, task_ids, delta);
  return launch_term<RowTerm::kScale>("pets::scale", y, task_ids, delta);
}

at::Tensor gelu_delta(const at::Tensor& y, const at::Tensor& task_ids, const std::optional<at::Tensor>& bias,
                      const std::optional<at::Tensor>& scale, c10::string_view approximate) {
  constexpr const char* op = "pets::gelu_delta";
  check_gelu_delta_inputs(y, task_ids, bias, scale, approximate);
  if (!bias.has_value() && !scale.has_value()) {
    const c10::cuda::OptionalCUDAGuard guard(y.device());
    return at::gelu(y.contiguous(), approximate);  // no table, no slot: aten's own kernel
  }
  return gelu_is_tanh(op, approximate) ? launch_gelu<Act::kGeluTanh>(op, y, task_ids, bias, scale)
                                       : launch_gelu<Act::kGelu>(op, y, task_ids, bias, scale);
}

}  // namespace pets::cuda
