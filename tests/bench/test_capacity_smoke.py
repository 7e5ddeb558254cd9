"""The capacity bench's smoke run, in process: it checks, grows, projects and plots; its stops are recorded."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from bench import capacity
from bench.capacity import SMOKE, capacity_of, main, parse
from bench.kinds import Kind, make_kinds
from bench.loading import Served
from bench.models import MODELS, make_base
from bench.plots.capacity import plot
from pets_compiler.frontend.base import BaseModel


@pytest.mark.slow
def test_smoke_records(tmp_path: Path) -> None:
    main(["--smoke", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("capacity-smoke-*.jsonl")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["kind"] for r in records] == list(SMOKE.kinds) == ["lora_r8", "mix"]
    for r in records:
        assert r["error"] is None, r.get("traceback")
        assert r["device"].startswith("cpu") and r["commit"] and {"torch", "transformers", "peft"} <= set(r["versions"])
        assert r["setup"]["batch"] == SMOKE.batch and r["setup"]["max_tasks"] == SMOKE.max_tasks
        assert r["check"]["passed"] and len(r["check"]["rows"]) >= 4
        assert r["check"]["max_rel_err"] <= r["check"]["tolerance"] == 1e-5
        assert r["stopped_by"] == "max_tasks" and r["tasks_loaded"] == SMOKE.max_tasks
        loaded = [s["tasks_loaded"] for s in r["steps"]]
        assert loaded == sorted(set(loaded)) and loaded[-1] == SMOKE.max_tasks
        for s in r["steps"]:
            per_task = s["memory"]["bytes_per_task"]
            assert per_task > 0 and s["batch_timing"]["median_s"] > 0 and s["seq_per_s"] > 0
            # on the CPU there is no serving transient: loaded + free memory / bytes per task
            assert s["projected_tasks_at_full_memory"] == s["tasks_loaded"] + int(s["free_bytes"] // per_task)
        seqs = r["seqs"]
        assert seqs["models_loaded"] == SMOKE.seqs_models and seqs["bytes_per_model"] > 0
        assert seqs["projected_models_at_full_memory"] >= seqs["models_loaded"]
        assert r["projected_over_seqs"] == pytest.approx(
            r["projected_tasks_at_full_memory"] / r["seqs_projected_models_at_full_memory"]
        )
    lora, mix = records
    # a mix task has a slot in every kind's tables (and sparse entries): more bytes than a LoRA task
    assert mix["bytes_per_task"] > lora["bytes_per_task"]
    assert any("rel_err_logits" in row for row in mix["check"]["rows"])  # mix tasks carry heads
    (png,) = plot(records, tmp_path / "figures")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny() -> tuple[BaseModel, Kind]:
    base = make_base(MODELS["tiny"])
    return base, make_kinds(base, ("lora_r8",))["lora_r8"]


class FakeServed:
    """Served's counters without a runtime: each task added costs one second of a fake clock, compiling none."""

    def __init__(self, clock: list[float]) -> None:
        self.kind = SimpleNamespace(cycle=1)
        self.loaded = self.compiled_with = 0
        self.make_s = self.add_s = 0.0
        self.clock = clock

    def load(self, n: int) -> None:
        if self.loaded == 0:
            self.loaded = self.compiled_with = 1
        self.add_s += n - self.loaded
        self.clock[0] += n - self.loaded
        self.loaded = n


@pytest.mark.parametrize(
    ("seconds", "max_tasks", "loaded", "stopped_by"),
    [
        (1000.0, 64, [8, 16, 32, 64], "max_tasks"),
        # after 16 tasks (15 s), 5 s are left at one second a task: the step to 32 is cut to 21, and is the last
        (20.0, 64, [8, 16, 21], "seconds"),
        # no time at all: one step at what is loaded (compiled with one task, one more added for the add rate)
        (0.0, 64, [2], "seconds"),
    ],
)
def test_steps_within_caps(
    seconds: float, max_tasks: int, loaded: list[int], stopped_by: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [0.0]
    monkeypatch.setattr(capacity, "time", SimpleNamespace(perf_counter=lambda: clock[0]))

    def step(cfg: object, served: FakeServed, check: bool) -> tuple[dict[str, Any], dict[str, Any] | None]:
        return {"tasks_loaded": served.loaded}, ({"passed": True} if check else None)

    monkeypatch.setattr(capacity, "step", step)
    record: dict[str, Any] = {"steps": []}
    cfg = replace(SMOKE, start=8, factor=2, max_tasks=max_tasks, seconds_per_kind=seconds)
    assert capacity.grow(cfg, FakeServed(clock), record, 0.0) == stopped_by  # type: ignore[arg-type]
    assert [s["tasks_loaded"] for s in record["steps"]] == loaded
    assert record["check"] == {"passed": True}  # checked at the first step only


@pytest.mark.slow
def test_out_of_memory_is_recorded(tiny: tuple[BaseModel, Kind], monkeypatch: pytest.MonkeyPatch) -> None:
    base, kind = tiny

    def full(self: Served, n: int) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(capacity.Served, "load", full)
    r = capacity_of(SMOKE, base, kind, {})
    assert r["stopped_by"] == "out of memory" and r["steps"] == []
    assert r["out_of_memory"]["message"].startswith("CUDA out of memory")
    assert r["projected_tasks_at_full_memory"] is None and r["seqs"]["models_loaded"] == SMOKE.seqs_models


def test_parse() -> None:
    cfg = parse(["--kinds", "all", "--max-tasks", "4096", "--seconds-per-kind", "60", "--out", "/tmp/x"])
    assert len(cfg.kinds) == 9 and cfg.max_tasks == 4096 and cfg.seconds_per_kind == 60
    assert cfg.device == "cuda" and cfg.dtype == "float16" and (cfg.batch, cfg.seq) == (64, 128)
    assert cfg.out == Path("/tmp/x") and parse(["--smoke"]).device == "cpu"
    with pytest.raises(SystemExit):
        parse(["--kinds", "lora_r4"])


def test_bytes_per_task_leaves_out_the_tables_room(monkeypatch: pytest.MonkeyPatch) -> None:
    # An allocator that holds exactly the task tables: the tables grow by doubling (slot 0 and 4 tasks, then 8 task
    # slots for 5 tasks), so they hold room, which the allocator counts and bytes_per_task must not (LoRA: no pools).
    base = make_base(MODELS["tiny"], seed=0)
    served = Served(make_kinds(base, ("lora_r8",))["lora_r8"], base, "cpu", "float32", "eager")

    def table_bytes_only(device: str) -> int:
        if served.runtime is None:
            return 0
        return sum(t.numel() * t.element_size() for t in served.runtime.tables.tensors.values())

    monkeypatch.setattr("bench.loading.allocated", table_bytes_only)
    served.load(1)
    served.load(4)
    served.load(5)
    memory = served.memory()
    per_slot, slots = memory["table_bytes"]["per_slot"], memory["table_bytes"]["slots"]
    assert slots == 9 and memory["tables_unused_bytes"] == 3 * per_slot  # slot 0 and 5 tasks: 3 rows of room
    assert memory["bytes_per_task"] == pytest.approx(per_slot)
    assert memory["bytes_per_task_allocated"] == pytest.approx(per_slot * 7 / 4)
