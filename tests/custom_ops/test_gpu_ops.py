"""The CUDA kernels of every pets op (csrc/cuda) against their float64 torch references: task mixes (one task, all
distinct, uniform, Zipf-skewed, sorted), per-slot ranks up to 128 with non-zero table padding, sizes that are not
tile multiples (token counts that leave partial tiles, 72/200 features), the row kernels' vector path at 768 to
3072 features, bert-base sizes (shared-memory opt-in above 48 KiB), fp32/fp16/bf16; then what must hold bitwise,
batch independence and the input checks."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from pets_compiler.custom_ops import (
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
    IN,
    LABELS,
    LN_TERMS,
    MIXES,
    OUT,
    ROW_TERMS,
    SLOTS,
    TOLERANCE,
    VOCAB,
    adapter_tables,
    bits,
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

pytestmark = pytest.mark.gpu
ops = torch.ops.pets
GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GPU_TOKENS = [(), (5,), (37,)]  # [B, F]; [B, S, F] with one partial tile; several tiles and a partial one


def cuda(*args: object) -> list[object]:
    return [a.cuda() if isinstance(a, Tensor) else a for a in args]


def check(op: str, ref: Callable[..., Tensor], args: tuple[object, ...], dtype: torch.dtype) -> Tensor:
    """The op on CUDA against the float64 reference on the CPU; returns the CUDA output."""
    got = getattr(ops, op)(*cuda(*args))
    assert got.is_cuda and got.dtype == dtype and got.is_contiguous()
    want = ref(*[f64(a)[0] if isinstance(a, Tensor) else a for a in args])
    tolerance = (ADAPTER_TOLERANCE if op == "adapter" else TOLERANCE)[dtype]
    torch.testing.assert_close(got.cpu(), want.to(dtype), **tolerance, msg=lambda m: f"{op}: {m}")
    return got


def site(dtype: torch.dtype, tokens: tuple[int, ...], in_f: int = IN, out_f: int = OUT) -> tuple[Tensor, Tensor]:
    return randn(BATCH, *tokens, in_f, dtype=dtype, seed=4), randn(BATCH, *tokens, out_f, dtype=dtype, seed=5)


@pytest.mark.parametrize("tokens", GPU_TOKENS, ids=["2d", "3d", "3d-long"])
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("rank", [0, 1, 7, 16, 33, 128])
@pytest.mark.parametrize("mix", MIXES)
def test_lora_delta(mix: str, rank: int, dtype: torch.dtype, tokens: tuple[int, ...]) -> None:
    x, y = site(dtype, tokens)
    check("lora_delta", lora_delta_ref, (y, x, task_ids_for(mix), *lora_tables(rank, dtype)), dtype)


@pytest.mark.parametrize(
    "terms", ["lora+bias", "lora", "bias", "none", "lora+bias+scale", "lora+scale", "bias+scale", "scale"]
)
@pytest.mark.parametrize("rank", [16, 40])  # the split kernels (R <= 16) and the tensor-core one
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("seq", [37, 150])  # the split expand's 64- and 128-token blocks, each with a partial one
def test_linear_delta(mix: str, dtype: torch.dtype, rank: int, terms: str, seq: int) -> None:
    x, y = site(dtype, (seq,))
    lora = lora_tables(rank, dtype) if "lora" in terms else (None,) * 4
    bias = randn(SLOTS, OUT, dtype=dtype, seed=6) if "bias" in terms else None
    out_scale = randn(SLOTS, OUT, dtype=dtype, seed=8, std=0.3) if "scale" in terms else None
    check("linear_delta", linear_delta_ref, (y, x, task_ids_for(mix), *lora, bias, out_scale), dtype)


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("rank", [8, 40, 200])  # split (fp16/bf16 tensor cores, fp32/fp64 CUDA cores), mma, fallback
@pytest.mark.parametrize("seq", [37, 150])
def test_linear_delta_out_scale_rounds_as_the_scale_op(dtype: torch.dtype, rank: int, seq: int) -> None:
    """Every kernel path applies the output scale to its rounded result as pets::scale after it would: bitwise the
    unfused pair; a zero slot's rows are the unscaled result bit for bit."""
    ids = task_ids_for("uniform").cuda()
    x, y = (t.cuda() for t in site(dtype, (seq,)))
    lora = [t.cuda() for t in lora_tables(rank, dtype)]
    bias = randn(SLOTS, OUT, dtype=dtype, seed=6).cuda()
    out_scale = randn(SLOTS, OUT, dtype=dtype, seed=8, std=0.3).cuda()
    out_scale[ids[0]] = 0
    unscaled = ops.linear_delta(y, x, ids, *lora, bias)
    fused = ops.linear_delta(y, x, ids, *lora, bias, out_scale)
    assert torch.equal(bits(fused), bits(ops.scale(unscaled, ids, out_scale)))
    same = ids == ids[0]
    assert torch.equal(bits(fused[same]), bits(unscaled[same])) and not torch.equal(fused[~same], unscaled[~same])


@pytest.mark.parametrize("tokens", GPU_TOKENS, ids=["2d", "3d", "3d-long"])
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("mix", MIXES)
def test_row_ops_and_layer_norm(mix: str, dtype: torch.dtype, tokens: tuple[int, ...]) -> None:
    ids = task_ids_for(mix)
    x, y = site(dtype, tokens)
    check("bias_delta", bias_delta_ref, (y, ids, randn(SLOTS, OUT, dtype=dtype, seed=6)), dtype)
    check("scale", scale_ref, (y, ids, randn(SLOTS, OUT, dtype=dtype, seed=7, std=0.3)), dtype)
    check("layer_norm", layer_norm_ref, (x * 3 + 1, ids, *ln_params(dtype), 1e-5), dtype)
    head = (randn(SLOTS, LABELS, IN, dtype=dtype, seed=8), randn(SLOTS, LABELS, dtype=dtype, seed=9))
    check("segmented_linear", segmented_linear_ref, (x, ids, *head), dtype)


@pytest.mark.parametrize("terms", LN_TERMS)
@pytest.mark.parametrize("tokens", GPU_TOKENS, ids=["2d", "3d", "3d-long"])
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("mix", MIXES)
def test_layer_norm_of_a_sum(mix: str, dtype: torch.dtype, tokens: tuple[int, ...], terms: str) -> None:
    """The register path (72 features: whole 16-byte vectors), x_bias's row staged per block; 5 and 37 tokens a row
    put blocks of 8 tokens across batch rows, whose tokens of the other slot read their row from global memory."""
    x = randn(BATCH, *tokens, IN, dtype=dtype, seed=4, std=3.0)
    check("layer_norm", layer_norm_ref, (x, task_ids_for(mix), *ln_params(dtype), 1e-5, *ln_terms(terms, x)), dtype)


# Hidden sizes of pets::layer_norm's and pets::adapter's two paths: bert-base's 768 in registers; 75 (not whole
# 16-byte vectors) and 1544 (fp16: 193 vectors, past the 128 a warp holds; fp32: 386) by the generic kernels.
NORM_HIDDEN = [768, 75, 1544]


@pytest.mark.parametrize("hidden", NORM_HIDDEN)
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_layer_norm_of_a_sum_at_each_path(dtype: torch.dtype, hidden: int) -> None:
    """Every combination of terms at each path's sizes, 45 and 1 tokens a row; then x_bias and residual off 16-byte
    alignment (the generic kernel at 768)."""
    ids = torch.tensor([3, 0, 7, 3, 5])
    ln = ln_params(dtype, slots=8, hidden=hidden)
    for tokens in [(45,), ()]:
        x = randn(5, *tokens, hidden, dtype=dtype, seed=4, std=3.0)
        for terms in LN_TERMS:
            check("layer_norm", layer_norm_ref, (x, ids, *ln, 1e-12, *ln_terms(terms, x, slots=8)), dtype)
    if hidden == 768:
        x = randn(5, 45, hidden, dtype=dtype, seed=4, std=3.0)
        x_bias, residual = ln_terms("bias+residual", x, slots=8)
        assert x_bias is not None and residual is not None
        want = layer_norm_ref(*f64(x, ids, *ln), 1e-12, *f64(x_bias, residual)).to(dtype)
        for terms in [(misaligned(x_bias), residual), (x_bias, misaligned(residual))]:
            got = ops.layer_norm(*cuda(x, ids, *ln, 1e-12), *cuda(*terms))
            torch.testing.assert_close(got.cpu(), want, **TOLERANCE[dtype])


def gelu_tables(terms: str, dtype: torch.dtype, slots: int = SLOTS, f: int = OUT) -> tuple[Tensor | None, ...]:
    """BitFit bias deltas and IA3 scales (l - 1) around an FFN's GELU, as `terms` asks."""
    bias = randn(slots, f, dtype=dtype, seed=6, std=0.5) if "bias" in terms else None
    scale = randn(slots, f, dtype=dtype, seed=7, std=0.3) if "scale" in terms else None
    return bias, scale


# (terms, approximate): both forms with both terms, each term alone, and neither (aten's own kernel).
GELU_CASES = [("bias+scale", "none"), ("bias+scale", "tanh"), ("bias", "none"), ("scale", "tanh"), ("none", "none")]


@pytest.mark.parametrize(("terms", "approximate"), GELU_CASES, ids=[f"{t}-{a}" for t, a in GELU_CASES])
@pytest.mark.parametrize("tokens", GPU_TOKENS, ids=["2d", "3d", "3d-long"])
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("mix", MIXES)
def test_gelu_delta(mix: str, dtype: torch.dtype, tokens: tuple[int, ...], terms: str, approximate: str) -> None:
    y = randn(BATCH, *tokens, OUT, dtype=dtype, seed=5, std=2.0)
    check("gelu_delta", gelu_delta_ref, (y, task_ids_for(mix), *gelu_tables(terms, dtype), approximate), dtype)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_gelu_delta_scalar_path(dtype: torch.dtype, approximate: str) -> None:
    """Features that are not a multiple of a 16-byte vector, and a table that is not 16-byte aligned."""
    ids = task_ids_for("uniform")
    y = randn(BATCH, 37, 75, dtype=dtype, seed=5, std=2.0)
    bias, scale = gelu_tables("bias+scale", dtype, f=75)
    check("gelu_delta", gelu_delta_ref, (y, ids, bias, scale, approximate), dtype)
    y = randn(BATCH, 37, OUT, dtype=dtype, seed=5)
    bias = randn(SLOTS * OUT + 1, dtype=dtype, seed=6).cuda()[1:].view(SLOTS, OUT)  # made on the device: offset kept
    got = ops.gelu_delta(y.cuda(), ids.cuda(), bias, None, approximate)
    want = gelu_delta_ref(*f64(y, ids, bias.cpu()), None, approximate)
    torch.testing.assert_close(got.cpu(), want.to(dtype), **TOLERANCE[dtype])


@pytest.mark.parametrize("terms", ROW_TERMS)
@pytest.mark.parametrize("tokens", GPU_TOKENS, ids=["2d", "3d", "3d-long"])
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("mix", MIXES)
def test_row_delta(mix: str, dtype: torch.dtype, tokens: tuple[int, ...], terms: str) -> None:
    y = randn(BATCH, *tokens, OUT, dtype=dtype, seed=5, std=2.0)
    check("row_delta", row_delta_ref, (y, task_ids_for(mix), *row_operands(terms, y)), dtype)


def misaligned(t: Tensor) -> Tensor:
    """t on the device one element past a 16-byte boundary (made there: a copy would realign it)."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device="cuda")[1:]
    return flat.copy_(t.flatten().cuda()).view(t.shape)


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_row_delta_scalar_path(dtype: torch.dtype) -> None:
    """Features that are not a multiple of a 16-byte vector, and a table or residual that is not 16-byte aligned."""
    ids = task_ids_for("uniform")
    y = randn(BATCH, 37, 75, dtype=dtype, seed=5, std=2.0)
    for terms in ROW_TERMS:
        check("row_delta", row_delta_ref, (y, ids, *row_operands(terms, y)), dtype)
    y = randn(BATCH, 37, OUT, dtype=dtype, seed=5, std=2.0)
    bias, scale, residual = row_operands("bias+scale+residual", y)
    assert bias is not None and scale is not None and residual is not None
    want = row_delta_ref(*f64(y, ids, bias, scale, residual)).to(dtype)
    for operands in [(misaligned(bias), scale, residual), (bias, scale, misaligned(residual))]:
        got = ops.row_delta(*cuda(y, ids, *operands))
        torch.testing.assert_close(got.cpu(), want, **TOLERANCE[dtype])


# Feature counts of the row kernels' vector path, whose threads share a block's (token, vector) pairs evenly:
# bert-base's hidden and intermediate sizes (fp16: 96 and 384 vectors of 16 bytes, fewer and more than a block's
# 256 threads) and 257 fp16 vectors (a step of 256 that wraps around a row by one).
ROW_FEATURES = [768, 3072, 2056]


@pytest.mark.parametrize("features", ROW_FEATURES)
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_row_kernels_at_wide_rows(dtype: torch.dtype, features: int) -> None:
    """Every op of the row kernels over 45 tokens a row (two full blocks of 16 tokens and a partial one) and one
    token rows, each row's slot its own."""
    slots = 8
    ids = torch.tensor([3, 0, 7, 3, 5])
    for tokens in [(45,), ()]:
        y = randn(5, *tokens, features, dtype=dtype, seed=5, std=2.0)
        bias, scale, _ = row_operands("bias+scale", y, slots)
        check("bias_delta", bias_delta_ref, (y, ids, bias), dtype)
        check("scale", scale_ref, (y, ids, scale), dtype)
        check("gelu_delta", gelu_delta_ref, (y, ids, bias, scale, "none"), dtype)
        for terms in ROW_TERMS:
            check("row_delta", row_delta_ref, (y, ids, *row_operands(terms, y, slots)), dtype)


@pytest.mark.parametrize("tokens", GPU_TOKENS, ids=["2d", "3d", "3d-long"])
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("mix", MIXES)
def test_sparse_ops(mix: str, dtype: torch.dtype, tokens: tuple[int, ...]) -> None:
    ids = task_ids_for(mix)
    x, y = site(dtype, tokens)
    check("sparse_delta", sparse_delta_ref, (y, x, ids, *sparse_pool(SLOTS, OUT, IN, dtype)), dtype)
    vocab_ids = torch.randint(0, VOCAB, (BATCH, *tokens), generator=gen(14))
    emb = randn(BATCH, *tokens, IN, dtype=dtype, seed=5)
    check("embedding_delta", embedding_delta_ref, (emb, vocab_ids, ids, *sparse_pool(SLOTS, VOCAB, IN, dtype)), dtype)


@pytest.mark.parametrize("tokens", [(), (5,), (37,), (16,)], ids=["2d", "3d", "3d-long", "3d-groups"])
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("bottleneck", [5, 64])
@pytest.mark.parametrize("mix", MIXES)
def test_adapter(mix: str, bottleneck: int, dtype: torch.dtype, tokens: tuple[int, ...]) -> None:
    ids = task_ids_for(mix)
    h, residual = randn(BATCH, *tokens, IN, dtype=dtype, seed=4), randn(BATCH, *tokens, IN, dtype=dtype, seed=5)
    args = (h, residual, ids, *ln_params(dtype), 1e-5, *adapter_tables(bottleneck, dtype))
    check("adapter", adapter_ref, args, dtype)


@pytest.mark.parametrize("tokens", [(), (5,), (37,)], ids=["2d", "3d", "3d-long"])
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("bottleneck", [5, 64])
@pytest.mark.parametrize("mix", MIXES)
def test_adapter_with_h_bias(mix: str, bottleneck: int, dtype: torch.dtype, tokens: tuple[int, ...]) -> None:
    """The register path (72 features) with h_bias, over adapter_tables' configs (LN before the adapter or not, the
    residual from h or not): h + h_bias[t] wherever h is read."""
    ids = task_ids_for(mix)
    h, residual = randn(BATCH, *tokens, IN, dtype=dtype, seed=4), randn(BATCH, *tokens, IN, dtype=dtype, seed=5)
    h_bias = randn(SLOTS, IN, dtype=dtype, seed=11, std=0.5)
    args = (h, residual, ids, *ln_params(dtype), 1e-5, *adapter_tables(bottleneck, dtype), h_bias)
    check("adapter", adapter_ref, args, dtype)


@pytest.mark.parametrize("tokens", [(), (8,)], ids=["2d", "3d-groups"])
def test_adapter_past_the_rows_its_blocks_list(tokens: tuple[int, ...]) -> None:
    """More batch rows than adapter_out's blocks list (2,048): every row counts as busy, answers unchanged; rows
    of slots with and without an adapter mixed."""
    ids = task_ids_for("uniform", batch=2100)
    h = randn(2100, *tokens, IN, dtype=torch.float16, seed=4)
    residual = randn(2100, *tokens, IN, dtype=torch.float16, seed=5)
    args = (h, residual, ids, *ln_params(torch.float16), 1e-5, *adapter_tables(16, torch.float16))
    check("adapter", adapter_ref, args, torch.float16)


@pytest.mark.parametrize("hidden", NORM_HIDDEN)
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_adapter_with_h_bias_at_each_path(dtype: torch.dtype, hidden: int) -> None:
    """h_bias at each path's sizes (the generic kernel also for padded bottleneck 0 and for h_bias off 16-byte
    alignment at 768), 45 and 1 tokens a row; rows without an adapter are pets::layer_norm of the same sum, bitwise
    (the two ops share their LayerNorm code on each path)."""
    ids = torch.tensor([3, 0, 7, 3, 5, 6])  # slot 0: no adapter; slot 6: disabled
    ln = ln_params(dtype, slots=8, hidden=hidden)
    tables = adapter_tables(16, dtype, slots=8, hidden=hidden)
    h_bias = randn(8, hidden, dtype=dtype, seed=11, std=0.5)
    for tokens in [(45,), ()]:
        h = randn(6, *tokens, hidden, dtype=dtype, seed=4)
        residual = randn(6, *tokens, hidden, dtype=dtype, seed=5)
        got = check("adapter", adapter_ref, (h, residual, ids, *ln, 1e-12, *tables, h_bias), dtype)
        plain = ops.layer_norm(*cuda(h, ids, *ln, 1e-12, h_bias, residual))
        assert torch.equal(bits(got[[1, 5]]), bits(plain[[1, 5]]))
    down_w, down_b, up_w, up_b, scaling, config = tables
    config = config.clone()
    config[:, 5] = 0
    no_units = (down_w[:, :0], down_b[:, :0], up_w[..., :0], up_b, scaling, config)
    check("adapter", adapter_ref, (h, residual, ids, *ln, 1e-12, *no_units, h_bias), dtype)
    if hidden == 768:
        want = adapter_ref(*f64(h, residual, ids, *ln), 1e-12, *f64(*tables, h_bias)).to(dtype)
        got = ops.adapter(*cuda(h, residual, ids, *ln, 1e-12, *tables), misaligned(h_bias))
        torch.testing.assert_close(got.cpu(), want, **ADAPTER_TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_bert_base_sizes(dtype: torch.dtype) -> None:
    """Hidden 768 and intermediate 3072 over 32 slots, 128 tokens a row: the sizes the benchmark runs, and the
    sparse kernel's staged activations above 48 KiB of shared memory (3072 inputs)."""
    slots, batch, seq, hidden, inter = 32, 6, 128, 768, 3072
    ids = torch.randint(0, slots, (batch,), generator=gen(1))
    x, y = randn(batch, seq, inter, dtype=dtype, seed=2, std=0.5), randn(batch, seq, hidden, dtype=dtype, seed=3)
    a, b, s, r = lora_tables(16, dtype, slots=slots, in_f=inter, out_f=hidden)
    check("lora_delta", lora_delta_ref, (y, x, ids, a, b, s, r), dtype)
    row_ptr, col, val = sparse_pool(slots, hidden, inter, dtype)
    check("sparse_delta", sparse_delta_ref, (y, x, ids, row_ptr, col, val), dtype)
    h = randn(batch, seq, hidden, dtype=dtype, seed=5)
    ln = ln_params(dtype, slots=slots, hidden=hidden)
    args = (h, y, ids, *ln, 1e-12, *adapter_tables(64, dtype, slots=slots, hidden=hidden))
    check("adapter", adapter_ref, args, dtype)
    check("adapter", adapter_ref, (*args, randn(slots, hidden, dtype=dtype, seed=11, std=0.5)), dtype)
    check("layer_norm", layer_norm_ref, (h, ids, *ln, 1e-12, *ln_terms("bias+residual", h, slots)), dtype)
    ffn = randn(batch, seq, inter, dtype=dtype, seed=6, std=2.0)
    check("gelu_delta", gelu_delta_ref, (ffn, ids, *gelu_tables("bias+scale", dtype, slots, inter), "none"), dtype)
    check("row_delta", row_delta_ref, (y, ids, *row_operands("bias+scale+residual", y, slots)), dtype)


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_what_must_stay_bitwise(dtype: torch.dtype) -> None:
    """Rows of slots without a term are y bit for bit; rows without an adapter are pets::layer_norm(h + residual)."""
    ids = torch.arange(BATCH).cuda()
    x, y = (t.cuda() for t in site(dtype, (5,)))
    a, b, s, r = (t.cuda() for t in lora_tables(8, dtype))
    s[::2] = 0
    out = ops.lora_delta(y, x, ids, a, b, s, r)
    zero = ((s == 0) | (r == 0))[ids]
    assert torch.equal(bits(out[zero]), bits(y[zero])) and not torch.equal(out[~zero], y[~zero])
    delta = randn(SLOTS, OUT, dtype=dtype, seed=7).cuda()
    delta[::3] = 0
    out = ops.scale(y, ids, delta)
    assert torch.equal(bits(out[::3]), bits(y[::3]))
    row_ptr, col, val = (t.cuda() for t in sparse_pool(SLOTS, OUT, IN, dtype))  # slots 0 and 7 have no nonzeros
    out = ops.sparse_delta(y, x, ids, row_ptr, col, val)
    assert torch.equal(bits(out[[0, 7]]), bits(y[[0, 7]]))
    h, res = x, randn(BATCH, 5, IN, dtype=dtype, seed=6).cuda()
    ln = [t.cuda() for t in ln_params(dtype)]
    tables = [t.cuda() for t in adapter_tables(7, dtype)]
    out = ops.adapter(h, res, ids, *ln, 1e-5, *tables)
    plain = tables[-1][:, 0][ids] == 0  # slots 0 and 6
    assert torch.equal(bits(out[plain]), bits(ops.layer_norm(h + res, ids, *ln, 1e-5)[plain]))
    # gelu_delta: rows of zero slots are aten.gelu's (the same formula, rounded once); no bias keeps a -0.0. The
    # erf GELU rounded to fp16 / bf16 is gelu.cuh's gelu_erf_fast: within one unit in the last place of aten's.
    y[:, 0, 0] = -0.0
    bias, scale = (t.cuda() for t in gelu_tables("bias+scale", dtype))
    bias[::3], scale[::3] = 0, 0
    for approximate in ("none", "tanh"):
        plain = torch.nn.functional.gelu(y, approximate=approximate)
        exact = dtype == torch.float32 or approximate == "tanh"
        for terms in [(bias, scale), (None, scale), (bias, None)]:
            out = ops.gelu_delta(y, ids, *terms, approximate)
            if exact:
                assert torch.equal(out[::3], plain[::3])
            else:
                ulp = torch.finfo(dtype).eps * plain[::3].float().abs() + 1e-6
                assert bool(((out[::3].float() - plain[::3].float()).abs() <= ulp).all())
            assert not torch.equal(out[1::3], plain[1::3])
        out = ops.gelu_delta(y, ids, None, scale, approximate)
        assert torch.equal(bits(out[::3]), bits(plain[::3])) if exact else bool(torch.signbit(out[::3, 0, 0]).all())
    # row_delta: rows of zero slots are y, or aten.add's y + residual (the sum rounded once); no bias keeps a -0.0.
    residual = randn(BATCH, 5, OUT, dtype=dtype, seed=9).cuda()
    for terms, plain in [((bias, scale, residual), y + residual), ((None, scale, residual), y + residual)]:
        out = ops.row_delta(y, ids, *terms)
        assert torch.equal(bits(out[::3]), bits(plain[::3])) and not torch.equal(out[1::3], plain[1::3])
    out = ops.row_delta(y, ids, None, scale, None)
    assert torch.equal(bits(out[::3]), bits(y[::3]))


def test_rows_do_not_depend_on_the_rest_of_the_batch() -> None:
    """Each kernel works per row: changing the other rows and their slots leaves a row's output bitwise alone."""
    dtype, tokens = torch.float16, (37,)
    x, y = site(dtype, tokens)
    x2, y2 = randn(BATCH, *tokens, IN, dtype=dtype, seed=40), randn(BATCH, *tokens, OUT, dtype=dtype, seed=41)
    x2[0], y2[0] = x[0], y[0]
    ids, ids2 = task_ids_for("uniform"), task_ids_for("distinct")
    ids2[0] = ids[0]
    lora = lora_tables(33, dtype)
    pool = sparse_pool(SLOTS, OUT, IN, dtype)
    adapter = (*ln_params(dtype, hidden=OUT), 1e-5, *adapter_tables(9, dtype, hidden=OUT))
    for op, rest in {"lora_delta": lora, "sparse_delta": pool}.items():
        one = getattr(ops, op)(*cuda(y, x, ids, *rest))
        two = getattr(ops, op)(*cuda(y2, x2, ids2, *rest))
        assert torch.equal(bits(one[0]), bits(two[0])), op
    terms = gelu_tables("bias+scale", dtype)
    one = ops.gelu_delta(*cuda(y, ids, *terms), "tanh")
    two = ops.gelu_delta(*cuda(y2, ids2, *terms), "tanh")
    assert torch.equal(bits(one[0]), bits(two[0]))
    one = ops.row_delta(*cuda(y, ids, *terms, x[..., :1].expand_as(y).contiguous()))
    two = ops.row_delta(*cuda(y2, ids2, *terms, x2[..., :1].expand_as(y2).contiguous()))
    assert torch.equal(bits(one[0]), bits(two[0]))
    one = ops.adapter(*cuda(y, y, ids, *adapter))
    two = ops.adapter(*cuda(y2, y2, ids2, *adapter))
    assert torch.equal(bits(one[0]), bits(two[0]))


def test_checks_name_the_wrong_input() -> None:
    x, y = (t.cuda() for t in site(torch.float16, (5,)))
    ids = task_ids_for("uniform").cuda()
    a, b, s, r = (t.cuda() for t in lora_tables(8, torch.float16))
    with pytest.raises(RuntimeError, match=r"lora_a has dtype Float, x has Half"):
        ops.lora_delta(y, x, ids, a.float(), b, s, r)
    with pytest.raises(RuntimeError, match=r"lora_b is on cpu, x is on cuda"):
        ops.lora_delta(y, x, ids, a, b.cpu(), s, r)
    with pytest.raises(RuntimeError, match=r"task_ids must be int64"):
        ops.bias_delta(y, ids.int(), randn(SLOTS, OUT, dtype=torch.float16).cuda())
    with pytest.raises(RuntimeError, match=r"gelu_delta: scale is on cpu, y is on cuda"):
        ops.gelu_delta(y, ids, None, randn(SLOTS, OUT, dtype=torch.float16), "none")
    with pytest.raises(RuntimeError, match=r"gelu_delta: bias has out_features 5, y has 200"):
        ops.gelu_delta(y, ids, randn(SLOTS, 5, dtype=torch.float16).cuda(), None, "tanh")
    with pytest.raises(RuntimeError, match=r"row_delta: residual is on cpu, y is on cuda"):
        ops.row_delta(y, ids, None, randn(SLOTS, OUT, dtype=torch.float16).cuda(), y.cpu())
    with pytest.raises(RuntimeError, match=r"row_delta: bias and scale are both None"):
        ops.row_delta(y, ids, None, None, y)
    ln = [t.cuda() for t in ln_params(torch.float16)]
    with pytest.raises(RuntimeError, match=r"layer_norm: x_bias is on cpu, x is on cuda"):
        ops.layer_norm(x, ids, *ln, 1e-5, randn(SLOTS, IN, dtype=torch.float16), None)
    with pytest.raises(RuntimeError, match=r"layer_norm: residual is on cpu, x is on cuda"):
        ops.layer_norm(x, ids, *ln, 1e-5, None, x.cpu())
    tables = [t.cuda() for t in adapter_tables(7, torch.float16)]
    with pytest.raises(RuntimeError, match=r"adapter: h_bias is on cpu, h is on cuda"):
        ops.adapter(x, x, ids, *ln, 1e-5, *tables, randn(SLOTS, IN, dtype=torch.float16))
    with pytest.raises(RuntimeError, match=r"row_ptr must be an int64 \[T, out \+ 1\]"):
        row_ptr, col, val = (t.cuda() for t in sparse_pool(SLOTS, OUT, IN, torch.float16))
        ops.sparse_delta(y, x, ids, row_ptr[:, :-1], col, val)


# ---------------------------------------------------------------------------------------------------------------
# sparse_delta kernel shapes (appended with the kernel rewrite of csrc/cuda/sparse.cu): its tile (64, 32 or 16
# tokens a block, by how many in_features fit shared memory), its row schedule (one group a row for a slot averaging
# under 16 entries a row, two groups above), its scalar paths (in_features not a multiple of 8, odd out_features,
# tables, x or y off 16-byte alignment) and what must stay bitwise.


def sparse_density_pool(
    slots: int,
    rows: int,
    cols: int,
    density: float,
    dtype: torch.dtype,
    seed: int = 50,
    empty: tuple[int, ...] = (0,),
    long_rows: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Pooled CSR tables of D_t [rows, cols] with binomial(cols, density) entries a row at random columns (unsorted,
    repeats allowed: they add up), slots in shuffled pool order with dead entries between them, every 4th row empty,
    all of D_t empty for the slots in `empty`; every 16th row (from row 1) gets `long_rows` entries if nonzero."""
    g = gen(seed)
    row_ptr = torch.zeros(slots, rows + 1, dtype=torch.long)
    pieces, pos = [], 0
    for t in torch.randperm(slots, generator=g).tolist():
        dead = torch.randint(0, cols, (int(torch.randint(0, 5, (), generator=g)),), generator=g)
        counts = torch.binomial(torch.full((rows,), float(cols)), torch.full((rows,), density), generator=g).long()
        counts[::4] = 0
        if long_rows:
            counts[1::16] = long_rows
        if t in empty:
            counts[:] = 0
        c = torch.randint(0, cols, (int(counts.sum()),), generator=g)
        pos += dead.numel()
        row_ptr[t, 1:] = counts.cumsum(0)
        row_ptr[t] += pos
        pieces += [dead, c]
        pos += c.numel()
    col = torch.cat(pieces)
    std = max(density * cols, 1.0) ** -0.5
    return row_ptr, col, randn(col.numel(), dtype=dtype, seed=seed + 1, std=std)


# (in_features, out_features, tokens a row, density): in 37 / 100 (not multiples of 8: scalar staging), out 37
# (odd: scalar epilogue), token counts leaving partial tiles, short rows (< 16 entries) and long ones, bert-base's
# 768x768 and both FFN shapes at 1% and 5%, in 1400 (fp16: 64-token tiles with 8 warps a block) and in 4096
# (fp16: 16-token tiles; fp32: 8).
SPARSE_SHAPES = [
    (37, 100, 37, 0.1),
    (100, 37, 100, 0.3),
    (768, 768, 128, 0.01),
    (768, 768, 77, 0.05),
    (768, 3072, 64, 0.01),
    (3072, 768, 70, 0.01),
    (3072, 768, 32, 0.05),
    (1400, 64, 64, 0.02),
    (4096, 256, 40, 0.02),
]


@pytest.mark.parametrize("shape", SPARSE_SHAPES, ids=lambda s: f"in{s[0]}-out{s[1]}-s{s[2]}-d{s[3]}")
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_sparse_delta_shapes(dtype: torch.dtype, shape: tuple[int, int, int, float]) -> None:
    in_f, out_f, seq, density = shape
    slots = 6
    ids = torch.tensor([3, 0, 5, 3])  # slot 0 empty; two rows share slot 3
    x = randn(4, seq, in_f, dtype=dtype, seed=52)
    y = randn(4, seq, out_f, dtype=dtype, seed=53)
    pool = sparse_density_pool(slots, out_f, in_f, density, dtype)
    check("sparse_delta", sparse_delta_ref, (y, x, ids, *pool), dtype)
    check("sparse_delta", sparse_delta_ref, (y[:, 0], x[:, 0], ids, *pool), dtype)  # [B, F]: one-token tiles


def sparse_off_alignment(t: Tensor) -> Tensor:
    """t on the device one element past a 16-byte boundary (made there: a copy would realign it)."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device="cuda")[1:]
    return flat.copy_(t.flatten().cuda()).view(t.shape)


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_sparse_delta_long_rows_alignment_and_bits(dtype: torch.dtype) -> None:
    """Long rows (up to 3 * in entries: repeated columns) among short and empty ones, in both row schedules (the
    slot averages: about 6, 150, 6 and 67 entries a row); col, val, x and y off alignment (the kernel's scalar
    loads, bitwise equal to the vector ones); empty rows and empty slots keep y's bits, -0.0 included."""
    slots, seq = 4, 45
    ids = torch.tensor([1, 2, 0, 3, 1])
    for in_f, out_f, density, long_rows in [
        (768, 256, 0.005, 60),
        (768, 256, 0.05, 3 * 768),
        (200, 64, 0.02, 50),
        (200, 64, 0.2, 600),
    ]:
        x = randn(5, seq, in_f, dtype=dtype, seed=60)
        y = randn(5, seq, out_f, dtype=dtype, seed=61)
        y[:, :, ::3] = -0.0
        row_ptr, col, val = sparse_density_pool(slots, out_f, in_f, density, dtype, seed=62, long_rows=long_rows)
        want = sparse_delta_ref(*f64(y, x, ids, row_ptr, col, val)).to(dtype)
        aligned = ops.sparse_delta(*cuda(y, x, ids, row_ptr, col, val))
        # fp32 sums of up to 2304 products in another order than the f64 reference: on the H200, 2 of 57,600
        # outputs were 2.2e-5 off (values of order 10), past the 1e-5 of shorter rows
        tol = {**TOLERANCE[dtype], "atol": 1e-4} if dtype == torch.float32 else TOLERANCE[dtype]
        torch.testing.assert_close(aligned.cpu(), want, **tol)
        shifted = ops.sparse_delta(
            sparse_off_alignment(y),
            sparse_off_alignment(x),
            ids.cuda(),
            row_ptr.cuda(),
            sparse_off_alignment(col),
            sparse_off_alignment(val),
        )
        torch.testing.assert_close(shifted.cpu(), want, **tol)
        assert torch.equal(bits(shifted.cpu()), bits(aligned.cpu())), "aligned and scalar paths differ"
        # Bitwise y: rows of slot 0 (no entries) and, in every row, the outputs whose D_t row is empty.
        empty_rows = (row_ptr[:, 1:] == row_ptr[:, :-1])[ids]  # [B, out]
        mask = empty_rows.unsqueeze(1).expand(-1, seq, -1)
        assert bool(mask[2].all()) and bool(mask.any()) and not bool(mask.all())
        assert torch.equal(bits(aligned.cpu()[mask]), bits(y[mask]))


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_sparse_delta_row_splits(dtype: torch.dtype) -> None:
    """Few busy (row, token tile) tiles: the kernel splits their output rows over the blocks as well (1 and 9
    rows: 187 chunks of 16 rows, 12 splits of 16 chunks, the last owning 11; 300 rows: none). Each batch against
    the reference, and row 0 (same slot, x and y in every batch) bitwise the same whatever the split."""
    in_f, out_f, seq = 768, 2990, 16
    pool = sparse_density_pool(4, out_f, in_f, 0.02, dtype, seed=70)
    x = randn(300, seq, in_f, dtype=dtype, seed=71)
    y = randn(300, seq, out_f, dtype=dtype, seed=72)
    ids = torch.arange(300) % 4
    ids[0] = 2
    row0 = []
    for rows in (1, 9, 300):
        got = check("sparse_delta", sparse_delta_ref, (y[:rows], x[:rows], ids[:rows], *pool), dtype)
        row0.append(bits(got[0].cpu()))
    assert all(torch.equal(row0[0], r) for r in row0[1:]), "row 0 depends on how many rows share its batch"


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("seq", [32, 13, 64], ids=lambda s: f"seq{s}")
def test_sparse_delta_mixed_batch(dtype: torch.dtype, seq: int) -> None:
    """A mixed batch: rows of slots with entries (busy) among many rows of a slot without (slot 0), as a batch of
    every PET kind has them; 256 rows (the kernel's plan in shared memory) and 1,100 (beyond kPlanRows: every row
    counted busy, each item checks its slot); short rows take 64- or 32-byte column lines. Against the reference;
    the empty rows keep y's bits; row 0 bitwise the same alone, among 256 rows and among 1,100."""
    in_f, out_f = 264, 72  # small: the reference densifies every row's D_t in float64
    pool = sparse_density_pool(5, out_f, in_f, 0.05, dtype, seed=80)
    gen = torch.Generator().manual_seed(81)
    ids = torch.where(torch.rand(1100, generator=gen) < 0.2, torch.randint(1, 5, (1100,), generator=gen), 0)
    ids[0], ids[1] = 3, 0
    x = randn(1100, seq, in_f, dtype=dtype, seed=82)
    y = randn(1100, seq, out_f, dtype=dtype, seed=83)
    row0 = []
    for rows in (1, 256, 1100):
        got = check("sparse_delta", sparse_delta_ref, (y[:rows], x[:rows], ids[:rows], *pool), dtype).cpu()
        row0.append(bits(got[0]))
        empty = ids[:rows] == 0
        assert bool(empty.any()) == (rows > 1)
        assert torch.equal(bits(got[empty]), bits(y[:rows][empty]))
    assert all(torch.equal(row0[0], r) for r in row0[1:]), "row 0 depends on the rows that share its batch"
