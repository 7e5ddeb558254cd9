"""The shape plumbing around an attention's scaled_dot_product_attention in a captured BERT graph: the head split of
its query, key and value (`view` to [batch, seq, heads, dim], then `transpose(1, 2)`) and the head merge of its
context, each step with one reader. Shared by the passes that move per-feature task terms across an attention
(fold_context_scale, fold_key_terms)."""

from __future__ import annotations

import torch
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from pets_compiler.passes.context import node_value

ATEN = torch.ops.aten
_RESHAPES = (ATEN.view.default, ATEN.reshape.default, ATEN._unsafe_view.default)
_COPIES = (ATEN.contiguous.default, ATEN.clone.default, ATEN.alias.default)


def sole_input(node: Node | None) -> Node | None:
    """node.args[0] when node is its only reader (a second reader would see the scale move)."""
    arg = node.args[0] if node is not None and node.args else None
    return arg if isinstance(arg, Node) and list(arg.users) == [node] else None


def shape_of(node: Node | None) -> tuple[int, ...] | None:
    """The node's shape (symbolic sizes as SymInts), as capture recorded it; None where no value is recorded."""
    value = None if node is None else node_value(node)
    return None if value is None else tuple(value.shape)


def same_shape(a: tuple[int, ...] | None, b: tuple[int, ...] | None) -> bool:
    if a is None or b is None or len(a) != len(b):
        return False
    return all(statically_known_true(m == n) for m, n in zip(a, b, strict=True))


def skip_copies(node: Node | None) -> Node | None:
    """Back through ops that keep values and shape (copies, reshapes to the same shape)."""
    while node is not None and (
        node.target in _COPIES or (node.target in _RESHAPES and same_shape(shape_of(node), shape_of(sole_input(node))))
    ):
        node = sole_input(node)
    return node


def swaps_1_2(node: Node | None) -> bool:
    """aten.transpose(x, 1, 2) of a 4-d x: [batch, seq, heads, dim] <-> [batch, heads, seq, dim]."""
    if node is None or node.target is not ATEN.transpose.int or len(shape_of(node) or ()) != 4:
        return False
    return sorted(d % 4 for d in node.args[1:3] if isinstance(d, int)) == [1, 2]


def head_reshape(node: Node | None, heads: tuple[int, ...] | None) -> bool:
    """A reshape between [batch, seq, heads * dim] and `heads` = [batch, seq, heads, dim], either way."""
    if node is None or node.target not in _RESHAPES or heads is None or len(heads) != 4:
        return False
    flat = (heads[0], heads[1], heads[2] * heads[3])
    out, inp = shape_of(node), shape_of(sole_input(node))
    return (same_shape(out, heads) and same_shape(inp, flat)) or (same_shape(out, flat) and same_shape(inp, heads))


def sdpa_dropout(sdpa: Node) -> object:
    return sdpa.args[4] if len(sdpa.args) > 4 else sdpa.kwargs.get("dropout_p", 0.0)


def split_source(node: Node) -> tuple[Node, tuple[int, ...]] | None:
    """(x, [batch, seq, heads, dim]) where `node` is transpose(1, 2) of x's head split, with one reader at every
    step from x on; None otherwise."""
    swap = skip_copies(node)
    split = skip_copies(sole_input(swap)) if swaps_1_2(swap) else None
    heads = shape_of(split)
    source = sole_input(split) if head_reshape(split, heads) else None
    return None if source is None or heads is None else (source, heads)
