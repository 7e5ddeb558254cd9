"""The torch.ops.pets CPU kernels against their plain-torch references, opcheck, input checks and export."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.export import Dim

import pets_compiler.custom_ops as custom_ops
from pets_compiler.custom_ops import (
    ADAPTER_ACTIVATIONS,
    ADAPTER_CONFIG_COLUMNS,
    adapter_ref,
    bias_delta_ref,
    embedding_delta_ref,
    gelu_delta_ref,
    layer_norm_ref,
    linear_delta_ref,
    lora_delta_ref,
    row_delta_ref,
    scale_ref,
    segmented_linear_ref,
    sparse_delta_ref,
)

from op_cases import (
    ADAPTER_TOLERANCE,
    BATCH,
    BOTTLENECKS,
    DTYPES,
    IN,
    LABELS,
    LN_TERMS,
    MIXES,
    OUT,
    RANKS,
    ROW_TERMS,
    SLOTS,
    TOKENS,
    TOLERANCE,
    VOCAB,
    adapter_tables,
    assert_matches,
    bits,
    csr_matrix,
    f64,
    gen,
    ln_params,
    ln_terms,
    lora_tables,
    randn,
    row_operands,
    sparse_pool,
    task_ids_for,
)

ops = torch.ops.pets


@pytest.mark.parametrize("tokens", TOKENS, ids=["2d", "3d"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("mix", MIXES)
def test_lora_delta_matches_reference(mix: str, rank: int, dtype: torch.dtype, tokens: tuple[int, ...]) -> None:
    ids = task_ids_for(mix)
    x = randn(BATCH, *tokens, IN, dtype=dtype, seed=4)
    y = randn(BATCH, *tokens, OUT, dtype=dtype, seed=5)
    a, b, scale, r = lora_tables(rank, dtype)
    out = ops.lora_delta(y, x, ids, a, b, scale, r)
    assert_matches(out, lora_delta_ref(*f64(y, x, ids, a, b, scale, r)), dtype)


@pytest.mark.parametrize("tokens", TOKENS, ids=["2d", "3d"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mix", MIXES)
def test_bias_delta_matches_reference(mix: str, dtype: torch.dtype, tokens: tuple[int, ...]) -> None:
    ids = task_ids_for(mix)
    y = randn(BATCH, *tokens, OUT, dtype=dtype, seed=5)
    bias = randn(SLOTS, OUT, dtype=dtype, seed=6)
    assert_matches(ops.bias_delta(y, ids, bias), bias_delta_ref(*f64(y, ids, bias)), dtype)


@pytest.mark.parametrize(
    "terms", ["lora+bias", "lora", "bias", "none", "lora+bias+scale", "lora+scale", "bias+scale", "scale"]
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mix", ["one", "uniform", "zipf"])
def test_linear_delta_matches_reference(mix: str, dtype: torch.dtype, terms: str) -> None:
    ids = task_ids_for(mix)
    x = randn(BATCH, 5, IN, dtype=dtype, seed=4)
    y = randn(BATCH, 5, OUT, dtype=dtype, seed=5)
    a, b, scale, r = lora_tables(7, dtype) if "lora" in terms else (None, None, None, None)
    bias = randn(SLOTS, OUT, dtype=dtype, seed=6) if "bias" in terms else None
    out_scale = randn(SLOTS, OUT, dtype=dtype, seed=8, std=0.3) if "scale" in terms else None
    out = ops.linear_delta(y, x, ids, a, b, scale, r, bias, out_scale)
    assert_matches(out, linear_delta_ref(*f64(y, x, ids, a, b, scale, r, bias, out_scale)), dtype)
    assert out.data_ptr() != y.data_ptr()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("terms", ["lora+bias", "lora", "bias", "none"])
def test_linear_delta_out_scale_is_the_scale_op_after_it(terms: str, dtype: torch.dtype) -> None:
    """On the CPU the fused output scale rounds as pets::scale after the unfused op: bitwise the same; a zero slot
    leaves the site's result as it was."""
    ids = task_ids_for("uniform")
    x = randn(BATCH, 5, IN, dtype=dtype, seed=4)
    y = randn(BATCH, 5, OUT, dtype=dtype, seed=5)
    a, b, scale, r = lora_tables(7, dtype) if "lora" in terms else (None, None, None, None)
    bias = randn(SLOTS, OUT, dtype=dtype, seed=6) if "bias" in terms else None
    out_scale = randn(SLOTS, OUT, dtype=dtype, seed=8, std=0.3)
    out_scale[ids[0]] = 0
    unscaled = ops.linear_delta(y, x, ids, a, b, scale, r, bias)
    fused = ops.linear_delta(y, x, ids, a, b, scale, r, bias, out_scale)
    assert torch.equal(bits(fused), bits(ops.scale(unscaled, ids, out_scale)))
    same = ids == ids[0]
    assert torch.equal(bits(fused[same]), bits(unscaled[same])) and not torch.equal(fused[~same], unscaled[~same])


@pytest.mark.parametrize("tokens", TOKENS, ids=["2d", "3d"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mix", MIXES)
def test_layer_norm_matches_reference(mix: str, dtype: torch.dtype, tokens: tuple[int, ...]) -> None:
    ids = task_ids_for(mix)
    x = randn(BATCH, *tokens, IN, dtype=dtype, seed=4, std=3.0)
    weight, bias = randn(IN, dtype=dtype, seed=7), randn(IN, dtype=dtype, seed=8)
    wd, bd = randn(SLOTS, IN, dtype=dtype, seed=9, std=0.1), randn(SLOTS, IN, dtype=dtype, seed=10, std=0.1)
    out = ops.layer_norm(x, ids, weight, bias, wd, bd, 1e-12)
    assert_matches(out, layer_norm_ref(*f64(x, ids, weight, bias, wd, bd), 1e-12), dtype)


def test_layer_norm_with_zero_deltas_is_torch_layer_norm() -> None:
    x = randn(BATCH, 11, 384, seed=4)
    weight, bias = randn(384, seed=7), randn(384, seed=8)
    zeros = torch.zeros(SLOTS, 384)
    out = ops.layer_norm(x, task_ids_for("uniform"), weight, bias, zeros, zeros, 1e-12)
    torch.testing.assert_close(out, F.layer_norm(x, (384,), weight, bias, 1e-12), rtol=1e-6, atol=1e-6)


def test_layer_norm_is_exact_when_the_mean_dwarfs_the_spread() -> None:
    """Statistics in double for fp32: within 1e-6 of float64 where torch's own fp32 kernel is off by ~2e-4."""
    x = randn(BATCH, 11, 384, seed=4) + 1e3
    weight, bias = randn(384, seed=7), randn(384, seed=8)
    zeros = torch.zeros(SLOTS, 384)
    out = ops.layer_norm(x, task_ids_for("uniform"), weight, bias, zeros, zeros, 1e-12)
    exact = F.layer_norm(x.double(), (384,), weight.double(), bias.double(), 1e-12)
    torch.testing.assert_close(out, exact.float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("terms", LN_TERMS)
@pytest.mark.parametrize("tokens", TOKENS, ids=["2d", "3d"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mix", MIXES)
def test_layer_norm_of_a_sum_matches_reference(
    mix: str, dtype: torch.dtype, tokens: tuple[int, ...], terms: str
) -> None:
    ids = task_ids_for(mix)
    x = randn(BATCH, *tokens, IN, dtype=dtype, seed=4, std=3.0)
    args = (x, ids, *ln_params(dtype), 1e-12, *ln_terms(terms, x))
    assert_matches(ops.layer_norm(*args), layer_norm_ref(*f64(*args[:6]), 1e-12, *f64(*args[7:])), dtype)


def _unfused_sum(x: Tensor, ids: Tensor, x_bias: Tensor | None, residual: Tensor | None) -> Tensor:
    """x + x_bias[t] + residual by the unfused ops the compiled program had before fuse_norm_inputs."""
    if x_bias is not None:
        return ops.row_delta(x, ids, x_bias, None, residual)
    assert residual is not None
    return x + residual


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_norm_of_a_sum_is_the_unfused_ops_bitwise_on_the_cpu(dtype: torch.dtype) -> None:
    """The sums are rounded as pets::row_delta and aten.add round them, so fusing them (passes/fuse_norm_inputs.py)
    changes no CPU result; rows of slots whose bias is zero are the plain LayerNorm of x + residual."""
    ids = task_ids_for("zipf")
    x = randn(BATCH, 5, IN, dtype=dtype, seed=4, std=3.0)
    ln = ln_params(dtype)
    for terms in LN_TERMS:
        x_bias, residual = ln_terms(terms, x)
        fused = ops.layer_norm(x, ids, *ln, 1e-12, x_bias, residual)
        unfused = ops.layer_norm(_unfused_sum(x, ids, x_bias, residual), ids, *ln, 1e-12)
        assert torch.equal(bits(fused), bits(unfused)), terms
    x_bias, residual = ln_terms("bias+residual", x)
    assert x_bias is not None and residual is not None
    x_bias[ids[::2]] = 0
    zero = torch.isin(ids, ids[::2])
    out = ops.layer_norm(x, ids, *ln, 1e-12, x_bias, residual)
    plain = ops.layer_norm(x + residual, ids, *ln, 1e-12)
    assert torch.equal(bits(out[zero]), bits(plain[zero])) and not torch.equal(out[~zero], plain[~zero])


@pytest.mark.parametrize("tokens", TOKENS, ids=["2d", "3d"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mix", MIXES)
def test_segmented_linear_matches_reference(mix: str, dtype: torch.dtype, tokens: tuple[int, ...]) -> None:
    ids = task_ids_for(mix)
    x = randn(BATCH, *tokens, IN, dtype=dtype, seed=4)
    weight = randn(SLOTS, LABELS, IN, dtype=dtype, seed=11, std=IN**-0.5)
    bias = randn(SLOTS, LABELS, dtype=dtype, seed=12)
    out = ops.segmented_linear(x, ids, weight, bias)
    assert out.shape == (BATCH, *tokens, LABELS)
    assert_matches(out, segmented_linear_ref(*f64(x, ids, weight, bias)), dtype)


def _row_loop_lora(y: Tensor, x: Tensor, ids: Tensor, a: Tensor, b: Tensor, scale: Tensor, r: Tensor) -> Tensor:
    rows = [(i, t, int(r[t])) for i, t in enumerate(ids.tolist())]
    return torch.stack([y[i] + scale[t] * (x[i] @ a[t, :k].T) @ b[t, :, :k].T for i, t, k in rows])


def test_references_match_a_row_by_row_loop() -> None:
    """The oracle itself, against the definition written one row at a time."""
    ids = task_ids_for("uniform")
    x, y = randn(BATCH, 4, IN, dtype=torch.float64, seed=4), randn(BATCH, 4, OUT, dtype=torch.float64, seed=5)
    a, b, scale, r = lora_tables(3, torch.float64)
    bias = randn(SLOTS, OUT, dtype=torch.float64, seed=6)
    rows = list(enumerate(ids.tolist()))
    close = torch.testing.assert_close
    close(lora_delta_ref(y, x, ids, a, b, scale, r), _row_loop_lora(y, x, ids, a, b, scale, r))
    close(bias_delta_ref(y, ids, bias), torch.stack([y[i] + bias[t] for i, t in rows]))
    close(
        linear_delta_ref(y, x, ids, a, b, scale, r, bias),
        _row_loop_lora(y, x, ids, a, b, scale, r) + bias[ids].unsqueeze(1),
    )
    w, bb = randn(IN, dtype=torch.float64, seed=7), randn(IN, dtype=torch.float64, seed=8)
    wd, bd = randn(SLOTS, IN, dtype=torch.float64, seed=9), randn(SLOTS, IN, dtype=torch.float64, seed=10)

    def ln_row(v: Tensor, t: int) -> Tensor:
        mean, var = v.mean(-1, keepdim=True), v.var(-1, unbiased=False, keepdim=True)
        return (v - mean) / torch.sqrt(var + 1e-5) * (w + wd[t]) + (bb + bd[t])

    close(layer_norm_ref(x, ids, w, bb, wd, bd, 1e-5), torch.stack([ln_row(x[i], t) for i, t in rows]))
    hw, hb = randn(SLOTS, LABELS, IN, dtype=torch.float64, seed=11), randn(SLOTS, LABELS, dtype=torch.float64)
    close(segmented_linear_ref(x, ids, hw, hb), torch.stack([x[i] @ hw[t].T + hb[t] for i, t in rows]))
    ia3 = randn(SLOTS, OUT, dtype=torch.float64, seed=12, std=0.3)
    close(
        gelu_delta_ref(y, ids, bias, ia3, "tanh"),
        torch.stack([F.gelu(y[i] + bias[t], approximate="tanh") * (1 + ia3[t]) for i, t in rows]),
    )
    res = randn(BATCH, 4, OUT, dtype=torch.float64, seed=14)
    close(
        row_delta_ref(y, ids, bias, ia3, res), torch.stack([(y[i] + bias[t]) * (1 + ia3[t]) + res[i] for i, t in rows])
    )


def test_lora_rows_of_zero_scale_slots_are_exactly_y() -> None:
    ids = task_ids_for("uniform")
    x, y = randn(BATCH, 5, IN, seed=4), randn(BATCH, 5, OUT, seed=5)
    a, b, scale, r = lora_tables(4, torch.float32)
    scale[ids[::2]] = 0.0
    out = ops.lora_delta(y, x, ids, a, b, scale, r)
    skipped = scale[ids] == 0
    assert torch.equal(out[skipped], y[skipped])
    assert not torch.equal(out[~skipped], y[~skipped])


@pytest.mark.parametrize("tokens", TOKENS, ids=["2d", "3d"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mix", MIXES)
def test_scale_matches_reference(mix: str, dtype: torch.dtype, tokens: tuple[int, ...]) -> None:
    ids = task_ids_for(mix)
    y = randn(BATCH, *tokens, OUT, dtype=dtype, seed=5)
    delta = randn(SLOTS, OUT, dtype=dtype, seed=6, std=0.3)
    assert_matches(ops.scale(y, ids, delta), scale_ref(*f64(y, ids, delta)), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scale_rows_of_zero_slots_are_bitwise_y(dtype: torch.dtype) -> None:
    ids = task_ids_for("uniform")
    y = randn(BATCH, 5, OUT, dtype=dtype, seed=5)
    y[:, 0, :3] = torch.tensor([-0.0, float("nan"), float("inf")], dtype=dtype)
    delta = randn(SLOTS, OUT, dtype=dtype, seed=6)
    delta[ids[::2]] = 0
    out = ops.scale(y, ids, delta)
    zero = (delta[ids] == 0).all(1)
    assert torch.equal(bits(out[zero]), bits(y[zero]))
    assert not torch.equal(out[~zero], y[~zero])
    torch.testing.assert_close(scale_ref(y, ids, delta)[zero], y[zero], equal_nan=True, rtol=0, atol=0)


GELU_TERMS = ["bias+scale", "bias", "scale", "none"]


def _gelu_tables(terms: str, dtype: torch.dtype) -> tuple[Tensor | None, Tensor | None]:
    """BitFit bias deltas and IA3 scales (l - 1) of the FFN activation, as `terms` asks."""
    bias = randn(SLOTS, OUT, dtype=dtype, seed=6, std=0.5) if "bias" in terms else None
    scale = randn(SLOTS, OUT, dtype=dtype, seed=7, std=0.3) if "scale" in terms else None
    return bias, scale


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("terms", GELU_TERMS)
@pytest.mark.parametrize("tokens", TOKENS, ids=["2d", "3d"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mix", MIXES)
def test_gelu_delta_matches_reference(
    mix: str, dtype: torch.dtype, tokens: tuple[int, ...], terms: str, approximate: str
) -> None:
    ids = task_ids_for(mix)
    y = randn(BATCH, *tokens, OUT, dtype=dtype, seed=5, std=2.0)
    bias, scale = _gelu_tables(terms, dtype)
    out = ops.gelu_delta(y, ids, bias, scale, approximate)
    assert_matches(out, gelu_delta_ref(*f64(y, ids, bias, scale), approximate), dtype)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("terms", GELU_TERMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gelu_delta_rows_of_zero_slots_are_aten_gelu_bitwise(dtype: torch.dtype, terms: str, approximate: str) -> None:
    """Slot 0 (and any slot whose terms are zero) computes what the base model's aten.gelu does, bit for bit."""
    ids = task_ids_for("uniform")
    y = randn(BATCH, 5, OUT, dtype=dtype, seed=5, std=3.0)
    y[:, 0, :3] = torch.tensor([1e4, -30.0, -1e4], dtype=dtype)  # gelu: y, -0.0, -0.0
    bias, scale = _gelu_tables(terms, dtype)
    for table in (bias, scale):
        if table is not None:
            table[ids[::2]] = 0
    zero = torch.isin(ids, ids[::2])
    out = ops.gelu_delta(y, ids, bias, scale, approximate)
    plain = F.gelu(y, approximate=approximate)
    assert torch.equal(bits(out[zero]), bits(plain[zero]))
    assert torch.equal(bits(out[~zero]), bits(plain[~zero])) == (terms == "none")
    if scale is not None and bias is None:  # no bias add: a -0.0 stays -0.0, as in aten.gelu
        y[:, 1, 0] = -0.0
        out = ops.gelu_delta(y, ids, None, scale, approximate)
        assert torch.equal(bits(out[zero]), bits(F.gelu(y, approximate=approximate)[zero]))


def test_gelu_delta_is_the_unfused_ops_bitwise_on_the_cpu() -> None:
    """The CPU kernel does the unfused ops' arithmetic, so fusing them changes no CPU result."""
    ids = task_ids_for("zipf")
    y = randn(BATCH, 5, OUT, seed=5, std=2.0)
    bias, scale = _gelu_tables("bias+scale", torch.float32)
    assert bias is not None and scale is not None
    for approximate in ("none", "tanh"):
        unfused = ops.scale(F.gelu(ops.bias_delta(y, ids, bias), approximate=approximate), ids, scale)
        assert torch.equal(bits(ops.gelu_delta(y, ids, bias, scale, approximate)), bits(unfused))


@pytest.mark.parametrize("features", [OUT, 75])
@pytest.mark.parametrize("terms", ROW_TERMS)
@pytest.mark.parametrize("tokens", TOKENS, ids=["2d", "3d"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mix", MIXES)
def test_row_delta_matches_reference(
    mix: str, dtype: torch.dtype, tokens: tuple[int, ...], terms: str, features: int
) -> None:
    ids = task_ids_for(mix)
    y = randn(BATCH, *tokens, features, dtype=dtype, seed=5, std=2.0)
    args = (y, ids, *row_operands(terms, y))
    assert_matches(ops.row_delta(*args), row_delta_ref(*f64(*args)), dtype)


@pytest.mark.parametrize("terms", ROW_TERMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_row_delta_rows_of_zero_slots_are_the_base_bitwise(dtype: torch.dtype, terms: str) -> None:
    """Slot 0 (and any slot whose tables are zero) computes what the base model does, y or aten.add(y, residual),
    bit for bit; without a bias a -0.0 of y stays -0.0 (a bias add of 0 makes it +0.0, as pets::bias_delta does)."""
    ids = task_ids_for("uniform")
    y = randn(BATCH, 5, OUT, dtype=dtype, seed=5, std=2.0)
    y[:, 0, :2] = torch.tensor([float("inf"), 0.0 if "bias" in terms else -0.0], dtype=dtype)
    bias, scale, residual = row_operands(terms, y)
    for table in (bias, scale):
        if table is not None:
            table[ids[::2]] = 0
    zero = torch.isin(ids, ids[::2])
    out = ops.row_delta(y, ids, bias, scale, residual)
    plain = y if residual is None else y + residual
    assert torch.equal(bits(out[zero]), bits(plain[zero]))
    assert not torch.equal(out[~zero], plain[~zero])


def test_row_delta_is_the_unfused_ops_bitwise_on_the_cpu() -> None:
    """The CPU kernel does the unfused ops' arithmetic, so fusing them (passes/fuse_row_terms.py) changes no CPU
    result."""
    ids = task_ids_for("zipf")
    for dtype in (torch.float32, torch.float16):
        y = randn(BATCH, 5, OUT, dtype=dtype, seed=5, std=2.0)
        for terms in ROW_TERMS:
            bias, scale, residual = row_operands(terms, y)
            unfused = y if bias is None else ops.bias_delta(y, ids, bias)
            unfused = unfused if scale is None else ops.scale(unfused, ids, scale)
            unfused = unfused if residual is None else unfused + residual
            assert torch.equal(bits(ops.row_delta(y, ids, bias, scale, residual)), bits(unfused)), (dtype, terms)


@pytest.mark.parametrize("tokens", TOKENS, ids=["2d", "3d"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mix", MIXES)
def test_sparse_delta_matches_reference(mix: str, dtype: torch.dtype, tokens: tuple[int, ...]) -> None:
    ids = task_ids_for(mix)
    x = randn(BATCH, *tokens, IN, dtype=dtype, seed=4)
    y = randn(BATCH, *tokens, OUT, dtype=dtype, seed=5)
    row_ptr, col, val = sparse_pool(SLOTS, OUT, IN, dtype)
    out = ops.sparse_delta(y, x, ids, row_ptr, col, val)
    assert_matches(out, sparse_delta_ref(*f64(y, x, ids, row_ptr, col, val)), dtype)


@pytest.mark.parametrize("tokens", TOKENS, ids=["2d", "3d"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mix", MIXES)
def test_embedding_delta_matches_reference(mix: str, dtype: torch.dtype, tokens: tuple[int, ...]) -> None:
    ids = task_ids_for(mix)
    y = randn(BATCH, *tokens, IN, dtype=dtype, seed=5)
    vocab_ids = torch.randint(0, VOCAB, (BATCH, *tokens), generator=gen(14))
    row_ptr, col, val = sparse_pool(SLOTS, VOCAB, IN, dtype)
    out = ops.embedding_delta(y, vocab_ids, ids, row_ptr, col, val)
    assert_matches(out, embedding_delta_ref(*f64(y, vocab_ids, ids, row_ptr, col, val)), dtype)


def test_sparse_deltas_match_dense_csr_matrices() -> None:
    """Kernels and references against D_t materialised by torch.sparse_csr_tensor, one row at a time."""
    ids = task_ids_for("uniform")
    x, y = randn(BATCH, 5, IN, dtype=torch.float64, seed=4), randn(BATCH, 5, OUT, dtype=torch.float64, seed=5)
    row_ptr, col, val = sparse_pool(SLOTS, OUT, IN, torch.float64)
    dense = [csr_matrix(row_ptr, col, val, t, IN) for t in range(SLOTS)]
    expected = torch.stack([y[i] + x[i] @ dense[t].T for i, t in enumerate(ids.tolist())])
    torch.testing.assert_close(ops.sparse_delta(y, x, ids, row_ptr, col, val), expected)
    torch.testing.assert_close(sparse_delta_ref(y, x, ids, row_ptr, col, val), expected)

    e = randn(BATCH, 5, IN, dtype=torch.float64, seed=6)
    vocab_ids = torch.randint(0, VOCAB, (BATCH, 5), generator=gen(14))
    e_ptr, e_col, e_val = sparse_pool(SLOTS, VOCAB, IN, torch.float64, seed=40)
    tables = [csr_matrix(e_ptr, e_col, e_val, t, IN) for t in range(SLOTS)]
    expected = torch.stack([e[i] + tables[t][vocab_ids[i]] for i, t in enumerate(ids.tolist())])
    torch.testing.assert_close(ops.embedding_delta(e, vocab_ids, ids, e_ptr, e_col, e_val), expected)
    torch.testing.assert_close(embedding_delta_ref(e, vocab_ids, ids, e_ptr, e_col, e_val), expected)
    delta = randn(SLOTS, IN, dtype=torch.float64, seed=6)
    expected = torch.stack([x[i] * (1 + delta[t]) for i, t in enumerate(ids.tolist())])
    torch.testing.assert_close(scale_ref(x, ids, delta), expected)


def test_sparse_deltas_add_up_repeated_columns() -> None:
    """Not canonical CSR: one row lists column 2 three times; the entries add up, like the Semantics sum."""
    x, y = randn(2, 3, 4, dtype=torch.float64), randn(2, 3, 2, dtype=torch.float64, seed=1)
    row_ptr = torch.tensor([[0, 3, 4]])
    col, val = torch.tensor([2, 2, 2, 0]), torch.tensor([0.5, 0.25, 1.0, 2.0], dtype=torch.float64)
    ids = torch.zeros(2, dtype=torch.long)
    expected = y + torch.stack([1.75 * x[..., 2], 2.0 * x[..., 0]], -1)
    torch.testing.assert_close(ops.sparse_delta(y, x, ids, row_ptr, col, val), expected)
    torch.testing.assert_close(sparse_delta_ref(y, x, ids, row_ptr, col, val), expected)
    e_ptr = torch.tensor([[0, 3, 4, 4, 4, 4]])  # V = 5, H = 4
    e, vocab_ids = randn(2, 3, 4, dtype=torch.float64, seed=2), torch.tensor([[0, 1, 2], [4, 0, 0]])
    dense = torch.tensor([[0, 0, 1.75, 0], [2.0, 0, 0, 0], [0] * 4, [0] * 4, [0] * 4], dtype=torch.float64)
    expected = e + dense[vocab_ids]
    torch.testing.assert_close(ops.embedding_delta(e, vocab_ids, ids, e_ptr, col, val), expected)
    torch.testing.assert_close(embedding_delta_ref(e, vocab_ids, ids, e_ptr, col, val), expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparse_deltas_leave_what_has_no_nonzeros_bitwise_y(dtype: torch.dtype) -> None:
    """Rows of slots without nonzeros, and features whose row of D_t is empty, are y bit for bit (-0.0 too)."""
    ids = torch.tensor([0, 7, 3, 0, 5, 7, 1, 2, 3])  # slots 0 and 7 have no nonzeros
    empty = (ids == 0) | (ids == 7)
    x, y = randn(BATCH, 5, IN, dtype=dtype, seed=4), randn(BATCH, 5, OUT, dtype=dtype, seed=5)
    y[..., ::4] = -0.0
    row_ptr, col, val = sparse_pool(SLOTS, OUT, IN, dtype)
    out = ops.sparse_delta(y, x, ids, row_ptr, col, val)
    assert torch.equal(bits(out[empty]), bits(y[empty]))
    assert torch.equal(bits(out[..., ::4]), bits(y[..., ::4]))  # every 4th row of each D_t is empty
    assert not torch.equal(out[~empty], y[~empty])

    vocab_ids = torch.randint(0, VOCAB, (BATCH, 5), generator=gen(14))
    e_ptr, e_col, e_val = sparse_pool(SLOTS, VOCAB, OUT, dtype, seed=40)
    out = ops.embedding_delta(y, vocab_ids, ids, e_ptr, e_col, e_val)
    untouched = empty.unsqueeze(1) | (vocab_ids % 4 == 0)
    assert torch.equal(bits(out[untouched]), bits(y[untouched]))
    assert not torch.equal(out[~untouched], y[~untouched])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparse_deltas_with_an_empty_pool_are_y(dtype: torch.dtype) -> None:
    ids = task_ids_for("uniform")
    x, y = randn(BATCH, 5, IN, dtype=dtype, seed=4), randn(BATCH, 5, OUT, dtype=dtype, seed=5)
    col, val = torch.empty(0, dtype=torch.long), torch.empty(0, dtype=dtype)
    row_ptr = torch.zeros(SLOTS, OUT + 1, dtype=torch.long)
    assert torch.equal(ops.sparse_delta(y, x, ids, row_ptr, col, val), y)
    assert torch.equal(sparse_delta_ref(y, x, ids, row_ptr, col, val), y)
    vocab_ids = torch.randint(0, VOCAB, (BATCH, 5), generator=gen(14))
    e_ptr = torch.zeros(SLOTS, VOCAB + 1, dtype=torch.long)
    assert torch.equal(ops.embedding_delta(y, vocab_ids, ids, e_ptr, col, val), y)
    assert torch.equal(embedding_delta_ref(y, vocab_ids, ids, e_ptr, col, val), y)


def test_sparse_delta_rows_do_not_depend_on_other_rows_or_slots() -> None:
    """A row alone, with its task alone in a compacted pool (every other task removed), is bitwise the same."""
    ids = task_ids_for("uniform")
    x, y = randn(BATCH, 5, IN, seed=4), randn(BATCH, 5, OUT, seed=5)
    row_ptr, col, val = sparse_pool(SLOTS, OUT, IN, torch.float32)
    out = ops.sparse_delta(y, x, ids, row_ptr, col, val)
    vocab_ids = torch.randint(0, VOCAB, (BATCH, 5), generator=gen(14))
    e_ptr, e_col, e_val = sparse_pool(SLOTS, VOCAB, OUT, torch.float32, seed=40)
    e_out = ops.embedding_delta(y, vocab_ids, ids, e_ptr, e_col, e_val)
    for i, t in enumerate(ids.tolist()):
        lo, hi = int(row_ptr[t, 0]), int(row_ptr[t, -1])
        alone = ops.sparse_delta(
            y[i : i + 1], x[i : i + 1], torch.tensor([0]), row_ptr[t : t + 1] - lo, col[lo:hi], val[lo:hi]
        )
        assert torch.equal(alone[0], out[i])
        lo, hi = int(e_ptr[t, 0]), int(e_ptr[t, -1])
        alone = ops.embedding_delta(
            y[i : i + 1], vocab_ids[i : i + 1], torch.tensor([0]), e_ptr[t : t + 1] - lo, e_col[lo:hi], e_val[lo:hi]
        )
        assert torch.equal(alone[0], e_out[i])


def _adapter_args(
    dtype: torch.dtype, bottleneck: int, mix: str = "uniform", tokens: int = 5, eps: float = 1e-5
) -> tuple[object, ...]:
    ids = task_ids_for(mix)
    h = randn(BATCH, tokens, IN, dtype=dtype, seed=4)
    residual = randn(BATCH, tokens, IN, dtype=dtype, seed=5)
    return (h, residual, ids, *ln_params(dtype), eps, *adapter_tables(bottleneck, dtype))


@pytest.mark.parametrize("bottleneck", BOTTLENECKS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mix", MIXES)
def test_adapter_matches_reference(mix: str, dtype: torch.dtype, bottleneck: int) -> None:
    args = _adapter_args(dtype, bottleneck, mix)
    out = ops.adapter(*args)
    expected = adapter_ref(*[f64(a)[0] if isinstance(a, Tensor) else a for a in args])
    assert out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out, expected.to(dtype), **TOLERANCE[dtype])


@pytest.mark.parametrize("bottleneck", BOTTLENECKS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mix", MIXES)
def test_adapter_with_h_bias_matches_reference(mix: str, dtype: torch.dtype, bottleneck: int) -> None:
    args = (*_adapter_args(dtype, bottleneck, mix), randn(SLOTS, IN, dtype=dtype, seed=11, std=0.5))
    out = ops.adapter(*args)
    expected = adapter_ref(*[f64(a)[0] if isinstance(a, Tensor) else a for a in args])
    assert out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out, expected.to(dtype), **ADAPTER_TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_adapter_with_h_bias_is_the_unfused_ops_bitwise_on_the_cpu(dtype: torch.dtype) -> None:
    """h + h_bias[t] is pets::bias_delta's sum wherever the adapter reads h (every config of adapter_tables: LN
    before or not, residual from h or not), so fusing the bias delta (passes/fuse_norm_inputs.py) changes no CPU
    result; rows of slots whose h_bias is zero are the adapter of h."""
    h, residual, ids, *rest = _adapter_args(dtype, 7, "distinct")
    h_bias = randn(SLOTS, IN, dtype=dtype, seed=11, std=0.5)
    fused = ops.adapter(h, residual, ids, *rest, h_bias)
    assert torch.equal(bits(fused), bits(ops.adapter(ops.bias_delta(h, ids, h_bias), residual, ids, *rest)))
    h_bias[ids[::2]] = 0
    zero = torch.isin(ids, ids[::2])
    out, plain = ops.adapter(h, residual, ids, *rest, h_bias), ops.adapter(h, residual, ids, *rest)
    assert torch.equal(bits(out[zero]), bits(plain[zero])) and not torch.equal(out[~zero], plain[~zero])


def test_adapter_on_2d_rows_and_padded_bottleneck_0() -> None:
    """[B, H] batches; tables of padded bottleneck R = 0 (no slot has any unit: a = up_b)."""
    h, residual, ids, *rest = _adapter_args(torch.float64, 5)
    args = (h[:, 0], residual[:, 0], ids, *rest)
    torch.testing.assert_close(ops.adapter(*args), adapter_ref(*args))
    w, b, wd, bd, eps, down_w, down_b, up_w, up_b, scaling, config = rest
    config = config.clone()
    config[:, 5] = 0
    args = (h, residual, ids, w, b, wd, bd, eps, down_w[:, :0], down_b[:, :0], up_w[..., :0], up_b, scaling, config)
    torch.testing.assert_close(ops.adapter(*args), adapter_ref(*args))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_adapter_rows_without_adapter_are_pets_layer_norm_bitwise(dtype: torch.dtype) -> None:
    h, residual, ids, w, b, wd, bd, eps, *tables = _adapter_args(dtype, 7)
    ids[::2] = torch.tensor([0, 6, 0, 6, 0])  # slot 0: config all zero; slot 6: enabled = 0, the rest set
    out = ops.adapter(h, residual, ids, w, b, wd, bd, eps, *tables)
    plain = ops.layer_norm(h + residual, ids, w, b, wd, bd, eps)
    off = tables[-1][ids, 0] == 0
    assert torch.equal(bits(out[off]), bits(plain[off]))
    assert not torch.equal(out[~off], plain[~off])


def test_adapter_rows_do_not_depend_on_other_slots_or_the_padding() -> None:
    """A slot's rows are bitwise the same alone, beside slots of larger bottlenecks, sorted or not, and with
    the tables re-padded to a larger R (as when a task with a larger bottleneck is added)."""
    h, residual, _, w, b, wd, bd, eps, down_w, down_b, up_w, up_b, scaling, config = _adapter_args(torch.float32, 7)
    config[1, 1:] = torch.tensor([1, 1, 1, 1, 2])  # bottleneck 2; slots 2 and 4 use the full 7
    config[2, 5] = config[4, 5] = 7
    ids = torch.tensor([1, 2, 1, 4, 0, 2, 1, 4, 1])
    full = ops.adapter(h, residual, ids, w, b, wd, bd, eps, down_w, down_b, up_w, up_b, scaling, config)
    grow = 12 - 7  # the tables re-padded to R = 12 with other values
    down_w12 = torch.cat([down_w, randn(SLOTS, grow, IN, seed=50)], 1)
    down_b12 = torch.cat([down_b, randn(SLOTS, grow, seed=51)], 1)
    up_w12 = torch.cat([up_w, randn(SLOTS, IN, grow, seed=52)], 2)
    repadded = ops.adapter(h, residual, ids, w, b, wd, bd, eps, down_w12, down_b12, up_w12, up_b, scaling, config)
    for t in [1, 2]:
        rows = ids == t
        alone = ops.adapter(
            h[rows], residual[rows], ids[rows], w, b, wd, bd, eps, down_w, down_b, up_w, up_b, scaling, config
        )
        assert torch.equal(alone, full[rows])
        assert torch.equal(repadded[rows], full[rows])


def _adapterhub_sublayer(
    h: Tensor, residual: Tensor, layer_norm: nn.LayerNorm, adapter: dict[str, object] | None
) -> Tensor:
    """One task's sublayer end written as AdapterHub's Adapter computes it (pre_forward, forward, post_forward)."""
    if adapter is None:
        return layer_norm(h + residual)
    hidden_states, input_tensor = h, residual
    if adapter["residual_before_ln"]:
        res = hidden_states
    if adapter["original_ln_before"]:
        hidden_states = layer_norm(hidden_states + input_tensor)
    if not adapter["residual_before_ln"]:
        res = hidden_states
    down, act, up = adapter["down"], adapter["act"], adapter["up"]
    assert callable(down) and callable(act) and callable(up)
    output = up(act(down(hidden_states))) * adapter["scaling"] + res
    if adapter["original_ln_after"]:
        output = layer_norm(output + input_tensor)
    return output


ADAPTERHUB_CONFIGS = {
    "pfeiffer": {"original_ln_before": True, "residual_before_ln": True, "original_ln_after": True, "act": "relu"},
    "houlsby": {"original_ln_before": False, "residual_before_ln": True, "original_ln_after": True, "act": "swish"},
}
HUB_CASES = [*ADAPTERHUB_CONFIGS, *(f"pfeiffer-{name}" for name in ADAPTER_ACTIVATIONS)]


@pytest.mark.parametrize("case", HUB_CASES)
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_adapter_matches_adapterhub(case: str) -> None:
    """AdapterHub's Pfeiffer (seq_bn) and Houlsby (double_seq_bn) configs, and every activation name, against
    nn.Linear / nn.LayerNorm modules and transformers' activations wired as AdapterHub wires them."""
    from transformers.activations import get_activation

    kind, _, act_name = case.partition("-")
    hub = {**ADAPTERHUB_CONFIGS[kind], **({"act": act_name} if act_name else {})}
    slots, bottleneck, dtype = 4, 7, torch.float64
    h, residual = randn(6, 5, IN, dtype=dtype, seed=4), randn(6, 5, IN, dtype=dtype, seed=5)
    ids = torch.tensor([1, 0, 2, 3, 1, 2])
    w, b, wd, bd = ln_params(dtype, slots)
    down_w, down_b, up_w, up_b, scaling, _ = adapter_tables(bottleneck, dtype, slots)
    flags = [int(hub[c]) for c in ADAPTER_CONFIG_COLUMNS[1:4]]
    code = ADAPTER_ACTIVATIONS[str(hub["act"])]
    config = torch.tensor([[0] * 6] + [[1, *flags, code, r] for r in (7, 3, 0)])  # slot 0: no adapter
    out = ops.adapter(h, residual, ids, w, b, wd, bd, 1e-12, down_w, down_b, up_w, up_b, scaling, config)
    ref = adapter_ref(h, residual, ids, w, b, wd, bd, 1e-12, down_w, down_b, up_w, up_b, scaling, config)

    name = str(hub["act"])
    act = F.leaky_relu if name == "leakyrelu" else nn.Identity() if name == "identity" else get_activation(name)
    expected = []
    for i, t in enumerate(ids.tolist()):
        layer_norm = nn.LayerNorm(IN, eps=1e-12, dtype=dtype)
        layer_norm.load_state_dict({"weight": w + wd[t], "bias": b + bd[t]})
        r = int(config[t, 5])
        down, up = nn.Linear(IN, r, dtype=dtype), nn.Linear(r, IN, dtype=dtype)
        down.load_state_dict({"weight": down_w[t, :r], "bias": down_b[t, :r]})
        up.load_state_dict({"weight": up_w[t, :, :r], "bias": up_b[t]})
        adapter = None if t == 0 else {**hub, "down": down, "act": act, "up": up, "scaling": scaling[t]}
        with torch.no_grad():
            expected.append(_adapterhub_sublayer(h[i], residual[i], layer_norm, adapter))
    torch.testing.assert_close(out, torch.stack(expected))
    torch.testing.assert_close(ref, torch.stack(expected))


def test_non_contiguous_inputs() -> None:
    ids = task_ids_for("uniform")
    x = randn(BATCH, IN, 5, seed=4).transpose(1, 2)  # [B, 5, in], strided
    y = randn(BATCH, 5, 2 * OUT, seed=5)[..., ::2]
    a = randn(SLOTS, IN, 3, seed=1).transpose(1, 2)
    b = randn(SLOTS, 3, OUT, seed=2).transpose(1, 2)
    scale = randn(2 * SLOTS, seed=3)[::2]
    r = torch.arange(2 * SLOTS)[::2] % 4  # ranks 0..3 of the padded rank 3 tables, strided
    bias = randn(OUT, SLOTS, seed=6).T
    assert not any(t.is_contiguous() for t in (x, y, a, b, scale, bias))
    tol = TOLERANCE[torch.float32]
    torch.testing.assert_close(
        ops.linear_delta(y, x, ids, a, b, scale, r, bias),
        linear_delta_ref(y, x, ids, a, b, scale, r, bias),
        **tol,
    )
    w = randn(LABELS, SLOTS, IN, seed=11).transpose(0, 1)
    wb = randn(SLOTS, LABELS)
    expected = segmented_linear_ref(x, ids, w, wb)
    torch.testing.assert_close(ops.segmented_linear(x, ids, w, wb), expected, **tol)
    gamma, beta = randn(2 * IN, seed=7)[::2], randn(IN, seed=8)
    wd, bd = randn(IN, SLOTS, seed=9).T, randn(IN, SLOTS, seed=10).T
    torch.testing.assert_close(
        ops.layer_norm(x, ids, gamma, beta, wd, bd, 1e-5), layer_norm_ref(x, ids, gamma, beta, wd, bd, 1e-5)
    )
    x_bias, residual = randn(IN, SLOTS, seed=11).T, randn(BATCH, IN, 5, seed=12).transpose(1, 2)
    assert not (x_bias.is_contiguous() or residual.is_contiguous())
    torch.testing.assert_close(
        ops.layer_norm(x, ids, gamma, beta, wd, bd, 1e-5, x_bias, residual),
        layer_norm_ref(x, ids, gamma, beta, wd, bd, 1e-5, x_bias, residual),
    )


def test_non_contiguous_inputs_of_the_pet_ops() -> None:
    ids = task_ids_for("uniform").repeat_interleave(2)[::2]  # strided task ids
    x = randn(BATCH, IN, 5, seed=4).transpose(1, 2)  # [B, 5, in], strided
    y = randn(BATCH, 5, 2 * OUT, seed=5)[..., ::2]
    assert not (ids.is_contiguous() or x.is_contiguous() or y.is_contiguous())
    tol = TOLERANCE[torch.float32]
    delta = randn(OUT, SLOTS, seed=6).T
    torch.testing.assert_close(ops.scale(y, ids, delta), scale_ref(y, ids, delta), **tol)
    bias = randn(2 * SLOTS, OUT, seed=7)[::2]
    assert not (delta.is_contiguous() or bias.is_contiguous())
    for terms in [(bias, delta), (bias, None), (None, delta)]:
        expected = gelu_delta_ref(y, ids, *terms, "tanh")
        torch.testing.assert_close(ops.gelu_delta(y, ids, *terms, "tanh"), expected, **tol)
    residual = randn(BATCH, OUT, 5, seed=8).transpose(1, 2)
    for terms in [(bias, delta, residual), (None, delta, residual), (bias, None, None)]:
        torch.testing.assert_close(ops.row_delta(y, ids, *terms), row_delta_ref(y, ids, *terms), **tol)
    row_ptr, col, val = sparse_pool(SLOTS, OUT, IN, torch.float32)
    row_ptr, col, val = row_ptr.T.contiguous().T, col.repeat_interleave(2)[::2], val.repeat_interleave(2)[::2]
    assert not (row_ptr.is_contiguous() or col.is_contiguous() or val.is_contiguous())
    expected = sparse_delta_ref(y, x, ids, row_ptr, col, val)
    torch.testing.assert_close(ops.sparse_delta(y, x, ids, row_ptr, col, val), expected, **tol)
    vocab_ids = torch.randint(0, VOCAB, (5, BATCH), generator=gen(14)).T
    e_ptr, e_col, e_val = sparse_pool(SLOTS, VOCAB, IN, torch.float32, seed=40)
    expected = embedding_delta_ref(x, vocab_ids, ids, e_ptr, e_col, e_val)
    torch.testing.assert_close(ops.embedding_delta(x, vocab_ids, ids, e_ptr, e_col, e_val), expected, **tol)
    down_w, down_b, up_w, up_b, scaling, config = adapter_tables(7, torch.float32)
    tables = (down_w.transpose(1, 2).contiguous().transpose(1, 2), down_b, up_w.mT.contiguous().mT, up_b)
    tables += (scaling.repeat_interleave(2)[::2], config.T.contiguous().T)
    residual = randn(BATCH, IN, 5, seed=6).transpose(1, 2)
    args = (x, residual, ids, *ln_params(torch.float32), 1e-5, *tables)
    torch.testing.assert_close(ops.adapter(*args), adapter_ref(*args), **tol)
    h_bias = randn(IN, SLOTS, seed=11).T
    torch.testing.assert_close(ops.adapter(*args, h_bias), adapter_ref(*args, h_bias), **tol)


def test_empty_batch() -> None:
    ids = torch.empty(0, dtype=torch.long)
    x, y = torch.empty(0, 5, IN), torch.empty(0, 5, OUT)
    a, b, scale, r = lora_tables(3, torch.float32)
    bias = randn(SLOTS, OUT)
    assert ops.linear_delta(y, x, ids, a, b, scale, r, bias).shape == (0, 5, OUT)
    assert ops.lora_delta(y, x, ids, a, b, scale, r).shape == (0, 5, OUT)
    assert ops.bias_delta(y, ids, bias).shape == (0, 5, OUT)
    zeros = torch.zeros(SLOTS, IN)
    assert ops.layer_norm(x, ids, zeros[0], zeros[0], zeros, zeros, 1e-5).shape == (0, 5, IN)
    head_w, head_b = randn(SLOTS, LABELS, IN), randn(SLOTS, LABELS)
    assert ops.segmented_linear(x, ids, head_w, head_b).shape == (0, 5, LABELS)
    assert ops.scale(y, ids, bias).shape == (0, 5, OUT)
    assert ops.gelu_delta(y, ids, bias, bias, "none").shape == (0, 5, OUT)
    assert ops.gelu_delta(y, ids, None, None, "tanh").shape == (0, 5, OUT)
    assert ops.row_delta(y, ids, bias, bias, y).shape == (0, 5, OUT)
    assert ops.sparse_delta(y, x, ids, *sparse_pool(SLOTS, OUT, IN, torch.float32)).shape == (0, 5, OUT)
    vocab_ids = torch.empty(0, 5, dtype=torch.long)
    assert ops.embedding_delta(x, vocab_ids, ids, *sparse_pool(SLOTS, VOCAB, IN, torch.float32)).shape == (0, 5, IN)
    assert ops.layer_norm(x, ids, zeros[0], zeros[0], zeros, zeros, 1e-5, zeros, x).shape == (0, 5, IN)
    adapter = adapter_tables(3, torch.float32)
    assert ops.adapter(x, x, ids, *ln_params(torch.float32), 1e-5, *adapter).shape == (0, 5, IN)
    assert ops.adapter(x, x, ids, *ln_params(torch.float32), 1e-5, *adapter, zeros).shape == (0, 5, IN)


def _samples() -> dict[str, tuple[Callable[..., Tensor], tuple[object, ...]]]:
    """One call of each op (and of linear_delta with absent terms) on a mixed 3-D batch."""
    ids = task_ids_for("zipf", batch=5, slots=4)
    x, y = randn(5, 3, 24), randn(5, 3, 40, seed=1)
    a, b, scale, r = lora_tables(3, torch.float32, slots=4, in_f=24, out_f=40)
    bias = randn(4, 40, seed=6)
    hw, hb = randn(4, 6, 24), randn(4, 6)
    wd, bd = randn(4, 24, seed=9), randn(4, 24, seed=10)
    pool = sparse_pool(4, 40, 24, torch.float32, empty=(1,))
    no_pool = (torch.zeros(4, 41, dtype=torch.long), torch.empty(0, dtype=torch.long), torch.empty(0))
    vocab_ids = torch.randint(0, VOCAB, (5, 3), generator=gen(14))
    e_pool = sparse_pool(4, VOCAB, 24, torch.float32, seed=40, empty=(1,))
    adapter = (*ln_params(torch.float32, 4, 24), 1e-5, *adapter_tables(3, torch.float32, slots=4, hidden=24))
    return {
        "lora_delta": (ops.lora_delta.default, (y, x, ids, a, b, scale, r)),
        "bias_delta": (ops.bias_delta.default, (y, ids, bias)),
        "linear_delta": (ops.linear_delta.default, (y, x, ids, a, b, scale, r, bias)),
        "linear_delta_lora_only": (ops.linear_delta.default, (y, x, ids, a, b, scale, r, None)),
        "linear_delta_bias_only": (ops.linear_delta.default, (y, x, ids, None, None, None, None, bias)),
        "layer_norm": (ops.layer_norm.default, (x, ids, randn(24), randn(24, seed=1), wd, bd, 1e-5)),
        "layer_norm_of_a_sum": (
            ops.layer_norm.default,
            (x, ids, randn(24), randn(24, seed=1), wd, bd, 1e-5, randn(4, 24, seed=11), randn(5, 3, 24, seed=12)),
        ),
        "layer_norm_residual_only": (
            ops.layer_norm.default,
            (x, ids, randn(24), randn(24, seed=1), wd, bd, 1e-5, None, randn(5, 3, 24, seed=12)),
        ),
        "segmented_linear": (ops.segmented_linear.default, (x[:, 0], ids, hw, hb)),
        "scale": (ops.scale.default, (y, ids, randn(4, 40, seed=6))),
        "gelu_delta": (ops.gelu_delta.default, (y, ids, bias, randn(4, 40, seed=7), "none")),
        "gelu_delta_bias_only": (ops.gelu_delta.default, (y, ids, bias, None, "tanh")),
        "gelu_delta_scale_only": (ops.gelu_delta.default, (y, ids, None, randn(4, 40, seed=7), "none")),
        "row_delta": (ops.row_delta.default, (y, ids, bias, randn(4, 40, seed=7), randn(5, 3, 40, seed=8))),
        "row_delta_bias_residual": (ops.row_delta.default, (y, ids, bias, None, randn(5, 3, 40, seed=8))),
        "row_delta_scale_only": (ops.row_delta.default, (y, ids, None, randn(4, 40, seed=7), None)),
        "sparse_delta": (ops.sparse_delta.default, (y, x, ids, *pool)),
        "sparse_delta_empty_pool": (ops.sparse_delta.default, (y, x, ids, *no_pool)),
        "embedding_delta": (ops.embedding_delta.default, (x, vocab_ids, ids, *e_pool)),
        "adapter": (ops.adapter.default, (x, randn(5, 3, 24, seed=2), ids, *adapter)),
        "adapter_h_bias": (ops.adapter.default, (x, randn(5, 3, 24, seed=2), ids, *adapter, randn(4, 24, seed=11))),
    }


@pytest.mark.parametrize("name", list(_samples()))
def test_opcheck(name: str) -> None:
    op, args = _samples()[name]
    torch.library.opcheck(op, args)


# The pool of the bad-input calls: P = 6 entries, in = H = 8 columns. Slot 0 holds entries 0..2 (rows 0, 2, 3 of its
# out = 6 rows), slot 3 entries 3..5; slots 1 and 2 have none. The embedding delta (V = 5) uses the same pool.
_BAD_ROW_PTR = torch.tensor([[0, 1, 1, 2, 3, 3, 3], [3] * 7, [3] * 7, [3, 3, 4, 4, 5, 5, 6]])
_BAD_EMB_ROW_PTR = torch.tensor([[0, 2, 2, 3, 3, 3], [0] * 6, [6] * 6, [3, 3, 4, 6, 6, 6]])
_BAD_COL = torch.tensor([0, 7, 3, 1, 2, 5])


def _bad_config(**cells: int) -> Tensor:
    """The adapter config of the bad-input calls (slot 0 none, slots 1..3 enabled, bottlenecks <= R = 3), with
    cells changed: _bad_config(c3_4=9) sets config[3, 4] = 9."""
    config = torch.tensor([[0] * 6, [1, 1, 1, 1, 1, 3], [1, 0, 1, 1, 2, 1], [1, 0, 1, 1, 2, 2]])
    for cell, value in cells.items():
        row, column = cell[1:].split("_")
        config[int(row), int(column)] = value
    return config


def _bad(op: str, **changes: object) -> Callable[[], Tensor]:
    """A call of `op` with one argument replaced (the rest as in a valid 2-row batch with T = 4 slots)."""
    a, b, scale, r = lora_tables(2, torch.float32, slots=4, in_f=8, out_f=6)
    k: dict[str, object] = {
        "y": randn(2, 6),
        "x": randn(2, 8),
        "task_ids": torch.tensor([0, 3]),
        "lora_a": a,
        "lora_b": b,
        "scale": scale,
        "lora_scale": scale,
        "rank": r,
        "bias": randn(4, 6),
        "out_scale": randn(4, 6),
        "weight": randn(4, 6, 8),
        "head_bias": randn(4, 6),
        "ln_weight": randn(8),
        "ln_bias": randn(8),
        "weight_delta": randn(4, 8),
        "bias_delta": randn(4, 8),
        "delta": randn(4, 6),
        "row_ptr": _BAD_ROW_PTR,
        "emb_row_ptr": _BAD_EMB_ROW_PTR,
        "col": _BAD_COL,
        "val": randn(6),
        "ids": torch.tensor([1, 3]),
        "residual": randn(2, 8, seed=1),
        "row_residual": randn(2, 6, seed=2),
        "x_bias": randn(4, 8, seed=3),
        "ln_residual": randn(2, 8, seed=4),
        "h_bias": None,  # the bad calls of h_bias set one
        "down_w": randn(4, 3, 8),
        "down_b": randn(4, 3),
        "up_w": randn(4, 8, 3),
        "up_b": randn(4, 8),
        "scaling": randn(4),
        "config": _bad_config(),
        "approximate": "none",
    }
    k.update(changes)

    def layer_norm_args() -> tuple[object, ...]:
        return (k["x"], k["task_ids"], k["ln_weight"], k["ln_bias"], k["weight_delta"], k["bias_delta"], 1e-5)

    calls: dict[str, Callable[[], Tensor]] = {
        "lora_delta": lambda: ops.lora_delta(
            k["y"], k["x"], k["task_ids"], k["lora_a"], k["lora_b"], k["scale"], k["rank"]
        ),
        "linear_delta": lambda: ops.linear_delta(
            k["y"],
            k["x"],
            k["task_ids"],
            k["lora_a"],
            k["lora_b"],
            k["lora_scale"],
            k["rank"],
            k["bias"],
            k["out_scale"],
        ),
        "bias_delta": lambda: ops.bias_delta(k["y"], k["task_ids"], k["bias"]),
        "layer_norm": lambda: ops.layer_norm(*layer_norm_args()),
        "layer_norm_of_a_sum": lambda: ops.layer_norm(
            *layer_norm_args(), x_bias=k["x_bias"], residual=k["ln_residual"]
        ),
        "segmented_linear": lambda: ops.segmented_linear(k["x"], k["task_ids"], k["weight"], k["head_bias"]),
        "scale": lambda: ops.scale(k["y"], k["task_ids"], k["delta"]),
        "gelu_delta": lambda: ops.gelu_delta(k["y"], k["task_ids"], k["bias"], k["delta"], k["approximate"]),
        "row_delta": lambda: ops.row_delta(k["y"], k["task_ids"], k["bias"], k["delta"], k["row_residual"]),
        "sparse_delta": lambda: ops.sparse_delta(k["y"], k["x"], k["task_ids"], k["row_ptr"], k["col"], k["val"]),
        "embedding_delta": lambda: ops.embedding_delta(
            k["x"], k["ids"], k["task_ids"], k["emb_row_ptr"], k["col"], k["val"]
        ),
        "adapter": lambda: ops.adapter(
            k["x"],
            k["residual"],
            k["task_ids"],
            k["ln_weight"],
            k["ln_bias"],
            k["weight_delta"],
            k["bias_delta"],
            1e-5,
            k["down_w"],
            k["down_b"],
            k["up_w"],
            k["up_b"],
            k["scaling"],
            k["config"],
            h_bias=k["h_bias"],
        ),
    }
    return calls[op]


BAD_CALLS = [
    ("lora_delta", {"lora_a": randn(4, 2, 9)}, r"lora_delta: lora_a has in_features 9, x has 8"),
    ("lora_delta", {"lora_b": randn(4, 7, 2)}, r"lora_b has out_features 7, y has 6"),
    ("lora_delta", {"lora_b": randn(4, 6, 3)}, r"lora_b has rank 3, lora_a has rank 2"),
    ("lora_delta", {"scale": randn(5)}, r"one slot count T, got lora_a \[4, 2, 8\], .* scale \[5\]"),
    ("lora_delta", {"lora_a": randn(4, 2, 8, dtype=torch.float64)}, r"lora_a has dtype Double, x has Float"),
    ("lora_delta", {"task_ids": torch.tensor([0, 4])}, r"task_ids\[1\] = 4 is not a slot of lora_a, .*T = 4"),
    ("lora_delta", {"task_ids": torch.tensor([-1, 0])}, r"task_ids\[0\] = -1 is not a slot"),
    ("lora_delta", {"task_ids": torch.tensor([0, 1], dtype=torch.int32)}, r"task_ids must be int64, got Int"),
    ("lora_delta", {"task_ids": torch.tensor([0, 1, 2])}, r"B = x.size\(0\) = 2, got shape \[3\]"),
    ("lora_delta", {"y": randn(2, 3, 6)}, r"same dims but the last, got y \[2, 3, 6\] and x \[2, 8\]"),
    ("lora_delta", {"x": randn(8)}, r"x must be \[B, ..., features\] .*got shape \[8\]"),
    ("lora_delta", {"lora_a": randn(2, 8)}, r"lora_a must be a 3-D table .*got shape \[2, 8\]"),
    ("linear_delta", {"lora_b": None}, r"given together or all be None, got lora_a given, lora_b None"),
    ("lora_delta", {"rank": torch.tensor([0, 1, 2])}, r"rank must be an int64 \[T\] table with T = 4"),
    ("lora_delta", {"rank": torch.tensor([0, 1, 1, 5])}, r"rank\[3\] = 5 is outside \[0, 2\]"),
    ("linear_delta", {"bias": randn(4, 5)}, r"linear_delta: bias has out_features 5, y has 6"),
    ("linear_delta", {"bias": randn(3, 6)}, r"task_ids\[1\] = 3 is not a slot of bias, which has T = 3"),
    ("linear_delta", {"out_scale": randn(4, 5)}, r"linear_delta: out_scale has features 5, y has 6"),
    ("linear_delta", {"out_scale": randn(3, 6)}, r"task_ids\[1\] = 3 is not a slot of out_scale, which has T = 3"),
    ("bias_delta", {"bias": randn(4, 6, dtype=torch.float64)}, r"bias has dtype Double, y has Float"),
    ("layer_norm", {"ln_weight": randn(7)}, r"weight must be \[H\] with H = x.size\(-1\) = 8, got .*\[7\]"),
    ("layer_norm", {"bias_delta": randn(4, 9)}, r"bias_delta must be \[T, H\] with H = x.size\(-1\) = 8"),
    ("layer_norm", {"bias_delta": randn(3, 8)}, r"weight_delta \[4, 8\], bias_delta \[3, 8\]"),
    (
        "layer_norm_of_a_sum",
        {"x_bias": randn(4, 7)},
        r"layer_norm: x_bias must be \[T, H\] with H = x.size\(-1\) = 8, got shape \[4, 7\]",
    ),
    ("layer_norm_of_a_sum", {"x_bias": randn(8)}, r"layer_norm: x_bias must be a 2-D table .*got shape \[8\]"),
    ("layer_norm_of_a_sum", {"x_bias": randn(4, 8, dtype=torch.float16)}, r"layer_norm: x_bias has dtype Half, x has"),
    ("layer_norm_of_a_sum", {"x_bias": randn(3, 8)}, r"task_ids\[1\] = 3 is not a slot of x_bias, which has T = 3"),
    (
        "layer_norm_of_a_sum",
        {"ln_residual": randn(2, 1, 8)},
        r"layer_norm: residual must have the shape of x, got residual \[2, 1, 8\] and x \[2, 8\]",
    ),
    (
        "layer_norm_of_a_sum",
        {"ln_residual": randn(2, 8, dtype=torch.float64)},
        r"layer_norm: residual has dtype Double, x has Float",
    ),
    ("segmented_linear", {"weight": randn(4, 6, 9)}, r"weight has in_features 9, x has 8"),
    ("segmented_linear", {"head_bias": randn(4, 5)}, r"got bias \[4, 5\], weight \[4, 6, 8\]"),
]


BAD_CALLS += [
    ("scale", {"delta": randn(4, 5)}, r"scale: delta has features 5, y has 6 \(delta \[4, 5\], y \[2, 6\]\)"),
    ("scale", {"delta": randn(3, 6)}, r"task_ids\[1\] = 3 is not a slot of delta, which has T = 3"),
    ("scale", {"delta": randn(4, 6, dtype=torch.float64)}, r"delta has dtype Double, y has Float"),
    ("scale", {"delta": randn(6)}, r"delta must be a 2-D table .*got shape \[6\]"),
    ("gelu_delta", {"bias": randn(4, 5)}, r"gelu_delta: bias has out_features 5, y has 6"),
    ("gelu_delta", {"delta": randn(4, 7)}, r"gelu_delta: scale has features 7, y has 6 \(scale \[4, 7\], y \[2, 6\]\)"),
    ("gelu_delta", {"delta": randn(4, 6, dtype=torch.float64)}, r"gelu_delta: scale has dtype Double, y has Float"),
    ("gelu_delta", {"bias": randn(4, 6, dtype=torch.float16)}, r"gelu_delta: bias has dtype Half, y has Float"),
    ("gelu_delta", {"delta": randn(4, 6, 1)}, r"scale must be a 2-D table .*got shape \[4, 6, 1\]"),
    ("gelu_delta", {"task_ids": torch.tensor([0, 3, 1])}, r"gelu_delta: task_ids must be \[B\] .*got shape \[3\]"),
    ("gelu_delta", {"task_ids": torch.tensor([[0, 3]])}, r"B = y.size\(0\) = 2, got shape \[1, 2\]"),
    ("gelu_delta", {"task_ids": torch.tensor([0, 3], dtype=torch.int32)}, r"gelu_delta: task_ids must be int64"),
    ("gelu_delta", {"delta": randn(3, 6)}, r"task_ids\[1\] = 3 is not a slot of scale, which has T = 3"),
    ("gelu_delta", {"bias": randn(2, 6)}, r"task_ids\[1\] = 3 is not a slot of bias, which has T = 2"),
    ("gelu_delta", {"y": randn(6)}, r"gelu_delta: y must be \[B, ..., features\] .*got shape \[6\]"),
    ("gelu_delta", {"approximate": "erf"}, r"approximate must be \"none\" or \"tanh\" \(aten.gelu's\), got \"erf\""),
    (
        "row_delta",
        {"bias": None, "delta": None},
        r"row_delta: bias and scale are both None; at least one must be given",
    ),
    (
        "row_delta",
        {"row_residual": randn(2, 1, 6)},
        r"row_delta: residual must have the shape of y, got residual \[2, 1, 6\] and y \[2, 6\]",
    ),
    (
        "row_delta",
        {"row_residual": randn(2, 5)},
        r"row_delta: residual must have the shape of y, got residual \[2, 5\]",
    ),
    (
        "row_delta",
        {"row_residual": randn(2, 6, dtype=torch.float16)},
        r"row_delta: residual has dtype Half, y has Float",
    ),
    ("row_delta", {"bias": randn(4, 5)}, r"row_delta: bias has out_features 5, y has 6"),
    ("row_delta", {"delta": randn(4, 7)}, r"row_delta: scale has features 7, y has 6 \(scale \[4, 7\], y \[2, 6\]\)"),
    ("row_delta", {"delta": randn(4, 6, dtype=torch.float64)}, r"row_delta: scale has dtype Double, y has Float"),
    ("row_delta", {"bias": randn(3, 6)}, r"row_delta: task_ids\[1\] = 3 is not a slot of bias, which has T = 3"),
    ("row_delta", {"delta": randn(2, 6), "bias": None}, r"task_ids\[1\] = 3 is not a slot of scale, which has T = 2"),
    ("row_delta", {"task_ids": torch.tensor([0, 3], dtype=torch.int32)}, r"row_delta: task_ids must be int64"),
    ("row_delta", {"y": randn(6)}, r"row_delta: y must be \[B, ..., features\] .*got shape \[6\]"),
    (
        "sparse_delta",
        {"row_ptr": torch.zeros(4, 6, dtype=torch.long)},
        r"sparse_delta: row_ptr must be an int64 \[T, out \+ 1\] table with out = y.size\(-1\) = 6, got Long \[4, 6\]",
    ),
    ("sparse_delta", {"col": _BAD_COL.int()}, r"col must be an int64 \[P\] pool, got Int \[6\]"),
    ("sparse_delta", {"val": randn(5)}, r"val must be \[P\] with P = col.size\(0\) = 6, got shape \[5\]"),
    ("sparse_delta", {"val": randn(6, dtype=torch.float64)}, r"val has dtype Double, x has Float"),
    (
        "sparse_delta",
        {"task_ids": torch.tensor([0, 4])},
        r"task_ids\[1\] = 4 is not a slot of row_ptr, which has T = 4",
    ),
    (
        "sparse_delta",
        {"row_ptr": torch.cat([_BAD_ROW_PTR[:3], torch.tensor([[3, 3, 5, 4, 5, 5, 6]])])},
        r"row_ptr\[3, 3\] = 4 is less than row_ptr\[3, 2\] = 5; the offsets of slot 3 must be non-decreasing",
    ),
    (
        "sparse_delta",
        {"row_ptr": torch.cat([torch.tensor([[0, 1, 1, 2, 3, 3, 7]]), _BAD_ROW_PTR[1:]])},
        r"row_ptr\[0, 6\] = 7 is outside the pool \[0, P\] with P = 6 \(slot 0\)",
    ),
    (
        "sparse_delta",
        {"row_ptr": torch.cat([torch.tensor([[-1, 1, 1, 2, 3, 3, 3]]), _BAD_ROW_PTR[1:]])},
        r"row_ptr\[0, 0\] = -1 is outside the pool \[0, P\] with P = 6 \(slot 0 is used by batch row 0\)",
    ),
    (
        "sparse_delta",
        {"col": torch.tensor([0, 8, 3, 1, 2, 5])},
        r"col\[1\] = 8 \(slot 0, row 2\) is outside \[0, in\) with in = x.size\(-1\) = 8",
    ),
    (
        "embedding_delta",
        {"ids": torch.tensor([1, 5])},
        r"embedding_delta: ids\[1\] = 5 is not a row of the embedding delta, which has V = 5 rows",
    ),
    (
        "embedding_delta",
        {"x": randn(2, 3, 8), "ids": torch.tensor([[0, 1, 2], [3, 4, 7]])},
        r"ids\[1, 2\] = 7 is not a row of the embedding delta, .*ids must be in \[0, 5\)",
    ),
    (
        "embedding_delta",
        {"ids": torch.tensor([[1, 2]])},
        r"ids must be int64 with the shape of y without its last dim, \[2\], got Long \[1, 2\]",
    ),
    ("embedding_delta", {"ids": torch.tensor([1, 3], dtype=torch.int32)}, r"ids must be int64 .*got Int \[2\]"),
    (
        "embedding_delta",
        {"col": torch.tensor([0, 9, 3, 1, 2, 5])},
        r"col\[1\] = 9 \(slot 0, row 0\) is outside \[0, H\) with H = y.size\(-1\) = 8",
    ),
    ("embedding_delta", {"emb_row_ptr": _BAD_EMB_ROW_PTR.int()}, r"row_ptr must be an int64 \[T, V \+ 1\] table"),
    ("adapter", {"residual": randn(2, 7)}, r"adapter: residual must have the shape of h, got residual \[2, 7\] and h"),
    ("adapter", {"residual": randn(2, 8, dtype=torch.float64)}, r"residual has dtype Double, h has Float"),
    ("adapter", {"ln_weight": randn(7)}, r"adapter: ln_weight must be \[H\] with H = h.size\(-1\) = 8"),
    (
        "adapter",
        {"down_w": randn(4, 3, 9)},
        r"down_w must be \[T, R, H\] with H = h.size\(-1\) = 8, got shape \[4, 3, 9\]",
    ),
    (
        "adapter",
        {"down_b": randn(4, 2)},
        r"down_b must be \[T, R\] = \[4, 3\] like down_w \[4, 3, 8\], got shape \[4, 2\]",
    ),
    ("adapter", {"up_w": randn(4, 3, 8)}, r"up_w must be \[T, H, R\] = \[4, 8, 3\] like down_w"),
    ("adapter", {"up_b": randn(4, 7)}, r"up_b must be \[T, H\] = \[4, 8\], got shape \[4, 7\]"),
    ("adapter", {"scaling": randn(4, dtype=torch.float64)}, r"scaling has dtype Double, h has Float"),
    ("adapter", {"scaling": randn(5)}, r"scaling must be \[T\] with T = 4"),
    (
        "adapter",
        {"config": _bad_config()[:, :5]},
        r"config must be an int64 \[T, 6\] table \(enabled, .*, bottleneck\) with T = 4, got Long \[4, 5\]",
    ),
    (
        "adapter",
        {"weight_delta": randn(3, 8), "bias_delta": randn(3, 8)},
        r"LayerNorm deltas and the adapter tables must have one slot count T, got ln_weight_delta \[3, 8\], down_w",
    ),
    ("adapter", {"task_ids": torch.tensor([0, 4])}, r"task_ids\[1\] = 4 is not a slot of config, which has T = 4"),
    ("adapter", {"h_bias": randn(4, 9)}, r"adapter: h_bias must be \[T, H\] with H = h.size\(-1\) = 8, got .*\[4, 9\]"),
    ("adapter", {"h_bias": randn(4, 8, dtype=torch.float64)}, r"adapter: h_bias has dtype Double, h has Float"),
    ("adapter", {"h_bias": randn(3, 8)}, r"adapter: task_ids\[1\] = 3 is not a slot of h_bias, which has T = 3"),
    (
        "adapter",
        {"config": _bad_config(c3_4=9)},
        r"slot 3 has the unknown activation code 9 \(config\[3, 4\]\); the codes are 0 identity, 1 relu",
    ),
    ("adapter", {"config": _bad_config(c3_4=-1)}, r"slot 3 has the unknown activation code -1"),
    ("adapter", {"config": _bad_config(c3_1=2)}, r"config\[3, 1\] = 2 \(original_ln_before of slot 3\) must be 0 or 1"),
    (
        "adapter",
        {"config": _bad_config(c3_5=4)},
        r"config\[3, 5\] = 4 \(bottleneck of slot 3\) is outside \[0, R\] with R = 3",
    ),
]


def test_only_the_slots_a_batch_uses_are_checked() -> None:
    """Bad offsets, columns or config in a slot no row uses (a slot being loaded, say) do not fail a batch."""
    row_ptr, e_ptr = _BAD_ROW_PTR.clone(), _BAD_EMB_ROW_PTR.clone()
    row_ptr[1] = torch.tensor([9, 2, 1, 0, -5, 4, 3])
    e_ptr[2] = torch.tensor([5, 4, 3, 2, 1, 0])
    assert _bad("sparse_delta", row_ptr=row_ptr)().shape == (2, 6)
    assert _bad("embedding_delta", emb_row_ptr=e_ptr)().shape == (2, 8)
    assert _bad("adapter", config=_bad_config(c1_4=99, c2_5=7, c2_0=5))().shape == (2, 8)


@pytest.mark.parametrize(
    "op",
    [
        "lora_delta",
        "linear_delta",
        "bias_delta",
        "layer_norm",
        "layer_norm_of_a_sum",
        "segmented_linear",
        "scale",
        "gelu_delta",
        "row_delta",
        "sparse_delta",
        "embedding_delta",
        "adapter",
    ],
)
def test_the_call_that_bad_inputs_start_from_is_valid(op: str) -> None:
    assert _bad(op)().shape[0] == 2


@pytest.mark.parametrize(("op", "changes", "message"), BAD_CALLS, ids=[m for _, _, m in BAD_CALLS])
def test_bad_inputs_raise_with_shapes_in_the_message(op: str, changes: dict[str, object], message: str) -> None:
    with pytest.raises(RuntimeError, match=message):
        _bad(op, **changes)()


class _SiteModule(nn.Module):
    """A linear site followed by one pets op (`op`), with the tables of every op as buffers."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.linear = nn.Linear(IN, OUT)
        a, b, scale, r = lora_tables(3, torch.float32, slots=4)
        for name, t in {"a": a, "b": b, "scale": scale, "rank": r, "bias": randn(4, OUT, seed=6)}.items():
            self.register_buffer(name, t)
        self.register_buffer("ln_delta", randn(2, 4, OUT, seed=9, std=0.1))
        self.register_buffer("head_w", randn(4, LABELS, OUT, seed=11, std=OUT**-0.5))
        self.register_buffer("head_b", randn(4, LABELS, seed=12))
        self.register_buffer("ia3", randn(4, OUT, seed=13, std=0.3))
        for prefix, pool in [
            ("", sparse_pool(4, OUT, IN, torch.float32)),
            ("emb_", sparse_pool(4, VOCAB, OUT, torch.float32)),
        ]:
            for name, t in zip(("row_ptr", "col", "val"), pool, strict=True):
                self.register_buffer(prefix + name, t)
        adapter = adapter_tables(5, torch.float32, slots=4, hidden=OUT)
        for name, t in zip(("down_w", "down_b", "up_w", "up_b", "scaling", "config"), adapter, strict=True):
            self.register_buffer(f"adapter_{name}", t)

    def _adapter_args(self, y: Tensor, task_ids: Tensor) -> tuple[object, ...]:
        w, b = self.linear.weight[:, 0], self.linear.bias
        tables = (self.adapter_down_w, self.adapter_down_b, self.adapter_up_w, self.adapter_up_b)
        ln = (w, b, self.ln_delta[0], self.ln_delta[1], 1e-12)
        return (y, torch.tanh(y), task_ids, *ln, *tables, self.adapter_scaling, self.adapter_config)

    @staticmethod
    def _vocab_ids(x: Tensor) -> Tensor:
        return (x[..., 0].abs() * 1000).long() % VOCAB

    def forward(self, x: Tensor, task_ids: Tensor) -> Tensor:
        y = self.linear(x)
        if self.op == "lora_delta":
            return ops.lora_delta(y, x, task_ids, self.a, self.b, self.scale, self.rank)
        if self.op == "bias_delta":
            return ops.bias_delta(y, task_ids, self.bias)
        if self.op == "linear_delta":
            return ops.linear_delta(y, x, task_ids, self.a, self.b, self.scale, self.rank, self.bias)
        if self.op == "layer_norm":
            w, b = self.linear.weight[:, 0], self.linear.bias
            return ops.layer_norm(y, task_ids, w, b, self.ln_delta[0], self.ln_delta[1], 1e-12)
        if self.op == "layer_norm_of_a_sum":
            w, b = self.linear.weight[:, 0], self.linear.bias
            ln = (w, b, self.ln_delta[0], self.ln_delta[1], 1e-12)
            return ops.layer_norm(y, task_ids, *ln, x_bias=self.bias, residual=torch.tanh(y))
        if self.op == "scale":
            return ops.scale(y, task_ids, self.ia3)
        if self.op == "gelu_delta":
            return ops.gelu_delta(y, task_ids, self.bias, self.ia3, "tanh")
        if self.op == "row_delta":
            return ops.row_delta(y, task_ids, self.bias, self.ia3, torch.tanh(y))
        if self.op == "sparse_delta":
            return ops.sparse_delta(y, x, task_ids, self.row_ptr, self.col, self.val)
        if self.op == "embedding_delta":
            ids = self._vocab_ids(x)
            return ops.embedding_delta(y, ids, task_ids, self.emb_row_ptr, self.emb_col, self.emb_val)
        if self.op == "adapter":
            return ops.adapter(*self._adapter_args(y, task_ids))
        if self.op == "adapter_h_bias":
            return ops.adapter(*self._adapter_args(y, task_ids), h_bias=self.bias)
        return ops.segmented_linear(y[:, 0], task_ids, self.head_w, self.head_b)

    def reference(self, x: Tensor, task_ids: Tensor) -> Tensor:
        y = self.linear(x)
        if self.op == "lora_delta":
            return lora_delta_ref(y, x, task_ids, self.a, self.b, self.scale, self.rank)
        if self.op == "bias_delta":
            return bias_delta_ref(y, task_ids, self.bias)
        if self.op == "linear_delta":
            return linear_delta_ref(y, x, task_ids, self.a, self.b, self.scale, self.rank, self.bias)
        if self.op == "layer_norm":
            w, b = self.linear.weight[:, 0], self.linear.bias
            return layer_norm_ref(y, task_ids, w, b, self.ln_delta[0], self.ln_delta[1], 1e-12)
        if self.op == "layer_norm_of_a_sum":
            w, b = self.linear.weight[:, 0], self.linear.bias
            ln = (w, b, self.ln_delta[0], self.ln_delta[1], 1e-12)
            return layer_norm_ref(y, task_ids, *ln, x_bias=self.bias, residual=torch.tanh(y))
        if self.op == "scale":
            return scale_ref(y, task_ids, self.ia3)
        if self.op == "gelu_delta":
            return gelu_delta_ref(y, task_ids, self.bias, self.ia3, "tanh")
        if self.op == "row_delta":
            return row_delta_ref(y, task_ids, self.bias, self.ia3, torch.tanh(y))
        if self.op == "sparse_delta":
            return sparse_delta_ref(y, x, task_ids, self.row_ptr, self.col, self.val)
        if self.op == "embedding_delta":
            ids = self._vocab_ids(x)
            return embedding_delta_ref(y, ids, task_ids, self.emb_row_ptr, self.emb_col, self.emb_val)
        if self.op == "adapter":
            return adapter_ref(*self._adapter_args(y, task_ids))
        if self.op == "adapter_h_bias":
            return adapter_ref(*self._adapter_args(y, task_ids), h_bias=self.bias)
        return segmented_linear_ref(y[:, 0], task_ids, self.head_w, self.head_b)


EXPORTED_OPS = [
    *("lora_delta", "bias_delta", "linear_delta", "layer_norm", "segmented_linear"),
    *("scale", "gelu_delta", "row_delta", "sparse_delta", "embedding_delta", "adapter"),
    *("layer_norm_of_a_sum", "adapter_h_bias"),
]
OP_OF_CASE = {"layer_norm_of_a_sum": "layer_norm", "adapter_h_bias": "adapter"}  # the op of a case with optional args


@pytest.mark.parametrize("op", EXPORTED_OPS)
def test_export_save_load_with_dynamic_batch(op: str, tmp_path) -> None:
    model = _SiteModule(op).eval()
    batch, seq = Dim("batch", min=1, max=1024), Dim("seq", min=1, max=512)
    example = (randn(3, 6, IN, seed=4), torch.tensor([0, 3, 1]))
    ep = torch.export.export(model, example, dynamic_shapes=({0: batch, 1: seq}, {0: batch}), strict=False)
    torch.export.save(ep, tmp_path / "site.pt2")
    loaded = torch.export.load(tmp_path / "site.pt2")
    targets = {str(n.target) for n in loaded.graph.nodes if n.op == "call_function"}
    assert f"pets.{OP_OF_CASE.get(op, op)}.default" in targets
    # Batches larger and smaller than the T = 4 slots: the fakes put no guard between the two.
    for rows, tokens, seed in [(11, 2, 1), (1, 9, 2)]:
        x, ids = randn(rows, tokens, IN, seed=seed), task_ids_for("uniform", batch=rows, slots=4, seed=seed)
        with torch.no_grad():
            torch.testing.assert_close(loaded.module()(x, ids), model.reference(x, ids), rtol=1e-5, atol=1e-5)


def test_importing_again_keeps_the_ops_and_fakes() -> None:
    importlib.reload(custom_ops.fake)
    importlib.reload(custom_ops)
    with torch._subclasses.fake_tensor.FakeTensorMode():
        x, ids = torch.empty(7, IN), torch.zeros(7, dtype=torch.long)
        out = ops.segmented_linear(x, ids, torch.empty(SLOTS, LABELS, IN), torch.empty(SLOTS, LABELS))
    assert out.shape == (7, LABELS)
