"""The throughput bench's smoke run, in process: it runs, checks correctness, and writes complete records."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from bench.records import table
from bench.throughput import SMOKE, parse, run


@pytest.mark.slow
def test_smoke_records(tmp_path: Path) -> None:
    # lora_r8 with 1 and 8 tasks (memory measured across the adds, peft's mixed batch); the mix with 8 tasks
    # covers every kind (7 parts) in one runtime, recompiled after the 1-task one, with heads.
    cfg = replace(SMOKE, kinds=("lora_r8", "mix"), tasks=(1, 8), out=tmp_path)
    records = run(cfg)
    assert len(records) == 4
    lines = [json.loads(line) for f in tmp_path.glob("throughput-smoke-*.jsonl") for line in f.read_text().splitlines()]
    assert [(r["kind"], r["tasks"]) for r in lines] == [("lora_r8", 1), ("lora_r8", 8), ("mix", 1), ("mix", 8)]
    for r in lines:
        assert r["error"] is None, r.get("traceback")
        assert r["device"].startswith("cpu") and r["commit"] and {"torch", "transformers", "peft"} <= set(r["versions"])
        assert r["check"]["passed"] and len(r["check"]["rows"]) >= 4
        assert r["check"]["max_rel_err"] <= r["check"]["tolerance"] == 1e-5
        assert r["seq_per_s"]["pets"] > 0 and r["seq_per_s"]["backbone"] > 0 and r["seq_per_s"]["seqs"] > 0
        assert r["ratios"]["pets_over_backbone"] > 0
        # the backbone's paths: HF eager and the pets pipeline's plain program; the denominator is the faster
        paths = {k: v for k, v in r["backbone"].items() if isinstance(v, dict) and "before" in v}
        assert {"eager", "pets_plain"} <= set(paths) and r["backbone"]["denominator"] in paths
        assert r["memory"]["bytes_per_task"] > 0 and r["compile_s"] > 0
        assert r["ops"]["ops"], "no pets op was profiled"
        for op in r["ops"]["ops"].values():
            assert op["time_us"] > 0 and "floor_error" not in op
        assert {"bandwidth_GBps", "peak_TFLOPs"} <= set(r["floors"]["device"])
        assert "goals" in r
    lora = [r for r in lines if r["kind"] == "lora_r8"]
    assert all(r["peft_mixed"]["available"] and r["peft_mixed"]["agrees"] for r in lora)
    assert lora[1]["peft_mixed"]["adapters"] == 8
    mix = [r for r in lines if r["kind"] == "mix"][1]
    assert mix["peft_mixed"]["available"] is False and mix["peft_mixed"]["reason"]
    assert {"adapter", "sparse_delta", "scale"} <= set(mix["ops"]["ops"])
    assert any("rel_err_logits" in row for row in mix["check"]["rows"])  # mix tasks carry heads
    assert "lora_r8" in table(records).splitlines()[1]


def test_parse_subsets() -> None:
    cfg = parse(["--kinds", "ia3,mask", "--tasks", "1,32", "--shapes", "64x128", "--iters", "5", "--out", "/tmp/x"])
    assert cfg.kinds == ("ia3", "mask") and cfg.tasks == (1, 32) and cfg.shapes == ((64, 128),)
    assert cfg.iters == 5 and cfg.out == Path("/tmp/x") and cfg.device == "cuda" and cfg.dtype == "float16"
    assert parse(["--smoke"]).device == "cpu"
    with pytest.raises(SystemExit):
        parse(["--kinds", "lora_r4"])


@pytest.mark.slow
def test_smoke_half_precision(tmp_path: Path) -> None:
    # The GPU runs fp16: the baselines' own models must cast what Module.to does not reach (adapters, heads).
    records = run(replace(SMOKE, dtype="float16", kinds=("mix",), tasks=(8,), out=tmp_path))
    (r,) = records
    assert r["error"] is None, r.get("traceback")
    assert r["check"]["tolerance"] == 1e-2 and r["check"]["passed"]
    assert r["seqs"]["distinct_models"] >= 1 and "error" not in r["seqs"]
