"""Attach a segmented LoRA op after every planned linear site."""

from __future__ import annotations

from torch.fx import GraphModule

from pets_compiler.passes.context import CompileContext, PassResult, cleanup, insert_after, op_target
from pets_compiler.runtime.tables import SLOTS, TableSpec, rank_dim


def attach_lora(gm: GraphModule, ctx: CompileContext) -> PassResult:
    """y = linear(x) -> lora_delta(y, x, task_ids, A, B, scale, rank) at each site of plan.lora."""
    task_ids = ctx.require_task_ids()
    shapes = ctx.base.sites.linear
    for site in ctx.plan.lora:
        out_f, in_f = shapes[site]
        linear = ctx.linear_nodes[site]
        tables = [
            ctx.add_table(gm, TableSpec(f"{site}.lora_A", "lora", site, "A", (SLOTS, rank_dim(site), in_f))),
            ctx.add_table(gm, TableSpec(f"{site}.lora_B", "lora", site, "B", (SLOTS, out_f, rank_dim(site)))),
            ctx.add_table(gm, TableSpec(f"{site}.lora_scale", "lora", site, "scale", (SLOTS,))),
            ctx.add_table(gm, TableSpec(f"{site}.lora_rank", "lora", site, "rank", (SLOTS,), integer=True)),
        ]
        insert_after(gm, linear, op_target("lora_delta"), (linear, linear.args[0], task_ids, *tables))
    if ctx.plan.lora:
        cleanup(gm)
    return PassResult("attach_lora", len(ctx.plan.lora), f"attached LoRA at {len(ctx.plan.lora)} linear sites")
