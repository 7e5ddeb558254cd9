"""The ONNX translations of the `torch.ops.pets` ops: each op -> plain torch ops that torch.onnx exports to
standard ONNX ops (export/lowering.py applies them).

Most ops lower to their torch reference (`custom_ops/reference.py`): gathers of table rows by task id and batched
matmuls (ONNX Gather, MatMul, Where, LayerNormalization, ...). The references of the sparse ops find each pool
entry's row with `searchsorted` and densify D_t per batch row over all rows, which ONNX cannot express (the first)
or cannot afford (a word-embedding delta, [batch, vocab, hidden]); they lower to the functions below instead, made
of gathers, ScatterElements (add) and CumSum. They take sparse pools of one entry at least (the export appends a
zero entry to each).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch._ops import OpOverload

from pets_compiler.custom_ops import reference as ref

pets = torch.ops.pets


def _pool_rows(row_ptr: Tensor, task_ids: Tensor, pool: int) -> tuple[Tensor, Tensor]:
    """reference._pool_rows without searchsorted: the row of pool entry k in D_t is the number of t's inner row
    boundaries at or before k (a ScatterElements add of ones at row_ptr[t, 1:-1], then a CumSum)."""
    offsets = row_ptr[task_ids]  # [B, rows + 1]
    batch = offsets.shape[0]
    inner = offsets[:, 1:-1]
    marks = torch.zeros(batch, pool + 1, dtype=torch.long, device=row_ptr.device)
    marks = marks.scatter_add(1, inner, torch.ones_like(inner))
    row = torch.cumsum(marks, 1)[:, :pool]
    k = torch.arange(pool, device=row_ptr.device).unsqueeze(0)
    inside = (k >= offsets[:, :1]) & (k < offsets[:, -1:])
    return row, inside


def sparse_delta(y: Tensor, x: Tensor, task_ids: Tensor, row_ptr: Tensor, col: Tensor, val: Tensor) -> Tensor:
    """pets::sparse_delta: every batch row's D_t densified by one ScatterElements (add) over the pool, then a
    batched MatMul, as reference.sparse_delta_ref computes it."""
    rows, cols = row_ptr.shape[1] - 1, x.shape[-1]
    row, inside = _pool_rows(row_ptr, task_ids, col.shape[0])  # [B, P]
    values = torch.where(inside, val.unsqueeze(0), torch.zeros_like(val).unsqueeze(0))
    flat = row * cols + col.unsqueeze(0)  # index into D_t [rows * cols]
    dense = torch.zeros(row.shape[0], rows * cols, dtype=val.dtype, device=val.device).scatter_add(1, flat, values)
    delta = torch.matmul(ref._as_rows(x), dense.view(-1, rows, cols).transpose(1, 2))
    return y + delta.reshape(y.shape)


def embedding_delta(y: Tensor, ids: Tensor, task_ids: Tensor, row_ptr: Tensor, col: Tensor, val: Tensor) -> Tensor:
    """pets::embedding_delta: each token gathers its own row of D_t (entries row_ptr[t, id] + j for j < hidden, at
    most one per column: `check_sparse_rows`) and adds them at their columns with a ScatterElements (add)."""
    hidden = y.shape[-1]
    offsets = row_ptr[task_ids]  # [B, V + 1]
    flat_ids = ids.reshape(ids.shape[0], -1)  # [B, N]
    start = torch.gather(offsets, 1, flat_ids).unsqueeze(-1)  # [B, N, 1]
    count = torch.gather(offsets, 1, flat_ids + 1).unsqueeze(-1) - start
    j = torch.arange(hidden, device=ids.device)
    present = j < count  # [B, N, H]
    k = torch.where(present, start + j, torch.zeros_like(start))  # the pool holds one entry at least
    values = torch.where(present, val[k], torch.zeros_like(val[k]))
    delta = torch.zeros_like(values).scatter_add(2, col[k], values)
    return y + delta.reshape(y.shape)


TRANSLATIONS: dict[OpOverload, Callable[..., Tensor]] = {
    pets.lora_delta.default: ref.lora_delta_ref,
    pets.bias_delta.default: ref.bias_delta_ref,
    pets.linear_delta.default: ref.linear_delta_ref,
    pets.layer_norm.default: ref.layer_norm_ref,
    pets.segmented_linear.default: ref.segmented_linear_ref,
    pets.scale.default: ref.scale_ref,
    pets.gelu_delta.default: ref.gelu_delta_ref,
    pets.row_delta.default: ref.row_delta_ref,
    pets.adapter.default: ref.adapter_ref,
    pets.sparse_delta.default: sparse_delta,
    pets.embedding_delta.default: embedding_delta,
}
