// Per-row table terms applied to every token of a batch row (row/row.h): bias_delta (y + bias[t]), scale (IA3,
// y * (1 + delta[t])), gelu_delta (gelu(y + bias[t]) * (1 + scale[t]): a BERT FFN's activation with the terms around
// it) and row_delta ((y + bias[t]) * (1 + scale[t]) + residual: a linear site's terms and the sublayer's residual
// add), one pass over the activation each, all by one kernel family. The activation and which operands a launch
// has are template arguments, so bias_delta and scale run single-term kernels (a kernel with runtime-optional
// tables measured 10.3 us against their 5.2 at bert-base sizes on the H200). A block takes kTokens tokens of one
// row (one slot); each element is computed in the accumulation type and rounded once.
#include <algorithm>
#include <limits>
#include <type_traits>

#include "../bias/bias.h"
#include "../common/task_groups.h"
#include "../gelu/gelu.h"
#include "../row/row.h"
#include "../scale/scale.h"
#include "common.cuh"
#include "gelu.cuh"
#include "ops.h"
#include "rowwise.h"

namespace pets::cuda {
namespace {

constexpr int kTokens = 16;  // tokens of one batch row per block
constexpr int kThreads = 256;
constexpr int kInFlight = 4;  // vectors of y a thread of the vector kernel loads before it stores any

enum class Act { kIdentity, kGelu, kGeluTanh };

// The operands of a launch besides y: tables [T, F] and a residual of y's shape, nullptr where absent. `slots` is
// the smallest T of the tables given.
template <typename scalar_t>
struct RowTables {
  const scalar_t* bias;
  const scalar_t* scale;
  const scalar_t* residual;
  int64_t slots;
};

// act(y + b) * (1 + s) + r, each term only where given: without a bias a -0.0 stays -0.0, and y * (1 + 0) is y
// exactly, so rows of slots without a scale are unchanged bit for bit (and with a residual are aten.add's y + r).
template <typename scalar_t, Act act, bool has_bias, bool has_scale, bool has_residual, typename acc>
__device__ __forceinline__ acc row_term(acc y, acc b, acc s, acc r) {
  acc z = has_bias ? y + b : y;
  if constexpr (act == Act::kGelu) z = gelu_erf_for<scalar_t>(z);
  if constexpr (act == Act::kGeluTanh) z = gelu_tanh(z);
  if constexpr (has_scale) z = z * (acc(1) + s);
  if constexpr (has_residual) z = z + r;
  return z;
}

// Any feature count and alignment: threads across features, each reads its table values once for the block's
// tokens.
template <typename scalar_t, Act act, bool has_bias, bool has_scale, bool has_residual>
__global__ void __launch_bounds__(kThreads)
    row_terms_kernel(const scalar_t* __restrict__ y, const int64_t* __restrict__ task_ids, RowTables<scalar_t> tables,
                     scalar_t* __restrict__ out, int64_t tokens, int64_t features) {
  using acc = acc_t<scalar_t>;
  const int64_t row = blockIdx.x;
  const int64_t tok0 = static_cast<int64_t>(blockIdx.y) * kTokens;
  const int64_t count = min64(kTokens, tokens - tok0);
  const int64_t t = slot_of(task_ids, row, tables.slots);
  const int64_t m0 = row * tokens + tok0;
  for (int64_t f = threadIdx.x; f < features; f += kThreads) {
    const acc b = has_bias && t >= 0 ? static_cast<acc>(tables.bias[t * features + f]) : acc(0);
    const acc s = has_scale && t >= 0 ? static_cast<acc>(tables.scale[t * features + f]) : acc(0);
    for (int64_t tm = 0; tm < count; ++tm) {
      const int64_t i = (m0 + tm) * features + f;
      const acc r = has_residual ? static_cast<acc>(tables.residual[i]) : acc(0);
      out[i] = static_cast<scalar_t>(
          row_term<scalar_t, act, has_bias, has_scale, has_residual>(static_cast<acc>(y[i]), b, s, r));
    }
  }
}

// 16-byte vectors (when every operand is vectorizable). A block's tokens are `total` consecutive vectors of y, out
// and the residual; thread i takes vectors i, i + kThreads, ..., so every thread has the same number within one
// whatever the features (threads over feature vectors alone left 160 of 256 idle at 768 fp16 features, and half
// of them with twice the work of the others at 3072). A vector's table vectors (feature vector p % nvec, the same
// for the block's tokens) are read per vector, from L1.
template <typename scalar_t, Act act, bool has_bias, bool has_scale, bool has_residual>
__global__ void __launch_bounds__(kThreads)
    row_terms_vec_kernel(const scalar_t* __restrict__ y, const int64_t* __restrict__ task_ids,
                         RowTables<scalar_t> tables, scalar_t* __restrict__ out, int64_t tokens, int64_t features) {
  using acc = acc_t<scalar_t>;
  using V = Vec<scalar_t>;
  constexpr int kV = kVecBytes / sizeof(scalar_t);
  const int64_t row = blockIdx.x;
  const int64_t tok0 = static_cast<int64_t>(blockIdx.y) * kTokens;
  const int64_t t = slot_of(task_ids, row, tables.slots);
  if (t < 0) return;
  const int64_t nvec = features / kV;
  const int64_t first = (row * tokens + tok0) * nvec;
  const int64_t total = min64(kTokens, tokens - tok0) * nvec;
  const V* yv = reinterpret_cast<const V*>(y) + first;
  const V* rv = has_residual ? reinterpret_cast<const V*>(tables.residual) + first : nullptr;
  V* ov = reinterpret_cast<V*>(out) + first;
  const V* bv = has_bias ? reinterpret_cast<const V*>(tables.bias + t * features) : nullptr;
  const V* sv = has_scale ? reinterpret_cast<const V*>(tables.scale + t * features) : nullptr;
  // The feature vector of the thread's next vector, stepped by kThreads vectors without a division each time.
  int64_t f = threadIdx.x % nvec;
  const int64_t step = kThreads % nvec;
  for (int64_t p0 = threadIdx.x; p0 < total; p0 += kInFlight * kThreads) {
    // The loads from y and the residual of kInFlight vectors first; the table vectors (L1 hits) as each is computed.
    V yk[kInFlight], rk[kInFlight];
    int64_t fk[kInFlight];
#pragma unroll
    for (int k = 0; k < kInFlight; ++k) {
      const int64_t p = p0 + k * kThreads;
      if (p < total) {
        yk[k] = yv[p];
        if constexpr (has_residual) rk[k] = rv[p];
      }
      fk[k] = f;
      f += step;
      if (f >= nvec) f -= nvec;
    }
#pragma unroll
    for (int k = 0; k < kInFlight; ++k) {
      const int64_t p = p0 + k * kThreads;
      if (p >= total) break;
      const V bk = has_bias ? bv[fk[k]] : V{};
      const V sk = has_scale ? sv[fk[k]] : V{};
      V o;
#pragma unroll
      for (int e = 0; e < kV; ++e) {
        const acc b = has_bias ? static_cast<acc>(bk.v[e]) : acc(0);
        const acc s = has_scale ? static_cast<acc>(sk.v[e]) : acc(0);
        const acc r = has_residual ? static_cast<acc>(rk[k].v[e]) : acc(0);
        o.v[e] = static_cast<scalar_t>(
            row_term<scalar_t, act, has_bias, has_scale, has_residual>(static_cast<acc>(yk[k].v[e]), b, s, r));
      }
      ov[p] = o;
    }
  }
}

// The same with each thread on one feature vector (threads = lanes x nvec, at most kMaxFixedThreads): its table
// vectors are read and converted once, and 1 + s added once, for all the tokens it takes (tokens lane, lane + lanes,
// ... of the block's), kInFlight loads of y ahead. The vector kernel reads and converts them per vector; gelu_delta,
// whose time goes to instructions (erf) more than to bytes, ran 42.7 us there against aten.gelu's 36.4 at bert-base
// sizes on the H200. The same operations on each element as the vector kernel: bitwise its outputs. At most 384
// threads (80 registers, no spills: 2 blocks an SM); wider rows take the vector kernel.
constexpr int kMaxFixedThreads = 384;

inline int fixed_lanes(int64_t nvec) { return static_cast<int>(std::max<int64_t>(1, kThreads / nvec)); }

template <typename scalar_t, Act act, bool has_bias, bool has_scale, bool has_residual>
__global__ void __launch_bounds__(kMaxFixedThreads, 2)
    row_terms_fixed_kernel(const scalar_t* __restrict__ y, const int64_t* __restrict__ task_ids,
                           RowTables<scalar_t> tables, scalar_t* __restrict__ out, int64_t tokens, int64_t features) {
  using acc = acc_t<scalar_t>;
  using V = Vec<scalar_t>;
  constexpr int kV = kVecBytes / sizeof(scalar_t);
  const int64_t row = blockIdx.x;
  const int64_t tok0 = static_cast<int64_t>(blockIdx.y) * kTokens;
  const int64_t t = slot_of(task_ids, row, tables.slots);
  if (t < 0) return;
  const int64_t nvec = features / kV;
  const int64_t f = threadIdx.x % nvec, lane = threadIdx.x / nvec, lanes = blockDim.x / nvec;
  const int64_t count = min64(kTokens, tokens - tok0);
  acc b[kV], s1[kV];
  if constexpr (has_bias) {
    const V bk = reinterpret_cast<const V*>(tables.bias + t * features)[f];
#pragma unroll
    for (int e = 0; e < kV; ++e) b[e] = static_cast<acc>(bk.v[e]);
  }
  if constexpr (has_scale) {
    const V sk = reinterpret_cast<const V*>(tables.scale + t * features)[f];
#pragma unroll
    for (int e = 0; e < kV; ++e) s1[e] = acc(1) + static_cast<acc>(sk.v[e]);
  }
  const int64_t first = (row * tokens + tok0) * nvec + f;
  const V* yv = reinterpret_cast<const V*>(y) + first;
  const V* rv = has_residual ? reinterpret_cast<const V*>(tables.residual) + first : nullptr;
  V* ov = reinterpret_cast<V*>(out) + first;
  for (int64_t tm0 = lane; tm0 < count; tm0 += kInFlight * lanes) {
    V yk[kInFlight], rk[kInFlight];
#pragma unroll
    for (int k = 0; k < kInFlight; ++k) {
      const int64_t tm = tm0 + k * lanes;
      if (tm < count) {
        yk[k] = yv[tm * nvec];
        if constexpr (has_residual) rk[k] = rv[tm * nvec];
      }
    }
#pragma unroll
    for (int k = 0; k < kInFlight; ++k) {
      const int64_t tm = tm0 + k * lanes;
      if (tm >= count) break;
      V o;
#pragma unroll
      for (int e = 0; e < kV; ++e) {
        acc z = static_cast<acc>(yk[k].v[e]);
        if constexpr (has_bias) z = z + b[e];
        if constexpr (act == Act::kGelu) z = gelu_erf_for<scalar_t>(z);
        if constexpr (act == Act::kGeluTanh) z = gelu_tanh(z);
        if constexpr (has_scale) z = z * s1[e];
        if constexpr (has_residual) z = z + static_cast<acc>(rk[k].v[e]);
        o.v[e] = static_cast<scalar_t>(z);
      }
      ov[tm * nvec] = o;
    }
  }
}

// Inputs already checked by the caller, whose name is `op`; at least one of bias and scale is given, a residual
// only with the identity.
template <Act act>
at::Tensor launch(const char* op, const at::Tensor& y, const at::Tensor& task_ids,
                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                  const std::optional<at::Tensor>& residual) {
  TORCH_INTERNAL_ASSERT(bias.has_value() || scale.has_value());
  TORCH_INTERNAL_ASSERT(act == Act::kIdentity || !residual.has_value());
  const c10::cuda::OptionalCUDAGuard guard(y.device());
  const at::Tensor y3 = as_rows(y).contiguous();
  const at::Tensor ids = task_ids.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor s = scale.has_value() ? scale->contiguous() : at::Tensor();
  const at::Tensor r = residual.has_value() ? as_rows(*residual).contiguous() : at::Tensor();
  int64_t slots = std::numeric_limits<int64_t>::max();
  for (const at::Tensor& table : {b, s}) {
    if (table.defined()) slots = std::min(slots, table.size(0));
  }
  at::Tensor out = at::empty(y.sizes(), y.options());
  if (out.numel() == 0) return out;
  const int64_t tokens = y3.size(1), features = y3.size(2);
  const dim3 grid(static_cast<unsigned>(y3.size(0)), static_cast<unsigned>(ceil_div(tokens, kTokens)));
  TORCH_CHECK(grid.y <= 65535, op, ": ", tokens, " tokens per row is more than the kernel's ", 65535 * kTokens);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "pets::row_terms", [&] {
    bool vec = vectorizable(y3, features) && vectorizable(out, features);
    for (const at::Tensor& operand : {b, s, r}) vec = vec && (!operand.defined() || vectorizable(operand, features));
    const auto data = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr; };
    const RowTables<scalar_t> tables{data(b), data(s), data(r), slots};
    const auto run = [&](auto bias_given, auto scale_given, auto residual_given) {
      constexpr bool kB = decltype(bias_given)::value, kS = decltype(scale_given)::value;
      constexpr bool kR = decltype(residual_given)::value;
      const int64_t nvec = features / static_cast<int64_t>(kVecBytes / sizeof(scalar_t));
      const bool fixed = vec && nvec <= kMaxFixedThreads;
      const auto kernel = fixed ? row_terms_fixed_kernel<scalar_t, act, kB, kS, kR>
                          : vec ? row_terms_vec_kernel<scalar_t, act, kB, kS, kR>
                                : row_terms_kernel<scalar_t, act, kB, kS, kR>;
      const int threads = fixed ? static_cast<int>(nvec) * fixed_lanes(nvec) : kThreads;
      kernel<<<grid, threads, 0, stream()>>>(y3.const_data_ptr<scalar_t>(), ids.const_data_ptr<int64_t>(), tables,
                                             out.mutable_data_ptr<scalar_t>(), tokens, features);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    const auto with_tables = [&](auto residual_given) {
      if (b.defined() && s.defined()) {
        run(std::true_type{}, std::true_type{}, residual_given);
      } else if (b.defined()) {
        run(std::true_type{}, std::false_type{}, residual_given);
      } else {
        run(std::false_type{}, std::true_type{}, residual_given);
      }
    };
    if constexpr (act == Act::kIdentity) {  // only the identity's kernels are built with a residual
      if (r.defined()) return with_tables(std::true_type{});
    }
    with_tables(std::false_type{});
  });
  return out;
}

}  // namespace

at::Tensor add_row_bias(const char* op, const at::Tensor& y, const at::Tensor& task_ids, const at::Tensor& bias) {
  return launch<Act::kIdentity>(op, y, task_ids, bias, std::nullopt, std::nullopt);
}

at::Tensor add_row_terms(const char* op, const at::Tensor& y, const at::Tensor& task_ids,
                         const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale) {
  return launch<Act::kIdentity>(op, y, task_ids, bias, scale, std::nullopt);
}

at::Tensor bias_delta(const at::Tensor& y, const at::Tensor& task_ids, const at::Tensor& bias) {
  check_bias_delta_inputs(y, task_ids, bias);
  return add_row_bias("pets::bias_delta", y, task_ids, bias);
}

at::Tensor scale(const at::Tensor& y, const at::Tensor& task_ids, const at::Tensor& delta) {
  check_scale_inputs(y, task_ids, delta);
  return launch<Act::kIdentity>("pets::scale", y, task_ids, std::nullopt, delta, std::nullopt);
}

at::Tensor gelu_delta(const at::Tensor& y, const at::Tensor& task_ids, const std::optional<at::Tensor>& bias,
                      const std::optional<at::Tensor>& scale, c10::string_view approximate) {
  constexpr const char* op = "pets::gelu_delta";
  check_gelu_delta_inputs(y, task_ids, bias, scale, approximate);
  if (!bias.has_value() && !scale.has_value()) {
    const c10::cuda::OptionalCUDAGuard guard(y.device());
    return at::gelu(y.contiguous(), approximate);  // no table, no slot: aten's own kernel
  }
  return gelu_is_tanh(op, approximate) ? launch<Act::kGeluTanh>(op, y, task_ids, bias, scale, std::nullopt)
                                       : launch<Act::kGelu>(op, y, task_ids, bias, scale, std::nullopt);
}

at::Tensor row_delta(const at::Tensor& y, const at::Tensor& task_ids, const std::optional<at::Tensor>& bias,
                     const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& residual) {
  check_row_delta_inputs(y, task_ids, bias, scale, residual);
  return launch<Act::kIdentity>("pets::row_delta", y, task_ids, bias, scale, residual);
}

}  // namespace pets::cuda
