"""The batching bench's smoke run, in process: every policy serves every query, records are complete."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from bench import batching
from bench.batching import POLICIES, SMOKE, parse, run


@pytest.mark.slow
def test_smoke_records(tmp_path: Path) -> None:
    cfg = replace(SMOKE, tasks=(3,), sigmas=(2,), queries=24, wide_queries=20, out=tmp_path)
    records = run(cfg)
    lines = [json.loads(x) for f in tmp_path.glob("batching-smoke-*.jsonl") for x in f.read_text().splitlines()]
    # the wide workload: one task, on a runtime of the wide kind with that task alone, without and with a head
    assert [(r["workload"], r["tasks"], r["kind"], r["heads"]) for r in lines] == [
        ("fig12", 3, cfg.kind, True),
        ("wide", 1, cfg.wide_kind, False),
        ("wide", 1, cfg.wide_kind, True),
    ]
    assert len(records) == 3
    for r in lines:
        assert set(r["policies"]) == set(POLICIES) and r["device"].startswith("cpu") and r["commit"]
        n = 24 if r["workload"] == "fig12" else 20
        for p in r["policies"].values():
            assert p["succeeded"] == n and p["failed"] == 0 and p["accepted"] == n and p["queries_per_s"] > 0
            assert 0 <= p["padding_fraction"] < 1 and max(map(int, p["batch_sizes"])) <= p["max_batch"]
        assert r["ratios"]["coordinated_over_fixed"] > 0
    steady = lines[0]["steady"]
    assert [(st["policy"], st["load"]) for st in steady] == [
        (p, load) for p in cfg.steady_policies for load in cfg.steady_loads
    ]
    st = steady[0]
    assert st["succeeded"] == cfg.steady_queries and st["rate_qps"] > 0 and st["p99_bound_ms"] > 0
    assert st["p99_within_bound"] == (st["latency_p99_ms"] <= st["p99_bound_ms"])
    for wide in lines[1:]:
        assert 0 < wide["hf_padded_backbone"]["padding_fraction"] < 1 and wide["ratios"]["packed_over_hf_padded"] > 0
        pad = {p: v["padding_fraction"] for p, v in wide["policies"].items()}
        assert pad["packed"] < pad["fixed"] and pad["packed"] < pad["sorted"]  # one task: rows fill up
    assert [batching.label(r) for r in lines] == ["fig12", "wide", "wide+head"]
    assert "wide+head" in batching.table(records)


@pytest.mark.parametrize(
    ("captures", "kept", "median", "discarded"),
    [
        ([1, 0, 0, 0, 0], [2, 3, 4], 3, 0),  # a warm pass captured, the next did not; 3 clean timed passes
        ([0, 1, 1, 0, 1, 1], [3], 3, 4),  # 4 timed passes captured: 1 kept when timed_tries (5) ran out
        ([0, 1, 1, 1, 1, 1], [], 5, 5),  # none kept: the last pass
        ([0, 0, 0, 0], [1, 2, 3], 3, 0),  # rates 30, 10, 20: the median is the last
    ],
)
def test_timed_serve_keeps_the_median_of_passes_without_a_capture(
    monkeypatch: pytest.MonkeyPatch, captures: list[int], kept: list[int], median: int, discarded: int
) -> None:
    """Each serve() call captures captures[call] graphs, at rates[call] queries/s: warm passes until one captures
    nothing, then timed passes until timed_passes (3) captured nothing, timed_tries (5) at most; the kept passes'
    median is the result."""
    calls: list[int] = []
    total = {"captures": 0, "fitted": 0, "eager": 0}
    rates = [0.0, 30.0, 10.0, 20.0, 40.0, 50.0]

    def fake_serve(runtime: object, qs: object, policy: str, cfg: object) -> dict[str, object]:
        total["captures"] += captures[len(calls)]
        calls.append(len(calls))
        return {"pass": len(calls) - 1, "queries_per_s": rates[len(calls) - 1]}

    monkeypatch.setattr(batching, "serve", fake_serve)
    monkeypatch.setattr(batching, "graph_counts", lambda runtime: dict(total))
    result = batching.timed_serve(None, [], "packed", SMOKE)
    assert result["pass"] == median and result["timed_passes_discarded"] == discarded
    assert result["queries_per_s_passes"] == [rates[k] for k in kept]
    assert result["graph_captures"] == captures[median]


def test_parse() -> None:
    cfg = parse(["--tasks", "32,64", "--sigmas", "1,8", "--queries", "100", "--no-wide", "--kind", "lora_r8"])
    assert cfg.tasks == (32, 64) and cfg.sigmas == (1.0, 8.0) and cfg.queries == 100 and not cfg.wide
    assert cfg.kind == "lora_r8" and cfg.device == "cuda" and cfg.steady_queries == 8192
    assert parse(["--steady-queries", "4096"]).steady_queries == 4096 and cfg.wide_queries == 4096
    assert parse(["--wide-queries", "2048"]).wide_queries == 2048
    for bad in (["--queries", "0"], ["--steady-queries", "0"], ["--wide-queries", "0"]):
        with pytest.raises(SystemExit):
            parse(bad)
