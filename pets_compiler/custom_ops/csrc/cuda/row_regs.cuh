// A token's row held in a warp's registers, for the LayerNorm-bound kernels (pets::layer_norm, the adapter's ends):
// lane l holds the 16-byte vectors l, l + 32, ... of the row (at most kMaxVec of them), so the row is read from
// memory once and the mean, the variance and the output come from registers. Applies when rows_fit().
//
// The vectors are held as raw 32-bit words (uint4), converted to acc where they are used and back (rounded to
// scalar_t) where they are set: every value a RowRegs holds is one a scalar_t tensor could hold, so a set is the
// rounding point the `round` calls of the fp32 version were (the kernels set exactly where they rounded or stored).
// Half the registers of fp32 rows for fp16/bf16. The conversions are c10's own (static_cast to and from at::Half
// and at::BFloat16), so the results are bitwise those of the fp32 version. (That version's rows already loaded and
// stored as LDG.E.128 / STG.E.128 with nvcc 13, sm_90; so do these, and fp16 packs to F2FP.F16.F32.PACK_AB.)
#pragma once

#include "common.cuh"

namespace pets::cuda {

constexpr int kMaxVec = 4;  // vectors per lane: rows of up to 32 * 4 * 8 = 1024 half or 512 float features
constexpr int kRowVecs = kWarp * kMaxVec;  // vectors of the longest row

template <typename scalar_t>
constexpr int vec_elems() {
  return kVecBytes / static_cast<int>(sizeof(scalar_t));
}

// Whether every row of `hidden` features of the given tensors (one dtype) can live in registers as 16-byte vectors.
inline bool rows_fit(int64_t hidden, std::initializer_list<const at::Tensor*> tensors) {
  const int64_t row_bytes = hidden * static_cast<int64_t>((*tensors.begin())->element_size());
  if (row_bytes % kVecBytes != 0 || row_bytes / kVecBytes > kRowVecs) return false;
  for (const at::Tensor* t : tensors) {
    if (!vectorizable(*t, hidden)) return false;
  }
  return true;
}

// A 16-byte vector's elements as acc, and back rounded to scalar_t.
template <typename scalar_t>
__device__ __forceinline__ void unpack(const uint4& q, acc_t<scalar_t> (&x)[vec_elems<scalar_t>()]) {
  const uint32_t w[4] = {q.x, q.y, q.z, q.w};
  if constexpr (sizeof(scalar_t) == 2) {  // at::Half, at::BFloat16: the lower address in the low bits
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      x[2 * k] = static_cast<float>(scalar_t(static_cast<uint16_t>(w[k] & 0xffffu), scalar_t::from_bits()));
      x[2 * k + 1] = static_cast<float>(scalar_t(static_cast<uint16_t>(w[k] >> 16), scalar_t::from_bits()));
    }
  } else if constexpr (sizeof(scalar_t) == 4) {
#pragma unroll
    for (int k = 0; k < 4; ++k) x[k] = __uint_as_float(w[k]);
  } else {
    x[0] = __hiloint2double(static_cast<int>(w[1]), static_cast<int>(w[0]));
    x[1] = __hiloint2double(static_cast<int>(w[3]), static_cast<int>(w[2]));
  }
}
template <typename scalar_t>
__device__ __forceinline__ uint4 pack(const acc_t<scalar_t> (&x)[vec_elems<scalar_t>()]) {
  uint32_t w[4];
  if constexpr (sizeof(scalar_t) == 2) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      w[k] = static_cast<uint32_t>(static_cast<scalar_t>(x[2 * k]).x) |
             (static_cast<uint32_t>(static_cast<scalar_t>(x[2 * k + 1]).x) << 16);
    }
  } else if constexpr (sizeof(scalar_t) == 4) {
#pragma unroll
    for (int k = 0; k < 4; ++k) w[k] = __float_as_uint(x[k]);
  } else {
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      w[2 * k] = static_cast<uint32_t>(__double2loint(x[k]));
      w[2 * k + 1] = static_cast<uint32_t>(__double2hiint(x[k]));
    }
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// The v-th 16-byte vector of a row (16-byte aligned), from global or shared memory.
template <typename T>
__device__ __forceinline__ uint4 raw_vec(const T* row, int64_t v) {
  return reinterpret_cast<const uint4*>(row)[v];
}

// One slot's rows (the LayerNorm weight and bias with the slot's deltas; up_b in the adapter), copied once per block
// to shared memory: a block's warps are consecutive tokens, mostly of one batch row and so of one slot, and each
// token used to reload these rows itself (from L1 or L2, in a round trip per vector after its reductions).
template <int kRows>
struct SlotRows {
  uint4 v[kRows][kRowVecs];  // 2 KiB a row
};

// The slot of token m (-1 past the rows) and of the block's first token m0 (whose slot rows the block stages); one
// task id read when both tokens are of one batch row.
struct TokenSlots {
  int64_t t, tb;
};
__device__ __forceinline__ TokenSlots token_slots(const int64_t* task_ids, int64_t m, int64_t m0, int64_t rows,
                                                  int64_t tokens, int64_t slots) {
  const int64_t row0 = m0 / tokens, row = m / tokens;
  const int64_t tb = slot_of(task_ids, row0, slots);
  return {m >= rows ? -1 : row == row0 ? tb : slot_of(task_ids, row, slots), tb};
}

// Staged in two steps, so that the copy's loads are in flight with the token's own: fetch, by every thread of the
// block (blockDim.x >= kRowVecs), loads this thread's vector of each row when `copy`; put stores them to shared
// memory, then a barrier.
template <int kRows>
struct SlotRowsFetch {
  uint4 q[kRows];
  bool copy;
};
template <int kRows, typename scalar_t>
__device__ __forceinline__ SlotRowsFetch<kRows> fetch_slot_rows(const scalar_t* const (&rows)[kRows], int64_t nvec,
                                                                bool copy) {
  SlotRowsFetch<kRows> f;
  f.copy = copy && threadIdx.x < nvec;
  if (f.copy) {
#pragma unroll
    for (int k = 0; k < kRows; ++k) f.q[k] = raw_vec(rows[k], threadIdx.x);
  }
  return f;
}
template <int kRows>
__device__ __forceinline__ void put_slot_rows(SlotRows<kRows>& s, const SlotRowsFetch<kRows>& f) {
  if (f.copy) {
#pragma unroll
    for (int k = 0; k < kRows; ++k) s.v[k][threadIdx.x] = f.q[k];
  }
  __syncthreads();
}

template <typename scalar_t>
struct RowRegs {
  static constexpr int V = vec_elems<scalar_t>();
  using acc = acc_t<scalar_t>;
  uint4 q[kMaxVec];

  // Vector i of this lane is vector (lane + 32 * i) of the row, if that is < nvec.
  __device__ __forceinline__ static bool has(int i, int64_t nvec) { return threadIdx.x % kWarp + kWarp * i < nvec; }
  __device__ __forceinline__ static int64_t index(int i) { return threadIdx.x % kWarp + kWarp * i; }

  __device__ __forceinline__ void load(const scalar_t* row, int64_t nvec) {
#pragma unroll
    for (int i = 0; i < kMaxVec; ++i) {
      if (has(i, nvec)) q[i] = raw_vec(row, index(i));
    }
  }
  __device__ __forceinline__ void store(scalar_t* row, int64_t nvec) const {
#pragma unroll
    for (int i = 0; i < kMaxVec; ++i) {
      if (has(i, nvec)) reinterpret_cast<uint4*>(row)[index(i)] = q[i];
    }
  }
  __device__ __forceinline__ void get(int i, acc (&x)[V]) const { unpack<scalar_t>(q[i], x); }
  __device__ __forceinline__ void set(int i, const acc (&x)[V]) { q[i] = pack<scalar_t>(x); }

  // In place: v + r (a residual), each sum rounded to scalar_t as aten.add's would be.
  __device__ __forceinline__ void add(const RowRegs& r, int64_t nvec) {
#pragma unroll
    for (int i = 0; i < kMaxVec; ++i) {
      if (!has(i, nvec)) continue;
      acc x[V], y[V];
      get(i, x);
      r.get(i, y);
#pragma unroll
      for (int e = 0; e < V; ++e) x[e] += y[e];
      set(i, x);
    }
  }
  // In place: v + row, a slot's bias row of 16-byte vectors in global or shared memory, each sum rounded to scalar_t
  // as pets::bias_delta's would be.
  template <typename T>
  __device__ __forceinline__ void add_row(const T* row, int64_t nvec) {
#pragma unroll
    for (int i = 0; i < kMaxVec; ++i) {
      if (!has(i, nvec)) continue;
      acc x[V], b[V];
      get(i, x);
      unpack<scalar_t>(raw_vec(row, index(i)), b);
#pragma unroll
      for (int e = 0; e < V; ++e) x[e] += b[e];
      set(i, x);
    }
  }
  // add_row with the block's staged row (SlotRows, shared memory) when this token's slot is the block's, else with its
  // slot's row in global memory.
  __device__ __forceinline__ void add_row_slot(int64_t nvec, bool block_slot, const uint4* staged, const scalar_t* row) {
    if (block_slot) {
      add_row(staged, nvec);
    } else {
      add_row(row, nvec);
    }
  }

  // The LayerNorm's mean, then its rstd from the variance as a second pass.
  __device__ __forceinline__ void ln_stats(int64_t nvec, int64_t hidden, double eps, acc& mean, acc& rstd) const {
    acc sum = 0;
#pragma unroll
    for (int i = 0; i < kMaxVec; ++i) {
      if (!has(i, nvec)) continue;
      acc x[V];
      get(i, x);
#pragma unroll
      for (int e = 0; e < V; ++e) sum += x[e];
    }
    mean = warp_sum(sum) / static_cast<acc>(hidden);
    acc squares = 0;
#pragma unroll
    for (int i = 0; i < kMaxVec; ++i) {
      if (!has(i, nvec)) continue;
      acc x[V];
      get(i, x);
#pragma unroll
      for (int e = 0; e < V; ++e) squares += (x[e] - mean) * (x[e] - mean);
    }
    rstd = acc(1) / sqrt(warp_sum(squares) / static_cast<acc>(hidden) + static_cast<acc>(eps));
  }
  // ln_apply with the block's staged rows (staged[0..3]: SlotRows, shared memory) when this token's slot is the
  // block's, else with its slot's rows in global memory.
  __device__ __forceinline__ void ln_apply_slot(int64_t nvec, acc mean, acc rstd, bool block_slot,
                                                const uint4 (*staged)[kRowVecs], const scalar_t* weight,
                                                const scalar_t* bias, const scalar_t* wd, const scalar_t* bd) {
    if (block_slot) {
      ln_apply(nvec, mean, rstd, staged[0], staged[1], staged[2], staged[3]);
    } else {
      ln_apply(nvec, mean, rstd, weight, bias, wd, bd);
    }
  }
  // In place: the LN with the affine (weight + wd, bias + bd), rows of 16-byte vectors in global or shared memory.
  template <typename T>
  __device__ __forceinline__ void ln_apply(int64_t nvec, acc mean, acc rstd, const T* weight, const T* bias,
                                           const T* wd, const T* bd) {
#pragma unroll
    for (int i = 0; i < kMaxVec; ++i) {
      if (!has(i, nvec)) continue;
      acc x[V], w[V], b[V], dw[V], db[V];
      unpack<scalar_t>(raw_vec(weight, index(i)), w);
      unpack<scalar_t>(raw_vec(bias, index(i)), b);
      unpack<scalar_t>(raw_vec(wd, index(i)), dw);
      unpack<scalar_t>(raw_vec(bd, index(i)), db);
      get(i, x);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const acc gamma = w[e] + dw[e];
        const acc beta = b[e] + db[e];
        x[e] = (x[e] - mean) * rstd * gamma + beta;
      }
      set(i, x);
    }
  }
};

}  // namespace pets::cuda
