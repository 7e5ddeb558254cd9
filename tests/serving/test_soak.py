"""A soak of mixed load with task adds and removes (RELIABILITY.md 23), short enough for CI: every round sends
mixed traffic through every policy while a task is added and removed; the nothing-lost identity holds every round,
and memory stays flat: the task tables keep their bytes once warm, and the process's resident memory grows by less
than a bound over the later rounds."""

from __future__ import annotations

import random
import threading
from pathlib import Path
from typing import Any

import pets_compiler
from pets_compiler.errors import TaskRemovedError, UnknownTaskError
from pets_compiler.serving import Engine
from tests.builders import make_bitfit, make_peft_lora

ROUNDS, WARM = 10, 3
RSS_GROWTH_BOUND = 64 << 20  # bytes over the rounds after the warm ones


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def table_bytes(runtime: pets_compiler.Runtime) -> int:
    return sum(t.numel() * t.element_size() for t in runtime.tables.inputs())


def one_round(runtime: pets_compiler.Runtime, policy: str, extra: Path, seed: int) -> dict[str, Any]:
    engine = Engine(runtime, policy=policy, max_batch=8, max_delay_ms=1)
    futures: list[tuple[str, Any]] = []
    lock = threading.Lock()

    def traffic(k: int) -> None:
        rng = random.Random(seed * 10 + k)
        for _ in range(25):
            task = rng.choice(["plain", "bitfit", "lora", "extra"])
            ids = [rng.randrange(5, 90) for _ in range(rng.randrange(1, 30))]
            try:
                f = engine.submit(task, input_ids=ids)
            except UnknownTaskError:
                continue  # "extra" not loaded at submit: refused, never accepted
            with lock:
                futures.append((task, f))

    senders = [threading.Thread(target=traffic, args=(k,)) for k in range(3)]
    for t in senders:
        t.start()
    runtime.add_task("extra", extra)
    runtime.remove_task("extra")
    for t in senders:
        t.join()
    engine.close()
    for task, f in futures:
        e = f.exception(timeout=60)
        assert e is None or (task == "extra" and isinstance(e, TaskRemovedError)), (task, e)
    m = engine.metrics()
    assert m["accepted"] == m["succeeded"] + m["failed"] == len(futures) and m["queue_depth"] == 0, m
    return m


def test_soak_mixed_load_with_adds_and_removes(small_base: Path, tmp_path: Path) -> None:
    sources = {
        "plain": small_base,
        "bitfit": make_bitfit(small_base, tmp_path / "b", num_labels=2),
        "lora": make_peft_lora(small_base, tmp_path / "l", r=2, alpha=4, targets=["query", "value"], num_labels=3),
    }
    extra = make_peft_lora(small_base, tmp_path / "x", r=2, alpha=4, targets=["query"], num_labels=2, seed=5)
    runtime = pets_compiler.compile(small_base, sources)
    policies = ["fixed", "sorted", "packed"]
    rss, tables = [], []
    for i in range(ROUNDS):
        one_round(runtime, policies[i % len(policies)], extra, seed=i)
        rss.append(rss_bytes())
        tables.append(table_bytes(runtime))
    assert len(set(tables[WARM - 1 :])) == 1, tables  # the freed slot is reused: the tables stop growing
    assert rss[-1] - rss[WARM - 1] < RSS_GROWTH_BOUND, [r >> 20 for r in rss]
    assert runtime.task_names() == sorted(sources)
