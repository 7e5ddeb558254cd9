"""One plot module per experiment: `bench/plots/<experiment>.py` exposes `plot(records, out) -> list[Path]`, which
draws the records of one run on one device (bench/plot.py chooses them) as PNG files in the folder `out` and returns
their paths. The helpers below are shared by those modules."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.figure import Figure

matplotlib.use("Agg")  # files only, no display (GPU machine, CI); before any plot module imports pyplot


def last_per(records: Iterable[dict[str, Any]], *fields: str) -> list[dict[str, Any]]:
    """The last record of each configuration (the values of `fields`), in order of first appearance: a session's
    file may hold a configuration re-run at a later commit, and the later record is the one to plot."""
    chosen: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in records:
        chosen[tuple(r.get(f) for f in fields)] = r
    return list(chosen.values())


def describe(records: list[dict[str, Any]]) -> str:
    """'DEVICE, MODEL DTYPE, commit C' of the records (several values joined with '/'), for a figure's title."""

    def values(key: str) -> str:
        found = dict.fromkeys(str(r[key]) for r in records if r.get(key) is not None)
        return "/".join(found) or "?"

    commits = "/".join(dict.fromkeys(str(r.get("commit", "?"))[:7] for r in records)) or "?"
    return f"{values('device')}, {values('model')} {values('dtype')}, commit {commits}"


def save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path
