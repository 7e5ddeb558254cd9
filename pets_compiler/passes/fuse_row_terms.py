"""Fuse the per-task row terms at a linear site's output (BitFit's bias delta, IA3's output scale) and the residual
add after them into one `pets.row_delta` call: one pass over the site's [batch, seq, features] activation instead of
one per op. A site whose LoRA op (`pets.linear_delta` / `pets.lora_delta`) is followed by its IA3 output scale alone
takes the scale into that op instead (linear_delta's `out_scale`): the scale then costs no pass of its own.

It runs after attach_adapters and attach_layer_norm_delta: an adapter takes its sublayer's `add(dense_out,
residual)` itself (attach_adapters matches that pattern), so the adds left are those before a plain or per-task
LayerNorm, and fusing them breaks no pattern a later pass looks for."""

from __future__ import annotations

from collections import Counter

import torch
from torch.fx import GraphModule, Node

from pets_compiler.passes.context import CompileContext, PassResult, alike, cleanup, node_value, op_target


def _sole_user(node: Node) -> Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _residual(add: Node | None, term: Node, y: Node) -> Node | None:
    """r where `add` is aten.add(term, r) or aten.add(r, term) with alpha 1 and r, the sum and y all alike."""
    if add is None or add.target is not torch.ops.aten.add.Tensor or add.kwargs.get("alpha", 1) != 1:
        return None
    a, b = add.args[:2]
    r = b if a is term else a
    if r is term or not isinstance(r, Node):
        return None
    value = node_value(y)
    return r if alike(value, node_value(r)) and alike(value, node_value(add)) else None


# linear_delta's argument positions: (y, x, task_ids, lora_a, lora_b, lora_scale, lora_rank, bias, out_scale)
OUT_SCALE = 8


def _scales_into_linear_delta(gm: GraphModule) -> int:
    """scale(linear_delta(y, x, t, A, B, s, r, db), t, l - 1) -> linear_delta(y, x, t, A, B, s, r, db, l - 1), and
    scale(lora_delta(...)) likewise, where the LoRA op has that one user and no residual add follows the scale (a
    row_delta takes that one, with its add)."""
    scale, lora, linear = op_target("scale"), op_target("lora_delta"), op_target("linear_delta")
    fused = 0
    nodes: list[Node] = list(gm.graph.nodes)
    for node in nodes:
        if node.target is not scale:
            continue
        inner, task_ids, dl = node.args
        if not isinstance(inner, Node) or inner.target not in (lora, linear) or _sole_user(inner) is not node:
            continue
        if inner.args[2] is not task_ids or _residual(_sole_user(node), node, inner) is not None:
            continue
        args = inner.args if inner.target is linear else (*inner.args, None)  # lora_delta: no bias
        if len(args) > OUT_SCALE and args[OUT_SCALE] is not None:
            continue  # already scaled (not made by this pipeline)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(linear, (*args[:OUT_SCALE], dl))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        gm.graph.erase_node(inner)
        fused += 1
    return fused


def fuse_row_terms(gm: GraphModule, ctx: CompileContext) -> PassResult:
    """scale(bias_delta(y, t, db), t, l - 1), add(bias_delta(y), r), add(scale(bias_delta(y)), r) or
    add(scale(y), r) -> row_delta(y, t, db?, l - 1?, r?), each intermediate node read by the next alone; first an
    output scale right after a site's LoRA op goes into it (_scales_into_linear_delta)."""
    bias, scale, fused_op = op_target("bias_delta"), op_target("scale"), op_target("row_delta")
    terms: Counter[str] = Counter(into_lora=_scales_into_linear_delta(gm))
    erased: set[Node] = set()
    # In graph order a bias delta comes before the scale that reads it, so each chain is found from its first op.
    for node in list(gm.graph.nodes):
        if node in erased or node.target not in (bias, scale):
            continue
        y, task_ids, table = node.args
        assert isinstance(y, Node)
        chain, db, dl = [node], None, None
        if node.target is bias:
            db, user = table, _sole_user(node)
            if user is not None and user.target is scale and user.args[:2] == (node, task_ids):
                chain.append(user)
                dl = user.args[2]
        else:
            dl = table
        add = _sole_user(chain[-1])
        r = _residual(add, chain[-1], y)
        if r is None and len(chain) == 1:
            continue  # a term alone: nothing to fuse
        if r is not None:
            assert add is not None
            chain.append(add)
        with gm.graph.inserting_before(chain[-1]):
            new = gm.graph.call_function(fused_op, (y, task_ids, db, dl, r))
        chain[-1].replace_all_uses_with(new)
        for n in reversed(chain):
            gm.graph.erase_node(n)
            erased.add(n)
        terms.update(fused=1, bias=db is not None, scale=dl is not None, residual=r is not None)
    if terms["fused"] or terms["into_lora"]:
        cleanup(gm)
    detail = (
        f"fused {terms['fused']} linear sites' row terms into row_delta ({terms['bias']} bias deltas, "
        f"{terms['scale']} IA3 scales, {terms['residual']} residual adds); {terms['into_lora']} IA3 output scales "
        "into their site's linear_delta"
    )
    return PassResult("fuse_row_terms", terms["fused"] + terms["into_lora"], detail)
