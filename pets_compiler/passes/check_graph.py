"""Check the invariants of the finished graph (see passes/README.md)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.fx import GraphModule, Node

from pets_compiler.passes.context import CompileContext, PassResult
from pets_compiler.passes.fuse_norm_inputs import ADAPTER_ARGS, LAYER_NORM_ARGS
from pets_compiler.passes.fuse_row_terms import OUT_SCALE


def _argument(node: Node, index: int, name: str) -> Any:
    """A call's argument by position or keyword; None where it is left out (the schema's default)."""
    return node.args[index] if len(node.args) > index else node.kwargs.get(name)


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
    # a linear_delta may carry its site's IA3 output scale (fuse_row_terms); a layer_norm's x_bias or an adapter's
    # h_bias (fuse_norm_inputs) the bias delta of the linear before it.
    terms = ops.copy()
    for n in gm.graph.nodes:
        if n.target in (torch.ops.pets.gelu_delta.default, torch.ops.pets.row_delta.default):
            terms["pets.bias_delta.default"] += n.args[2] is not None
            terms["pets.scale.default"] += n.args[3] is not None
        elif n.target is torch.ops.pets.linear_delta.default:
            terms["pets.scale.default"] += _argument(n, OUT_SCALE, "out_scale") is not None
        elif n.target is torch.ops.pets.layer_norm.default:
            terms["pets.bias_delta.default"] += _argument(n, LAYER_NORM_ARGS, "x_bias") is not None
        elif n.target is torch.ops.pets.adapter.default:
            terms["pets.bias_delta.default"] += _argument(n, ADAPTER_ARGS, "h_bias") is not None
    linear_ops = sum(terms[f"pets.{op}.default"] for op in ("lora_delta", "bias_delta", "linear_delta"))
    # fold_key_terms drops a key site's bias delta (softmax ignores it): that site has no linear task op left.
    expected = len(set(ctx.plan.lora) | set(ctx.plan.bias)) - len(ctx.dropped_key_bias)
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
