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


def attach_heads(gm: GraphModule, ctx: CompileContext) -> PassResult:
    """(hidden, pooled) -> (per-task head logits [batch, labels] of pooled, embedding [batch, hidden])."""
    task_ids = ctx.require_task_ids()
    out = next(n for n in gm.graph.nodes if n.op == "output")
    hidden, pooled = out.args[0]
    mask = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.name == "attention_mask")
    size = ctx.base.config.hidden_size
    weight = ctx.add_table(gm, TableSpec("head.weight", "head", "head", "weight", (SLOTS, LABELS, size)))
    bias = ctx.add_table(gm, TableSpec("head.bias", "head", "head", "bias", (SLOTS, LABELS)))
    with gm.graph.inserting_before(out):
        logits = gm.graph.call_function(op_target("segmented_linear"), (pooled, task_ids, weight, bias))  # type: ignore[arg-type]
        embedding = gm.graph.call_function(
            pool_embedding, (hidden, pooled, mask, ctx.pooling.mode, ctx.pooling.normalize)
        )
    out.args = ((logits, embedding),)
    cleanup(gm)
    return PassResult("attach_heads", 2, f"outputs: head logits and {ctx.pooling.mode}-pooled embedding")
