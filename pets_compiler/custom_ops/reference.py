"""Plain-torch references of the `torch.ops.pets` ops: the test oracle for the CPU and CUDA kernels.

Each reference gathers the table rows of every batch row (`table[task_ids]`) and applies them with batched
matmuls: simple enough to check by eye, and made only of standard ops. Batch tensors are `[B, ..., features]`;
the dims between batch and features ("tokens") are flattened to N and restored on output.
"""

from __future__ import annotations

import math

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
) -> Tensor:
    """All task terms of one linear site: LoRA (if lora_a is given) and bias delta (if bias is given).

    Semantics: out[i] = y[i] + scale[t] * (x[i] @ lora_a[t].T) @ lora_b[t].T + bias[t]  where t = task_ids[i]
    Shapes: as lora_delta_ref and bias_delta_ref; lora_a, lora_b, lora_scale and lora_rank are all given or all None.
    """
    out = y
    if lora_a is not None:
        if lora_b is None or lora_scale is None or lora_rank is None:
            raise ValueError("linear_delta_ref: lora_a, lora_b, lora_scale and lora_rank must be given together")
        out = lora_delta_ref(out, x, task_ids, lora_a, lora_b, lora_scale, lora_rank)
    if bias is not None:
        out = bias_delta_ref(out, task_ids, bias)
    return out.clone() if out is y else out


def layer_norm_ref(
    x: Tensor,
    task_ids: Tensor,
    weight: Tensor,
    bias: Tensor,
    weight_delta: Tensor,
    bias_delta: Tensor,
    eps: float,
) -> Tensor:
    """LayerNorm over the last dim with a per-task affine delta (BitFit on LayerNorm).

    Semantics: out[i] = (x[i] - mean) / sqrt(var + eps) * (weight + weight_delta[t]) + (bias + bias_delta[t])
               where t = task_ids[i], mean and biased var over the last dim
    Shapes: x [B, ..., H], task_ids int64 [B], weight and bias [H], weight_delta and bias_delta [T, H]
    -> [B, ..., H].
    """
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
