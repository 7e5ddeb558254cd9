"""Attach a per-task bias delta (BitFit) after every planned linear site."""

from __future__ import annotations

from torch.fx import GraphModule

from pets_compiler.passes.context import CompileContext, PassResult, cleanup, insert_after, op_target, site_output
from pets_compiler.runtime.tables import SLOTS, TableSpec


def attach_bias_delta(gm: GraphModule, ctx: CompileContext) -> PassResult:
    """y -> bias_delta(y, task_ids, db) at each site of plan.bias."""
    task_ids = ctx.require_task_ids()
    shapes = ctx.base.sites.linear
    for site in ctx.plan.bias:
        table = ctx.add_table(gm, TableSpec(f"{site}.bias", "bias", site, "bias", (SLOTS, shapes[site][0])))
        y = site_output(ctx.linear_nodes[site])
        insert_after(gm, y, op_target("bias_delta"), (y, task_ids, table))
    if ctx.plan.bias:
        cleanup(gm)
    return PassResult("attach_bias_delta", len(ctx.plan.bias), f"attached bias deltas at {len(ctx.plan.bias)} sites")
