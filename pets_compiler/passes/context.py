"""What every pass gets and returns: the compile context, the pass result, and the shared cleanup helper."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

from pets_compiler.frontend.base import BaseModel, Pooling
from pets_compiler.runtime.tables import TableSpec


@dataclass(frozen=True)
class SitePlan:
    """Which sites get which task op. Fixed at compile time: add_task can fill slots, not add sites."""

    lora: tuple[str, ...] = ()
    bias: tuple[str, ...] = ()
    layer_norm: tuple[str, ...] = ()

    def to_json(self) -> dict[str, list[str]]:
        return {"lora": list(self.lora), "bias": list(self.bias), "layer_norm": list(self.layer_norm)}

    @staticmethod
    def from_json(d: dict[str, list[str]]) -> SitePlan:
        return SitePlan(tuple(d.get("lora", ())), tuple(d.get("bias", ())), tuple(d.get("layer_norm", ())))


@dataclass
class CompileContext:
    base: BaseModel
    plan: SitePlan
    pooling: Pooling
    tables: list[TableSpec] = field(default_factory=list)
    linear_nodes: dict[str, Node] = field(default_factory=dict)
    layer_norm_nodes: dict[str, Node] = field(default_factory=dict)
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


def insert_after(gm: GraphModule, node: Node, target: object, args: tuple[object, ...]) -> Node:
    """Insert `target(*args)` right after `node` and route node's other users to it."""
    with gm.graph.inserting_before(node.next):
        new = gm.graph.call_function(target, args)  # type: ignore[arg-type]
    node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    return new


def op_target(name: str) -> object:
    """`torch.ops.pets.<name>.default`, looked up late so importing passes does not need the library."""
    return getattr(torch.ops.pets, name).default
