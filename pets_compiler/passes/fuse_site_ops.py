"""Fuse the task ops of one linear site (LoRA then bias delta) into one `pets.linear_delta` call."""

from __future__ import annotations

from torch.fx import GraphModule

from pets_compiler.passes.context import CompileContext, PassResult, cleanup, op_target


def fuse_site_ops(gm: GraphModule, ctx: CompileContext) -> PassResult:
    """bias_delta(lora_delta(y, x, t, A, B, s, r), t, db) -> linear_delta(y, x, t, A, B, s, r, db)."""
    lora, bias, fused_op = op_target("lora_delta"), op_target("bias_delta"), op_target("linear_delta")
    fused = 0
    for node in list(gm.graph.nodes):
        if node.target is not bias:
            continue
        inner = node.args[0]
        if getattr(inner, "target", None) is not lora or len(inner.users) != 1:
            continue
        y, x, task_ids, a, b, scale, rank = inner.args
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(fused_op, (y, x, task_ids, a, b, scale, rank, node.args[2]))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        gm.graph.erase_node(inner)
        fused += 1
    if fused:
        cleanup(gm)
    return PassResult("fuse_site_ops", fused, f"fused LoRA + bias delta into one call at {fused} sites")
