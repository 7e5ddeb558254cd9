"""PNG figures from the bench records, one set per experiment.

    python -m bench.plot                             # every experiment, bench/results -> bench/figures
    python -m bench.plot --only batching --results DIR --figures DIR
    python -m bench.plot --smoke --results DIR       # the smoke records (otherwise left out)

For each experiment, the records of `<results>/<experiment>-*.jsonl` go to `bench/plots/<experiment>.py`'s
`plot(records, out)`. A run is the records of one file: a script writes one file per run, named by its start stamp
(`%Y%m%d-%H%M%S`; kept files may carry a session name after the date, as `20261127-session5-h200`), so files sort by
name in the order they were made. For each device, the newest file holding records of that device is plotted (its
records of that device only); a session file that holds a configuration twice is resolved by the plot module, which
plots the last. With one device the figures go into --figures, with several into one subfolder per device.
Smoke files (`<experiment>-smoke-*.jsonl`) are read only with --smoke, and then only they. An experiment with no
records is skipped with a line saying so.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BENCH = Path(__file__).parent
RESULTS = BENCH / "results"
FIGURES = BENCH / "figures"
EXPERIMENTS = ("throughput", "capacity", "breakdown", "op_scheduling", "batching")


def experiments_of(text: str | None) -> tuple[str, ...]:
    """The experiments named in a comma-separated list (all of them for None), in EXPERIMENTS' order."""
    if text is None:
        return EXPERIMENTS
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown or not names:
        raise ValueError(f"unknown experiment(s) {unknown or [text]}: choose from {', '.join(EXPERIMENTS)}")
    return tuple(e for e in EXPERIMENTS if e in names)


def run_files(results: Path, experiment: str, smoke: bool) -> list[Path]:
    """The experiment's record files, oldest first."""
    prefix = f"{experiment}-smoke-" if smoke else f"{experiment}-"
    files = [f for f in results.glob(f"{prefix}*.jsonl") if smoke or not f.name.startswith(f"{experiment}-smoke-")]
    return sorted(files, key=lambda f: f.name[len(prefix) :])


def read_records(path: Path) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not a JSON record ({e})") from e
    return records


def newest_per_device(files: Sequence[Path]) -> dict[str, list[dict[str, Any]]]:
    """For each device, its records in the newest of `files` (given oldest first) that holds any."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for path in files:
        by_device: dict[str, list[dict[str, Any]]] = {}
        for r in read_records(path):
            by_device.setdefault(str(r.get("device", "unknown device")), []).append(r)
        runs.update(by_device)  # a later file replaces an earlier one's run on the same device
    return runs


def slug(device: str) -> str:
    """A folder name for a device: 'NVIDIA H200' -> 'nvidia-h200'."""
    return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") or "device"


def plot_experiment(experiment: str, results: Path, figures: Path, smoke: bool = False) -> list[Path]:
    """The experiment's figures (no records: none, and a line saying so)."""
    runs = newest_per_device(run_files(results, experiment, smoke))
    if not runs:
        print(f"{experiment}: no {'smoke ' if smoke else ''}records in {results}: skipped")
        return []
    try:
        module = importlib.import_module(f"bench.plots.{experiment}")
    except ModuleNotFoundError as e:
        if e.name != f"bench.plots.{experiment}":
            raise
        raise ModuleNotFoundError(f"{experiment} has records but no plot module bench/plots/{experiment}.py") from e
    paths: list[Path] = []
    for device, records in runs.items():
        out = figures if len(runs) == 1 else figures / slug(device)
        paths += module.plot(records, out)
    return paths


def plot_all(experiments: Sequence[str], results: Path, figures: Path, smoke: bool = False) -> dict[str, list[Path]]:
    """Each experiment's figures; an experiment whose plotting failed maps to its error, printed, not raised."""
    done: dict[str, list[Path]] = {}
    failed = []
    for experiment in experiments:
        try:
            done[experiment] = plot_experiment(experiment, results, figures, smoke)
        except Exception as e:  # one experiment's broken records or plot module must not cost the others' figures
            print(f"{experiment}: plotting failed: {type(e).__name__}: {e}")
            failed.append(experiment)
        for path in done.get(experiment, []):
            print(f"{experiment}: {path}")
    if failed:
        raise PlotError(failed)
    return done


class PlotError(Exception):
    def __init__(self, experiments: list[str]) -> None:
        super().__init__(f"plotting failed for {', '.join(experiments)}")
        self.experiments = experiments


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.plot", description=(__doc__ or "").split("\n")[0])
    p.add_argument("--only", help=f"comma-separated experiments (default: all of {','.join(EXPERIMENTS)})")
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of the records (default bench/results)")
    p.add_argument("--figures", type=Path, default=FIGURES, help="folder for the PNGs (default bench/figures)")
    p.add_argument("--smoke", action="store_true", help="plot the smoke records instead")
    args = p.parse_args(argv)
    try:
        experiments = experiments_of(args.only)
    except ValueError as e:
        p.error(str(e))
    try:
        plot_all(experiments, args.results, args.figures, args.smoke)
    except PlotError as e:
        raise SystemExit(str(e)) from e


if __name__ == "__main__":
    main(sys.argv[1:])
