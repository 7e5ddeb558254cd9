"""Add the `task_ids` graph input: int64 [batch], each row's task table slot."""

from __future__ import annotations

from torch.fx import GraphModule

from pets_compiler.passes.context import CompileContext, PassResult, cleanup


def add_task_ids(gm: GraphModule, ctx: CompileContext) -> PassResult:
    """Insert the task_ids placeholder after the model inputs."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if any(n.name == "task_ids" for n in placeholders):
        raise RuntimeError("the graph already has a task_ids input")
    with gm.graph.inserting_after(placeholders[-1]):
        ctx.task_ids = gm.graph.placeholder("task_ids")
    cleanup(gm)
    return PassResult("add_task_ids", 1, "added input task_ids")
