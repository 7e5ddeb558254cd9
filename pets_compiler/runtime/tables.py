"""Task tables: per site and kind, the tasks' PET tensors stacked along a slot dimension.

Slot 0 is never given to a task and stays zero, so a row with slot 0 computes the base model. A task owns one slot
in every table; adding or removing a task writes or zeroes that slot, and a table grows (zero padded) when it needs
more slots, a larger rank or more labels. The program takes the tables as inputs with dynamic sizes, so none of
this retraces or recompiles it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pets_compiler.errors import SiteNotServedError
from pets_compiler.frontend.taskset import TaskSpec

SLOTS = "slots"
LABELS = "labels"


def rank_dim(site: str) -> str:
    return f"rank@{site}"


@dataclass(frozen=True)
class TableSpec:
    """One table: `key` names it, `dims` are ints or symbolic names (SLOTS, LABELS, rank_dim(site))."""

    key: str
    kind: str  # lora | bias | layer_norm | head
    site: str
    field: str  # lora: A, B, scale, rank; bias: bias; layer_norm: weight, bias; head: weight, bias
    dims: tuple[int | str, ...]
    integer: bool = False

    @property
    def arg_name(self) -> str:
        return "t_" + re.sub(r"\W", "_", self.key)

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "kind": self.kind,
            "site": self.site,
            "field": self.field,
            "dims": list(self.dims),
            "integer": self.integer,
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> TableSpec:
        return TableSpec(d["key"], d["kind"], d["site"], d["field"], tuple(d["dims"]), bool(d.get("integer")))


def _values(spec: TaskSpec, table: TableSpec) -> Tensor | float | int | None:
    """The value a task puts into its slot of `table`, or None if the task leaves it zero."""
    if table.kind == "head":
        return None if spec.head is None else (spec.head.weight if table.field == "weight" else spec.head.bias)
    pet = spec.sites.get(table.site)
    if pet is None:
        return None
    if table.kind == "lora" and pet.lora is not None:
        fields: dict[str, Tensor | float | int] = {
            "A": pet.lora.a,
            "B": pet.lora.b,
            "scale": pet.lora.scale,
            "rank": pet.lora.rank,
        }
        return fields[table.field]
    if table.kind == "bias":
        return pet.bias
    if table.kind == "layer_norm" and pet.layer_norm is not None:
        return pet.layer_norm.weight if table.field == "weight" else pet.layer_norm.bias
    return None


def unserved(spec: TaskSpec, tables: list[TableSpec]) -> list[str]:
    """(site kind) pairs the task needs that no table serves."""
    served = {(t.site, t.kind) for t in tables}
    return [
        f"{kind} at {site}" for site, pet in spec.sites.items() for kind in pet.kinds() if (site, kind) not in served
    ]


class TaskTables:
    def __init__(self, specs: list[TableSpec], dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        self.specs = list(specs)
        self.dtype = dtype
        self.device = torch.device(device)
        self.sizes: dict[str, int] = {SLOTS: 1, LABELS: 0}
        for t in self.specs:
            for d in t.dims:
                if isinstance(d, str):
                    self.sizes.setdefault(d, 0)
        self.tensors: dict[str, Tensor] = {t.key: self._zeros(t) for t in self.specs}

    def _shape(self, t: TableSpec) -> tuple[int, ...]:
        return tuple(self.sizes[d] if isinstance(d, str) else d for d in t.dims)

    def _zeros(self, t: TableSpec) -> Tensor:
        return torch.zeros(self._shape(t), dtype=torch.long if t.integer else self.dtype, device=self.device)

    def inputs(self) -> list[Tensor]:
        """The tables in the order the program takes them."""
        return [self.tensors[t.key] for t in self.specs]

    def _grow(self, wanted: dict[str, int]) -> None:
        grow = {d: n for d, n in wanted.items() if n > self.sizes[d]}
        if not grow:
            return
        self.sizes.update(grow)
        for t in self.specs:
            old = self.tensors[t.key]
            new = self._zeros(t)
            if new.shape != old.shape:
                new[tuple(slice(0, n) for n in old.shape)] = old
                self.tensors[t.key] = new

    def check_fits(self, spec: TaskSpec) -> None:
        missing = unserved(spec, self.specs)
        if missing:
            raise SiteNotServedError(
                f"task {spec.name!r} needs {', '.join(missing[:4])}, which this compiled program does not serve; "
                "compile it in (pets compile with this task, or with --sites all)"
            )

    def write(self, slot: int, spec: TaskSpec) -> None:
        """Put the task's tensors into `slot` of every table (growing tables as needed)."""
        self.check_fits(spec)
        wanted = {SLOTS: slot + 1}
        if spec.head is not None:
            wanted[LABELS] = spec.head.num_labels
        for site, pet in spec.sites.items():
            if pet.lora is not None:
                wanted[rank_dim(site)] = pet.lora.rank
        self._grow({d: n for d, n in wanted.items() if d in self.sizes})
        self.clear(slot)
        for t in self.specs:
            value = _values(spec, t)
            if value is None:
                continue
            row = self.tensors[t.key][slot]
            if isinstance(value, Tensor):
                row[tuple(slice(0, n) for n in value.shape)] = value.to(row.dtype)
            else:
                row.fill_(value)

    def clear(self, slot: int) -> None:
        for tensor in self.tensors.values():
            if slot < tensor.shape[0]:
                tensor[slot].zero_()

    def nbytes_per_slot(self) -> int:
        return sum(t[0].numel() * t.element_size() for t in self.tensors.values() if t.shape[0])
