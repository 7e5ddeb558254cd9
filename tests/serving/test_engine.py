"""The serving engine (issue 5, first part): answers equal `pets run`'s, typed errors, nothing lost.

In every test that ends an engine: accepted = succeeded + failed and the queue is empty."""

from __future__ import annotations

import asyncio
import gc
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import CancelledError
from pathlib import Path
from typing import Any

import pytest
import torch

import pets_compiler
from pets_compiler.errors import (
    EngineClosedError,
    InputError,
    PetsError,
    QueueFullError,
    RequestCancelledError,
    RequestTimeoutError,
    TaskRemovedError,
    UnknownTaskError,
)
from pets_compiler.serving import Engine, FixedPolicy, SortedPolicy, policy_named
from tests.builders import make_bitfit, make_peft_lora

LONG = 60_000.0  # ms: no batch forms by delay while a test holds requests in the queue


@pytest.fixture(scope="module")
def sources(small_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("engine_tasks")
    return {
        "lora": make_peft_lora(small_base, root / "lora", r=4, alpha=8, targets=["query", "value"], num_labels=3),
        "bitfit": make_bitfit(small_base, root / "bitfit", num_labels=2, seed=2),
        "plain": small_base,
    }


@pytest.fixture(scope="module")
def runtime(small_base: Path, sources: dict[str, Path]) -> pets_compiler.Runtime:
    return pets_compiler.compile(small_base, sources)


def requests(n: int, seed: int = 0) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(seed)
    tasks = ["lora", "bitfit", "plain"]
    out = []
    for i in range(n):
        length = int(torch.randint(1, 40, (1,), generator=gen))
        ids = torch.randint(5, 90, (length,), generator=gen).tolist()
        out.append({"id": i, "task": tasks[i % 3], "input_ids": ids})
    return out


def submit(engine: Engine, r: dict[str, Any], **kw: Any) -> Any:
    return engine.submit(r["task"], input_ids=r["input_ids"], id=r["id"], **kw)


def balanced(engine: Engine) -> dict[str, Any]:
    m = engine.metrics()
    assert m["accepted"] == m["succeeded"] + m["failed"], m
    assert m["queue_depth"] == 0, m
    return m


def close_to(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got.keys() == want.keys() and got["task"] == want["task"] and got.get("id") == want.get("id")
    key = "logits" if "logits" in want else "embedding"
    assert torch.allclose(torch.tensor(got[key]), torch.tensor(want[key]), rtol=1e-5, atol=1e-5)
    assert got.get("label") == want.get("label")


@pytest.mark.parametrize("policy", ["fixed", "sorted", "packed"])
def test_answers_are_pets_run_answers(runtime: pets_compiler.Runtime, policy: str) -> None:
    reqs = requests(40)
    want = runtime.run(reqs, batch_size=1)  # each alone: the answer does not depend on the batch
    with Engine(runtime, policy=policy, max_batch=8, max_delay_ms=2) as engine:
        futures = [submit(engine, r) for r in reqs]
        got = [f.result(timeout=60) for f in futures]
    for g, w in zip(got, want, strict=True):
        close_to(g, w)
    m = balanced(engine)
    assert m["succeeded"] == 40 and m["failed"] == 0 and max(m["batch_sizes"]) <= 8
    assert 0 <= m["padding_fraction"] < 1 and m["latency_p50_ms"] <= m["latency_p99_ms"]
    assert 0 <= m["launch_time_p50_ms"] <= m["batch_time_max_ms"]


def test_a_packed_engine_builds_the_packed_program_at_start(small_base: Path, sources: dict[str, Path]) -> None:
    rt = pets_compiler.compile(small_base, {"lora": sources["lora"]})
    assert rt._packed is None  # built on first use otherwise
    with Engine(rt, policy="packed"):
        assert rt._packed is not None


def test_the_engine_exempts_what_was_alive_at_start_from_gc_scans(runtime: pets_compiler.Runtime) -> None:
    gc.unfreeze()
    with Engine(runtime, freeze_gc=False):
        assert gc.get_freeze_count() == 0
    with Engine(runtime):  # the default: a full collection would otherwise scan torch's objects, all threads stopped
        assert gc.get_freeze_count() > 1000


def test_the_engine_lowers_the_thread_switch_interval_while_open(runtime: pets_compiler.Runtime) -> None:
    before = sys.getswitchinterval()
    with Engine(runtime, switch_interval_ms=None):
        assert sys.getswitchinterval() == before
    outer = Engine(runtime)  # the default, 0.5 ms
    assert sys.getswitchinterval() == pytest.approx(5e-4)
    with Engine(runtime, switch_interval_ms=0.2):  # the lowest asked for holds
        assert sys.getswitchinterval() == pytest.approx(2e-4)
    assert sys.getswitchinterval() == pytest.approx(5e-4)
    with Engine(runtime, switch_interval_ms=100):  # never above what holds already
        assert sys.getswitchinterval() == pytest.approx(5e-4)
    outer.close()
    outer.close()  # a second close gives nothing back twice
    assert sys.getswitchinterval() == before
    for bad in (0, -1, True, "1", 1e9):
        with pytest.raises(InputError, match="switch_interval_ms"):
            Engine(runtime, switch_interval_ms=bad)  # type: ignore[arg-type]
    assert sys.getswitchinterval() == before


def test_bad_requests_raise_at_submit_and_are_not_accepted(runtime: pets_compiler.Runtime) -> None:
    with Engine(runtime) as engine:
        with pytest.raises(UnknownTaskError, match="nope"):
            engine.submit("nope", input_ids=[5, 6])
        with pytest.raises(InputError, match="exactly one"):
            engine.submit("lora")
        with pytest.raises(InputError, match="outside the vocabulary"):
            engine.submit("lora", input_ids=[10**9])
        with pytest.raises(InputError, match="timeout_s"):
            engine.submit("lora", input_ids=[5], timeout_s=0)
        assert engine.metrics()["accepted"] == 0
    with pytest.raises(InputError, match="max_batch"):
        Engine(runtime, max_batch=0)
    with pytest.raises(InputError, match="unknown batch policy 'best'"):
        Engine(runtime, policy="best")


def test_queue_full_rejects_exactly_the_excess(runtime: pets_compiler.Runtime) -> None:
    engine = Engine(runtime, max_queue=5, max_batch=100, max_delay_ms=LONG)
    accepted, rejected = [], 0
    for r in requests(8):
        try:
            accepted.append(submit(engine, r))
        except QueueFullError as e:
            assert "max_queue" in str(e) and isinstance(e, PetsError)
            rejected += 1
    assert len(accepted) == 5 and rejected == 3
    engine.close()  # drains: the five run
    assert all(f.result(timeout=0)["task"] for f in accepted)
    m = balanced(engine)
    assert m["rejected"] == 3 and m["succeeded"] == 5


def test_next_batch_launches_before_the_last_is_answered(runtime: pets_compiler.Runtime) -> None:
    """With batches ready, the engine launches the next one before it answers the one in flight (on a GPU, the
    host builds inputs while the device runs); every request is still answered once, as when run alone."""
    events: list[tuple[str, int]] = []
    real = runtime.launch_batch

    class Pending:
        def __init__(self, inner: Any, n: int) -> None:
            self.inner, self.n = inner, n

        def result(self) -> Any:
            events.append(("answered", self.n))
            return self.inner.result()

    class Spy:
        def __getattr__(self, name: str) -> Any:
            return getattr(runtime, name)

        def launch_batch(self, batch: Any, **how: Any) -> Any:
            n = len([e for e in events if e[0] == "launched"])
            events.append(("launched", n))
            if n == 0:
                time.sleep(0.2)  # the first batch "runs" while the rest are submitted
            return Pending(real(batch, **how), n)

    reqs = requests(16)
    want = runtime.run(reqs, batch_size=1)
    with Engine(Spy(), policy="fixed", max_batch=4, max_delay_ms=LONG) as engine:
        got = [f.result(timeout=60) for f in [submit(engine, r) for r in reqs]]
    for g, w in zip(got, want, strict=True):
        close_to(g, w)
    assert events.index(("launched", 1)) < events.index(("answered", 0))
    assert sorted(n for e, n in events if e == "answered") == [0, 1, 2, 3]
    assert balanced(engine)["succeeded"] == 16


def test_timeout_answers_promptly_and_never_runs(runtime: pets_compiler.Runtime) -> None:
    ran: list[str] = []
    real = runtime.launch_batch

    class Spy:  # the engine's view of the runtime, recording what runs
        def __getattr__(self, name: str) -> Any:
            return getattr(runtime, name)

        def launch_batch(self, batch: Any, **how: Any) -> Any:
            ran.extend(str(p.extra.get("id")) for p in batch)
            return real(batch, **how)

    engine = Engine(Spy(), max_batch=100, max_delay_ms=LONG)
    start = time.monotonic()
    late = engine.submit("lora", input_ids=[5, 6, 7], timeout_s=0.05, id="late")
    kept = engine.submit("lora", input_ids=[5, 6, 7], id="kept")
    with pytest.raises(RequestTimeoutError, match="timed out"):
        late.result(timeout=5)
    assert time.monotonic() - start < 2.0  # answered when its time passed, not when a batch formed
    engine.close()
    assert kept.result(timeout=0)["id"] == "kept" and ran == ["kept"]
    assert balanced(engine)["failed"] == 1


def test_cancel_and_close_with_cancel_pending(runtime: pets_compiler.Runtime) -> None:
    engine = Engine(runtime, max_batch=100, max_delay_ms=LONG)
    f1, f2, f3 = (submit(engine, r) for r in requests(3))
    assert f1.cancel()
    engine.close(cancel_pending=True)
    with pytest.raises(CancelledError):
        f1.result(timeout=0)
    for f in (f2, f3):
        with pytest.raises(RequestCancelledError):
            f.result(timeout=0)
    m = balanced(engine)
    assert m["failed"] == 3 and m["succeeded"] == 0
    with pytest.raises(EngineClosedError):
        submit(engine, requests(1)[0])


def test_removed_task_fails_its_queued_requests_only(
    small_base: Path, sources: dict[str, Path], tmp_path: Path
) -> None:
    rt = pets_compiler.compile(small_base, sources)
    engine = Engine(rt, max_batch=100, max_delay_ms=LONG)
    doomed = engine.submit("bitfit", input_ids=[5, 6])
    fine = engine.submit("lora", input_ids=[5, 6])
    rt.remove_task("bitfit")
    engine.close()
    with pytest.raises(TaskRemovedError, match="bitfit"):
        doomed.result(timeout=0)
    assert fine.result(timeout=0)["task"] == "lora"
    balanced(engine)


def test_add_and_remove_under_load(small_base: Path, sources: dict[str, Path], tmp_path: Path) -> None:
    """Bad and missing task loads during traffic, then a good one: no request for a loaded task fails."""
    rt = pets_compiler.compile(small_base, sources)
    rt.remove_task("bitfit")  # the program serves its sites; the task comes back during the traffic
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{not json")
    engine = Engine(rt, max_batch=8, max_delay_ms=1)
    stop = threading.Event()
    futures: list[Any] = []

    def traffic() -> None:
        reqs = [r for r in requests(400, seed=3) if r["task"] != "bitfit"]
        for r in reqs:
            if stop.is_set():
                return
            futures.append(submit(engine, r))

    t = threading.Thread(target=traffic)
    t.start()
    try:
        for i in range(25):
            with pytest.raises(PetsError):
                rt.add_task(f"bad{i}", bad)
            with pytest.raises(PetsError):
                rt.add_task(f"missing{i}", tmp_path / f"missing{i}")
        rt.add_task("bitfit", sources["bitfit"])
        good = engine.submit("bitfit", input_ids=[5, 6, 7])
    finally:
        t.join()
        stop.set()
        engine.close()
    assert good.result(timeout=0)["task"] == "bitfit"
    assert all(f.exception(timeout=0) is None for f in futures)
    m = balanced(engine)
    assert m["failed"] == 0 and m["succeeded"] == len(futures) + 1


def test_many_threads_submit(runtime: pets_compiler.Runtime) -> None:
    engine = Engine(runtime, max_batch=16, max_delay_ms=1)
    results: dict[int, Any] = {}
    lock = threading.Lock()

    def worker(k: int) -> None:
        for r in requests(20, seed=k):
            f = submit(engine, {**r, "id": k * 100 + r["id"]})
            with lock:
                results[k * 100 + r["id"]] = f

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine.close()
    assert len(results) == 160 and all(f.result(timeout=0)["id"] == i for i, f in results.items())
    assert balanced(engine)["succeeded"] == 160


def test_async_submit(runtime: pets_compiler.Runtime) -> None:
    with Engine(runtime, max_delay_ms=1) as engine:

        async def main() -> list[dict[str, Any]]:
            return await asyncio.gather(*(engine.submit_async("lora", input_ids=[5, 6, i + 7]) for i in range(5)))

        answers = asyncio.run(main())
    assert [a["task"] for a in answers] == ["lora"] * 5
    balanced(engine)


class _Bad:
    name = "bad"

    def select(self, queue: Any, max_batch: int) -> list[int]:
        return [len(queue) + 5]


def test_policies() -> None:
    class Q:
        def __init__(self, length: int) -> None:
            self.length, self.arrived = length, 0.0

    queue = [Q(n) for n in (10, 50, 11, 9, 30, 10)]
    assert FixedPolicy().select(queue, 4) == [0, 1, 2, 3]
    assert SortedPolicy().select(queue, 4) == [0, 2, 3, 5]  # the oldest and the three closest in length
    assert SortedPolicy().select(queue[:1], 4) == [0]
    assert isinstance(policy_named("sorted"), SortedPolicy)


def test_a_wrong_policy_falls_back_to_fifo(runtime: pets_compiler.Runtime) -> None:
    with Engine(runtime, policy=_Bad(), max_delay_ms=1) as engine:
        assert engine.submit("lora", input_ids=[5, 6]).result(timeout=30)["task"] == "lora"
    assert engine.metrics()["policy_errors"] >= 1
    balanced(engine)


@pytest.fixture(autouse=True)
def _no_thread_left() -> Iterator[None]:
    before = {t.name for t in threading.enumerate()}
    yield
    left = [t for t in threading.enumerate() if t.name.startswith("pets-engine") and t.name not in before]
    for t in left:
        t.join(timeout=5)
    assert not any(t.is_alive() for t in left), "an engine thread outlived its engine"
