"""Inputs shared by the op tests (CPU kernels in test_ops.py, CUDA kernels in test_gpu_ops.py): task mixes, tables
with non-zero padding beyond each slot's own rank, pooled CSR matrices, adapter configs, tolerances."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from pets_compiler.custom_ops import ADAPTER_ACTIVATIONS, ADAPTER_CONFIG_COLUMNS

SLOTS = 12  # T: table slots
BATCH = 9  # B <= SLOTS, so that "distinct" can give every row its own slot
IN, OUT, LABELS = 72, 200, 5  # odd sizes, not multiples of any tile
VOCAB = 40  # V: rows of an embedding delta
BOTTLENECKS = [5, 7]  # R: padded adapter bottlenecks
MIXES = ["one", "distinct", "uniform", "zipf", "sorted"]
RANKS = [0, 1, 3, 7, 16]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
TOKENS = [(), (5,)]  # x is [B, in] or [B, S, in]

# Kernel in `dtype` against the reference in float64 on the same (rounded) inputs, cast to `dtype`.
TOLERANCE = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-10},
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2},
    torch.float16: {"rtol": 2e-3, "atol": 2e-3},
}

# The adapter rounds its intermediates to the input dtype where a matmul or add in that dtype would (as the CPU
# kernel and the task's own fp16 model do), and two LayerNorms amplify that rounding: fp16 outputs then differ from
# the float64 reference by up to ~3e-3 (seen: 2.9e-3 at bert-base sizes on the GPU; 4.9e-3 on the CPU with h_bias,
# one rounding more), so its half-type bounds are wider.
ADAPTER_TOLERANCE = {
    torch.float64: TOLERANCE[torch.float64],
    torch.float32: TOLERANCE[torch.float32],
    torch.float16: {"rtol": 5e-3, "atol": 5e-3},
    torch.bfloat16: {"rtol": 4e-2, "atol": 4e-2},
}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def task_ids_for(mix: str, batch: int = BATCH, slots: int = SLOTS, seed: int = 0) -> Tensor:
    """A task mix: all rows one task, all distinct, uniform, Zipf-skewed, or uniform sorted by slot."""
    g = gen(seed)
    if mix == "one":
        return torch.full((batch,), 3, dtype=torch.long)
    if mix == "distinct":
        return torch.randperm(slots, generator=g)[:batch]
    if mix == "zipf":
        weights = 1.0 / torch.arange(1, slots + 1, dtype=torch.float64) ** 1.5
        return torch.multinomial(weights, batch, replacement=True, generator=g)
    ids = torch.randint(0, slots, (batch,), generator=g)
    return ids.sort().values if mix == "sorted" else ids


def randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0, std: float = 1.0) -> Tensor:
    return (torch.randn(shape, generator=gen(seed), dtype=torch.float64) * std).to(dtype)


def lora_tables(
    rank: int, dtype: torch.dtype, slots: int = SLOTS, in_f: int = IN, out_f: int = OUT
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Tables of padded rank R = `rank`; each slot's own rank is drawn in [0, R] and the padding is NOT zero,
    so a kernel that ignored the per-slot rank would differ from the reference."""
    a = randn(slots, rank, in_f, dtype=dtype, seed=1, std=in_f**-0.5)
    b = randn(slots, out_f, rank, dtype=dtype, seed=2, std=max(rank, 1) ** -0.5)
    scale = (torch.rand(slots, generator=gen(3), dtype=torch.float64) + 0.5).to(dtype)
    ranks = torch.randint(0, rank + 1, (slots,), generator=gen(13))
    ranks[3] = rank  # the slot of the "one" mix uses the full rank
    return a, b, scale, ranks


def sparse_pool(
    slots: int, rows: int, cols: int, dtype: torch.dtype, seed: int = 20, empty: tuple[int, ...] = (0, 7)
) -> tuple[Tensor, Tensor, Tensor]:
    """Pooled CSR tables (row_ptr [slots, rows + 1], col [P], val [P]) of D_t [rows, cols] with about 6 nonzeros a
    row (unique columns, row-major). The slots lie in the pool in shuffled order with dead entries (no slot's)
    between them, as adding and removing tasks leaves it; every 4th row of every D_t is empty, and so is all of
    D_t for the slots in `empty` (row_ptr[t, :] all equal, and not 0)."""
    g = gen(seed)
    row_ptr = torch.zeros(slots, rows + 1, dtype=torch.long)
    pieces, pos = [], 0
    for t in torch.randperm(slots, generator=g).tolist():
        dead = torch.randint(0, cols, (int(torch.randint(0, 4, (), generator=g)),), generator=g)
        mask = torch.rand(rows, cols, generator=g) < min(1.0, 6 / cols)
        mask[::4] = False
        if t in empty:
            mask[:] = False
        r, c = mask.nonzero(as_tuple=True)
        pos += dead.numel()
        row_ptr[t, 1:] = torch.bincount(r, minlength=rows).cumsum(0)
        row_ptr[t] += pos
        pieces += [dead, c]
        pos += c.numel()
    col = torch.cat(pieces)
    return row_ptr, col, randn(col.numel(), dtype=dtype, seed=seed + 1, std=6**-0.5)


def csr_matrix(row_ptr: Tensor, col: Tensor, val: Tensor, slot: int, cols: int) -> Tensor:
    """D_t of one slot as a dense matrix, by torch's own CSR tensor."""
    lo, hi = int(row_ptr[slot, 0]), int(row_ptr[slot, -1])
    crow, size = row_ptr[slot] - lo, (row_ptr.shape[1] - 1, cols)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col[lo:hi], val[lo:hi], size, check_invariants=True).to_dense()


def ln_params(dtype: torch.dtype, slots: int = SLOTS, hidden: int = IN) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """LayerNorm weight and bias [H] and per-slot deltas [T, H]."""
    weight, bias = randn(hidden, dtype=dtype, seed=7, std=0.5) + 1, randn(hidden, dtype=dtype, seed=8, std=0.5)
    wd = randn(slots, hidden, dtype=dtype, seed=9, std=0.1)
    bd = randn(slots, hidden, dtype=dtype, seed=10, std=0.1)
    return weight, bias, wd, bd


def adapter_tables(
    bottleneck: int, dtype: torch.dtype, slots: int = SLOTS, hidden: int = IN, seed: int = 30
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(down_w, down_b, up_w, up_b, scaling, config) of padded bottleneck R = `bottleneck`. Each slot draws its
    flags and its own bottleneck in [0, R] and takes activation code slot % 8; the padding is NOT zero, so a kernel
    that ignored the per-slot bottleneck would differ from the reference. Slot 0 has no adapter (config all
    zero), slot 6 is disabled with its other columns set, slot 5 is enabled with bottleneck 0 and slot 3 (the
    "one" mix) is Pfeiffer with the full R."""
    g = gen(seed)
    down_w = randn(slots, bottleneck, hidden, dtype=dtype, seed=seed + 1, std=hidden**-0.5)
    down_b = randn(slots, bottleneck, dtype=dtype, seed=seed + 2, std=0.5)
    up_w = randn(slots, hidden, bottleneck, dtype=dtype, seed=seed + 3, std=max(bottleneck, 1) ** -0.5)
    up_b = randn(slots, hidden, dtype=dtype, seed=seed + 4, std=0.5)
    scaling = (torch.rand(slots, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    config = torch.zeros(slots, len(ADAPTER_CONFIG_COLUMNS), dtype=torch.long)
    config[:, 0] = 1
    config[:, 1:4] = torch.randint(0, 2, (slots, 3), generator=g)
    config[:, 4] = torch.arange(slots) % 8
    config[:, 5] = torch.randint(0, bottleneck + 1, (slots,), generator=g)
    config[0] = 0
    config[3] = torch.tensor([1, 1, 1, 1, ADAPTER_ACTIVATIONS["relu"], bottleneck])
    if slots > 6:
        config[5, 5] = 0
        config[6, 0] = 0
    return down_w, down_b, up_w, up_b, scaling, config


# The operands of pets::row_delta a case gives (bias or scale at least), by "+"-joined name.
ROW_TERMS = ["bias+scale+residual", "bias+scale", "bias+residual", "scale+residual", "bias", "scale"]


def row_operands(terms: str, y: Tensor, slots: int = SLOTS) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """A linear site's BitFit bias deltas and IA3 output scales (l - 1) [slots, F] and a residual of y's shape, in
    y's dtype, as `terms` asks."""
    f, dtype = y.shape[-1], y.dtype
    bias = randn(slots, f, dtype=dtype, seed=6, std=0.5) if "bias" in terms else None
    scale = randn(slots, f, dtype=dtype, seed=7, std=0.3) if "scale" in terms else None
    residual = randn(*y.shape, dtype=dtype, seed=8) if "residual" in terms else None
    return bias, scale, residual


# The terms pets::layer_norm sums into its input (x_bias, residual: the bias delta of the linear before it and the
# sublayer's residual), by "+"-joined name; pets::adapter takes the first (h_bias).
LN_TERMS = ["bias+residual", "bias", "residual"]


def ln_terms(terms: str, x: Tensor, slots: int = SLOTS) -> tuple[Tensor | None, Tensor | None]:
    """A BitFit bias delta table [slots, H] and a residual of x's shape, in x's dtype, as `terms` asks."""
    bias = randn(slots, x.shape[-1], dtype=x.dtype, seed=11, std=0.5) if "bias" in terms else None
    residual = randn(*x.shape, dtype=x.dtype, seed=12, std=2.0) if "residual" in terms else None
    return bias, residual


def bits(t: Tensor) -> Tensor:
    """The bit patterns of a float tensor, for bitwise comparisons (torch.equal says NaN != NaN, -0.0 == 0.0)."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def f64(*tensors: Tensor | None) -> list[Tensor | None]:
    return [None if t is None else t.double() if t.is_floating_point() else t for t in tensors]


def assert_matches(actual: Tensor, expected64: Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == dtype
    assert actual.is_contiguous()
    torch.testing.assert_close(actual, expected64.to(dtype), **TOLERANCE[dtype])
