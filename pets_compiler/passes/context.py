"""What every pass gets and returns: the compile context, the pass result, and the shared cleanup helper."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, cast

import torch
from torch.fx import GraphModule, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from pets_compiler.frontend.base import BaseModel, Pooling
from pets_compiler.runtime.tables import TableSpec


@dataclass(frozen=True)
class SitePlan:
    """Which sites get which task op (by table kind). Fixed at compile time: add_task fills slots, not sites."""

    lora: tuple[str, ...] = ()
    bias: tuple[str, ...] = ()
    layer_norm: tuple[str, ...] = ()
    ia3_in: tuple[str, ...] = ()
    ia3_out: tuple[str, ...] = ()
    sparse: tuple[str, ...] = ()  # linear and embedding sites (diff-pruning and MaskBERT)
    adapter: tuple[str, ...] = ()  # sublayer ends
    head_dense: tuple[str, ...] = ()  # ("head",) when heads with a dense layer (AdapterHub's 2-layer) are served

    def to_json(self) -> dict[str, list[str]]:
        return {f.name: list(getattr(self, f.name)) for f in fields(self)}

    @staticmethod
    def from_json(d: dict[str, list[str]]) -> SitePlan:
        return SitePlan(**{f.name: tuple(d.get(f.name, ())) for f in fields(SitePlan)})


@dataclass
class CompileContext:
    base: BaseModel
    plan: SitePlan
    pooling: Pooling
    tables: list[TableSpec] = field(default_factory=list)
    linear_nodes: dict[str, Node] = field(default_factory=dict)
    layer_norm_nodes: dict[str, Node] = field(default_factory=dict)
    embedding_nodes: dict[str, Node] = field(default_factory=dict)
    adapted_layer_norms: set[str] = field(default_factory=set)  # LayerNorm sites an adapter op took over
    dropped_key_bias: set[str] = field(default_factory=set)  # key sites whose bias delta softmax ignores
    task_ids: Node | None = None

    def add_table(self, gm: GraphModule, spec: TableSpec) -> Node:
        """A new graph input for a task table, placed after the last placeholder."""
        last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
        with gm.graph.inserting_after(last):
            node = gm.graph.placeholder(spec.arg_name)
        self.tables.append(spec)
        return node

    def require_task_ids(self) -> Node:
        if self.task_ids is None:
            raise RuntimeError("task_ids input is not in the graph yet (add_task_ids must run first)")
        return self.task_ids


@dataclass(frozen=True)
class PassResult:
    name: str
    changed: int
    detail: str

    def __str__(self) -> str:
        return f"{self.name}: {self.detail}"


def cleanup(gm: GraphModule) -> None:
    """Dead-code elimination, lint and recompile; run once after a pass that changed the graph."""
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()


def insert_after(gm: GraphModule, node: Node, target: Callable[..., Any], args: tuple[Any, ...]) -> Node:
    """Insert `target(*args)` right after `node` and route node's other users to it."""
    with gm.graph.inserting_before(node.next):
        new = gm.graph.call_function(target, args)
    node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    return new


def site_output(linear: Node) -> Node:
    """The last task op already attached after a linear (or the linear itself): where the next one goes."""
    node = linear
    while True:
        users = [u for u in node.users if str(u.target).startswith("pets.") and u.args[0] is node]
        if not users:
            return node
        node = users[0]


def node_value(node: Node) -> torch.Tensor | None:
    """The (fake) tensor a node computes, as capture recorded it in meta "val"; for a task op a pass inserted (no
    meta), its first argument's, since every pets op but segmented_linear returns a tensor like its first argument
    (custom_ops/fake.py). None where neither tells."""
    while "val" not in node.meta:
        first = node.args[0] if node.args else None
        task_op = str(node.target).startswith("pets.") and node.target is not op_target("segmented_linear")
        if not task_op or not isinstance(first, Node):
            return None
        node = first
    val = node.meta["val"]
    return val if isinstance(val, torch.Tensor) else None


def alike(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Same dtype and (symbolic) shape: their sum is elementwise, with no broadcast and no type promotion."""
    if a is None or b is None or a.dtype != b.dtype or a.dim() != b.dim():
        return False
    return all(statically_known_true(m == n) for m, n in zip(a.shape, b.shape, strict=True))


def op_target(name: str) -> Callable[..., Any]:
    """`torch.ops.pets.<name>.default`, looked up late so importing passes does not need the library."""
    return cast(Callable[..., Any], getattr(torch.ops.pets, name).default)
