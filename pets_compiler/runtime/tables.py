"""Task tables: per site and kind, the tasks' PET tensors stacked along a slot dimension.

Slot 0 is never given to a task and stays zero, so a row with slot 0 computes the base model (every table stores
what a task adds: deltas, `l - 1` for IA3 scales, zero config for adapters). A task owns one slot in every table;
adding or removing a task writes or zeroes that slot, and a table grows (zero padded) when it needs more slots, a
larger rank or bottleneck, or more labels. Sparse deltas live in one pool per site (CSR: `row_ptr` per slot into
shared `col` / `val` arrays); a task's entries are appended at the pool's used end, and a removed task's entries are
reclaimed by compaction, which moves other tasks' entries but never changes their values or order. The program
takes all tables as inputs with dynamic sizes, so none of this retraces or recompiles it.

The task slots and the pools grow like a vector's buffer, to at least GROWTH times their size: loading k tasks
reallocates them O(log k) times, and an add within the room left writes in place. The zeros past the last slot and
the pool entries past the used end (or freed and not yet compacted) are covered by no slot's row_ptr, so no row
reads them. Labels, ranks and bottlenecks grow to exactly what a task needs (the logits' width; work every batch
does). `sizes` holds the allocated sizes; `for_slots` gives tables with no room and no freed entries.

Writing or clearing a slot writes into the existing tensors; growth, compaction and a move to another device
replace them, and each replacement bumps `generation`, so that whatever holds on to table addresses (captured CUDA
graphs) knows to let go.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pets_compiler.custom_ops.reference import ADAPTER_ACTIVATIONS
from pets_compiler.errors import SiteNotServedError
from pets_compiler.frontend.taskset import SitePET, SparseDelta, TaskSpec

SLOTS = "slots"
LABELS = "labels"


def rank_dim(site: str) -> str:
    return f"rank@{site}"


def bottleneck_dim(site: str) -> str:
    return f"bottleneck@{site}"


def pool_dim(site: str) -> str:
    return f"pool@{site}"


# The task slots and the sparse pools grow to at least this many times their size (see the module docstring).
GROWTH = 2


def _grown_size(dim: str, have: int, need: int) -> int:
    """The size a dim of `have` grows to when it must hold `need`."""
    if dim == SLOTS:  # slot 0 is no task's: the tasks' slots grow as the pools do, so equal tasks grow both at once
        return max(need, GROWTH * (have - 1) + 1)
    if dim.startswith(pool_dim("")):
        return max(need, GROWTH * have)
    return need


@dataclass(frozen=True)
class TableSpec:
    """One table: `key` names it, `dims` are ints or symbolic names (SLOTS, LABELS, rank_dim(site), ...).

    kind / field: lora (A, B, scale, rank), ia3_in / ia3_out (scale), bias (bias), layer_norm (weight, bias),
    sparse (row_ptr, col, val), adapter (down_w, down_b, up_w, up_b, scaling, config), head (weight, bias).
    `fold_in` (ia3_out only): the site whose IA3 input scale this output scale also carries
    (passes/fold_context_scale.py): the table holds `l_out * l_in - 1`.
    """

    key: str
    kind: str
    site: str
    field: str
    dims: tuple[int | str, ...]
    integer: bool = False
    fold_in: str | None = None

    @property
    def arg_name(self) -> str:
        return "t_" + re.sub(r"\W", "_", self.key)

    @property
    def per_slot(self) -> bool:
        return self.dims[0] == SLOTS

    def to_json(self) -> dict[str, Any]:
        d = {
            "key": self.key,
            "kind": self.kind,
            "site": self.site,
            "field": self.field,
            "dims": list(self.dims),
            "integer": self.integer,
        }
        return d if self.fold_in is None else d | {"fold_in": self.fold_in}

    @staticmethod
    def from_json(d: dict[str, Any]) -> TableSpec:
        dims = tuple(d["dims"])
        return TableSpec(d["key"], d["kind"], d["site"], d["field"], dims, bool(d.get("integer")), d.get("fold_in"))


def table_kinds(pet: SitePET) -> list[str]:
    """The table kinds a site's PET needs."""
    kinds = [k for k in ("lora", "bias", "layer_norm", "adapter") if getattr(pet, k) is not None]
    if pet.ia3 is not None:
        kinds += [k for k, v in (("ia3_in", pet.ia3.input), ("ia3_out", pet.ia3.output)) if v is not None]
    if pet.sparse is not None:
        kinds.append("sparse")
    return kinds


def unserved(spec: TaskSpec, tables: list[TableSpec]) -> list[str]:
    """(kind at site) pairs the task needs that no table serves."""
    served = {(t.site, t.kind) for t in tables} | {(t.fold_in, "ia3_in") for t in tables if t.fold_in is not None}
    needed = [(site, kind) for site, pet in spec.sites.items() for kind in table_kinds(pet)]
    if spec.head is not None and spec.head.dense_w is not None:
        needed.append(("head", "head_dense"))
    return [f"{kind} at {site}" for site, kind in needed if (site, kind) not in served]


def _slot_value(spec: TaskSpec, table: TableSpec) -> Tensor | float | int | None:
    """The value a task puts into its slot of a per-slot table, or None if it leaves the slot zero."""
    if table.kind in ("head", "head_dense"):
        head = spec.head
        if head is None:
            return None
        fields: dict[str, Tensor | int | None] = {
            "weight": head.weight,
            "bias": head.bias,
            "use_cls": int(head.use_cls),
            "has_dense": int(head.dense_w is not None),
            "dense_w": head.dense_w,
            "dense_b": head.dense_b,
        }
        return fields[table.field]
    if table.kind in ("ia3_in", "ia3_out"):
        return _ia3_value(spec, table)
    pet = spec.sites.get(table.site)
    if pet is None:
        return None
    if table.kind == "lora" and pet.lora is not None:
        lora: dict[str, Tensor | float | int] = {"A": pet.lora.a, "B": pet.lora.b, "scale": pet.lora.scale}
        return lora.get(table.field, pet.lora.rank)
    if table.kind == "bias":
        return pet.bias
    if table.kind == "layer_norm" and pet.layer_norm is not None:
        return pet.layer_norm.weight if table.field == "weight" else pet.layer_norm.bias
    if table.kind == "adapter" and pet.adapter is not None:
        a = pet.adapter
        if table.field == "config":
            flags = (1, a.original_ln_before, a.residual_before_ln, a.original_ln_after)
            return torch.tensor([*map(int, flags), ADAPTER_ACTIVATIONS[a.activation], a.bottleneck])
        adapter: dict[str, Tensor | float] = {"down_w": a.down_w, "down_b": a.down_b, "up_w": a.up_w, "up_b": a.up_b}
        return adapter.get(table.field, a.scaling)
    return None


def _ia3_scale(spec: TaskSpec, site: str, kind: str) -> Tensor | None:
    """The task's IA3 scale l (not l - 1) of `kind` ("ia3_in" / "ia3_out") at `site`, or None (l = 1)."""
    pet = spec.sites.get(site)
    if pet is None or pet.ia3 is None:
        return None
    return pet.ia3.input if kind == "ia3_in" else pet.ia3.output


def _ia3_value(spec: TaskSpec, table: TableSpec) -> Tensor | None:
    """`l - 1` for an IA3 table; `l_out * l_in - 1` for an output scale that carries `fold_in`'s input scale, the
    product taken in float64 so that the table is rounded once. None where the task scales neither."""
    scales = [_ia3_scale(spec, table.site, table.kind)]
    if table.fold_in is not None:
        scales.append(_ia3_scale(spec, table.fold_in, "ia3_in"))
    present = [s for s in scales if s is not None]
    if len(present) < 2:
        return present[0] - 1 if present else None
    return present[0].double() * present[1].double() - 1


def _csr(delta: SparseDelta) -> tuple[Tensor, Tensor, Tensor]:
    """(row counts [rows], col [nnz], val [nnz]) of a row-major sorted sparse delta."""
    counts = torch.bincount(delta.index[0], minlength=delta.shape[0])
    return counts, delta.index[1], delta.values


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
        self.tensors: dict[str, Tensor] = {t.key: self._zeros(t, self.sizes) for t in self.specs}
        self._pool_used: dict[str, int] = {t.site: 0 for t in self.specs if t.kind == "sparse"}
        # Free pool entries tolerated before a removal compacts a pool; None: as many as are live (or 4096).
        self.compact_threshold: int | None = None
        self.generation = 0  # bumped whenever a table tensor is replaced; in-place writes leave it

    def _zeros(self, t: TableSpec, sizes: dict[str, int]) -> Tensor:
        shape = tuple(sizes[d] if isinstance(d, str) else d for d in t.dims)
        return torch.zeros(shape, dtype=torch.long if t.integer else self.dtype, device=self.device)

    def to(self, device: torch.device | str) -> None:
        """Move every table (and future growth) to `device`."""
        self.device = torch.device(device)
        moved = {key: t.to(self.device) for key, t in self.tensors.items()}
        if any(moved[key] is not t for key, t in self.tensors.items()):
            self.generation += 1
        self.tensors = moved

    def inputs(self) -> list[Tensor]:
        """The tables in the order the program takes them."""
        return [self.tensors[t.key] for t in self.specs]

    def _grow(self, wanted: dict[str, int]) -> None:
        """Make every dim of `wanted` hold at least its size: the task slots or a pool to at least GROWTH x their
        size (exactly the size where that much memory is not there), other dims exactly."""
        for dim, need in wanted.items():
            have = self.sizes.get(dim)
            if have is None or need <= have:
                continue
            size = _grown_size(dim, have, need)
            try:
                self._resize(dim, size)
                continue
            except torch.OutOfMemoryError:
                if size == need:
                    raise
            # Outside the except block, so that the failed attempt's tensors are freed before this one.
            self._resize(dim, need)

    def _resize(self, dim: str, size: int) -> None:
        """Reallocate the tables that have `dim` with `dim` = size, contents kept; all or none of them (they must
        agree on the dim), so a failed allocation leaves the tables as they were."""
        sizes = {**self.sizes, dim: size}
        new = {}
        for t in self.specs:
            if dim in t.dims:
                old, grown = self.tensors[t.key], self._zeros(t, sizes)
                grown[tuple(slice(0, n) for n in old.shape)] = old
                new[t.key] = grown
        self.sizes = sizes
        self.tensors.update(new)
        self.generation += 1

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
        self.clear(slot)
        wanted = {SLOTS: slot + 1}
        if spec.head is not None:
            wanted[LABELS] = spec.head.num_labels
        for site, pet in spec.sites.items():
            if pet.lora is not None:
                wanted[rank_dim(site)] = pet.lora.rank
            if pet.adapter is not None:
                wanted[bottleneck_dim(site)] = pet.adapter.bottleneck
            if pet.sparse is not None:
                wanted[pool_dim(site)] = self._pool_used[site] + pet.sparse.nnz
        self._grow(wanted)
        for t in self.specs:
            value = _slot_value(spec, t) if t.per_slot else None
            if value is None:
                continue
            row = self.tensors[t.key][slot]
            if isinstance(value, Tensor):
                row[tuple(slice(0, n) for n in value.shape)] = value.to(row.dtype)
            else:
                row.fill_(value)
        for site, pet in spec.sites.items():
            if pet.sparse is not None:
                self._write_sparse(slot, site, pet.sparse)

    def _write_sparse(self, slot: int, site: str, delta: SparseDelta) -> None:
        counts, col, val = _csr(delta)
        start = self._pool_used[site]  # write() made room for the entries
        self.tensors[f"{site}.sparse_col"][start : start + delta.nnz] = col
        self.tensors[f"{site}.sparse_val"][start : start + delta.nnz] = val.to(self.dtype)
        row_ptr = self.tensors[f"{site}.sparse_row_ptr"][slot]
        row_ptr[0] = start
        row_ptr[1:] = start + torch.cumsum(counts, 0)
        self._pool_used[site] = start + delta.nnz

    def clear(self, slot: int) -> None:
        """Zero the slot in every table; free its sparse entries (compacting a pool that is mostly free)."""
        for t in self.specs:
            tensor = self.tensors[t.key]
            if t.per_slot and slot < tensor.shape[0]:
                tensor[slot].zero_()
        for site, used in self._pool_used.items():
            live = self._live_entries(site)
            limit = max(4096, live) if self.compact_threshold is None else self.compact_threshold
            if used - live > limit:
                self._compact(site)

    def _live_entries(self, site: str) -> int:
        row_ptr = self.tensors[f"{site}.sparse_row_ptr"]
        return int((row_ptr[:, -1] - row_ptr[:, 0]).sum())

    def _compact(self, site: str) -> None:
        """Move every slot's entries to the front of the pool, in slot order; values and their order unchanged."""
        row_ptr, col, val = (self.tensors[f"{site}.sparse_{f}"] for f in ("row_ptr", "col", "val"))
        new_col, new_val = torch.zeros_like(col), torch.zeros_like(val)
        cursor = 0
        for slot in range(row_ptr.shape[0]):
            begin, end = int(row_ptr[slot, 0]), int(row_ptr[slot, -1])
            if end == begin:
                row_ptr[slot].zero_()
                continue
            new_col[cursor : cursor + end - begin] = col[begin:end]
            new_val[cursor : cursor + end - begin] = val[begin:end]
            row_ptr[slot] += cursor - begin
            cursor += end - begin
        self.tensors[f"{site}.sparse_col"], self.tensors[f"{site}.sparse_val"] = new_col, new_val
        self._pool_used[site] = cursor
        self.generation += 1

    def nbytes_per_slot(self) -> int:
        """Bytes one slot takes in the per-slot tables (a sparse task's pool entries come on top: pool_bytes)."""
        return sum(
            self.tensors[t.key][0].numel() * self.tensors[t.key].element_size() for t in self.specs if t.per_slot
        )

    def pool_bytes(self) -> dict[str, int]:
        """Bytes of the sparse pools (col and val): "live", the entries some slot's row_ptr covers, and
        "allocated", what the pool tensors take (live entries, freed ones not yet compacted, room for later adds)."""
        live = allocated = 0
        for site in self._pool_used:
            col, val = self.tensors[f"{site}.sparse_col"], self.tensors[f"{site}.sparse_val"]
            entry = col.element_size() + val.element_size()
            live += self._live_entries(site) * entry
            allocated += col.shape[0] * entry
        return {"live": live, "allocated": allocated}

    def for_slots(self, slots: list[int]) -> list[Tensor]:
        """The tables in program order, on the CPU, as if only `slots` were loaded: row i of a per-slot table is
        slot slots[i], and each sparse pool holds exactly those slots' entries, in that order (row_ptr rebased), with
        no room and no freed entries past them (what an export bakes in)."""
        index = torch.tensor(slots, dtype=torch.long)
        out = {}
        for t in self.specs:
            tensor = self.tensors[t.key].detach().cpu()
            out[t.key] = tensor[index].contiguous() if t.per_slot else tensor
        for site in self._pool_used:
            row_ptr, col, val = (out[f"{site}.sparse_{f}"] for f in ("row_ptr", "col", "val"))
            spans = [(int(r[0]), int(r[-1])) for r in row_ptr]
            ends = list(itertools.accumulate(end - begin for begin, end in spans))
            starts = torch.tensor([0, *ends[:-1]] if ends else [], dtype=torch.long)
            out[f"{site}.sparse_row_ptr"] = row_ptr - row_ptr[:, :1] + starts.unsqueeze(1)
            out[f"{site}.sparse_col"] = torch.cat([col[begin:end] for begin, end in spans] or [col[:0]])
            out[f"{site}.sparse_val"] = torch.cat([val[begin:end] for begin, end in spans] or [val[:0]])
        return [out[t.key] for t in self.specs]
