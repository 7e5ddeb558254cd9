"""The engine's host ceiling on bench.batching's wide workload (issue 5): every policy served by the engine on the
CPU with forwards that take no time (the runtime's executors replaced by stubs that return zeros of bert-base's
output widths), so the rate is what the host side alone allows: submitting, batching, packing, building the
inputs, answering (lists of floats) and the futures; with `--fig12 RECORD`, PetS's Fig. 12 workload on a runtime of
the record's mix tasks and its GPU cost model, so coordinated plans as it did on the GPU. A development probe:
`python -m scripts.engine_ceiling [--queries 4096] [--policies packed,fixed] [--profile] [--fig12 RECORD]`.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bench.batching import Config, queries, serve
from bench.kinds import make_kinds
from bench.loading import Served
from bench.models import TINY, make_base
from pets_compiler.serving import CostModel
from scripts.profile_engine import engine_thread_profiled

HIDDEN, LABELS = 768, 4  # bert-base's embedding width; the logits' width does not matter for a task without head


class ZeroForward:
    """An executor whose forward takes no time: zero logits and embeddings, one row a request (packed: rows * K)."""

    def __call__(self, ids: Tensor, mask: Tensor | None, slots: Tensor) -> tuple[Tensor, Tensor]:
        n = ids.shape[0] * (mask.shape[1] if mask is not None and mask.dim() == 3 else 1)
        return torch.zeros(n, LABELS), torch.zeros(n, HIDDEN)

    def tokens_run(self, rows: int, seq: int) -> int:
        return rows * seq


def stubbed_runtime(heads: bool = False, kind_name: str = "lora_r8", tasks: int = 1) -> Any:
    """A CPU runtime of the tiny model with `tasks` tasks of `kind_name` (by default the wide workload's one LoRA r8
    task; `heads`: with a classification head), its executors stubbed."""
    base = make_base(TINY)
    kind = replace(make_kinds(base, (kind_name,))[kind_name], heads=heads)
    served = Served(kind, base, "cpu", "float32", "default")
    served.load(tasks)
    runtime = served.runtime
    assert runtime is not None
    runtime.executor = ZeroForward()
    runtime._packed = ZeroForward()  # the packed program is never built
    return runtime


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--queries", type=int, default=4096)
    p.add_argument("--policies", default="packed,fixed,sorted")
    p.add_argument("--passes", type=int, default=3)
    p.add_argument(
        "--profile", action="store_true", help="cProfile a pass of the first policy: engine thread and caller"
    )
    p.add_argument("--heads", action="store_true", help="the task has a classification head (answers: logits)")
    p.add_argument(
        "--fig12",
        metavar="RECORD",
        type=Path,
        help="PetS's Fig. 12 workload instead (1,024 queries, the record's tasks, sigma and cost model: a "
        "bench.batching JSON line, e.g. `batching-...jsonl:3` for its third), to time coordinated's host side",
    )
    args = p.parse_args()
    if args.fig12 is not None:
        record = fig12_record(args.fig12)
        runtime = stubbed_runtime(True, "mix", int(record["tasks"]))
        runtime.cost_model = CostModel.from_json(record["cost_model"])
        cfg = Config(device="cpu", dtype="float32")
        qs = queries("fig12", runtime.task_names(), cfg, float(record["sigma"]))
    else:
        runtime = stubbed_runtime(args.heads)
        cfg = replace(Config(device="cpu", dtype="float32"), wide_queries=args.queries)
        qs = queries("wide", runtime.task_names(), cfg, 32.0)
    for policy in args.policies.split(","):
        rates = sorted(serve(runtime, qs, policy, cfg)["queries_per_s"] for _ in range(args.passes))
        print(f"{policy}: {rates[len(rates) // 2]:,.0f} q/s (median of {args.passes}: {[round(r) for r in rates]})")
    if args.profile:  # the engine's thread (Engine._serve), then the caller's (submitting, waiting)
        worker, caller = cProfile.Profile(), cProfile.Profile()
        with engine_thread_profiled(worker):
            caller.enable()
            serve(runtime, qs, args.policies.split(",")[0], cfg)
            caller.disable()
        for name, prof in (("engine thread", worker), ("caller", caller)):
            print(f"== {name}")
            pstats.Stats(prof).sort_stats("tottime").print_stats(18)


def fig12_record(path: Path) -> dict[str, Any]:
    """The bench.batching record `path` names (`file.jsonl` for its first line, `file.jsonl:N` for line N)."""
    name, _, line = str(path).partition(".jsonl:")
    file = Path(name + ".jsonl") if line else path
    lines = file.read_text().splitlines()
    record: dict[str, Any] = json.loads(lines[int(line) - 1 if line else 0])
    if record.get("workload") != "fig12" or "cost_model" not in record:
        raise SystemExit(f"{path}: not a bench.batching Fig. 12 record with a cost model")
    return record


if __name__ == "__main__":
    main()
