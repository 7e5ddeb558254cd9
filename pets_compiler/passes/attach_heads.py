"""Give the program its two outputs: per-task head logits and the pooled sentence embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx import GraphModule

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


def head_input(hidden: Tensor, pooled: Tensor, task_ids: Tensor, use_cls: Tensor) -> Tensor:
    """Per row: the [CLS] hidden state (AdapterHub heads) or the BERT pooler output (HF classifiers)."""
    return torch.where(use_cls[task_ids].bool().unsqueeze(-1), hidden[:, 0], pooled)


def head_dense(x: Tensor, task_ids: Tensor, has_dense: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Per row: tanh(x @ weight[t].T + bias[t]) for heads with a dense layer, else x unchanged."""
    dense = torch.tanh(torch.ops.pets.segmented_linear(x, task_ids, weight, bias))
    return torch.where(has_dense[task_ids].bool().unsqueeze(-1), dense, x)


def attach_heads(gm: GraphModule, ctx: CompileContext) -> PassResult:
    """(hidden, pooled) -> (per-task head logits [batch, labels], pooled embedding [batch, hidden])."""
    task_ids = ctx.require_task_ids()
    out = next(n for n in gm.graph.nodes if n.op == "output")
    hidden, pooled = out.args[0]
    mask = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.name == "attention_mask")
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
        x = gm.graph.call_function(head_input, (hidden, pooled, task_ids, use_cls))
        if ctx.plan.head_dense:
            x = gm.graph.call_function(head_dense, (x, task_ids, *dense))
        logits = gm.graph.call_function(op_target("segmented_linear"), (x, task_ids, weight, bias))
        embedding = gm.graph.call_function(
            pool_embedding, (hidden, pooled, mask, ctx.pooling.mode, ctx.pooling.normalize)
        )
    out.args = ((logits, embedding),)
    cleanup(gm)
    layers = "one or two layers" if ctx.plan.head_dense else "one layer"
    return PassResult("attach_heads", 2, f"outputs: head logits ({layers}) and {ctx.pooling.mode}-pooled embedding")
