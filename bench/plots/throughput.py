"""Fig. 7/8 from bench.throughput's records: for each model and kind of PetS's grid, queries/s of ours, SeqS, ParS
and peft against the task count, one panel per per-task (bs, seq); ours over SeqS and ParS against the task count,
with PetS's V100 band over SeqS; and issue 4's large batches, pets over the backbone per kind and task count."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from bench.pets_grid import PETS_SHAPES, PETS_V100_OVER_SEQS
from bench.plots import describe, last_per, save
from bench.records import RATIO_GOALS

SYSTEMS = {"pets": "ours (pets)", "seqs": "SeqS", "pars": "ParS", "peft_mixed": "peft mixed batch"}
PLAIN = FuncFormatter(lambda v, _: f"{v:g}")
MINOR = FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else "")  # 2s and 5s: readable over decades
COLORS = {"pets": "C0", "seqs": "C1", "pars": "C2", "peft_mixed": "C3"}  # the same in every panel and figure


def plot(records: list[dict[str, Any]], out: Path) -> list[Path]:
    grid = last_per(
        (r for r in records if r.get("experiment") == "throughput_grid"),
        *("model", "kind", "tasks", "per_task_batch", "seq"),
    )
    large = last_per((r for r in records if r.get("experiment") == "throughput"), "kind", "tasks", "batch", "seq")
    paths = []
    parts = dict.fromkeys((r["model"], r["kind"]) for r in grid)
    for model, kind in parts:
        mine = [r for r in grid if (r["model"], r["kind"]) == (model, kind)]
        paths.append(save(rates_figure(mine, model, kind), out / f"throughput-grid-{model}-{kind}.png"))
    if grid:
        paths.append(save(speedup_figure(grid, list(parts)), out / "throughput-grid-speedup.png"))
    if large:
        paths.append(save(large_figure(large), out / "throughput-large.png"))
    return paths


def shapes_of(records: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """Per-task (bs, seq) present, PetS's in its order first."""
    present = {(r["per_task_batch"], r["seq"]) for r in records}
    return [s for s in PETS_SHAPES if s in present] + sorted(present - set(PETS_SHAPES))


def _panels(count: int, width: float = 4.2, height: float = 3.4) -> tuple[Figure, list[Axes]]:
    cols = min(count, 3 if count <= 6 else 4)
    rows = math.ceil(count / cols)
    fig = Figure(figsize=(width * cols, height * rows + 1.2), layout="constrained")
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    for ax in axes[count:]:
        ax.set_visible(False)
    return fig, axes[:count]


def _log_axes(ax: Axes, tasks: list[int]) -> None:
    """Tasks on a log2 x axis, the y axis logarithmic with plain numbers."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(tasks, [str(n) for n in tasks])
    ax.set_xlabel("tasks in the batch")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(PLAIN)
    ax.yaxis.set_minor_formatter(MINOR)


def rates_figure(records: list[dict[str, Any]], model: str, kind: str) -> Figure:
    shapes = shapes_of(records)
    fig, axes = _panels(len(shapes))
    for ax, (bs, seq) in zip(axes, shapes, strict=True):
        mine = sorted((r for r in records if (r["per_task_batch"], r["seq"]) == (bs, seq)), key=lambda r: r["tasks"])
        for key, label in SYSTEMS.items():
            points = [(r["tasks"], q) for r in mine if (q := (r.get("queries_per_s") or {}).get(key))]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", color=COLORS[key], label=label)
        failed = [r["tasks"] for r in mine if r.get("error")]
        ax.set_title(f"bs {bs}, seq {seq} per task" + (f" (failed at {failed})" if failed else ""))
        ax.set_ylabel("throughput (queries/s)")
        _log_axes(ax, sorted({r["tasks"] for r in mine}))
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=max(1, len(labels)))
    fig.suptitle(f"PetS Fig. 7/8 grid: {model}, {kind} tasks, each task's rows contiguous\n{describe(records)}")
    return fig


def speedup_figure(records: list[dict[str, Any]], parts: list[tuple[str, str]]) -> Figure:
    fig, axes = _panels(len(parts), width=5.0)
    low, high = PETS_V100_OVER_SEQS
    for ax, (model, kind) in zip(axes, parts, strict=True):
        mine = [r for r in records if (r["model"], r["kind"]) == (model, kind)]
        for i, (bs, seq) in enumerate(shapes_of(mine)):
            shape = sorted((r for r in mine if (r["per_task_batch"], r["seq"]) == (bs, seq)), key=lambda r: r["tasks"])
            for key, style in (("pets_over_seqs", "-"), ("pets_over_pars", ":")):
                points = [(r["tasks"], v) for r in shape if (v := (r.get("ratios") or {}).get(key))]
                label = f"bs {bs} seq {seq}" if key == "pets_over_seqs" else None  # one entry per shape
                if points:
                    ax.plot(*zip(*points, strict=True), style, color=f"C{i % 10}", marker="o", label=label)
        ax.axhspan(low, high, color="grey", alpha=0.25, label=f"PetS / SeqS, V100 ({low}-{high}x)")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylabel("ours / baseline (queries/s ratio)")
        ax.set_title(f"{model}, {kind}")
        _log_axes(ax, sorted({r["tasks"] for r in mine}))
        ax.legend(fontsize="x-small", ncols=2)
    fig.suptitle(f"Ours over SeqS (solid) and over ParS (dotted), PetS's grid\n{describe(records)}")
    return fig


def large_figure(records: list[dict[str, Any]]) -> Figure:
    shapes = sorted({(r["batch"], r["seq"]) for r in records})
    counts = sorted({r["tasks"] for r in records})
    most = max(len({r["kind"] for r in records if (r["batch"], r["seq"]) == s}) for s in shapes)
    fig, axes = _panels(len(shapes), width=max(5.0, 0.9 + 0.3 * most * len(counts)), height=4.0)
    width = 0.8 / len(counts)
    for ax, (batch, seq) in zip(axes, shapes, strict=True):
        kinds = list(dict.fromkeys(r["kind"] for r in records if (r["batch"], r["seq"]) == (batch, seq)))
        for j, n in enumerate(counts):
            by_kind = {r["kind"]: r for r in records if (r["batch"], r["seq"], r["tasks"]) == (batch, seq, n)}
            values = [((by_kind.get(k) or {}).get("ratios") or {}).get("pets_over_backbone") or math.nan for k in kinds]
            ax.bar([i + (j - (len(counts) - 1) / 2) * width for i in range(len(kinds))], values, width, label=f"{n}")
        for i, k in enumerate(kinds):
            if k in RATIO_GOALS:
                ax.hlines(RATIO_GOALS[k], i - 0.45, i + 0.45, colors="black", linestyles="dashed")
        ax.set_xticks(range(len(kinds)), kinds, rotation=30)
        ax.set_xlabel("PET kind (dashes: issue 4's goal)")
        ax.set_ylabel("pets / backbone (seq/s ratio)")
        ax.set_title(f"batch {batch} x seq {seq}")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, title="tasks loaded", loc="outside lower center", ncols=max(1, len(labels)))
    fig.suptitle(f"Large batches: mixed-task throughput over the backbone alone\n{describe(records)}")
    return fig
