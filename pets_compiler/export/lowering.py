"""Lower a program's `torch.ops.pets` ops for the ONNX export: each op node is pointed at its translation
(custom_ops/onnx_translations.py), so the program traces to standard torch ops only."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor
from torch._ops import OpOverload
from torch.fx import GraphModule

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
