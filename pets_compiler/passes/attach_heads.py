"""Give the program its two outputs: per-task head logits and the pooled sentence embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx import GraphModule, Node

from pets_compiler.passes.context import CompileContext, PassResult, cleanup, op_target
from pets_compiler.runtime.tables import LABELS, SLOTS, TableSpec


def pool_embedding(hidden: Tensor, pooler_output: Tensor, mask: Tensor, mode: str, normalize: bool) -> Tensor:
    """sentence-transformers pooling of the last hidden state (or the pooler output), then optional L2 norm."""
    if mode == "pooler":
        pooled = pooler_output
    elif mode == "cls":
        pooled = hidden[:, 0]
    else:
        m = mask.unsqueeze(-1).to(hidden.dtype)
        if mode == "max":
            pooled = torch.where(m > 0, hidden, torch.full_like(hidden, -1e9)).max(dim=1).values
        else:
            summed = (hidden * m).sum(dim=1)
            count = m.sum(dim=1).clamp(min=1e-9)
            pooled = summed / (count.sqrt() if mode == "mean_sqrt_len" else count)
    return F.normalize(pooled, p=2, dim=1) if normalize else pooled


def pool_requests(hidden: Tensor, pooled: Tensor, cls: Tensor, segments: Tensor, mode: str, normalize: bool) -> Tensor:
    """pool_embedding for packed rows: one embedding per (row, request) of `segments` [rows, K, seq],
    flattened to [rows * K, hidden]."""
    if mode == "pooler":
        out = pooled
    elif mode == "cls":
        out = cls
    elif mode == "max":
        inside = segments.unsqueeze(-1) > 0
        spread = hidden.unsqueeze(1).expand(-1, segments.shape[1], -1, -1)
        out = torch.where(inside, spread, torch.full_like(spread, -1e9)).amax(dim=2).flatten(0, 1)
    else:
        m = segments.to(hidden.dtype)
        count = m.sum(-1).flatten().unsqueeze(-1).clamp(min=1e-9)
        out = torch.einsum("rkl,rlh->rkh", m, hidden).flatten(0, 1) / (
            count.sqrt() if mode == "mean_sqrt_len" else count
        )
    return F.normalize(out, p=2, dim=1) if normalize else out


def request_task_ids(task_ids: Tensor, segments: Tensor) -> Tensor:
    """Packed rows: each (row, request)'s slot, the row's, flattened to [rows * K]."""
    return task_ids.unsqueeze(1).expand(-1, segments.shape[1]).flatten()


def head_input(hidden: Tensor, pooled: Tensor, task_ids: Tensor, use_cls: Tensor) -> Tensor:
    """Per row: the [CLS] hidden state (AdapterHub heads) or the BERT pooler output (HF classifiers). For packed
    rows `hidden` is already each request's [CLS] state, [rows * K, hidden]."""
    cls = hidden if hidden.dim() == 2 else hidden[:, 0]
    return torch.where(use_cls[task_ids].bool().unsqueeze(-1), cls, pooled)


def head_dense(x: Tensor, task_ids: Tensor, has_dense: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Per row: tanh(x @ weight[t].T + bias[t]) for heads with a dense layer, else x unchanged."""
    dense = torch.tanh(torch.ops.pets.segmented_linear(x, task_ids, weight, bias))
    return torch.where(has_dense[task_ids].bool().unsqueeze(-1), dense, x)


def attach_heads(gm: GraphModule, ctx: CompileContext) -> PassResult:
    """(hidden, pooled) -> (per-task head logits [batch, labels], pooled embedding [batch, hidden]); packed
    programs (capture's `packed`): (hidden, pooled, cls) -> [rows * K, labels] and [rows * K, hidden], (row, k)
    at row * K + k."""
    task_ids = ctx.require_task_ids()
    out = next(n for n in gm.graph.nodes if n.op == "output")
    packed = len(out.args[0]) == 3
    placeholders = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    mask = placeholders["segments" if packed else "attention_mask"]
    if packed:
        hidden, pooled, cls = out.args[0]
        with gm.graph.inserting_after(cls):
            ids = gm.graph.call_function(request_task_ids, (task_ids, mask))
        _per_request_ids(cls, task_ids, ids)
    else:
        hidden, pooled = out.args[0]
        cls, ids = hidden, task_ids
    size = ctx.base.config.hidden_size
    use_cls = ctx.add_table(gm, TableSpec("head.use_cls", "head", "head", "use_cls", (SLOTS,), integer=True))
    if ctx.plan.head_dense:
        dense = [
            ctx.add_table(gm, TableSpec("head.has_dense", "head_dense", "head", "has_dense", (SLOTS,), integer=True)),
            ctx.add_table(gm, TableSpec("head.dense_w", "head_dense", "head", "dense_w", (SLOTS, size, size))),
            ctx.add_table(gm, TableSpec("head.dense_b", "head_dense", "head", "dense_b", (SLOTS, size))),
        ]
    weight = ctx.add_table(gm, TableSpec("head.weight", "head", "head", "weight", (SLOTS, LABELS, size)))
    bias = ctx.add_table(gm, TableSpec("head.bias", "head", "head", "bias", (SLOTS, LABELS)))
    with gm.graph.inserting_before(out):
        x = gm.graph.call_function(head_input, (cls, pooled, ids, use_cls))
        if ctx.plan.head_dense:
            x = gm.graph.call_function(head_dense, (x, ids, *dense))
        logits = gm.graph.call_function(op_target("segmented_linear"), (x, ids, weight, bias))
        pool = ctx.pooling.mode, ctx.pooling.normalize
        if packed:
            embedding = gm.graph.call_function(pool_requests, (hidden, pooled, cls, mask, *pool))
        else:
            embedding = gm.graph.call_function(pool_embedding, (hidden, pooled, mask, *pool))
    out.args = ((logits, embedding),)
    cleanup(gm)
    layers = "one or two layers" if ctx.plan.head_dense else "one layer"
    what = "per request of packed rows" if packed else "per row"
    return PassResult(
        "attach_heads", 2, f"outputs {what}: head logits ({layers}) and {ctx.pooling.mode}-pooled embedding"
    )


def _per_request_ids(cls: Node, task_ids: Node, ids: Node) -> None:
    """Packed programs: the nodes computed from the requests' [CLS] states (the pooler and its task ops) work on
    [rows * K] requests, so they read each request's slot (`ids`) instead of each row's."""
    todo, seen = list(cls.users), set()
    while todo:
        node = todo.pop()
        if node in seen or node is ids:
            continue
        seen.add(node)
        node.args = tuple(ids if a is task_ids else a for a in node.args)
        todo.extend(node.users)
