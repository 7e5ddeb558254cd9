"""The throughput bench's smoke run, in process: it runs, checks correctness, and writes complete records (issue 4's
large batches and PetS's grid) that the plot module draws."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from bench.baselines import SeqS, own_model
from bench.kinds import make_kinds
from bench.models import MODELS, make_base
from bench.pets_grid import CHECK_TASKS, LARGE, SMOKE_GRID, SUITE_GRID, GridRun, Part, points
from bench.plots.throughput import plot
from bench.records import table
from bench.throughput import SMOKE, Config, main, parse, run


@pytest.mark.slow
def test_smoke_records(tmp_path: Path) -> None:
    # Large batches: lora_r8 with 1 and 8 tasks (memory measured across the adds, peft's mixed batch); the mix with 8
    # tasks covers every kind (7 parts) in one runtime, recompiled after the 1-task one, with heads. Then the grid.
    main(["--smoke", "--out", str(tmp_path)])
    lines = [json.loads(line) for f in tmp_path.glob("throughput-smoke-*.jsonl") for line in f.read_text().splitlines()]
    large = [r for r in lines if r["experiment"] == "throughput"]
    grid = [r for r in lines if r["experiment"] == "throughput_grid"]
    assert len(large) + len(grid) == len(lines)
    assert [(r["kind"], r["tasks"]) for r in large] == [("lora_r8", 1), ("lora_r8", 8), ("mix", 1), ("mix", 8)]
    for r in lines:
        assert r["error"] is None, r.get("traceback")
        assert r["device"].startswith("cpu") and r["commit"] and {"torch", "transformers", "peft"} <= set(r["versions"])
        assert r["check"]["passed"] and r["check"]["max_rel_err"] <= r["check"]["tolerance"] == 1e-5
    for r in large:
        assert len(r["check"]["rows"]) >= 4
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
    lora = [r for r in large if r["kind"] == "lora_r8"]
    assert all(r["peft_mixed"]["available"] and r["peft_mixed"]["agrees"] for r in lora)
    assert lora[1]["peft_mixed"]["adapters"] == 8
    mix = [r for r in large if r["kind"] == "mix"][1]
    assert mix["peft_mixed"]["available"] is False and mix["peft_mixed"]["reason"]
    assert {"adapter", "sparse_delta", "scale"} <= set(mix["ops"]["ops"])
    assert any("rel_err_logits" in row for row in mix["check"]["rows"])  # mix tasks carry heads
    assert "lora_r8" in table(large).splitlines()[1]
    check_grid(grid)
    names = {p.name for p in plot(lines, tmp_path / "figures")}
    assert names == {
        "throughput-large.png",
        "throughput-grid-speedup.png",
        "throughput-grid-tiny-mix.png",
        "throughput-grid-tiny-lora_r8.png",
    }
    assert all((tmp_path / "figures" / n).stat().st_size > 0 for n in names)


def check_grid(grid: list[dict[str, Any]]) -> None:
    want = [(kind, *p) for (_, kind), todo in points(SMOKE_GRID).items() for p in todo]
    assert [(r["kind"], r["tasks"], r["per_task_batch"], r["seq"]) for r in grid] == want
    for r in grid:
        n, bs = r["tasks"], r["per_task_batch"]
        assert r["batch"] == n * bs and len(r["check"]["rows"]) == min(n, CHECK_TASKS)
        assert all(r["queries_per_s"][k] > 0 for k in ("pets", "seqs", "pars"))
        assert r["ratios"]["pets_over_seqs"] == pytest.approx(r["time_s"]["seqs"] / r["time_s"]["pets"])
        # SeqS: one real model per task (none reused), checked against the same own models; shared weights counted
        seqs = r["seqs"]
        assert seqs["distinct_models"] == n and not seqs["estimated"] and seqs["check"]["passed"]
        assert 0 < seqs["weight_bytes"]["distinct"] < seqs["weight_bytes"]["unshared"]
        assert all(run["agrees"] and run["rel_err_vs_seqs"] <= 1e-5 for run in r["pars"]["runs"])
        assert r["peft_mixed"]["available"] == (r["kind"] == "lora_r8")
        if r["kind"] == "lora_r8":
            assert r["peft_mixed"]["adapters"] >= n and r["queries_per_s"]["peft_mixed"] > 0
        elif n >= 7:  # every part of the mix, heads included
            assert any("rel_err_logits" in row for row in r["check"]["rows"])


def test_seqs_shares_unchanged_weights() -> None:
    base = make_base(MODELS["tiny"], seed=0)
    spec = make_kinds(base, ("lora_r8",))["lora_r8"].task(0)  # LoRA on query and value only
    seqs = SeqS(base, "cpu", torch.float32)
    model = seqs.build(spec)
    attention = model.bert.encoder.layer[0].attention.self
    assert attention.key.weight is seqs.shared["encoder.layer.0.attention.self.key.weight"]
    assert attention.query.weight is not seqs.shared["encoder.layer.0.attention.self.query.weight"]
    ids = torch.randint(1000, 30000, (2, 8))
    mask = torch.ones_like(ids)
    assert torch.equal(model(ids, mask)[1], own_model(base, spec, "cpu", torch.float32)(ids, mask)[1])
    seqs.models = {"a": model, "b": seqs.build(spec)}
    counted = seqs.weight_bytes()
    per_model = sum(p.numel() * 4 for p in model.parameters())
    q_and_v = sum(p.numel() * 4 for n, p in model.named_parameters() if n.endswith(("query.weight", "value.weight")))
    assert counted == {"models": 2, "distinct": per_model + q_and_v, "unshared": 2 * per_model}


def test_parse_subsets() -> None:
    cfg = parse(["--kinds", "ia3,mask", "--tasks", "1,32", "--shapes", "64x128", "--iters", "5", "--out", "/tmp/x"])
    assert cfg.kinds == ("ia3", "mask") and cfg.tasks == (1, 32) and cfg.shapes == ((64, 128),)
    assert cfg.iters == 5 and cfg.out == Path("/tmp/x") and cfg.device == "cuda" and cfg.dtype == "float16"
    assert cfg.large_batches and not cfg.grid
    assert parse(["--smoke"]).device == "cpu"
    with pytest.raises(SystemExit):
        parse(["--kinds", "lora_r4"])


def test_parse_grid() -> None:
    cfg = parse(["--grid-models", "bert-base,bert-large", "--grid-tasks", "2,4", "--grid-shapes", "1x128,4x16"])
    shapes = ((1, 128), (4, 16))
    assert cfg.grid == (GridRun("bert-base", ("mix",), (2, 4), shapes), GridRun("bert-large", ("mix",), (2, 4), shapes))
    assert not cfg.large_batches
    cfg = parse(["--grid", "--grid-kinds", "lora_r8", "--pars-streams", "2,8", "--time-budget", "60"])
    assert cfg.grid == (GridRun("bert-base", ("lora_r8",)),) and cfg.pars_streams == (2, 8) and cfg.time_budget_s == 60
    suite = parse(["--suite"])
    assert suite.grid == SUITE_GRID and not suite.large_batches and suite.time_budget_s is not None
    for bad in (["--grid-models", "gpt2"], ["--grid-shapes", "1x"], ["--grid-tasks", "0"], ["--pars-streams", "a"]):
        with pytest.raises(SystemExit):
            parse(bad)


def test_points_merge_runs() -> None:
    # the large batches join bert-base's mix grid on one growing runtime, task counts ascending
    plan = points(SUITE_GRID)
    mix = plan[("bert-base", "mix")]
    assert mix == sorted(mix) and {(32, 2, 128), (32, 4, 64), (2, 1, 128), (64, 4, 16)} <= set(mix)
    assert plan[("bert-base", "lora_r8")] == [(32, 2, 128), (32, 4, 64)] == sorted(points((LARGE,))["bert-base", "mix"])
    # every model before LoRA's large batches: a time budget spent on bert-base still leaves the other models run
    assert list(plan) == [("bert-base", "mix"), ("distilbert", "mix"), ("bert-large", "mix"), ("bert-base", "lora_r8")]


@pytest.mark.slow
def test_smoke_half_precision(tmp_path: Path) -> None:
    # The GPU runs fp16: the baselines' own models must cast what Module.to does not reach (adapters, heads).
    records = run(replace(SMOKE, dtype="float16", kinds=("mix",), tasks=(8,), grid=(), out=tmp_path))
    (r,) = records
    assert r["error"] is None, r.get("traceback")
    assert r["check"]["tolerance"] == 1e-2 and r["check"]["passed"]
    assert r["seqs"]["distinct_models"] >= 1 and "error" not in r["seqs"]


def test_a_failed_grid_check_is_the_record_with_the_plain_models_beside_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # A bound nothing meets: ours is not timed, the record says why, and the merged own models' errors on the same
    # rows are there to compare (how far the dtype alone is from the fp32 oracle).
    monkeypatch.setattr(Config, "tolerance", property(lambda self: 0.0))
    base = make_base(MODELS["tiny"], seed=0)
    part = Part(SMOKE, "tiny", base, make_kinds(base, ("lora_r8",))["lora_r8"], {}, 2)
    try:
        r = part.measure(2, 1, 8)
    finally:
        part.free()
    assert r["error"].startswith("correctness check failed") and not r["check"]["passed"]
    assert "queries_per_s" not in r and "timing" not in r["seqs"]
    assert [row["task"] for row in r["seqs"]["check"]["rows"]] == [row["task"] for row in r["check"]["rows"]]
