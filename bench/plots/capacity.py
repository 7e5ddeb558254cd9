"""PetS Table 5 from bench.capacity's records: per kind, the tasks the pets runtime holds at full memory (projected,
and those it really loaded) against SeqS's merged models; and the bytes each takes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from bench.plots import describe, last_per, save


def plot(records: list[dict[str, Any]], out: Path) -> list[Path]:
    records = [r for r in last_per(records, "kind") if r.get("projected_tasks_at_full_memory")]
    if not records:
        return []
    return [save(figure(records), out / "capacity.png")]


def figure(records: list[dict[str, Any]]) -> Figure:
    kinds = [r["kind"] for r in records]
    seqs = [r.get("seqs_projected_models_at_full_memory") or float("nan") for r in records]
    fig = Figure(figsize=(4.5 + 1.3 * len(records), 5.4), layout="constrained")
    count, size = fig.subplots(1, 2, width_ratios=(3, 2))
    x = range(len(records))
    width = 0.38
    ours = count.bar(
        [i - width / 2 for i in x],
        [r["projected_tasks_at_full_memory"] for r in records],
        width,
        label="pets runtime, projected at full memory",
    )
    count.bar([i + width / 2 for i in x], seqs, width, label="SeqS (a merged model per task), projected")
    count.scatter(
        [i - width / 2 for i in x],
        [r["tasks_loaded"] for r in records],
        marker="_",
        s=400,
        color="k",
        zorder=3,
        label="tasks really loaded (then projected)",
    )
    ratios = [r.get("projected_over_seqs") for r in records]
    count.bar_label(ours, ["" if q is None else f"{q:.0f}x" for q in ratios], fontsize="small")
    count.set_yscale("log")
    count.set_xticks(list(x), kinds)
    count.set_xlabel("PET kind (the number above a bar: pets / SeqS)")
    count.set_ylabel("tasks served at once (count, log scale)")
    count.grid(axis="y", alpha=0.3)

    size.bar(list(x), [r["bytes_per_task"] / 2**20 for r in records], label="pets runtime, per task")
    model = [(r.get("seqs") or {}).get("bytes_per_model") for r in records]
    size.scatter(
        list(x),
        [float("nan") if b is None else b / 2**20 for b in model],
        marker="D",
        color="C1",
        zorder=3,
        label="SeqS, per merged model",
    )
    size.set_yscale("log")
    size.set_xticks(list(x), kinds)
    size.set_xlabel("PET kind")
    size.set_ylabel("memory per task (MiB, log scale)")
    size.grid(axis="y", alpha=0.3)
    handles = [h for ax in (count, size) for h in ax.get_legend_handles_labels()[0]]
    labels = [label for ax in (count, size) for label in ax.get_legend_handles_labels()[1]]
    fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize="small")
    setup = records[0].get("setup", {})
    fig.suptitle(
        f"Tasks one card serves while serving bs{setup.get('batch', '?')} x s{setup.get('seq', '?')} "
        f"(PetS Table 5: up to 25x SeqS on a V100)\n{describe(records)}"
    )
    return fig
