"""PetS Fig. 9 from bench.breakdown's records: per kind and shape, the shares of a forward's time in shared ops
and in task ops, as stacked bars."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from bench.plots import describe, last_per, save


def plot(records: list[dict[str, Any]], out: Path) -> list[Path]:
    records = [r for r in last_per(records, "kind", "rows_per_task", "seq") if (r.get("shares") or {}).get("task_ops")]
    if not records:
        return []
    return [save(figure(records), out / "breakdown.png")]


def figure(records: list[dict[str, Any]]) -> Figure:
    labels = [f"{r['kind']}\n{r['rows_per_task']} x {r['seq']}" for r in records]
    task = [100 * r["shares"]["task_ops"] for r in records]
    shared = [100 - t for t in task]
    fig = Figure(figsize=(4.0 + 0.9 * len(records), 5.2), layout="constrained")
    ax = fig.subplots()
    ax.bar(labels, shared, label="shared ops (aten: GEMMs, attention, elementwise, copies)", color="C0")
    bars = ax.bar(labels, task, bottom=shared, label="task ops (pets::*)", color="C3")
    totals = [r["ops"]["total_us"] / 1e3 for r in records]
    ax.bar_label(bars, [f"{t:.0f}%\n{ms:.2f} ms" for t, ms in zip(task, totals, strict=True)], fontsize="small")
    unit = "device" if "kernel" in str(records[0]["shares"].get("time", "")) else "CPU"
    ax.set_ylabel(f"share of the forward's {unit} time (%)")
    tasks = records[0].get("tasks", "?")
    ax.set_xlabel(f"kind, rows per task x tokens ({tasks} tasks; above a bar: task share, {unit} time per forward)")
    ax.set_ylim(0, 115)
    ax.grid(axis="y", alpha=0.3)
    fig.legend(loc="outside lower center", ncols=2, fontsize="small")
    fig.suptitle(f"Shared vs task ops (PetS Fig. 9: task ops a small share on a V100)\n{describe(records)}")
    return fig
