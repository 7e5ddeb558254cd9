"""Map each aten.linear / aten.layer_norm node to the HF module path of its weight."""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from pets_compiler.passes.context import CompileContext, PassResult

_LINEAR = torch.ops.aten.linear.default
_LAYER_NORM = torch.ops.aten.layer_norm.default


def find_sites(gm: GraphModule, ctx: CompileContext) -> PassResult:
    """Record the linear and LayerNorm nodes by site name; the graph is not changed."""
    for node in gm.graph.nodes:
        if node.target not in (_LINEAR, _LAYER_NORM):
            continue
        weight = node.args[1] if node.target is _LINEAR else node.args[2]
        if getattr(weight, "op", None) != "get_attr" or not str(weight.target).endswith(".weight"):
            continue
        site = str(weight.target).removesuffix(".weight")
        table = ctx.linear_nodes if node.target is _LINEAR else ctx.layer_norm_nodes
        if site in table:
            raise RuntimeError(f"site {site} is used by two graph nodes ({table[site].name}, {node.name})")
        table[site] = node
    sites = ctx.base.sites
    lost = sorted(set(sites.linear) - set(ctx.linear_nodes)) + sorted(set(sites.layer_norm) - set(ctx.layer_norm_nodes))
    if lost:
        raise RuntimeError(f"sites of the model not found in the captured graph: {lost[:4]}")
    return PassResult(
        "find_sites",
        0,
        f"found {len(ctx.linear_nodes)} linear and {len(ctx.layer_norm_nodes)} LayerNorm sites",
    )
