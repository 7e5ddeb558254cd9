"""Check the invariants of the finished graph (see passes/README.md)."""

from __future__ import annotations

from collections import Counter

import torch
from torch.fx import GraphModule

from pets_compiler.passes.context import CompileContext, PassResult


def check_graph(gm: GraphModule, ctx: CompileContext) -> PassResult:
    """task_ids is an input, each planned site has exactly one task op, no dropout is left, two outputs."""
    gm.graph.lint()
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    if names[:3] not in (["input_ids", "attention_mask", "task_ids"], ["input_ids", "segments", "task_ids"]):
        raise RuntimeError(
            f"graph inputs start {names[:3]}, expected input_ids, attention_mask (or segments), task_ids"
        )
    if len(names) != 3 + len(ctx.tables):
        raise RuntimeError(f"graph has {len(names) - 3} table inputs, the context records {len(ctx.tables)}")
    if any(n.target is torch.ops.aten.dropout.default for n in gm.graph.nodes):
        raise RuntimeError("a dropout node is left in the graph")
    ops = Counter(str(n.target) for n in gm.graph.nodes if str(n.target).startswith("pets."))
    # A gelu_delta (fuse_activation) or row_delta (fuse_row_terms) carries a site's bias delta and / or an IA3 scale;
    # a linear_delta may carry its site's IA3 output scale (fuse_row_terms).
    terms = ops.copy()
    for n in gm.graph.nodes:
        if n.target in (torch.ops.pets.gelu_delta.default, torch.ops.pets.row_delta.default):
            terms["pets.bias_delta.default"] += n.args[2] is not None
            terms["pets.scale.default"] += n.args[3] is not None
        if n.target is torch.ops.pets.linear_delta.default:
            terms["pets.scale.default"] += len(n.args) > 8 and n.args[8] is not None
    linear_ops = sum(terms[f"pets.{op}.default"] for op in ("lora_delta", "bias_delta", "linear_delta"))
    expected = len(set(ctx.plan.lora) | set(ctx.plan.bias))
    if linear_ops != expected:
        raise RuntimeError(f"{linear_ops} linear task ops in the graph, the plan has {expected} linear sites")
    # fold_context_scale moves an input scale to a value site: into its planned output scale (one term carries
    # both), or as a new one there.
    folded = sum(t.fold_in is not None and t.site in ctx.plan.ia3_out for t in ctx.tables)
    counts = {
        "layer_norm": len(set(ctx.plan.layer_norm) - ctx.adapted_layer_norms),
        "scale": len(ctx.plan.ia3_in) + len(ctx.plan.ia3_out) - folded,
        "adapter": len(ctx.plan.adapter),
    }
    counts["sparse_delta"] = sum(s in ctx.linear_nodes for s in ctx.plan.sparse)
    counts["embedding_delta"] = len(ctx.plan.sparse) - counts["sparse_delta"]
    for op, n in counts.items():
        if terms[f"pets.{op}.default"] != n:
            raise RuntimeError(f"{terms[f'pets.{op}.default']} pets.{op} terms in the graph, the plan asks for {n}")
    out = next(n for n in gm.graph.nodes if n.op == "output")
    if len(out.args[0]) != 2:
        raise RuntimeError("the program must return (logits, embedding)")
    summary = ", ".join(f"{k.removeprefix('pets.').removesuffix('.default')} x{v}" for k, v in sorted(ops.items()))
    return PassResult("check_graph", 0, f"ok: {len(ctx.tables)} task tables; {summary}")
