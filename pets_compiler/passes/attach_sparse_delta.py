"""Attach segmented sparse deltas (diff-pruning, MaskBERT) at planned linear and embedding sites."""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from pets_compiler.passes.context import CompileContext, PassResult, cleanup, insert_after, op_target, site_output
from pets_compiler.runtime.tables import SLOTS, TableSpec, pool_dim


def _pool(gm: GraphModule, ctx: CompileContext, site: str, rows: int) -> list[Node]:
    return [
        ctx.add_table(gm, TableSpec(f"{site}.sparse_row_ptr", "sparse", site, "row_ptr", (SLOTS, rows + 1), True)),
        ctx.add_table(gm, TableSpec(f"{site}.sparse_col", "sparse", site, "col", (pool_dim(site),), True)),
        ctx.add_table(gm, TableSpec(f"{site}.sparse_val", "sparse", site, "val", (pool_dim(site),))),
    ]


def _batched_embedding(gm: GraphModule, ctx: CompileContext, node: Node) -> tuple[Node, Node]:
    """The embedding output and ids with the batch as dim 0: position embeddings are looked up once for
    [1, seq] and broadcast, so a per-row delta needs them expanded to [batch, seq] first."""
    ids = node.args[1]
    batch_ids = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.name == "input_ids")
    with gm.graph.inserting_before(node.next):
        shape = gm.graph.call_function(torch.ops.aten.sym_size.int, (batch_ids, 0))
        seq = gm.graph.call_function(torch.ops.aten.sym_size.int, (batch_ids, 1))
        ids_b = gm.graph.call_function(torch.ops.aten.expand.default, (ids, [shape, seq]))
        out = gm.graph.call_function(torch.ops.aten.expand.default, (node, [shape, seq, -1]))  # last: ops go after it
    node.replace_all_uses_with(out, delete_user_cb=lambda user: user is not out)
    return out, ids_b


def attach_sparse_delta(gm: GraphModule, ctx: CompileContext) -> PassResult:
    """y -> sparse_delta(y, x, task_ids, CSR pool) at linears; embedding_delta(e, ids, ...) at embeddings."""
    task_ids = ctx.require_task_ids()
    for site in ctx.plan.sparse:
        if site in ctx.linear_nodes:
            linear = ctx.linear_nodes[site]
            y = site_output(linear)
            pool = _pool(gm, ctx, site, ctx.base.sites.linear[site][0])
            insert_after(gm, y, op_target("sparse_delta"), (y, linear.args[0], task_ids, *pool))
        else:
            rows = ctx.base.sites.embedding[site][0]
            out, ids = _batched_embedding(gm, ctx, ctx.embedding_nodes[site])
            pool = _pool(gm, ctx, site, rows)
            insert_after(gm, out, op_target("embedding_delta"), (out, ids, task_ids, *pool))
    if ctx.plan.sparse:
        cleanup(gm)
    n = len(ctx.plan.sparse)
    return PassResult("attach_sparse_delta", n, f"attached sparse (diff / mask) deltas at {n} sites")
