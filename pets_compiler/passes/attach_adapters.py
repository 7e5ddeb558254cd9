"""Replace the end of each planned sublayer (residual add + LayerNorm) with the per-task adapter op.

The pattern, as HF's BertSelfOutput / BertOutput compute it and the capture records it (dropout already gone):
    h = dense(x) [+ task ops of the dense site];  ln = layer_norm(add(h, residual))
becomes  ln = pets.adapter(h, residual, task_ids, ...), which places the bottleneck where AdapterHub does
(before or after the sublayer's LayerNorm, per the task's config) and is the plain sublayer for other rows.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from pets_compiler.passes.context import CompileContext, PassResult, cleanup, op_target, site_output
from pets_compiler.runtime.tables import SLOTS, TableSpec, bottleneck_dim


def _match(ctx: CompileContext, sublayer: str) -> tuple[Node, Node, Node]:
    """(layer_norm node, h, residual) of a sublayer end, or an error naming what did not match."""
    ln = ctx.layer_norm_nodes[f"{sublayer}.LayerNorm"]
    add = ln.args[0]
    h = site_output(ctx.linear_nodes[f"{sublayer}.dense"])
    if not isinstance(add, Node) or add.target is not torch.ops.aten.add.Tensor or add.args[0] is not h:
        raise RuntimeError(f"{sublayer}: expected LayerNorm(dense(x) + residual), found {ln.format_node()}")
    residual = add.args[1]
    assert isinstance(residual, Node)
    return ln, h, residual


def attach_adapters(gm: GraphModule, ctx: CompileContext) -> PassResult:
    """layer_norm(add(h, residual)) -> pets.adapter(h, residual, task_ids, LN and its deltas, adapter tables)."""
    task_ids = ctx.require_task_ids()
    for sublayer in ctx.plan.adapter:
        ln, h, residual = _match(ctx, sublayer)
        ln_site, hidden, r = f"{sublayer}.LayerNorm", ctx.base.sites.sublayer[sublayer], bottleneck_dim(sublayer)

        def table(
            key: str, kind: str, site: str, field: str, dims: tuple[int | str, ...], integer: bool = False
        ) -> Node:
            return ctx.add_table(gm, TableSpec(key, kind, site, field, dims, integer))

        ln_deltas = [
            table(f"{ln_site}.ln_weight", "layer_norm", ln_site, "weight", (SLOTS, hidden)),
            table(f"{ln_site}.ln_bias", "layer_norm", ln_site, "bias", (SLOTS, hidden)),
        ]
        adapter = [
            table(f"{sublayer}.adapter_down_w", "adapter", sublayer, "down_w", (SLOTS, r, hidden)),
            table(f"{sublayer}.adapter_down_b", "adapter", sublayer, "down_b", (SLOTS, r)),
            table(f"{sublayer}.adapter_up_w", "adapter", sublayer, "up_w", (SLOTS, hidden, r)),
            table(f"{sublayer}.adapter_up_b", "adapter", sublayer, "up_b", (SLOTS, hidden)),
            table(f"{sublayer}.adapter_scaling", "adapter", sublayer, "scaling", (SLOTS,)),
            table(f"{sublayer}.adapter_config", "adapter", sublayer, "config", (SLOTS, 6), integer=True),
        ]
        eps = ln.args[4] if len(ln.args) > 4 else 1e-5
        args = (h, residual, task_ids, ln.args[2], ln.args[3], *ln_deltas, eps, *adapter)
        with gm.graph.inserting_before(ln):
            new = gm.graph.call_function(op_target("adapter"), args)
        ln.replace_all_uses_with(new)
        gm.graph.erase_node(ln)
        ctx.layer_norm_nodes[ln_site] = new
        ctx.adapted_layer_norms.add(ln_site)
    if ctx.plan.adapter:
        cleanup(gm)
    n = len(ctx.plan.adapter)
    return PassResult("attach_adapters", n, f"attached bottleneck adapters at {n} sublayer ends")
