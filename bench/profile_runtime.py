"""Where a mixed-task forward spends its time (torch.profiler): the runtime vs the backbone alone.

    python -m bench.profile_runtime [--kind lora_r8] [--tasks 32] [--batch 64] [--seq 128]

Prints the top operators by self CUDA time and by self CPU time for both, and the wall time per forward.
A first look for issue 4 (PetS Fig. 9's breakdown becomes bench.breakdown in issue 7); bench.throughput records
each pets op against its floor.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

import pets_compiler
from bench.baselines import backbone_model
from bench.kinds import KINDS, make_kinds
from bench.models import BERT_BASE, make_base
from bench.pets_exec import pets_forward


def wall(fn: Callable[[], object], iters: int = 20) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def kernel_name(key: str) -> str:
    """A demangled kernel name without its parameter list, namespaces' noise and the c10:: of its types."""
    name = key.replace("(anonymous namespace)::", "").replace("c10::", "").removeprefix("void ")
    depth = 0
    for i, ch in enumerate(name):
        depth += (ch == "<") - (ch == ">")
        if ch == "(" and depth == 0 and i > 0:
            return name[:i][:110]
    return name[:110]


def print_kernels(events: Any, forwards: int, top: int = 24) -> None:
    """Each CUDA kernel's time and launches a forward, by name (the template arguments' noise cut), longest first:
    the table's own 40-character names leave every pets kernel as `void pets::cuda::(anonymous namespace...`."""
    kernels = [e for e in events if e.self_device_time_total > 0 and not e.key.startswith(("aten::", "pets::"))]
    total = sum(e.self_device_time_total for e in kernels)
    print(f"kernels: {total / forwards / 1e3:.3f} ms a forward")
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:top]:
        name = kernel_name(e.key)
        per = e.self_device_time_total / forwards / 1e3
        print(f"  {per:7.3f} ms {e.count / forwards:6.1f}x  {e.self_device_time_total / e.count:7.1f} us  {name}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", default="lora_r8", choices=KINDS)
    parser.add_argument("--tasks", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument(
        "--per-op", action="store_true", help="also run the program eagerly: CUDA time per pets and aten op"
    )
    args = parser.parse_args()
    base = make_base(BERT_BASE)
    kind = make_kinds(base, (args.kind,))[args.kind]
    specs = {s.name: s for s in (kind.task(i) for i in range(args.tasks))}
    runtime = pets_compiler.compile(base, specs, dtype="float16").to("cuda")
    backbone = backbone_model(base, "cuda", torch.float16)
    ids = torch.randint(1000, 30000, (args.batch, args.seq), device="cuda")
    mask = torch.ones_like(ids)
    names = [kind.task_name(i % args.tasks) for i in range(args.batch)]

    ours = pets_forward(runtime, ids, mask, names)

    def theirs() -> object:
        with torch.inference_mode():
            return backbone(input_ids=ids, attention_mask=mask)

    for label, fn in (("backbone", theirs), ("pets", ours)):
        print(f"== {label}: {wall(fn) * 1e3:.2f} ms per forward (wall, {torch.cuda.get_device_name()})")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
        events = prof.key_averages()
        print_kernels(events, forwards=5)
        print(events.table(sort_by="self_cpu_time_total", row_limit=8, max_name_column_width=40))
    if args.per_op:  # op by op (no CUDA graph): each op's kernels under its name
        runtime.accelerate(cuda_graphs=False)
        ours()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                ours()
            torch.cuda.synchronize()
        ops = [e for e in prof.key_averages() if e.key.startswith(("pets::", "aten::")) and e.device_time_total > 0]
        print("== pets eager, per op (5 forwards; CUDA total includes the op's kernels)")
        for e in sorted(ops, key=lambda e: -e.device_time_total)[:30]:
            print(f"{e.key:<48} {e.count:>5} calls {e.device_time_total / 5e3:8.3f} ms a forward")


if __name__ == "__main__":
    main()
