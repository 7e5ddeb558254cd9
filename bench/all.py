"""The whole GPU benchmark suite, each script in its own process, then the figures.

    python -m bench.all --out DIR --deadline 570     # GPU: every experiment at GPU_ARGS, under 10 minutes on an H200
    python -m bench.all --smoke                      # CPU: every script's --smoke, into a new temporary folder
    python -m bench.all --only throughput,batching   # a subset

Each script runs as `python -m bench.<name> [args] --out DIR` in a process of its own (its GPU memory is given back
when it ends), under a timeout (its budget's, cut to what --deadline leaves), its output in
`<out>/all-<stamp>-logs/<name>.log`. Then bench.plot draws the figures of the experiments that ran (skipped, with
a line saying so, where matplotlib is not installed: plot the records elsewhere), and a
summary table (script, status, exit code, seconds against the budget) is printed and written beside the logs as
summary.json. The exit status is 1 if any script failed, timed out, is missing or got no time, or plotting failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib.util import find_spec
from pathlib import Path

from bench.plot import EXPERIMENTS, FIGURES, RESULTS, PlotError, experiments_of, plot_all

ROOT = Path(__file__).resolve().parents[1]

# Each script's arguments on the GPU and its budget in seconds, chosen so that the suite fits 10 minutes on an H200
# (the scripts' own defaults run much longer). A script not yet written gets only --out.
GPU_ARGS: dict[str, tuple[str, ...]] = {
    "throughput": ("--suite",),  # its SUITE config: PetS's grid subset (pets_grid.SUITE_GRID), ~3 min
    # 14 s a kind, compile included (its default: 4 kinds x 28 s; 3 x 28 took 101 s on the H200, 3 x 20 86 s)
    "capacity": ("--kinds", "mix,lora_r8,pfeiffer", "--seconds-per-kind", "14"),
    "breakdown": ("--kinds", "mix"),  # PetS's Fig. 9 setup: 8 tasks of random PET types (its default: 6 kinds)
    "op_scheduling": ("--suite",),  # its SUITE config: every configuration, fewer timed calls, a 50 s budget
    # Fig. 12's extremes, s = 1 and 8, at 32 and 128 tasks, then the wide workload. The default grid (s = 1, 2, 4, 8
    # at 32, 64, 128 tasks) is ~3.2 min by the session-6 H200 records (batching-20261127-session6-h200.jsonl, which
    # carry no run time): timed passes 9 s, timed steady streams 21 s, profiles 12 s, with up to 4 and 2 untimed
    # passes before each, graph captures (~0.6 s each), loading 128 tasks and compiling on top. Steady streams of
    # 4096 queries (the default 8192: the four Fig. 12 configurations alone took 137 s at 11cc4b8)
    "batching": ("--tasks", "32,128", "--sigmas", "1,8", "--steady-queries", "4096"),
}
# Measured on the H200: at e918a44 throughput 263 s, capacity 101, breakdown 45, op_scheduling 59, batching 154,
# plots 22 (645 s); at 11cc4b8, with the grid's time budget 180 s and capacity 20 s a kind, throughput 235 s,
# capacity 86, breakdown 48, op_scheduling 67, batching stopped by the deadline after 137 s (its wide workload not
# reached), so the cuts above (grid 130 s, capacity 14 s a kind, steady streams halved); at 44476b4 with them:
# throughput 157 s, capacity 77, breakdown 57, op_scheduling 64, batching 125, plots 19: 499 s, all ok. The grid's
# budget then went to 150 s with 4 of bert-base's 6 shapes, so that distilbert and bert-large run too; batching's
# wide workload went from 1024 to 4096 queries (bench.batching's wide_queries; ~15 s more by its passes, not timed),
# and in session 12 it runs twice, its task without and with a classification head (budget +20 s, not yet timed).
BUDGET_S = {"throughput": 185, "capacity": 65, "breakdown": 50, "op_scheduling": 65, "batching": 170}
PLOT_S = 30  # of --deadline, kept for the plots (22 s on the H200 machine)
# a script is stopped at 1.5 x its budget + 30 s (start-up: imports, the op library): its records so far are kept,
# written as each configuration finishes
TIMEOUT_FACTOR, TIMEOUT_EXTRA_S = 1.5, 30.0
SMOKE_TIMEOUT_S = 300  # each smoke run takes ~1 minute on a busy 2-core CPU
TAIL_LINES = 25  # of each script's log, printed when it ends: its closing table, or its error


@dataclass
class Outcome:
    script: str
    status: str  # ok, failed, timeout, missing (no such script), no time (deadline), skipped (plot: no matplotlib)
    rc: int | None
    seconds: float
    budget_s: float | None
    log: str
    command: str


def command(name: str, out: Path, smoke: bool) -> list[str]:
    args = ("--smoke",) if smoke else GPU_ARGS[name]
    return [sys.executable, "-m", f"bench.{name}", *args, "--out", str(out)]


def run_script(name: str, cmd: list[str], timeout_s: float, log: Path, budget_s: float | None = None) -> Outcome:
    """Run `cmd` from the repo root, its output into `log`; stopped (its whole process group) after `timeout_s`."""
    start = time.perf_counter()
    with log.open("w") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the log shows progress as it goes, and all of it at a kill
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=timeout_s)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the script and anything it started
            proc.wait()
            rc, status = None, "timeout"
            f.write(f"\n[bench.all] stopped after {timeout_s:.0f} s\n")
    return Outcome(name, status, rc, time.perf_counter() - start, budget_s, str(log), shlex.join(cmd))


def run_suite(
    experiments: tuple[str, ...], out: Path, logs: Path, smoke: bool, deadline_s: float | None = None
) -> list[Outcome]:
    """Each script in turn; with `deadline_s`, none runs past that many seconds from now (less PLOT_S)."""
    started = time.perf_counter()
    outcomes = []
    for name in experiments:
        log = logs / f"{name}.log"
        budget = None if smoke else BUDGET_S[name]
        timeout = SMOKE_TIMEOUT_S if budget is None else TIMEOUT_FACTOR * budget + TIMEOUT_EXTRA_S
        if deadline_s is not None:
            timeout = min(timeout, deadline_s - PLOT_S - (time.perf_counter() - started))
        if find_spec(f"bench.{name}") is None:
            outcome = Outcome(name, "missing", None, 0.0, budget, str(log), f"bench/{name}.py does not exist")
            print(f"[{name}] missing: bench/{name}.py does not exist", flush=True)
        elif timeout < 1:
            outcome = Outcome(name, "no time", None, 0.0, budget, str(log), "not run: --deadline passed")
            print(f"[{name}] not run: the deadline of {deadline_s:.0f} s has passed", flush=True)
        else:
            cmd = command(name, out, smoke)
            print(f"[{name}] {shlex.join(cmd[1:])} (timeout {timeout:.0f} s)", flush=True)
            outcome = run_script(name, cmd, timeout, log, budget)
            tail = log.read_text().splitlines()[-TAIL_LINES:]
            print("\n".join(f"  | {line}" for line in tail))
            print(f"[{name}] {outcome.status} in {outcome.seconds:.0f} s, log {log}", flush=True)
        outcomes.append(outcome)
    return outcomes


def table(outcomes: list[Outcome]) -> str:
    lines = [f"{'script':<14} {'status':<8} {'rc':>4} {'seconds':>8} {'budget':>7}"]
    for o in outcomes:
        rc = "-" if o.rc is None else str(o.rc)
        budget = "-" if o.budget_s is None else f"{o.budget_s:.0f}"
        lines.append(f"{o.script:<14} {o.status:<8} {rc:>4} {o.seconds:>8.0f} {budget:>7}")
    lines.append(f"{'total':<14} {'':<8} {'':>4} {sum(o.seconds for o in outcomes):>8.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.all", description=(__doc__ or "").split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="every script's --smoke on the CPU (into a temporary folder)")
    p.add_argument("--only", help=f"comma-separated experiments (default: all of {','.join(EXPERIMENTS)})")
    p.add_argument("--out", type=Path, help="folder for the records (default bench/results; --smoke: a new temp one)")
    p.add_argument("--figures", type=Path, help="folder for the PNGs (default bench/figures; --smoke: <out>/figures)")
    p.add_argument(
        "--deadline", type=float, help=f"seconds for the whole suite: each script stops by then less {PLOT_S} (plots)"
    )
    args = p.parse_args(argv)
    try:
        experiments = experiments_of(args.only)
    except ValueError as e:
        p.error(str(e))
    out = args.out or (Path(tempfile.mkdtemp(prefix="bench-smoke-")) if args.smoke else RESULTS)
    figures = args.figures or (out / "figures" if args.smoke else FIGURES)
    logs = out / f"all-{'smoke-' if args.smoke else ''}{time.strftime('%Y%m%d-%H%M%S')}-logs"
    logs.mkdir(parents=True)
    print(f"records -> {out}, logs -> {logs}, figures -> {figures}", flush=True)

    outcomes = run_suite(experiments, out, logs, args.smoke, args.deadline)
    outcomes.append(plot(tuple(o.script for o in outcomes if o.status != "missing"), out, figures, args.smoke))
    (logs / "summary.json").write_text(json.dumps([asdict(o) for o in outcomes], indent=1) + "\n")
    print("\n" + table(outcomes))
    if any(o.status not in ("ok", "skipped") for o in outcomes):
        raise SystemExit(1)


def plot(experiments: tuple[str, ...], out: Path, figures: Path, smoke: bool) -> Outcome:
    """bench.plot over the records in `out`, as one more row of the summary."""
    start = time.perf_counter()
    if find_spec("matplotlib") is None:  # the GPU machine has none and no network: plot where the records go
        print(f"matplotlib is not installed: no figures; run `python -m bench.plot --results {out}` where it is")
        return Outcome("plot", "skipped", None, 0.0, None, "-", "bench.plot")
    try:
        plot_all(experiments, out, figures, smoke)
        status, rc = "ok", 0
    except PlotError:
        status, rc = "failed", 1
    return Outcome("plot", status, rc, time.perf_counter() - start, None, "-", "bench.plot")


if __name__ == "__main__":
    main(sys.argv[1:])
