"""Map each aten.linear / aten.layer_norm node to the HF module path of its weight."""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from pets_compiler.passes.context import CompileContext, PassResult

_LINEAR = torch.ops.aten.linear.default
_LAYER_NORM = torch.ops.aten.layer_norm.default
_EMBEDDING = torch.ops.aten.embedding.default
_WEIGHT_ARG = {_LINEAR: 1, _LAYER_NORM: 2, _EMBEDDING: 0}


def find_sites(gm: GraphModule, ctx: CompileContext) -> PassResult:
    """Record the linear, LayerNorm and embedding nodes by site name; the graph is not changed."""
    tables = {_LINEAR: ctx.linear_nodes, _LAYER_NORM: ctx.layer_norm_nodes, _EMBEDDING: ctx.embedding_nodes}
    for node in gm.graph.nodes:
        if node.target not in _WEIGHT_ARG:
            continue
        weight = node.args[_WEIGHT_ARG[node.target]]
        if getattr(weight, "op", None) != "get_attr" or not str(weight.target).endswith(".weight"):
            continue
        site = str(weight.target).removesuffix(".weight")
        table = tables[node.target]
        if site in table:
            raise RuntimeError(f"site {site} is used by two graph nodes ({table[site].name}, {node.name})")
        table[site] = node
    sites = ctx.base.sites
    lost = [s for s in [*sites.linear, *sites.layer_norm, *sites.embedding] if not any(s in t for t in tables.values())]
    if lost:
        raise RuntimeError(f"sites of the model not found in the captured graph: {lost[:4]}")
    found = (
        f"{len(ctx.linear_nodes)} linear, {len(ctx.layer_norm_nodes)} LayerNorm, {len(ctx.embedding_nodes)} embedding"
    )
    return PassResult("find_sites", 0, f"found {found} sites")
