"""Load a kind's tasks into a runtime, growing it task count by task count, and account for time and memory.

A kind's runtime is compiled once (with its first task, or one task of each part for a mix) and grown with
`Runtime.add_task`: no recompilation, as in serving. Before each growth the task with the highest new slot is added
first, so the tables grow once per step rather than once per task. Memory per task is measured from the device
allocator across the adds (torch.cuda.memory_allocated after minus before, over the tasks added since the runtime
was compiled) and computed from the task tables (bytes of one slot in every per-slot table, plus the sparse pools'
live bytes over the tasks loaded). The tables grow by doubling (runtime/tables.py): the allocator's count includes
the room kept for later adds, none at power-of-two task counts of one kind, up to 2x between them.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import Any

import torch

import pets_compiler
from bench.kinds import Kind
from bench.pets_exec import configure
from pets_compiler.frontend.base import BaseModel


def allocated(device: str) -> int | None:
    """Bytes the allocator holds for live tensors, after collecting garbage (whose tensors would be freed at a
    random point inside the span measured)."""
    if device != "cuda":
        return None
    gc.collect()
    return torch.cuda.memory_allocated()


def table_bytes(runtime: pets_compiler.Runtime) -> dict[str, int]:
    """Bytes of the task tables: one slot of the per-slot tables; the shared tables (the sparse pools) as their
    live entries ("shared": what the loaded tasks use) and as allocated ("shared_allocated": with freed entries and
    the room the pools keep for later adds, up to 2x); all tables as allocated ("total"); "slots": the rows the
    per-slot tables hold (slot 0, no task, included; up to 2x the slots in use)."""
    tables = runtime.tables
    per_slot = shared_allocated = total = slots = 0
    for spec in tables.specs:
        t = tables.tensors[spec.key]
        nbytes = t.numel() * t.element_size()
        total += nbytes
        if spec.per_slot:
            per_slot += t[0].numel() * t.element_size() if t.shape[0] else 0
            slots = int(t.shape[0])
        else:
            shared_allocated += nbytes
    pools = tables.pool_bytes()  # col and val; the other shared tables (none today) count as allocated
    shared = shared_allocated - pools["allocated"] + pools["live"]
    return {
        "per_slot": per_slot,
        "shared": shared,
        "shared_allocated": shared_allocated,
        "total": total,
        "slots": slots,
    }


def unused_bytes(tables: dict[str, int], loaded: int) -> int:
    """What the tables hold beyond what `loaded` tasks use: free slots (slot 0 is in use: no task) and pool room."""
    return tables["per_slot"] * max(0, tables["slots"] - loaded - 1) + tables["shared_allocated"] - tables["shared"]


@dataclass
class Served:
    """A kind's runtime on the device and what loading it cost."""

    kind: Kind
    base: BaseModel
    device: str
    dtype: str
    exec_mode: str
    runtime: pets_compiler.Runtime | None = None
    loaded: int = 0
    compiled_with: int = 0
    compile_s: float = 0.0
    make_s: float = 0.0  # making TaskSpecs, cumulative for this runtime
    add_s: float = 0.0  # Runtime.add_task, cumulative for this runtime
    runtime_bytes: int | None = None  # allocator bytes of program + tables, followed across adds
    compiled_bytes: int | None = None
    compiled_unused: int = 0  # unused_bytes of the tables as compiled
    history: list[dict[str, Any]] = field(default_factory=list)

    def needs_compile(self, n: int) -> bool:
        """A mix's runtime compiled with its first k tasks serves only their parts (task i is part i % parts)."""
        return self.runtime is None or n < self.loaded or self.compiled_with < min(n, self.kind.cycle)

    def load(self, n: int) -> None:
        """Have exactly tasks 0..n-1 loaded, on the device."""
        if self.needs_compile(n):
            self.free()
            self._compile(min(n, self.kind.cycle))
        if n > self.loaded:
            self._add(range(self.loaded, n))

    def _compile(self, k: int) -> None:
        t0 = time.perf_counter()
        specs = {s.name: s for s in (self.kind.task(i) for i in range(k))}
        self.make_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        runtime = pets_compiler.compile(self.base, specs, dtype=self.dtype)
        before = allocated(self.device)
        runtime.to(self.device)
        after = allocated(self.device)
        self.compile_s = time.perf_counter() - t0
        configure(runtime, self.exec_mode)
        self.runtime, self.loaded, self.compiled_with = runtime, k, k
        self.add_s = 0.0
        self.runtime_bytes = None if before is None or after is None else after - before
        self.compiled_bytes = self.runtime_bytes
        self.compiled_unused = unused_bytes(table_bytes(runtime), k)

    def _add(self, indices: range) -> None:
        runtime = self.runtime
        assert runtime is not None
        before = allocated(self.device)
        order = [indices[-1], *indices[:-1]]  # the highest slot first: the tables grow once
        for j, i in enumerate(order):
            t0 = time.perf_counter()
            spec = self.kind.task(i)
            t1 = time.perf_counter()
            runtime.add_task(spec.name, spec, slot=indices[-1] + 1 if j == 0 else None)
            self.make_s += t1 - t0
            self.add_s += time.perf_counter() - t1
        after = allocated(self.device)
        if self.runtime_bytes is not None and before is not None and after is not None:
            self.runtime_bytes += after - before
        self.loaded = indices[-1] + 1

    def memory(self) -> dict[str, Any]:
        """Bytes per task, measured (allocator, over the tasks added since compiling) and from the tables. The tables
        grow by doubling, so the allocator's bytes hold room for later adds: "bytes_per_task" leaves it out (what a
        task costs once the room fills), "bytes_per_task_allocated" keeps it."""
        assert self.runtime is not None
        tables = table_bytes(self.runtime)
        from_tables = tables["per_slot"] + tables["shared"] / max(1, self.loaded)
        added = self.loaded - self.compiled_with
        measured = allocated_now = None
        unused = unused_bytes(tables, self.loaded)
        if added > 0 and self.runtime_bytes is not None and self.compiled_bytes is not None:
            allocated_now = (self.runtime_bytes - self.compiled_bytes) / added
            measured = (self.runtime_bytes - self.compiled_bytes - unused + self.compiled_unused) / added
        how = (
            f"allocator: (bytes with {self.loaded} tasks - bytes with {self.compiled_with} - the tables' unused room"
            f" added since) / {added}"
            if measured is not None
            else "tables: one slot of every per-slot table + pooled sparse bytes / tasks loaded"
        )
        return {
            "bytes_per_task": measured if measured is not None else from_tables,
            "bytes_per_task_measured": measured,
            "bytes_per_task_allocated": allocated_now,
            "bytes_per_task_tables": from_tables,
            "tables_unused_bytes": unused,
            "how": how,
            "table_bytes": tables,
            "runtime_allocated_bytes": self.runtime_bytes,
            "tasks_loaded": self.loaded,
        }

    def free(self) -> None:
        self.runtime = None
        self.loaded = self.compiled_with = 0
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()
