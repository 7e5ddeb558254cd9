"""Replace every planned LayerNorm with the per-task LayerNorm op (BitFit on LayerNorm parameters)."""

from __future__ import annotations

from torch.fx import GraphModule

from pets_compiler.passes.context import CompileContext, PassResult, cleanup, op_target
from pets_compiler.runtime.tables import SLOTS, TableSpec


def attach_layer_norm_delta(gm: GraphModule, ctx: CompileContext) -> PassResult:
    """layer_norm(x, shape, w, b, eps) -> pets.layer_norm(x, task_ids, w, b, dw, db, eps)."""
    task_ids = ctx.require_task_ids()
    planned = [s for s in ctx.plan.layer_norm if s not in ctx.adapted_layer_norms]  # adapters serve their own LN
    for site in planned:
        node = ctx.layer_norm_nodes[site]
        x, _, weight, bias = node.args[:4]
        eps = node.args[4] if len(node.args) > 4 else 1e-5
        hidden = ctx.base.sites.layer_norm[site]
        dw = ctx.add_table(gm, TableSpec(f"{site}.ln_weight", "layer_norm", site, "weight", (SLOTS, hidden)))
        db = ctx.add_table(gm, TableSpec(f"{site}.ln_bias", "layer_norm", site, "bias", (SLOTS, hidden)))
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(op_target("layer_norm"), (x, task_ids, weight, bias, dw, db, eps))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        ctx.layer_norm_nodes[site] = new
    if planned:
        cleanup(gm)
    n = len(planned)
    return PassResult("attach_layer_norm_delta", n, f"replaced {n} LayerNorms with per-task LayerNorm")
