"""Profile the coordinated policy's cost model on the runtime's own device: alpha(rows, length) is the time of one
forward of the compiled program (task ops included: they run inside it for every row), its rows taking the loaded
tasks in turn, as served traffic mixes them. Rows of the first task alone had made alpha the cost of that
task's kind: in bench.batching's mix (its first task LoRA r8) alpha(256, 32) was 6.9 ms on the H200 (17ee7e6)
while a forward of every kind at 256 x 32 ran 10.1 ms of kernels (da78b4b; the diff and mask rows' sparse ops),
so the plans weighed padding well under its cost (bench/results/*session14*)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from pets_compiler.errors import InputError
from pets_compiler.serving.coordinated import CostModel

ROWS = (1, 2, 4, 8, 16, 32, 64)
LENGTHS = (8, 16, 32, 64, 128)


def profile_costs(
    runtime: Any, rows: Sequence[int] = ROWS, lengths: Sequence[int] = LENGTHS, repeats: int = 3, warmup: int = 1
) -> CostModel:
    """Median seconds of `repeats` forwards at every (rows, length), after `warmup` untimed ones; lengths beyond
    the model's positions are dropped. Row i runs loaded task i mod (tasks loaded)."""
    tasks = runtime.task_names()
    if not tasks:
        raise InputError("profile_costs needs a runtime with at least one task loaded")
    positions = int(runtime.base.config.max_position_embeddings)
    lengths = tuple(n for n in lengths if n <= positions)
    if not lengths or not rows or repeats < 1:
        raise InputError(f"nothing to profile: rows {list(rows)}, lengths within {positions}, repeats {repeats}")
    vocab = int(runtime.base.config.vocab_size)
    gen = torch.Generator().manual_seed(0)
    table = []
    for r in rows:
        times = []
        for n in lengths:
            ids = torch.randint(min(5, vocab - 1), vocab, (r, n), generator=gen)
            mask = torch.ones_like(ids)
            names = [tasks[i % len(tasks)] for i in range(r)]
            samples = []
            for i in range(warmup + repeats):
                _sync(runtime.device)
                start = time.perf_counter()
                runtime.forward(ids, mask, names)
                _sync(runtime.device)
                if i >= warmup:
                    samples.append(time.perf_counter() - start)
            times.append(statistics.median(samples))
        table.append(tuple(times))
    device = torch.cuda.get_device_name(runtime.device) if runtime.device.type == "cuda" else "cpu"
    return CostModel(rows=tuple(rows), lengths=lengths, alpha_s=tuple(table), device=device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
