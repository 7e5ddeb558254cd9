"""Fig. 11 from bench.op_scheduling's records: for each op and launch mode, the time of one layer site's task ops
against the sequence length, one line per scheme (the per-task loop, per-task on S streams, our segmented launch),
one panel per task count."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from bench.plots import describe, last_per, save
from bench.plots.throughput import MINOR, PLAIN


def plot(records: list[dict[str, Any]], out: Path) -> list[Path]:
    records = last_per(records, "op", "tasks", "seq", "mode")
    paths = []
    for op, mode in dict.fromkeys((r["op"], r["mode"]) for r in records):
        mine = [r for r in records if (r["op"], r["mode"]) == (op, mode)]
        paths.append(save(figure(mine, op, mode), out / f"op_scheduling-{op}-{mode}.png"))
    return paths


def schemes(records: list[dict[str, Any]]) -> list[str]:
    """loop, streams_S by S, segmented."""
    seen = {k for r in records for k in r["time_us"]}
    streams = sorted((k for k in seen if k.startswith("streams_")), key=lambda k: int(k.removeprefix("streams_")))
    return [k for k in ("loop", *streams, "segmented") if k in seen]


def figure(records: list[dict[str, Any]], op: str, mode: str) -> Figure:
    counts = sorted({r["tasks"] for r in records})
    fig = Figure(figsize=(4.6 * len(counts), 4.2), layout="constrained")
    axes = fig.subplots(1, len(counts), sharey=True, squeeze=False)[0]
    names = schemes(records)
    for ax, n in zip(axes, counts, strict=True):
        mine = sorted((r for r in records if r["tasks"] == n), key=lambda r: r["seq"])
        for i, name in enumerate(names):
            points = [(r["seq"], r["time_us"][name]) for r in mine if name in r["time_us"]]
            if not points:
                continue
            style: dict[str, Any] = {"marker": "o"}
            if name == "loop":
                style |= {"color": "black", "label": "per-task loop, one stream"}
            elif name == "segmented":
                style |= {"color": "red", "linewidth": 2.5, "label": "segmented (one launch)"}
            else:
                s = name.removeprefix("streams_")
                style |= {"color": f"C{i % 10}", "linestyle": "--", "label": f"per task on {s} stream(s)"}
            ax.plot(*zip(*points, strict=True), **style)
        rows = mine[0]["rows"] if mine else "?"
        ax.set_title(f"{n} tasks ({rows} rows)")
        ax.set_xscale("log", base=2)
        seqs = sorted({r["seq"] for r in mine})
        ax.set_xticks(seqs, [str(s) for s in seqs])
        ax.set_xlabel("sequence length (tokens)")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(PLAIN)
        ax.yaxis.set_minor_formatter(MINOR)
    axes[0].set_ylabel("time per call (us, median)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(4, max(1, len(labels))))
    how = "eager launches (host time included)" if mode == "eager" else "replayed from a CUDA graph (device time)"
    title = {"lora": "LoRA delta on one projection", "adapter": "bottleneck adapter at one sublayer"}.get(op, op)
    fig.suptitle(f"Task-op scheduling, PetS Fig. 11: {title}, {how}\n{describe(records)}")
    return fig
