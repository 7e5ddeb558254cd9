"""The throughput records: environment stamp, issue 4's goals, the JSON Lines file and the closing table."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

# pets seq/s over the backbone's, at GOAL_TASKS tasks (issue 4); the mix with sparse kinds has no stated goal.
RATIO_GOALS = {
    "lora_r8": 0.90,
    "lora_r16": 0.90,
    "bitfit": 0.90,
    "pfeiffer": 0.90,
    "ia3": 0.90,
    "mix_dense": 0.90,
    "diff": 0.80,
    "mask": 0.75,
}
GOAL_TASKS = (32, 128, 1024)
SPEEDUP_GOAL, SPEEDUP_TASKS = 25.0, 32  # over peft's mixed batch and over SeqS
LORA_R8_MAX_BYTES = 1_000_000  # a LoRA r8 task on bert-base adds under 1 MB


def environment(device: str) -> dict[str, Any]:
    import peft
    import transformers

    # The GPU machine's copy of the tree may carry no .git, or a stale one (seen: it named the commit the session
    # started from): the caller passes the commit in PETS_COMMIT, and the record says which source it used.
    head, dirty = _git("rev-parse", "--short", "HEAD"), _git("status", "--porcelain")
    given = os.environ.get("PETS_COMMIT")
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "versions": {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "python": platform.python_version(),
        },
        "commit": given or head or "unknown",
        "commit_source": "PETS_COMMIT" if given else ("git" if head else None),
        "worktree_dirty": None if given or head is None else bool(dirty),
    }


def describe_env(env: dict[str, Any]) -> str:
    """The closing line's stamp: device, torch version and commit of an environment() record."""
    return f"device: {env['device']}  torch {env['versions']['torch']}  commit {env['commit']}"


def _git(*args: str) -> str | None:
    """git's output in the repo, or None where there is no git or no repository."""
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, check=False, cwd=Path(__file__).parent)
    except OSError:
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def goals(r: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The issue's goals that apply to this record: target, value, met (reported, not asserted)."""
    out: dict[str, dict[str, Any]] = {}
    ratios = r.get("ratios") or {}
    if r["kind"] in RATIO_GOALS and r["tasks"] in GOAL_TASKS:
        out["pets_over_backbone"] = _goal(RATIO_GOALS[r["kind"]], ratios.get("pets_over_backbone"))
    if r["tasks"] == SPEEDUP_TASKS:
        if (r.get("peft_mixed") or {}).get("available"):
            out["pets_over_peft"] = _goal(SPEEDUP_GOAL, ratios.get("pets_over_peft"))
        out["pets_over_seqs"] = _goal(SPEEDUP_GOAL, ratios.get("pets_over_seqs"))
    if r["kind"] == "lora_r8" and r.get("model") == "bert-base":
        per_task = (r.get("memory") or {}).get("bytes_per_task")
        out["bytes_per_task"] = {
            "target": f"< {LORA_R8_MAX_BYTES}",
            "value": per_task,
            "met": None if per_task is None else per_task < LORA_R8_MAX_BYTES,
        }
    return out


def _goal(target: float, value: float | None) -> dict[str, Any]:
    return {"target": f">= {target}", "value": value, "met": None if value is None else value >= target}


def goals_met(r: dict[str, Any]) -> str:
    """'yes', 'no' (naming what missed), or '-' when no goal applies or the configuration failed."""
    if r.get("error"):
        return "FAILED"
    checked = {k: g["met"] for k, g in (r.get("goals") or {}).items() if g["met"] is not None}
    if not checked:
        return "-"
    missed = [k.replace("pets_over_", "") for k, met in checked.items() if not met]
    return "yes" if not missed else "no: " + ",".join(missed)


class RecordFile:
    """One JSON record per line, written as each configuration finishes (a run cut short keeps what it did)."""

    def __init__(self, directory: Path, stem: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"{stem}.jsonl"
        self.records: list[dict[str, Any]] = []

    @staticmethod
    def for_run(directory: Path, experiment: str, smoke: bool) -> RecordFile:
        """`<experiment>[-smoke]-<date>-<time>.jsonl` in `directory` (bench.plot reads smoke records apart)."""
        return RecordFile(directory, f"{experiment}{'-smoke' if smoke else ''}-{time.strftime('%Y%m%d-%H%M%S')}")

    def summary(self, started: float | None = None) -> str:
        took = "" if started is None else f" ({time.perf_counter() - started:.0f} s)"
        return f"\n{len(self.records)} records -> {self.path}{took}"

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=_jsonable) + "\n")


def _jsonable(value: object) -> object:
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(records: list[dict[str, Any]]) -> str:
    """The short table printed last: one line per configuration."""
    head: tuple[str, ...] = ("kind", "tasks", "bs", "seq", "backbone/s", "pets/s", "ratio")
    head += ("pets/peft", "pets/SeqS", "bytes/task", "goal met?")
    widths = (9, 5, 4, 4, 10, 9, 6, 9, 9, 10, 0)
    lines = [" ".join(f"{h:>{w}}" if w else h for h, w in zip(head, widths, strict=True))]
    for r in records:
        rate = r.get("seq_per_s") or {}
        ratios = r.get("ratios") or {}
        per_task = (r.get("memory") or {}).get("bytes_per_task")
        seqs = _fmt(ratios.get("pets_over_seqs"), ".1f")
        if (r.get("seqs") or {}).get("estimated") and seqs != "-":
            seqs += "~"
        cells = (
            r["kind"],
            str(r["tasks"]),
            str(r["batch"]),
            str(r["seq"]),
            _fmt(rate.get("backbone"), ".0f"),
            _fmt(rate.get("pets"), ".0f"),
            _fmt(ratios.get("pets_over_backbone"), ".3f"),
            _fmt(ratios.get("pets_over_peft"), ".1f"),
            seqs,
            _fmt(per_task, ".3g"),
            goals_met(r),
        )
        lines.append(" ".join(f"{c:>{w}}" if w else c for c, w in zip(cells, widths, strict=True)))
    return "\n".join(lines)
