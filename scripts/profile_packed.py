"""Where the wide workload's time goes (issue 5): the packed policy against the HF backbone's padded batches.

    python -m scripts.profile_packed [--queries 4096] [--timeline]

The same queries as bench.batching's wide workload (one LoRA r8 task, lengths ~ N(64, 32) in [8, 256]). Each side is
warmed up, then one pass is profiled (torch.profiler, CPU and CUDA): the wall time, the device time summed over
kernels (how busy the GPU was), and the top kernels by device time; then the packed batches' shapes. `--timeline`:
instead, when each packed forward was launched and ran in three unprofiled passes, and the GPU's idle time between.
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

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


def timeline(runtime: pets_compiler.Runtime, qs: list[tuple[str, list[int]]], cfg: Config, passes: int = 3) -> None:
    """Passes of the packed policy with CUDA events around each packed forward: when each was launched (host) and
    when the GPU ran it, from the pass's start; the GPU's idle time between forwards is what the host cost."""
    executor = runtime._packed_executor()
    base_cls = type(executor)
    calls: list[tuple[float, torch.cuda.Event, torch.cuda.Event]] = []

    class Timed(base_cls):  # type: ignore[valid-type,misc]  # the same executor, its calls timed
        def __call__(self, *args: Any) -> Any:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            launched = time.perf_counter()
            start.record()
            out = base_cls.__call__(self, *args)
            end.record()
            calls.append((launched, start, end))
            return out

    executor.__class__ = Timed
    try:
        for n in range(passes):
            calls.clear()
            origin = torch.cuda.Event(enable_timing=True)
            origin.record()
            host0 = time.perf_counter()
            result = serve(runtime, qs, "packed", cfg)
            torch.cuda.synchronize()
            gpu = [(origin.elapsed_time(s), origin.elapsed_time(e)) for _, s, e in calls]
            idle = [b[0] - a[1] for a, b in itertools.pairwise(gpu)]
            print(
                f"pass {n}: wall {result['seconds'] * 1e3:.1f} ms, submit {result['submit_s'] * 1e3:.1f} ms, "
                f"{len(calls)} forwards, GPU {sum(e - s for s, e in gpu):.1f} ms busy from {gpu[0][0]:.1f} to "
                f"{gpu[-1][1]:.1f} ms, idle between {sum(idle):.1f} ms"
            )
            print("  launched at (host, ms):", [round((h - host0) * 1e3, 1) for h, _, _ in calls])
            print("  ran at (GPU, ms):", [round(s, 1) for s, _ in gpu])
            print("  idle before each (ms):", [round(x, 2) for x in idle])
    finally:
        executor.__class__ = base_cls


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--queries", type=int, default=4096)
    p.add_argument("--timeline", action="store_true", help="only the packed passes' timeline (timeline())")
    args = p.parse_args()
    cfg, served, runtime, qs = warmed_wide(args.queries, "packed")
    if args.timeline:
        timeline(runtime, qs, cfg)
        return
    hf = backbone_model(served.base, "cuda", torch.float16)
    profiled("packed", lambda: serve(runtime, qs, "packed", cfg))
    profiled("hf padded", lambda: _padded_pass(hf, qs, "cuda", cfg.max_batch))
    print("graphs:", runtime.graph_stats())


if __name__ == "__main__":
    main()
