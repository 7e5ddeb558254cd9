"""Fuse the per-task row terms around a GELU (BitFit's bias delta before it, IA3's input scale after it) into one
`pets.gelu_delta` call: one pass over the FFN's [batch, seq, intermediate] activation instead of one per op."""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import GraphModule, Node

from pets_compiler.passes.context import CompileContext, PassResult, cleanup, op_target


def _sole_scale(gelu: Node, scale: Any, task_ids: Node) -> Node | None:
    """The IA3 scale that is the GELU's only user, if it is."""
    users = list(gelu.users)
    if len(users) != 1:
        return None
    user = users[0]
    return user if user.target is scale and user.args[0] is gelu and user.args[1] is task_ids else None


def fuse_activation(gm: GraphModule, ctx: CompileContext) -> PassResult:
    """scale(gelu(bias_delta(y, t, db)), t, l - 1), or either half -> gelu_delta(y, t, db?, l - 1?, approximate)."""
    task_ids = ctx.require_task_ids()
    bias, scale, fused_op = op_target("bias_delta"), op_target("scale"), op_target("gelu_delta")
    fused = biases = scales = 0
    for gelu in [n for n in gm.graph.nodes if n.target is torch.ops.aten.gelu.default]:
        x = gelu.args[0]
        assert isinstance(x, Node)
        inner = x if x.target is bias and x.args[1] is task_ids and len(x.users) == 1 else None
        outer = _sole_scale(gelu, scale, task_ids)
        if inner is None and outer is None:
            continue
        y, db = (inner.args[0], inner.args[2]) if inner is not None else (x, None)
        dl = outer.args[2] if outer is not None else None
        approximate = gelu.kwargs.get("approximate", gelu.args[1] if len(gelu.args) > 1 else "none")
        last = outer if outer is not None else gelu
        with gm.graph.inserting_before(last):
            new = gm.graph.call_function(fused_op, (y, task_ids, db, dl, approximate))
        last.replace_all_uses_with(new)
        for node in (outer, gelu, inner):
            if node is not None:
                gm.graph.erase_node(node)
        fused, biases, scales = fused + 1, biases + (inner is not None), scales + (outer is not None)
    if fused:
        cleanup(gm)
    detail = f"fused the row terms into {fused} GELUs ({biases} bias deltas, {scales} IA3 scales)"
    return PassResult("fuse_activation", fused, detail)
