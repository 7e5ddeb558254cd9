"""The engine under random request streams and a storm of task adds and removes: every accepted request ends
once, accepted = succeeded + failed, the queue drains, and a request's answer does not depend on its batch."""

from __future__ import annotations

import random
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pets_compiler
from pets_compiler.errors import PetsError, RequestTimeoutError, TaskRemovedError, UnknownTaskError
from pets_compiler.serving import CoordinatedPolicy, CostModel, Engine
from tests.builders import make_bitfit


@pytest.fixture(scope="module")
def rt(small_base: Path, tmp_path_factory: pytest.TempPathFactory) -> pets_compiler.Runtime:
    root = tmp_path_factory.mktemp("stress_tasks")
    return pets_compiler.compile(
        small_base, {"plain": small_base, "bitfit": make_bitfit(small_base, root / "b", num_labels=2)}
    )


def balanced(engine: Engine) -> dict[str, Any]:
    m = engine.metrics()
    assert m["accepted"] == m["succeeded"] + m["failed"] and m["queue_depth"] == 0, m
    return m


request = st.tuples(
    st.sampled_from(["plain", "bitfit"]),
    st.integers(1, 30),
    st.sampled_from([None, None, 0.001, 5.0]),  # timeout_s
    st.booleans(),  # cancel right after submit
)


# a cost model of a forward's shape (a fixed cost plus rows x length) for coordinated, without profiling
COST = CostModel(
    rows=(1, 2, 4, 8),
    lengths=(8, 16, 32),
    alpha_s=tuple(tuple(1e-3 + 1e-6 * r * n for n in (8, 16, 32)) for r in (1, 2, 4, 8)),
)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(request, min_size=1, max_size=25),
    st.sampled_from(["fixed", "sorted", "packed", "coordinated"]),
    st.integers(1, 8),
    st.integers(1, 3),
)
def test_random_streams_end_every_request(
    rt: pets_compiler.Runtime,
    stream: list[tuple[str, int, float | None, bool]],
    policy: str,
    max_batch: int,
    lookahead: int,
) -> None:
    """Coordinated runs with windows of 1-3 batches: its released windows meet timeouts and cancellations too."""
    chosen: str | CoordinatedPolicy = policy
    if policy == "coordinated":
        chosen = CoordinatedPolicy(COST, lookahead=lookahead)
    engine = Engine(rt, policy=chosen, max_batch=max_batch, max_delay_ms=0.5)
    futures = []
    for task, n, timeout, cancel in stream:
        f = engine.submit(task, input_ids=list(range(5, 5 + n)), timeout_s=timeout)
        if cancel:
            f.cancel()
        futures.append(f)
    engine.close()
    for f in futures:
        assert f.done()
        if not f.cancelled() and f.exception() is not None:
            assert isinstance(f.exception(), RequestTimeoutError)
    m = balanced(engine)
    assert m["succeeded"] == sum(1 for f in futures if not f.cancelled() and f.exception() is None)


def test_add_remove_storm(small_base: Path, tmp_path: Path) -> None:
    src = make_bitfit(small_base, tmp_path / "b", num_labels=2)
    runtime = pets_compiler.compile(small_base, {"plain": small_base, "t0": src})
    engine = Engine(runtime, max_batch=8, max_delay_ms=0.5)
    stop = threading.Event()
    errors: list[BaseException] = []
    futures: list[Any] = []
    lock = threading.Lock()

    def churn(k: int) -> None:
        rng = random.Random(k)
        while not stop.is_set():
            name = f"t{rng.randrange(4)}"
            try:
                if rng.random() < 0.5:
                    runtime.add_task(name, src)
                else:
                    runtime.remove_task(name)
            except PetsError:  # already loaded / not loaded: expected in a storm
                pass
            except BaseException as e:  # anything else is a bug
                errors.append(e)

    def traffic(k: int) -> None:
        rng = random.Random(100 + k)
        for _ in range(60):
            task = rng.choice(["plain", "t0", "t1", "t2", "t3"])
            try:
                f = engine.submit(task, input_ids=[5, 6, 7][: rng.randrange(1, 4)])
            except UnknownTaskError:
                continue  # not loaded at submit: refused, not accepted
            with lock:
                futures.append((task, f))

    workers = [threading.Thread(target=churn, args=(k,)) for k in range(3)]
    senders = [threading.Thread(target=traffic, args=(k,)) for k in range(4)]
    for t in workers + senders:
        t.start()
    for t in senders:
        t.join()
    stop.set()
    for t in workers:
        t.join()
    engine.close()
    assert not errors, errors
    for task, f in futures:
        e = f.exception(timeout=0)
        assert e is None or (isinstance(e, TaskRemovedError) and task != "plain"), (task, e)
    assert all(f.exception(timeout=0) is None for task, f in futures if task == "plain")
    balanced(engine)


def _answer_alone_and_in_batches(rt: pets_compiler.Runtime, seed: int) -> list[tuple[dict, dict]]:
    gen = random.Random(seed)
    target = {"task": "bitfit", "input_ids": [gen.randrange(5, 90) for _ in range(11)]}
    alone = rt.run([target])[0]
    pairs = []
    for size in (2, 5, 9):
        others = [
            {
                "task": gen.choice(["plain", "bitfit"]),
                "input_ids": [gen.randrange(5, 90) for _ in range(gen.randrange(1, 40))],
            }
            for _ in range(size - 1)
        ]
        batch = [*others, target]
        gen.shuffle(batch)
        answers = rt.run(batch, batch_size=size)
        pairs.append((alone, answers[batch.index(target)]))
        packed, _ = rt.run_batch(rt.prepare(batch), packed=True)  # sharing a packed row, or not
        pairs.append((alone, packed[batch.index(target)]))
    return pairs


def same_answer(a: dict, b: dict, tol: float = 1e-5) -> bool:
    key = "logits" if "logits" in a else "embedding"
    return a["task"] == b["task"] and torch.allclose(torch.tensor(a[key]), torch.tensor(b[key]), rtol=tol, atol=tol)


def test_batch_invariance(rt: pets_compiler.Runtime) -> None:
    for seed in range(3):
        for alone, batched in _answer_alone_and_in_batches(rt, seed):
            assert same_answer(alone, batched)


def test_deterministic_mode_is_bitwise_batch_invariant(rt: pets_compiler.Runtime) -> None:
    """Every batch padded to one shape: the target's answer is bitwise the same in every batch it shares; the
    control shows the bitwise check tells a one-ulp nudge, and a run at another shape, apart."""
    gen = random.Random(5)
    target = {"task": "bitfit", "input_ids": [gen.randrange(5, 90) for _ in range(11)]}
    answers = []
    for size in (1, 3, 6):
        others = [
            {"task": gen.choice(["plain", "bitfit"]), "input_ids": [gen.randrange(5, 90) for _ in range(n)]}
            for n in [gen.randrange(1, 40) for _ in range(size - 1)]
        ]
        with Engine(rt, policy="fixed", max_batch=8, max_delay_ms=50, deterministic=True) as engine:
            futures = [engine.submit(r["task"], input_ids=r["input_ids"]) for r in others]
            mine = engine.submit(target["task"], input_ids=target["input_ids"])
            answers.append(mine.result(timeout=60))
            assert all(f.result(timeout=60) for f in futures)
        assert max(map(int, balanced(engine)["batch_sizes"])) == size  # it shared its batch with the others
    first = torch.tensor(answers[0]["logits"])
    assert all(torch.equal(torch.tensor(a["logits"]), first) for a in answers[1:])
    nudged = torch.nextafter(first, torch.full_like(first, float("inf")))
    alone = torch.tensor(rt.run([target])[0]["logits"])  # another shape: equal within rounding, not bitwise
    assert not torch.equal(nudged, first) and torch.allclose(alone, first, rtol=1e-5, atol=1e-6)
    with pytest.raises(PetsError, match="no deterministic mode"):
        Engine(rt, policy="packed", deterministic=True)


def test_batch_invariance_check_can_fail(rt: pets_compiler.Runtime) -> None:
    """The control: the same check tells a different request's answer, or a nudged one, apart."""
    (alone, batched), *_ = _answer_alone_and_in_batches(rt, 0)
    other = rt.run([{"task": "bitfit", "input_ids": [7, 8, 9]}])[0]
    nudged = {**batched, "logits": [v + 1e-3 for v in batched["logits"]]}
    assert not same_answer(alone, other) and not same_answer(alone, nudged)


junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 40000),
    st.floats(allow_nan=True),
    st.text(max_size=5),
    st.lists(st.one_of(st.integers(-3, 40000), st.floats(), st.text(max_size=2)), max_size=6),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.sampled_from(["plain", "bitfit", "nope", "../x"]), junk), junk, junk, junk)
def test_fuzzed_submits_raise_typed_errors_only(
    rt: pets_compiler.Runtime, task: Any, ids: Any, text: Any, timeout: Any
) -> None:
    engine = Engine(rt, max_delay_ms=0.5)
    try:
        f = engine.submit(task, input_ids=ids, text=text if isinstance(text, str) else None, timeout_s=timeout)
    except PetsError:
        f = None
    engine.close()
    if f is not None:
        assert f.done() and (f.exception() is None or isinstance(f.exception(), PetsError))
    balanced(engine)
