"""Where the wide workload's time goes (issue 5): the packed policy against the HF backbone's padded batches.

    python -m scripts.profile_packed [--queries 1024]

The same queries as bench.batching's wide workload (one LoRA r8 task, lengths ~ N(64, 32) in [8, 256]). Each side is
warmed up, then one pass is profiled (torch.profiler, CPU and CUDA): the wall time, the device time summed over
kernels (how busy the GPU was), and the top kernels by device time; then the packed batches' shapes.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

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


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--queries", type=int, default=1024)
    args = p.parse_args()
    cfg = Config(queries=args.queries)
    base = make_base(BERT_BASE)
    kind = make_kinds(base, ("lora_r8",))["lora_r8"]
    served = Served(kind, base, "cuda", "float16", "default")
    served.load(1)
    runtime = served.runtime
    assert runtime is not None
    qs = queries("wide", runtime.task_names(), cfg, 32.0)
    for _ in range(3):
        serve(runtime, qs, "packed", cfg)
    hf = backbone_model(base, "cuda", torch.float16)
    profiled("packed", lambda: serve(runtime, qs, "packed", cfg))
    profiled("hf padded", lambda: _padded_pass(hf, qs, "cuda", cfg.max_batch))
    print("graphs:", runtime.graph_stats())


if __name__ == "__main__":
    main()
