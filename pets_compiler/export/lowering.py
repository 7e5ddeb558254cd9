"""Lower a program's `torch.ops.pets` ops for the ONNX export: each op node is pointed at its translation
(custom_ops/onnx_translations.py), so the program traces to standard torch ops only."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch._ops import OpOverload
from torch.fx import GraphModule, Node

from pets_compiler.custom_ops import onnx_translations
from pets_compiler.errors import ExportError


def _is_pets_op(target: Any) -> bool:
    return isinstance(target, OpOverload) and target.namespace == "pets"


def lower_pets_ops(gm: GraphModule, table: dict[OpOverload, Callable[..., Tensor]] | None = None) -> int:
    """Point every pets op node of `gm` at its translation, in place; returns how many. An op without one is
    refused before anything changes, with its name."""
    table = onnx_translations.TRANSLATIONS if table is None else table
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and _is_pets_op(n.target)]
    missing = sorted({str(n.target) for n in nodes if n.target not in table})
    if missing:
        raise ExportError(
            f"no ONNX translation for {', '.join(missing)}: the program uses an op that "
            "pets_compiler/custom_ops/onnx_translations.py does not translate; add one there"
        )
    for n in nodes:
        n.target = table[n.target]
    gm.recompile()
    return len(nodes)


def expand_attention_masks(gm: GraphModule) -> int:
    """Expand each attention's mask to the queries' length, in place; returns how many. The program's key padding
    mask is [batch, 1, 1, seq] (passes/attention_mask.py), broadcast over queries by torch, but ONNX Runtime's
    Attention (opset 23) asks the mask's query dimension to equal the queries' ("inconsistent q_sequence_length")."""
    sdpa = torch.ops.aten.scaled_dot_product_attention.default
    count = 0
    for n in [n for n in gm.graph.nodes if n.target is sdpa and len(n.args) > 3 and isinstance(n.args[3], Node)]:
        with gm.graph.inserting_before(n):
            queries = gm.graph.call_function(torch.ops.aten.sym_size.int, (n.args[0], 2))
            mask = gm.graph.call_function(torch.ops.aten.expand.default, (n.args[3], [-1, -1, queries, -1]))
        n.args = (*n.args[:3], mask, *n.args[4:])
        count += 1
    if count:
        gm.recompile()
    return count
