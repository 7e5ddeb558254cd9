"""The task-op scheduling bench's smoke run, in process: every scheme is checked against the op's reference and
timed, the records are complete, and the plot module draws them."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from bench import op_scheduling
from bench.op_scheduling import OPS, SMOKE, Case, main, measure, parse, spans_of
from bench.plots.op_scheduling import plot


def test_smoke_records(tmp_path: Path) -> None:
    main(["--smoke", "--out", str(tmp_path)])
    records = [json.loads(x) for f in tmp_path.glob("op_scheduling-smoke-*.jsonl") for x in f.read_text().splitlines()]
    assert [(r["op"], r["tasks"], r["seq"], r["mode"]) for r in records] == [
        (op, n, seq, "eager") for op in OPS for n in SMOKE.tasks for seq in SMOKE.seqs
    ]
    schemes = {"loop", *(f"streams_{s}" for s in SMOKE.streams), "segmented"}
    for r in records:
        assert r["error"] is None
        assert r["device"].startswith("cpu") and r["commit"] and "torch" in r["versions"]
        assert r["rows"] == SMOKE.rows and r["hidden"] == 64 and r["setup"]["streams_note"]
        assert set(r["check"]) == set(r["time_us"]) == schemes
        assert max(r["check"].values()) <= 1e-5
        assert all(t > 0 for t in r["time_us"].values())
        assert r["over_loop"]["segmented"] == pytest.approx(r["time_us"]["loop"] / r["time_us"]["segmented"])
        assert r["best_streams"] in SMOKE.streams
    paths = plot(records, tmp_path / "figures")
    assert [p.name for p in paths] == [f"op_scheduling-{op}-eager.png" for op in OPS]
    assert all(p.stat().st_size > 0 for p in paths)


def test_a_wrong_scheme_fails_the_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A per-task schedule that leaves one task's rows out is caught by the reference and not timed."""
    real = op_scheduling.CASES["lora"]

    def skips_task_1(cfg: op_scheduling.Config, tasks: int, seq: int, g: object) -> Case:
        case = real(cfg, tasks, seq, g)  # type: ignore[arg-type]
        return replace(case, task_op=lambda out, t: None if t == 1 else case.task_op(out, t))

    monkeypatch.setitem(op_scheduling.CASES, "lora", skips_task_1)
    r = measure(SMOKE, "lora", 4, 4, "eager", {})
    assert "relative error" in r["error"] and r["check"]["loop"] > 1e-3
    assert set(r["time_us"]) == {"segmented"}  # only the segmented call passed, and only it was timed


def test_spans_and_parse() -> None:
    assert spans_of(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert spans_of(128, 128)[-1] == (127, 128)
    cfg = parse(["--ops", "lora", "--tasks", "32,64", "--seqs", "4,64", "--modes", "graph", "--iters", "7"])
    assert cfg.ops == ("lora",) and cfg.tasks == (32, 64) and cfg.seqs == (4, 64) and cfg.modes == ("graph",)
    assert cfg.iters == 7 and cfg.device == "cuda" and cfg.hidden == 768
    assert parse(["--suite"]).time_budget_s is not None
    for bad in (["--ops", "sparse"], ["--tasks", "256"], ["--seqs", "0"], ["--modes", "compiled"]):
        with pytest.raises(SystemExit):
            parse(bad)
