"""Attach IA3 scales: on a linear's input (peft feedforward modules) or on the site's output."""

from __future__ import annotations

from torch.fx import GraphModule, Node

from pets_compiler.passes.context import CompileContext, PassResult, cleanup, insert_after, op_target, site_output
from pets_compiler.runtime.tables import SLOTS, TableSpec


def attach_ia3(gm: GraphModule, ctx: CompileContext) -> PassResult:
    """linear(x) -> linear(scale(x, l_in - 1)); site output y -> scale(y, l_out - 1) (tables hold l - 1)."""
    task_ids = ctx.require_task_ids()
    shapes = ctx.base.sites.linear
    for site in ctx.plan.ia3_in:
        linear = ctx.linear_nodes[site]
        table = ctx.add_table(gm, TableSpec(f"{site}.ia3_in", "ia3_in", site, "scale", (SLOTS, shapes[site][1])))
        x = linear.args[0]
        assert isinstance(x, Node)
        with gm.graph.inserting_before(linear):
            scaled = gm.graph.call_function(op_target("scale"), (x, task_ids, table))
        linear.replace_input_with(x, scaled)  # only this linear reads the scaled input
    for site in ctx.plan.ia3_out:
        table = ctx.add_table(gm, TableSpec(f"{site}.ia3_out", "ia3_out", site, "scale", (SLOTS, shapes[site][0])))
        y = site_output(ctx.linear_nodes[site])
        insert_after(gm, y, op_target("scale"), (y, task_ids, table))
    n = len(ctx.plan.ia3_in) + len(ctx.plan.ia3_out)
    if n:
        cleanup(gm)
    return PassResult(
        "attach_ia3", n, f"attached IA3 scales at {len(ctx.plan.ia3_in)} inputs, {len(ctx.plan.ia3_out)} outputs"
    )
