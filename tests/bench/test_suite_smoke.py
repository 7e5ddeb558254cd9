"""bench.all and bench.plot: the suite's orchestration and which records the figures are drawn from.

Each script's smoke run and its plot module have their own test (test_<name>_smoke.py): only one smoke script
(batching, ~1 minute on 2 cores) runs here through bench.all; failures, timeouts and the choice of records are
tested with stand-ins that take a second."""

from __future__ import annotations

import importlib
import json
import shutil
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

from bench import all as bench_all
from bench import plot as bench_plot

PNG = b"\x89PNG\r\n\x1a\n"
H200_BATCHING = Path(bench_plot.RESULTS) / "batching-20261127-session5-h200.jsonl"


def summary(out: Path) -> list[dict[str, object]]:
    (logs,) = out.glob("all-*-logs")
    return json.loads((logs / "summary.json").read_text())


@pytest.mark.slow
def test_all_smoke(tmp_path: Path) -> None:
    bench_all.main(["--smoke", "--only", "batching", "--out", str(tmp_path)])
    assert [(o["script"], o["status"], o["rc"]) for o in summary(tmp_path)] == [
        ("batching", "ok", 0),
        ("plot", "ok", 0),
    ]
    assert "records ->" in Path(str(summary(tmp_path)[0]["log"])).read_text()  # the script's own output
    assert len(list(tmp_path.glob("batching-smoke-*.jsonl"))) == 1
    pngs = sorted((tmp_path / "figures").glob("*.png"))
    assert [p.name for p in pngs] == ["batching-fig12.png", "batching-wide-head.png", "batching-wide.png"]
    assert all(p.read_bytes().startswith(PNG) for p in pngs)


def test_all_reports_failed_and_missing_scripts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_all, "command", lambda *_: [sys.executable, "-c", "print('boom'); raise SystemExit(3)"])
    real_find_spec = bench_all.find_spec
    monkeypatch.setattr(bench_all, "find_spec", lambda name: None if name == "bench.capacity" else real_find_spec(name))
    with pytest.raises(SystemExit) as exit_:
        bench_all.main(["--smoke", "--only", "capacity,batching", "--out", str(tmp_path)])
    assert exit_.value.code == 1
    rows = summary(tmp_path)
    # a script not written is reported, not run; the plot finds no records and skips both experiments
    assert [(o["script"], o["status"], o["rc"]) for o in rows] == [
        ("capacity", "missing", None),
        ("batching", "failed", 3),
        ("plot", "ok", 0),
    ]
    assert "boom" in Path(str(rows[1]["log"])).read_text()


def test_all_deadline(tmp_path: Path) -> None:
    # a deadline no longer than the plots' share of it leaves the scripts no time
    with pytest.raises(SystemExit) as exit_:
        bench_all.main(["--smoke", "--only", "batching", "--out", str(tmp_path), "--deadline", str(bench_all.PLOT_S)])
    assert exit_.value.code == 1
    assert [(o["script"], o["status"]) for o in summary(tmp_path)] == [("batching", "no time"), ("plot", "ok")]


def test_run_script_timeout(tmp_path: Path) -> None:
    cmd = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(600)"]
    outcome = bench_all.run_script("sleeper", cmd, 2.0, tmp_path / "sleeper.log")
    assert (outcome.status, outcome.rc) == ("timeout", None)
    log = (tmp_path / "sleeper.log").read_text()
    assert "started" in log and "stopped after 2 s" in log


def test_unknown_experiment_refused(capsys: pytest.CaptureFixture[str]) -> None:
    for main in (bench_plot.main, bench_all.main):
        with pytest.raises(SystemExit) as exit_:
            main(["--only", "batching,fig99"])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert "unknown experiment(s) ['fig99']" in err and "op_scheduling" in err


def write(path: Path, records: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_newest_run_per_device(tmp_path: Path) -> None:
    old = write(tmp_path / "batching-20261126-120000.jsonl", [{"device": "A", "v": 1}, {"device": "B", "v": 2}])
    new = write(tmp_path / "batching-20261127-session5-h200.jsonl", [{"device": "A", "v": 3}, {"device": "A", "v": 4}])
    write(tmp_path / "batching-smoke-20261128-000000.jsonl", [{"device": "A", "v": 5}])
    write(tmp_path / "batching_x-20261128-000000.jsonl", [{"device": "A", "v": 6}])
    files = bench_plot.run_files(tmp_path, "batching", smoke=False)
    assert files == [old, new]  # by stamp: a session name after the date sorts after that date's times
    assert bench_plot.newest_per_device(files) == {
        "A": [{"device": "A", "v": 3}, {"device": "A", "v": 4}],
        "B": [{"device": "B", "v": 2}],
    }
    smoke = bench_plot.run_files(tmp_path, "batching", smoke=True)
    assert bench_plot.newest_per_device(smoke) == {"A": [{"device": "A", "v": 5}]}


def test_plot_skips_experiments_without_records(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the H200 records, and the same records as if from a second device: one folder of figures per device
    shutil.copy(H200_BATCHING, tmp_path)
    other = [{**json.loads(line), "device": "NVIDIA H100 80GB HBM3"} for line in H200_BATCHING.read_text().splitlines()]
    write(tmp_path / "batching-20261128-000000.jsonl", other)
    figures = tmp_path / "figures"
    bench_plot.main(["--only", "capacity,batching", "--results", str(tmp_path), "--figures", str(figures)])
    printed = capsys.readouterr().out
    assert "capacity: no records in" in printed and "skipped" in printed
    pngs = sorted(p.relative_to(figures).as_posix() for p in figures.rglob("*.png"))
    assert pngs == [
        f"{device}/batching-{fig}.png"
        for device in ("nvidia-h100-80gb-hbm3", "nvidia-h200")
        for fig in ("fig12", "wide")
    ]
    assert all(str(figures / p) in printed for p in pngs)


def test_gpu_args_accepted(tmp_path: Path) -> None:
    # each written script's parser takes bench.all's arguments for it (a renamed flag fails here, not on the GPU)
    for name in bench_plot.EXPERIMENTS:
        if find_spec(f"bench.{name}") is None:
            continue
        parse = getattr(importlib.import_module(f"bench.{name}"), "parse", None)
        if parse is not None:
            cfg = parse([*bench_all.GPU_ARGS[name], "--out", str(tmp_path)])
            assert cfg.device == "cuda" and not cfg.smoke and cfg.out == tmp_path, name
