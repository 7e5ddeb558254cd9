"""Where the wide workload's time goes (issue 5): the packed policy against the HF backbone's padded batches.

    python -m scripts.profile_packed [--queries 4096]

The same queries as bench.batching's wide workload (one LoRA r8 task, lengths ~ N(64, 32) in [8, 256]). Each side is
warmed up, then one pass is profiled (torch.profiler, CPU and CUDA): the wall time, the device time summed over
kernels (how busy the GPU was), and the top kernels by device time; then the packed batches' shapes.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import replace

import torch
from torch.profiler import ProfilerActivity, profile

import pets_compiler
from bench.baselines import backbone_model
from bench.batching import Config, _padded_pass, queries, serve
from bench.kinds import make_kinds
from bench.loading import Served
from bench.models import BERT_BASE, make_base


def profiled(label: str, fn: Callable[[], object]) -> None:
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    busy = sum(e.self_device_time_total for e in events) / 1e3  # us -> ms
    print(f"== {label}: wall {wall * 1e3:.1f} ms, device busy {busy:.1f} ms ({torch.cuda.get_device_name()})")
    print(events.table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60))


def wide_runtime(n: int) -> tuple[Config, Served, list[tuple[str, list[int]]]]:
    """bench.batching's wide workload of n queries and a bert-base fp16 runtime on the GPU with its one LoRA r8
    task: (the config, the served runtime, the queries)."""
    cfg = replace(Config(), wide_queries=n)
    base = make_base(BERT_BASE)
    served = Served(make_kinds(base, ("lora_r8",))["lora_r8"], base, "cuda", "float16", "default")
    served.load(1)
    assert served.runtime is not None
    return cfg, served, queries("wide", served.runtime.task_names(), cfg, 32.0)


def warmed_wide(n: int, policy: str) -> tuple[Config, Served, pets_compiler.Runtime, list[tuple[str, list[int]]]]:
    """wide_runtime's workload served three times by `policy` (the packed program built, the batch shapes captured):
    (the config, the served runtime, its Runtime, the queries)."""
    cfg, served, qs = wide_runtime(n)
    runtime = served.runtime
    assert runtime is not None
    for _ in range(3):
        serve(runtime, qs, policy, cfg)
    return cfg, served, runtime, qs


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--queries", type=int, default=4096)
    args = p.parse_args()
    cfg, served, runtime, qs = warmed_wide(args.queries, "packed")
    hf = backbone_model(served.base, "cuda", torch.float16)
    profiled("packed", lambda: serve(runtime, qs, "packed", cfg))
    profiled("hf padded", lambda: _padded_pass(hf, qs, "cuda", cfg.max_batch))
    print("graphs:", runtime.graph_stats())


if __name__ == "__main__":
    main()
