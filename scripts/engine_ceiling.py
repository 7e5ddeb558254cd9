"""The engine's host ceiling on bench.batching's wide workload (issue 5): every policy served by the engine on the
CPU with forwards that take no time (the runtime's executors replaced by stubs that return zeros of bert-base's
output widths), so the rate is what the host side alone allows: submitting, batching, packing, building the
inputs, answering (lists of floats) and the futures. A development probe:
`python -m scripts.engine_ceiling [--queries 4096] [--policies packed,fixed] [--profile]`.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from bench.batching import Config, queries, serve
from bench.kinds import make_kinds
from bench.loading import Served
from bench.models import TINY, make_base
from scripts.profile_engine import engine_thread_profiled

HIDDEN, LABELS = 768, 4  # bert-base's embedding width; the logits' width does not matter for a task without head


class ZeroForward:
    """An executor whose forward takes no time: zero logits and embeddings, one row a request (packed: rows * K)."""

    def __call__(self, ids: Tensor, mask: Tensor | None, slots: Tensor) -> tuple[Tensor, Tensor]:
        n = ids.shape[0] * (mask.shape[1] if mask is not None and mask.dim() == 3 else 1)
        return torch.zeros(n, LABELS), torch.zeros(n, HIDDEN)

    def tokens_run(self, rows: int, seq: int) -> int:
        return rows * seq


def stubbed_runtime(heads: bool = False) -> Any:
    """A CPU runtime of the tiny model with one LoRA r8 task (the wide workload's kind; `heads`: with a classification
    head), its executors stubbed."""
    base = make_base(TINY)
    kind = replace(make_kinds(base, ("lora_r8",))["lora_r8"], heads=heads)
    served = Served(kind, base, "cpu", "float32", "default")
    served.load(1)
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
        "--profile", action="store_true", help="cProfile a packed pass: the engine's thread and the caller's"
    )
    p.add_argument("--heads", action="store_true", help="the task has a classification head (answers: logits)")
    args = p.parse_args()
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
            serve(runtime, qs, "packed", cfg)
            caller.disable()
        for name, prof in (("engine thread", worker), ("caller", caller)):
            print(f"== {name}")
            pstats.Stats(prof).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
