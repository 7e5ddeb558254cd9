"""Remove nodes that only matter in training (dropout, which eval-mode export still records)."""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from pets_compiler.passes.context import CompileContext, PassResult, cleanup

_TRAINING_ONLY = (torch.ops.aten.dropout.default,)


def drop_training_nodes(gm: GraphModule, ctx: CompileContext) -> PassResult:
    """Replace every eval-mode dropout with its input."""
    dropped = 0
    for node in list(gm.graph.nodes):
        if node.target in _TRAINING_ONLY:
            if len(node.args) > 2 and node.args[2]:
                raise RuntimeError(f"{node.name} is a dropout in training mode; capture the model in eval mode")
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            dropped += 1
    if dropped:
        cleanup(gm)
    return PassResult("drop_training_nodes", dropped, f"removed {dropped} dropout nodes")
