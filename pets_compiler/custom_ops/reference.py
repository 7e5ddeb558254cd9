"""Plain-torch references of the `torch.ops.pets` ops: the test oracle for the CPU and CUDA kernels.

Each reference gathers the table rows of every batch row (`table[task_ids]`) and applies them with batched
matmuls: simple enough to check by eye, and made only of standard ops. Batch tensors are `[B, ..., features]`;
the dims between batch and features ("tokens") are flattened to N and restored on output.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def _as_rows(t: Tensor) -> Tensor:
    """[B, ..., F] -> [B, N, F]."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:-1]), t.shape[-1])


def lora_delta_ref(
    y: Tensor, x: Tensor, task_ids: Tensor, lora_a: Tensor, lora_b: Tensor, scale: Tensor, rank: Tensor
) -> Tensor:
    """LoRA term of a linear site, per row's task; only the first rank[t] components of a slot count.

    Semantics: out[i] = y[i] + scale[t] * (x[i] @ lora_a[t, :r].T) @ lora_b[t, :, :r].T  where t = task_ids[i],
    r = rank[t]
    Shapes: y [B, ..., out], x [B, ..., in], task_ids int64 [B], lora_a [T, R, in], lora_b [T, out, R],
    scale [T], rank int64 [T] (each <= R) -> [B, ..., out].
    """
    keep = (torch.arange(lora_a.shape[1], device=rank.device) < rank[task_ids].unsqueeze(1)).to(x.dtype)  # [B, R]
    h = torch.matmul(_as_rows(x), lora_a[task_ids].transpose(1, 2)) * keep.unsqueeze(1)  # [B, N, R]
    delta = torch.matmul(h, lora_b[task_ids].transpose(1, 2))  # [B, N, out]
    return y + (scale[task_ids].view(-1, 1, 1) * delta).reshape(y.shape)


def bias_delta_ref(y: Tensor, task_ids: Tensor, bias: Tensor) -> Tensor:
    """Per-task bias delta (BitFit), the same for every token of a row.

    Semantics: out[i] = y[i] + bias[t]  where t = task_ids[i]
    Shapes: y [B, ..., out], task_ids int64 [B], bias [T, out] -> [B, ..., out].
    """
    return (_as_rows(y) + bias[task_ids].unsqueeze(1)).reshape(y.shape)


def linear_delta_ref(
    y: Tensor,
    x: Tensor,
    task_ids: Tensor,
    lora_a: Tensor | None,
    lora_b: Tensor | None,
    lora_scale: Tensor | None,
    lora_rank: Tensor | None,
    bias: Tensor | None,
    out_scale: Tensor | None = None,
) -> Tensor:
    """All task terms of one linear site: LoRA (if lora_a is given), bias delta (if bias is given) and IA3's output
    scale (if out_scale is given, stored as l - 1 as scale_ref's delta).

    Semantics: out[i] = (y[i] + scale[t] * (x[i] @ lora_a[t].T) @ lora_b[t].T + bias[t]) * (1 + out_scale[t])
    where t = task_ids[i]
    Shapes: as lora_delta_ref, bias_delta_ref and scale_ref; lora_a, lora_b, lora_scale and lora_rank are all given
    or all None.
    """
    out = y
    if lora_a is not None:
        if lora_b is None or lora_scale is None or lora_rank is None:
            raise ValueError("linear_delta_ref: lora_a, lora_b, lora_scale and lora_rank must be given together")
        out = lora_delta_ref(out, x, task_ids, lora_a, lora_b, lora_scale, lora_rank)
    if bias is not None:
        out = bias_delta_ref(out, task_ids, bias)
    if out_scale is not None:
        out = scale_ref(out, task_ids, out_scale)
    return out.clone() if out is y else out


def layer_norm_ref(
    x: Tensor,
    task_ids: Tensor,
    weight: Tensor,
    bias: Tensor,
    weight_delta: Tensor,
    bias_delta: Tensor,
    eps: float,
    x_bias: Tensor | None = None,
    residual: Tensor | None = None,
) -> Tensor:
    """LayerNorm over the last dim with a per-task affine delta (BitFit on LayerNorm), of x or of x with the terms
    before it (the bias delta of the linear that made x, the sublayer's residual), each sum rounded to x's dtype.

    Semantics: v = (x[i] + x_bias[t]) + residual[i]  (each term only where given)
               out[i] = (v - mean) / sqrt(var + eps) * (weight + weight_delta[t]) + (bias + bias_delta[t])
               where t = task_ids[i], mean and biased var over the last dim
    Shapes: x [B, ..., H], task_ids int64 [B], weight and bias [H], weight_delta and bias_delta [T, H],
    x_bias [T, H] or None, residual x's shape or None -> [B, ..., H].
    """
    if x_bias is not None:
        x = bias_delta_ref(x, task_ids, x_bias)
    if residual is not None:
        x = x + residual
    normed = _as_rows(F.layer_norm(x, (x.shape[-1],), eps=eps))
    gamma = (weight + weight_delta[task_ids]).unsqueeze(1)
    beta = (bias + bias_delta[task_ids]).unsqueeze(1)
    return (normed * gamma + beta).reshape(x.shape)


def segmented_linear_ref(x: Tensor, task_ids: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Per-task linear (classification heads, label columns zero-padded to a common L).

    Semantics: out[i] = x[i] @ weight[t].T + bias[t]  where t = task_ids[i]
    Shapes: x [B, ..., in], task_ids int64 [B], weight [T, L, in], bias [T, L] -> [B, ..., L].
    """
    out = torch.matmul(_as_rows(x), weight[task_ids].transpose(1, 2)) + bias[task_ids].unsqueeze(1)
    return out.reshape(*x.shape[:-1], weight.shape[1])


def scale_ref(y: Tensor, task_ids: Tensor, delta: Tensor) -> Tensor:
    """Per-task feature scale (IA3), stored as l - 1 so that an all-zero slot is the identity.

    Semantics: out[i] = y[i] * (1 + delta[t])  where t = task_ids[i], the same for every token of row i
    Shapes: y [B, ..., F], task_ids int64 [B], delta [T, F] -> [B, ..., F].
    """
    return (_as_rows(y) * (1 + delta[task_ids]).unsqueeze(1)).reshape(y.shape)


def gelu_delta_ref(y: Tensor, task_ids: Tensor, bias: Tensor | None, scale: Tensor | None, approximate: str) -> Tensor:
    """A BERT FFN's activation with the per-task row terms around it, either of which may be absent: BitFit's
    bias delta of the intermediate linear before it, IA3's input scale (stored as l - 1) of the output linear after.

    Semantics: out[i] = gelu(y[i] + bias[t], approximate) * (1 + scale[t])  where t = task_ids[i], the same for
    every token of row i; approximate is aten.gelu's ("none" or "tanh")
    Shapes: y [B, ..., F], task_ids int64 [B], bias and scale [T, F] or None -> [B, ..., F].
    """
    out = y if bias is None else bias_delta_ref(y, task_ids, bias)
    out = F.gelu(out, approximate=approximate)
    return out if scale is None else scale_ref(out, task_ids, scale)


def row_delta_ref(
    y: Tensor, task_ids: Tensor, bias: Tensor | None, scale: Tensor | None, residual: Tensor | None
) -> Tensor:
    """A linear site's per-task row terms and the residual add after it, each of which may be absent: BitFit's bias
    delta, IA3's output scale (stored as l - 1), the sublayer's residual (at least one of bias and scale given).

    Semantics: out[i] = (y[i] + bias[t]) * (1 + scale[t]) + residual[i]  where t = task_ids[i], the table rows the
    same for every token of row i
    Shapes: y [B, ..., F], task_ids int64 [B], bias and scale [T, F] or None, residual y's shape or None -> [B, ..., F].
    """
    if bias is None and scale is None:
        raise ValueError("row_delta_ref: at least one of bias and scale must be given")
    out = y if bias is None else bias_delta_ref(y, task_ids, bias)
    out = out if scale is None else scale_ref(out, task_ids, scale)
    return out if residual is None else out + residual


def _pool_rows(row_ptr: Tensor, task_ids: Tensor, pool: int) -> tuple[Tensor, Tensor]:
    """For every batch row i and pool entry k: the row o of D_t (t = task_ids[i]) that k belongs to, and whether
    it belongs to D_t at all (row_ptr[t, 0] <= k < row_ptr[t, -1]). Both [B, P]."""
    offsets = row_ptr[task_ids]  # [B, rows + 1]
    k = torch.arange(pool, device=row_ptr.device).expand(offsets.shape[0], pool).contiguous()
    row = torch.searchsorted(offsets, k, right=True) - 1  # the last o with row_ptr[t, o] <= k
    inside = (k >= offsets[:, :1]) & (k < offsets[:, -1:])
    return row.clamp(0, offsets.shape[1] - 2), inside


def _dense_deltas(row_ptr: Tensor, col: Tensor, val: Tensor, task_ids: Tensor, cols: int) -> Tensor:
    """D_t of every batch row, dense: [B, rows, cols], from the pooled CSR tables (repeated entries add up)."""
    batch, rows = task_ids.shape[0], row_ptr.shape[1] - 1
    row, inside = _pool_rows(row_ptr, task_ids, col.shape[0])
    dense = val.new_zeros(batch, rows, cols)
    i = torch.arange(batch, device=val.device).unsqueeze(1).expand_as(row)
    values = torch.where(inside, val.expand_as(row), torch.zeros_like(val))
    return dense.index_put_((i, row, col.expand_as(row)), values, accumulate=True)


def sparse_delta_ref(y: Tensor, x: Tensor, task_ids: Tensor, row_ptr: Tensor, col: Tensor, val: Tensor) -> Tensor:
    """Sparse weight delta of a linear site (diff-pruning, MaskBERT): one CSR matrix D_t [out, in] per slot, all
    slots' nonzeros in one pool (offsets absolute; a slot without nonzeros has row_ptr[t, :] all equal).

    Semantics: out[i, n, o] = y[i, n, o] + sum_{k = row_ptr[t, o]}^{row_ptr[t, o + 1] - 1} val[k] * x[i, n, col[k]]
               where t = task_ids[i]
    Shapes: y [B, ..., out], x [B, ..., in], task_ids int64 [B], row_ptr int64 [T, out + 1], col int64 [P],
    val [P] -> [B, ..., out].
    """
    dense = _dense_deltas(row_ptr, col, val, task_ids, x.shape[-1])  # [B, out, in]: an oracle for test sizes
    return y + torch.matmul(_as_rows(x), dense.transpose(1, 2)).reshape(y.shape)


def embedding_delta_ref(y: Tensor, ids: Tensor, task_ids: Tensor, row_ptr: Tensor, col: Tensor, val: Tensor) -> Tensor:
    """Sparse delta of an embedding table (word, position or token type): D_t [V, H] in sparse_delta's pooled CSR
    form, rows = the embedding index, columns = the hidden index.

    Semantics: out[i, s, :] = y[i, s, :] + D_t[ids[i, s], :]  where t = task_ids[i]
    Shapes: y [B, S, H] (any [B, ..., H]), ids int64 [B, S] (y's shape without H, values in [0, V)),
    task_ids int64 [B], row_ptr int64 [T, V + 1], col int64 [P], val [P] -> [B, S, H].
    """
    dense = _dense_deltas(row_ptr, col, val, task_ids, y.shape[-1])  # [B, V, H]: an oracle for test sizes
    flat_ids = ids.reshape(ids.shape[0], -1, 1).expand(-1, -1, y.shape[-1])  # [B, N, H]
    return y + torch.gather(dense, 1, flat_ids).reshape(y.shape)


# AdapterHub's non_linearity names -> the activation codes of pets::adapter's config (csrc/adapter/adapter.h).
ADAPTER_ACTIVATIONS: dict[str, int] = {
    "identity": 0,
    "linear": 0,
    "relu": 1,
    "swish": 2,
    "silu": 2,
    "gelu": 3,
    "gelu_new": 4,
    "gelu_pytorch_tanh": 4,
    "tanh": 5,
    "sigmoid": 6,
    "leakyrelu": 7,
    "leaky_relu": 7,
}
# The columns of pets::adapter's int64 config [T, 6]; the first four are 0/1 flags.
ADAPTER_CONFIG_COLUMNS = (
    "enabled",
    "original_ln_before",
    "residual_before_ln",
    "original_ln_after",
    "activation",
    "bottleneck",
)

# Activation code -> function, in code order.
_ADAPTER_ACTIVATION_FNS: tuple[Callable[[Tensor], Tensor], ...] = (
    lambda v: v,
    F.relu,
    F.silu,
    F.gelu,
    lambda v: F.gelu(v, approximate="tanh"),
    torch.tanh,
    torch.sigmoid,
    lambda v: F.leaky_relu(v, 0.01),
)


def _activate(v: Tensor, codes: Tensor) -> Tensor:
    """act_{codes[i]}(v[i]) for v [B, ...] and int64 codes [B]: every activation, then a gather by code."""
    # Checked when run on values; an export (the ONNX lowering) cannot branch on them, and the tables it bakes
    # in hold only the codes of ADAPTER_ACTIVATIONS.
    bad = (codes < 0) | (codes >= len(_ADAPTER_ACTIVATION_FNS))
    if not torch.compiler.is_exporting() and bool(bad.any()):
        raise ValueError(f"adapter_ref: unknown activation code in {codes.tolist()}")
    candidates = torch.stack([f(v) for f in _ADAPTER_ACTIVATION_FNS])  # [codes, B, ...]
    return candidates[codes, torch.arange(v.shape[0], device=v.device)]


def adapter_ref(
    h: Tensor,
    residual: Tensor,
    task_ids: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    ln_weight_delta: Tensor,
    ln_bias_delta: Tensor,
    eps: float,
    down_w: Tensor,
    down_b: Tensor,
    up_w: Tensor,
    up_b: Tensor,
    scaling: Tensor,
    config: Tensor,
    h_bias: Tensor | None = None,
) -> Tensor:
    """The end of a BERT sublayer (residual add + LayerNorm, after dense + dropout) with a per-task bottleneck
    adapter placed as AdapterHub places it (Pfeiffer `seq_bn` = (1, 1, 1, 1, relu), Houlsby `double_seq_bn` =
    (1, 0, 1, 1, swish) at each of its two sites). Only the first r = config[t, 5] bottleneck units take part.
    With h_bias (the bias delta of the dense that made h), h[i] + h_bias[t], rounded to h's dtype, stands for h[i]
    throughout.

    Semantics: LN_t(z) = layer_norm(z, eps) * (ln_weight + ln_weight_delta[t]) + (ln_bias + ln_bias_delta[t]);
               with t = task_ids[i], (enabled, ln_before, res_before_ln, ln_after, act, r) = config[t]:
               out[i] = LN_t(h[i] + residual[i])                                              if not enabled
               a_in = LN_t(h[i] + residual[i]) if ln_before else h[i];  res = h[i] if res_before_ln else a_in
               z = (act(a_in @ down_w[t, :r].T + down_b[t, :r]) @ up_w[t, :, :r].T + up_b[t]) * scaling[t] + res
               out[i] = LN_t(z + residual[i]) if ln_after else z                             if enabled
    Shapes: h and residual [B, ..., H], task_ids int64 [B], ln_weight and ln_bias [H], ln_weight_delta and
    ln_bias_delta [T, H], down_w [T, R, H], down_b [T, R], up_w [T, H, R], up_b [T, H], scaling [T],
    config int64 [T, 6] (ADAPTER_CONFIG_COLUMNS; activation codes ADAPTER_ACTIVATIONS), h_bias [T, H] or None
    -> [B, ..., H].
    """

    def ln(v: Tensor) -> Tensor:
        return layer_norm_ref(v, task_ids, ln_weight, ln_bias, ln_weight_delta, ln_bias_delta, eps)

    if h_bias is not None:
        h = bias_delta_ref(h, task_ids, h_bias)

    h3, residual3 = _as_rows(h), _as_rows(residual)
    enabled, ln_before, res_before_ln, ln_after, act, rank = (c.view(-1, 1, 1) for c in config[task_ids].unbind(1))
    sublayer = ln(h3 + residual3)
    a_in = torch.where(ln_before == 1, sublayer, h3)
    res = torch.where(res_before_ln == 1, h3, a_in)
    keep = (torch.arange(down_w.shape[1], device=rank.device) < rank.view(-1, 1)).to(h.dtype)  # [B, R]
    down = torch.matmul(a_in, down_w[task_ids].transpose(1, 2)) + down_b[task_ids].unsqueeze(1)  # [B, N, R]
    down = _activate(down, act.view(-1)) * keep.unsqueeze(1)
    up = torch.matmul(down, up_w[task_ids].transpose(1, 2)) + up_b[task_ids].unsqueeze(1)  # [B, N, H]
    z = up * scaling[task_ids].view(-1, 1, 1) + res
    adapted = torch.where(ln_after == 1, ln(z + residual3), z)
    return torch.where(enabled == 1, adapted, sublayer).reshape(h.shape)
