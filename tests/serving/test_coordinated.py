"""PetS's coordinated batching: the programs equal brute force, plans cover the queue, the cost model profiles,
round-trips and travels with the artifact, and the engine serves with it."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pets_compiler
from pets_compiler.errors import InputError
from pets_compiler.serving import CoordinatedPolicy, CostModel, Engine, profile_costs, split_sorted


def monotone_cost(a: float, b: float, c: float):  # type: ignore[no-untyped-def]
    """A fixed cost per batch plus terms growing with rows and with length: the shape of a forward's time."""
    return lambda rows, length: a + b * rows * length + c * length


def partitions(items: list[int]):  # type: ignore[no-untyped-def]
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for p in partitions(rest):
        yield [[first], *p]
        for i in range(len(p)):
            yield [*p[:i], [first, *p[i]], *p[i + 1 :]]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(1, 128), min_size=1, max_size=7),
    st.integers(1, 7),
    st.floats(0, 5),
    st.floats(0, 1),
    st.floats(0, 1),
)
def test_program_equals_brute_force(lengths: list[int], max_rows: int, a: float, b: float, c: float) -> None:
    lengths = sorted(lengths)
    cost = monotone_cost(a, b, c)
    got = split_sorted(lengths, [1] * len(lengths), cost, max_rows)
    assert [i for s, e in got for i in range(s, e)] == list(range(len(lengths)))
    assert all(0 < e - s <= max_rows for s, e in got)
    dp = sum(cost(e - s, lengths[e - 1]) for s, e in got)
    # every partition into groups of at most max_rows, contiguous or not
    best = min(
        sum(cost(len(g), max(lengths[i] for i in g)) for g in p)
        for p in partitions(list(range(len(lengths))))
        if all(len(g) <= max_rows for g in p)
    )
    assert dp == pytest.approx(best, rel=1e-9, abs=1e-12)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.integers(1, 128), min_size=1, max_size=60),
    st.lists(st.integers(1, 9), min_size=60, max_size=60),
    st.integers(1, 40),
    st.lists(st.floats(0, 1), min_size=20, max_size=20),
)
def test_step_search_costs_what_every_split_costs(
    lengths: list[int], sizes: list[int], max_rows: int, noise: list[float]
) -> None:
    """With a cost model's steps, the program tries one split per step (CostModel's look-ups round rows up to the
    next profiled entry): its plans cost exactly what the search over every split finds, on noisy profiles made
    monotone, including rows past the last step (scaled) and groups the max_rows cap cuts short."""
    lengths = sorted(lengths)
    sizes = sizes[: len(lengths)]
    rows, profiled = (1, 2, 4, 8, 16), (8, 32, 128)
    table = tuple(
        tuple(0.5 + r * n * 1e-3 + noise[(i * 3 + j) % 20] for j, n in enumerate(profiled)) for i, r in enumerate(rows)
    )
    model = CostModel(rows, profiled, table).monotone()
    fast = split_sorted(lengths, sizes, model.alpha, max_rows, model.rows)
    full = split_sorted(lengths, sizes, model.alpha, max_rows)

    def total(groups: list[tuple[int, int]]) -> float:
        assert [i for s, e in groups for i in range(s, e)] == list(range(len(lengths)))
        assert all(e - s == 1 or sum(sizes[s:e]) <= max_rows for s, e in groups)
        return sum(model.alpha(sum(sizes[s:e]), lengths[e - 1]) for s, e in groups)

    assert total(fast) == pytest.approx(total(full), rel=1e-12)


def test_monotone_envelope() -> None:
    noisy = CostModel((1, 2), (8, 16), ((2.0, 1.0), (1.5, 3.0)))
    assert noisy.monotone().alpha_s == ((2.0, 2.0), (2.0, 3.0))
    # control: the noisy table itself is not monotone, so the step search's assumption needs the envelope
    assert noisy.alpha(1, 16) < noisy.alpha(1, 8)


def test_groups_of_sizes_and_an_oversized_item() -> None:
    got = split_sorted([4, 8, 16], [3, 5, 2], lambda rows, length: 1.0 + rows * length, 6)
    assert [i for s, e in got for i in range(s, e)] == [0, 1, 2] and got[0] == (0, 1)
    assert split_sorted([4], [9], lambda rows, length: 1.0, 6) == [(0, 1)]  # alone above max_rows: its own group


@dataclass
class R:
    task: str
    length: int
    arrived: float = 0.0


def model() -> CostModel:
    rows, lengths = (1, 2, 4, 8), (8, 16, 32, 64, 128)
    return CostModel(rows, lengths, tuple(tuple(0.001 + 1e-6 * r * n for n in lengths) for r in rows))


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abc"), st.integers(1, 128)), min_size=1, max_size=40), st.integers(1, 9))
def test_plans_cover_the_queue(stream: list[tuple[str, int]], max_batch: int) -> None:
    queue = [R(t, n, float(i)) for i, (t, n) in enumerate(stream)]
    policy = CoordinatedPolicy(model())
    plan = policy.plan(queue, max_batch)
    assert sorted(i for m in plan for i in m) == list(range(len(queue)))
    assert all(0 < len(m) <= max_batch for m in plan)
    picked = policy.select(queue, max_batch)
    assert 0 in picked and len(picked) <= max_batch


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.tuples(st.sampled_from("abc"), st.integers(1, 128)), min_size=1, max_size=30), max_size=4))
def test_a_policy_plans_as_a_fresh_one_after_other_queues(queues: list[list[tuple[str, int]]]) -> None:
    """The policy memoises its cost look-ups across plans: each plan is still the one a new policy makes."""
    beta = {"b": tuple(tuple(2e-4 * r for _ in (8, 16, 32, 64, 128)) for r in (1, 2, 4, 8))}
    costs = replace(model(), beta_s=beta)
    kind_of = {"a": None, "b": "b", "c": None}.get
    used = CoordinatedPolicy(costs, kind_of)
    for stream in queues:
        queue = [R(t, n, float(i)) for i, (t, n) in enumerate(stream)]
        assert used.plan(queue, 5) == CoordinatedPolicy(costs, kind_of).plan(queue, 5)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from("abc"), st.integers(1, 128)), min_size=1, max_size=40),
    st.integers(1, 9),
    st.sets(st.integers(0, 39), max_size=5),
)
def test_selects_drain_the_queue_from_one_plan(stream: list[tuple[str, int]], max_batch: int, gone: set[int]) -> None:
    """The engine's loop: each select's batch leaves the queue. Batches come from the first plan while they are
    whole; a request that leaves otherwise (cancelled, timed out) forces a new plan. Every request runs once."""
    queue = [R(t, n, float(i)) for i, (t, n) in enumerate(stream)]
    policy = CoordinatedPolicy(model())
    first = [[queue[i] for i in m] for m in policy.plan(queue, max_batch)]
    ran: list[R] = []
    step = 0
    while queue:
        picked = policy.select(queue, max_batch)
        assert 0 in picked and 0 < len(picked) <= max_batch
        batch = [queue[i] for i in picked]
        if not gone:  # nothing left on its own: the batches are the first plan's
            assert any(sorted(map(id, batch)) == sorted(map(id, b)) for b in first)
        ran.extend(batch)
        queue = [r for i, r in enumerate(queue) if i not in picked]
        if step in gone and len(queue) > 1:
            ran.append(queue.pop(len(queue) // 2))  # cancelled while queued
        step += 1
    assert sorted(id(r) for r in ran) == sorted({id(r) for r in ran}) and len(ran) == len(stream)


def test_new_arrivals_are_planned_with_the_queue() -> None:
    """A plan made on a partial queue is not reused once more requests wait: they join the next plan."""
    policy = CoordinatedPolicy(model())
    x, y, v = R("a", 100, 0.0), R("a", 10, 1.0), R("a", 100, 2.0)
    assert policy.select([x, y, v], 2) == [0, 2]  # the plan: [x, v], then y alone
    z = R("a", 10, 3.0)
    assert policy.select([y, z], 2) == [0, 1]  # z arrived: y runs with it, not alone as planned


def test_beta_forms_single_task_mini_batches() -> None:
    base = model()
    beta = {"lora": tuple(tuple(0.01 for _ in base.lengths) for _ in base.rows)}  # a fixed cost per mini-batch
    cost = CostModel(base.rows, base.lengths, base.alpha_s, beta)
    policy = CoordinatedPolicy(cost, kind_of=lambda task: "lora" if task == "a" else None)
    queue = [R("a", 10), R("b", 10), R("a", 12), R("a", 11)]
    plan = policy.plan(queue, 8)
    assert sorted(i for m in plan for i in m) == [0, 1, 2, 3]


def test_cost_model_look_up_and_json(tmp_path: Path) -> None:
    m = model()
    assert m.alpha(3, 10) == m.alpha(4, 16)  # rounds up to the next profiled entry
    assert m.alpha(16, 128) == pytest.approx(2 * m.alpha(8, 128))  # beyond the last: scaled
    assert m.beta("anything", 2, 8) == 0.0
    m.save(tmp_path / "c.json")
    assert CostModel.load(tmp_path / "c.json") == m
    with pytest.raises(InputError, match="increasing"):
        CostModel((2, 1), (8,), ((1.0,), (1.0,)))
    with pytest.raises(InputError, match="2 x 1"):
        CostModel((1, 2), (8,), ((1.0,),))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(InputError, match="cannot read the cost model"):
        CostModel.load(tmp_path / "bad.json")


def test_engine_serves_with_a_profiled_cost_model(small_base: Path, tmp_path: Path) -> None:
    rt = pets_compiler.compile(small_base, {"plain": small_base})
    with pytest.raises(InputError, match="cost model"):
        Engine(rt, policy="coordinated")
    rt.cost_model = profile_costs(rt, rows=(1, 2, 4), lengths=(8, 16, 32), repeats=1)
    assert rt.cost_model.device == "cpu" and all(v > 0 for r in rt.cost_model.alpha_s for v in r)
    reqs = [{"task": "plain", "input_ids": list(range(5, 5 + n)), "id": i} for i, n in enumerate([3, 30, 4, 29, 5])]
    want = rt.run(reqs, batch_size=1)
    with Engine(rt, policy="coordinated", max_batch=4, max_delay_ms=1) as engine:
        got = [engine.submit("plain", input_ids=r["input_ids"], id=r["id"]).result(timeout=60) for r in reqs]
    assert [g["id"] for g in got] == [w["id"] for w in want]
    rt.save(tmp_path / "art")
    assert pets_compiler.load(tmp_path / "art").cost_model == rt.cost_model


def test_the_engine_lets_coordinated_see_its_lookahead(small_base: Path) -> None:
    """A coordinated engine forms its first batch once lookahead x max_batch requests are queued (capped at
    max_queue), not at max_batch: the plan sorts lengths across batches. Fixed, lookahead 1, is the control."""
    rt = pets_compiler.compile(small_base, {"plain": small_base})
    rt.cost_model = profile_costs(rt, rows=(1, 2, 4), lengths=(8, 16), repeats=1, warmup=0)
    with pytest.raises(InputError, match="lookahead"):
        CoordinatedPolicy(rt.cost_model, lookahead=0)
    ids = [[5, 6, 7], [5, 6, 7, 8, 9, 10, 11, 12, 13], [5, 6], [5, 6, 7, 8, 9, 10, 11, 12]]
    with Engine(rt, policy=CoordinatedPolicy(rt.cost_model, lookahead=2), max_batch=2, max_delay_ms=600_000) as eng:
        first = [eng.submit("plain", input_ids=i) for i in ids[:3]]
        time.sleep(0.3)
        assert not any(f.done() for f in first) and eng.metrics()["batches"] == 0  # 3 queued, the window is 4
        last = eng.submit("plain", input_ids=ids[3])
        got = [f.result(timeout=60) for f in [*first, last]]
    want = rt.run([{"task": "plain", "input_ids": i} for i in ids], batch_size=1)
    for g, w in zip(got, want, strict=True):
        assert g["embedding"] == pytest.approx(w["embedding"], abs=1e-5)
    # the window is at most max_queue: 3 queued requests fill a queue of 3
    with Engine(
        rt, policy=CoordinatedPolicy(rt.cost_model, lookahead=2), max_batch=2, max_delay_ms=600_000, max_queue=3
    ) as eng:
        assert all(f.result(timeout=60) for f in [eng.submit("plain", input_ids=i) for i in ids[:3]])
    with Engine(rt, policy="fixed", max_batch=2, max_delay_ms=600_000) as eng:  # the control: a batch at 2 queued
        assert all(f.result(timeout=60) for f in [eng.submit("plain", input_ids=i) for i in ids[:2]])


def test_profile_costs_rows_take_the_loaded_tasks_in_turn(small_base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """alpha is the cost of a mixed batch: row i of each profiled forward runs loaded task i mod (tasks), not the
    first task alone (whose kind would stand for every row)."""
    rt = pets_compiler.compile(small_base, {"a": small_base, "b": small_base, "c": small_base})
    seen: list[list[str]] = []
    forward = rt.forward

    def recording(ids: Any, mask: Any, names: list[str]) -> Any:
        seen.append(list(names))
        return forward(ids, mask, names)

    monkeypatch.setattr(rt, "forward", recording)
    model = profile_costs(rt, rows=(1, 4), lengths=(8,), repeats=1, warmup=0)
    assert model.rows == (1, 4) and len(seen) == 2
    assert seen == [["a"], ["a", "b", "c", "a"]]


def test_partitions_helper_counts() -> None:
    assert sum(1 for _ in partitions([0, 1, 2, 3])) == 15  # Bell(4)
    assert len(list(itertools.islice(partitions([]), 3))) == 1
