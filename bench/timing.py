"""Median time per call: CUDA events on a GPU, the wall clock on the CPU, after warm-up."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    """Median seconds per call, over `iters` timed calls after `warmup` untimed ones."""

    median_s: float
    iters: int
    warmup: int
    min_s: float
    max_s: float

    def to_json(self) -> dict[str, float | int]:
        return {
            "median_s": self.median_s,
            "iters": self.iters,
            "warmup": self.warmup,
            "min_s": self.min_s,
            "max_s": self.max_s,
        }


def timed(fn: Callable[[], object], device: str, warmup: int, iters: int, budget_s: float | None = None) -> Timing:
    """Time `fn`, each call alone (synchronised). With `budget_s`, warm up for a quarter of it at most and stop the
    timed calls once they took that long (after 3 of them, or 1 that took twice as long): slow baselines (peft, SeqS)
    or a slow path then cost seconds, not minutes, and the median is as good."""
    done_warmup = 0
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
        done_warmup += 1
        if budget_s is not None and time.perf_counter() - start > budget_s / 4:
            break
    if device == "cuda":
        torch.cuda.synchronize()
    times: list[float] = []
    for _ in range(iters):
        if device == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        spent = sum(times)
        if budget_s is not None and spent > budget_s and (len(times) >= 3 or spent > 2 * budget_s):
            break
    return Timing(statistics.median(times), len(times), done_warmup, min(times), max(times))


@contextmanager
def on_device(device: str) -> Iterator[None]:
    """A benchmark's run on `device`: refused without CUDA where it asks for it; on the CPU with one intra-op thread
    (on a small machine busy with other work, each thread barrier can wait a time slice: a tiny op then takes
    ~0.1 s)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke (CPU) or on the GPU machine")
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
