"""The breakdown bench's smoke run, in process: checked rows, shares of shared and task ops, families, a figure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.breakdown import SMOKE, main, parse
from bench.plots.breakdown import plot


@pytest.mark.slow
def test_smoke_records(tmp_path: Path) -> None:
    main(["--smoke", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("breakdown-smoke-*.jsonl")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["kind"], r["rows_per_task"], r["seq"]) for r in records] == [("mix", 1, 64), ("mix", 2, 32)]
    for r in records:
        assert r["error"] is None, r.get("traceback")
        assert r["device"].startswith("cpu") and r["commit"] and {"torch", "transformers", "peft"} <= set(r["versions"])
        assert r["tasks"] == SMOKE.tasks == 8 and r["batch"] == 8 * r["rows_per_task"]
        assert r["check"]["passed"] and r["check"]["max_rel_err"] <= r["check"]["tolerance"] == 1e-5
        # 8 mix tasks: one of each of the 7 kinds, and LoRA r8 again
        assert len(r["parts"]) == 7
        shares = r["shares"]
        assert 0 < shares["task_ops"] < 1 and shares["shared_ops"] == pytest.approx(1 - shares["task_ops"])
        assert shares["task_ops"] == pytest.approx(r["ops"]["pets_ops_us"] / r["ops"]["total_us"])
        assert {"adapter", "sparse_delta", "scale", "layer_norm"} <= set(r["ops"]["ops"])
        top = r["families"]["top"]
        assert "aten::linear" in top and not top["aten::linear"]["task_op"]
        assert any(f["task_op"] for name, f in top.items() if name.startswith("pets::"))
        assert r["families"]["total_us"] >= sum(f["us"] for f in top.values()) > 0
        assert r["timing"]["median_s"] > 0 and r["host_s"]["served"] > 0 and r["host_s"]["op_by_op"] > 0
    (png,) = plot(records, tmp_path / "figures")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_parse() -> None:
    cfg = parse(["--kinds", "lora_r8,mask", "--tasks", "16", "--out", "/tmp/x"])
    assert cfg.kinds == ("lora_r8", "mask") and cfg.tasks == 16 and cfg.out == Path("/tmp/x")
    assert cfg.device == "cuda" and cfg.shapes == ((1, 64), (2, 32)) and parse(["--smoke"]).device == "cpu"
    with pytest.raises(SystemExit):
        parse(["--tasks", "0"])
