"""Fig. 12 from bench.batching's records: queries/s of each batch policy as grouped bars, one panel per task count,
one group per length spread s; and the wide workload, each policy beside the HF backbone alone on padded batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from bench.plots import describe, last_per, save

POLICY_ORDER = ("fixed", "sorted", "coordinated", "packed")  # PetS's baseline first, padding-free last
HF = "HF padded"


def plot(records: list[dict[str, Any]], out: Path) -> list[Path]:
    records = last_per(records, "workload", "tasks", "sigma", "heads")
    fig12 = [r for r in records if r.get("workload") == "fig12"]
    paths = []
    if fig12:
        paths.append(save(fig12_figure(fig12), out / "batching-fig12.png"))
    for heads, name in ((False, "batching-wide.png"), (True, "batching-wide-head.png")):
        wide = [r for r in records if r.get("workload") == "wide" and bool(r.get("heads")) == heads]
        if wide:
            paths.append(save(wide_figure(wide[-1]), out / name))
    return paths


def policies(records: list[dict[str, Any]]) -> list[str]:
    seen = dict.fromkeys(p for r in records for p in r["policies"])
    return [p for p in POLICY_ORDER if p in seen] + [p for p in seen if p not in POLICY_ORDER]


def fig12_figure(records: list[dict[str, Any]]) -> Figure:
    counts = sorted({r["tasks"] for r in records})
    sigmas = sorted({float(r["sigma"]) for r in records})
    names = policies(records)
    panel = max(5.0, 0.8 + 0.22 * len(names) * len(sigmas))  # inches
    fig = Figure(figsize=(panel * len(counts), 5.0), layout="constrained")
    axes = fig.subplots(1, len(counts), sharey=True, squeeze=False)[0]
    for ax, n in zip(axes, counts, strict=True):
        by_sigma = {float(r["sigma"]): r for r in records if r["tasks"] == n}
        rates = {p: [_rate(by_sigma.get(s), p) for s in sigmas] for p in names}
        _bars(ax, [f"s={s:g}" for s in sigmas], rates)
        for i, s in enumerate(sigmas):  # PetS's headline: coordinated over fixed (V100: 1.58-1.73x at s = 1-2)
            ratio = (by_sigma.get(s) or {}).get("ratios", {}).get("coordinated_over_fixed")
            if ratio is not None:
                top = max(values[i] for values in rates.values())
                ax.annotate(f"{ratio:.2f}x", (i, top), xytext=(0, 3), textcoords="offset points", ha="center")
        ax.set_title(f"{n} tasks")
        ax.set_xlabel("length spread s of N(32, s)")
        ax.margins(y=0.12)
    axes[0].set_ylabel("throughput (queries/s)")
    handles, labels = axes[0].get_legend_handles_labels()
    title = "policy (above a group: coordinated / fixed; PetS's V100 figure: 1.58-1.73x at s = 1-2)"
    fig.legend(handles, labels, title=title, loc="outside lower center", ncols=len(labels))
    kinds = "/".join(dict.fromkeys(str(r.get("kind")) for r in records))
    queries = records[0].get("setup", {}).get("queries", "?")
    fig.suptitle(f"Batch policies, PetS Fig. 12: {queries} queries over {kinds} tasks\n{describe(records)}")
    return fig


def wide_figure(record: dict[str, Any]) -> Figure:
    results = {p: record["policies"][p] for p in policies([record])}
    hf = record.get("hf_padded_backbone")
    if hf:
        results[HF] = hf
    fig = Figure(figsize=(1.5 + 1.0 * len(results), 4.4), layout="constrained")
    ax = fig.subplots()
    bars = ax.bar(
        list(results),
        [r["queries_per_s"] for r in results.values()],
        color=[f"C{i}" for i in range(len(results))],  # the policies' colours in Fig. 12
        hatch=["//" if name == HF else "" for name in results],
    )
    ax.bar_label(bars, [f"{r['padding_fraction']:.0%} padding" for r in results.values()], fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    ax.margins(y=0.1)
    ax.set_ylabel("throughput (queries/s)")
    packed_over_hf = record.get("ratios", {}).get("packed_over_hf_padded")
    ratio = "" if packed_over_hf is None else f"; packed / HF padded: {packed_over_hf:.2f}x (issue 5's goal: 2x)"
    head = " with a classification head" if record.get("heads") else ""
    tasks = f"{record['tasks']} {record.get('kind')} task{'s' if record['tasks'] != 1 else ''}{head}"
    ax.set_xlabel(f"policy ({tasks}){ratio}")
    fig.suptitle(f"Wide workload, lengths ~ N(64, 32) in [8, 256]\n{describe([record])}")
    return fig


def _rate(record: dict[str, Any] | None, policy: str) -> float:
    """The policy's queries/s; 0 where it did not run (a gap in its group)."""
    result = (record or {}).get("policies", {}).get(policy)
    return float(result["queries_per_s"]) if result else 0.0


def _bars(ax: Axes, groups: list[str], rates: dict[str, list[float]]) -> None:
    width = 0.8 / len(rates)
    for i, (name, values) in enumerate(rates.items()):
        offsets = [g + (i - (len(rates) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(offsets, values, width, label=name)
    ax.set_xticks(range(len(groups)), groups)
    ax.grid(axis="y", alpha=0.3)
