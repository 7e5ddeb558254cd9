"""Fuse the terms a LayerNorm's input is summed from into the pets op that normalizes it: a linear site's BitFit bias
delta and the sublayer's residual add become `pets.layer_norm`'s x_bias and residual, and the bias delta of the dense
before a `pets.adapter` its h_bias. The LayerNorm's one pass over its [batch, seq, hidden] input then reads the terms
itself, instead of a pass of their own writing the sum first.

It runs after fuse_row_terms, whose `row_delta(y, t, db, None, r)` before a LayerNorm it takes apart again (a
row_delta with an IA3 scale stays: the LayerNorm does not scale its input), and after attach_adapters and
attach_layer_norm_delta, whose ops it extends. The ops round each sum to the input's dtype as the unfused ops did, so
on the CPU the program computes bitwise what it did before."""

from __future__ import annotations

from collections import Counter

import torch
from torch.fx import GraphModule, Node

from pets_compiler.passes.context import CompileContext, PassResult, alike, cleanup, node_value, op_target

# The required arguments of pets.layer_norm(x, task_ids, weight, bias, weight_delta, bias_delta, eps, x_bias=None,
# residual=None) and pets.adapter(h, residual, task_ids, ..., config, h_bias=None): the index of the first optional.
LAYER_NORM_ARGS, ADAPTER_ARGS = 7, 14


def _sole_reader(node: Node, user: Node) -> bool:
    """`user` is node's only user and reads it once (as one argument)."""
    return list(node.users) == [user] and sum(a is node for a in (*user.args, *user.kwargs.values())) == 1


def _layer_norm_terms(x: Node, task_ids: Node) -> tuple[Node, Node | None, Node | None] | None:
    """(y, x_bias, residual) where x is row_delta(y, task_ids, x_bias, None, residual) or aten.add(y, residual), an
    elementwise add with alpha 1 (y, residual and the sum alike); else None."""
    if x.target is op_target("row_delta"):
        y, ids, bias, scale, residual = x.args
        if ids is not task_ids or scale is not None:
            return None
        assert isinstance(y, Node) and (bias is None or isinstance(bias, Node))
        assert residual is None or isinstance(residual, Node)
        return y, bias, residual
    if x.target is torch.ops.aten.add.Tensor and x.kwargs.get("alpha", 1) == 1:
        y, residual = x.args[:2]
        if not (isinstance(y, Node) and isinstance(residual, Node)):
            return None
        value = node_value(x)
        return (y, None, residual) if alike(node_value(y), value) and alike(node_value(residual), value) else None
    return None


def _fuse_layer_norm(gm: GraphModule, ln: Node, task_ids: Node) -> tuple[bool, bool] | None:
    """Move the terms of ln's input into ln; (x_bias given, residual given), or None where nothing matched."""
    x = ln.args[0]
    if len(ln.args) != LAYER_NORM_ARGS or ln.kwargs or ln.args[1] is not task_ids:
        return None  # its terms already fused
    if not (isinstance(x, Node) and _sole_reader(x, ln)):
        return None
    terms = _layer_norm_terms(x, task_ids)
    if terms is None:
        return None
    y, x_bias, residual = terms
    ln.args = (y, *ln.args[1:], x_bias, residual)
    gm.graph.erase_node(x)
    return x_bias is not None, residual is not None


def _fuse_adapter(gm: GraphModule, adapter: Node, task_ids: Node) -> bool:
    """Move the bias delta of adapter's h into adapter; whether one was there."""
    h = adapter.args[0]
    if len(adapter.args) != ADAPTER_ARGS or adapter.kwargs or adapter.args[2] is not task_ids:
        return False
    if not (isinstance(h, Node) and h.target is op_target("bias_delta") and _sole_reader(h, adapter)):
        return False
    y, ids, h_bias = h.args
    if ids is not task_ids:
        return False
    adapter.args = (y, *adapter.args[1:], h_bias)
    gm.graph.erase_node(h)
    return True


def fuse_norm_inputs(gm: GraphModule, ctx: CompileContext) -> PassResult:
    """layer_norm(row_delta(y, t, db, None, r)) or layer_norm(add(y, r)) -> layer_norm(y, ..., x_bias=db?, r), and
    adapter(bias_delta(y, t, db), r, t, ...) -> adapter(y, r, t, ..., h_bias=db), each intermediate read once."""
    task_ids = ctx.require_task_ids()
    layer_norm, adapter = op_target("layer_norm"), op_target("adapter")
    fused: Counter[str] = Counter()
    for node in list(gm.graph.nodes):
        if node.target is layer_norm:
            terms = _fuse_layer_norm(gm, node, task_ids)
            if terms is not None:
                fused.update(layer_norm=1, bias=terms[0], residual=terms[1])
        elif node.target is adapter:
            fused.update(adapter=_fuse_adapter(gm, node, task_ids))
    changed = fused["layer_norm"] + fused["adapter"]
    if changed:
        cleanup(gm)
    detail = (
        f"fused {fused['bias']} bias deltas and {fused['residual']} residual adds into {fused['layer_norm']} "
        f"LayerNorms, {fused['adapter']} bias deltas into adapters"
    )
    return PassResult("fuse_norm_inputs", changed, detail)
