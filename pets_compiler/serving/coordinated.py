"""PetS's coordinated batching (its research/python_scripts/pet_scheduler.py, rebuilt): a cost model of the shared
time alpha(rows, length) and the task-op time beta(kind, rows, length), then two dynamic programs over
length-sorted requests. Intra-task: each task's requests, sorted by length, split into mini-batches minimising
sum beta(kind, size, longest). Inter-task: the mini-batches, sorted by their longest request, merged into
macro-batches of at most max_batch rows minimising sum alpha(rows, longest). Look-ups round up to the next
profiled entry (past the last, the last is scaled linearly), as PetS's tables do.

In this runtime the task ops run inside the one compiled program for every row, so their time is part of alpha;
beta is zero unless a cost model gives a table for a kind, and intra-task batching then leaves each request its
own mini-batch (the inter-task program alone decides).
"""

from __future__ import annotations

import bisect
import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pets_compiler.errors import InputError


@dataclass(frozen=True)
class CostModel:
    """Seconds per batch: alpha[(rows, length)] for the shared program, beta[kind][(rows, length)] for task ops."""

    rows: tuple[int, ...]
    lengths: tuple[int, ...]
    alpha_s: tuple[tuple[float, ...], ...]  # [len(rows)][len(lengths)]
    beta_s: dict[str, tuple[tuple[float, ...], ...]] = field(default_factory=dict)
    device: str = "unknown"

    def __post_init__(self) -> None:
        for name, axis in (("rows", self.rows), ("lengths", self.lengths)):
            if not axis or list(axis) != sorted(set(axis)) or axis[0] < 1:
                raise InputError(f"cost model {name} must be increasing positive integers, got {list(axis)}")
        for name, table in (("alpha", self.alpha_s), *((f"beta[{k}]", t) for k, t in self.beta_s.items())):
            if len(table) != len(self.rows) or any(len(r) != len(self.lengths) for r in table):
                raise InputError(f"cost model {name} must be {len(self.rows)} x {len(self.lengths)}")
            if any(not v >= 0 for r in table for v in r):
                raise InputError(f"cost model {name} holds a negative or NaN time")

    def alpha(self, rows: int, length: int) -> float:
        return _look_up(self.alpha_s, self.rows, self.lengths, rows, length)

    def beta(self, kind: str | None, rows: int, length: int) -> float:
        table = self.beta_s.get(kind) if kind is not None else None
        return 0.0 if table is None else _look_up(table, self.rows, self.lengths, rows, length)

    def monotone(self) -> CostModel:
        """The same model with each table replaced by its running maximum over rows and lengths: a profile's noise
        (a longer or fuller batch timed a little faster) removed, as the planner's step search assumes."""
        return CostModel(
            self.rows,
            self.lengths,
            _envelope(self.alpha_s),
            {k: _envelope(t) for k, t in self.beta_s.items()},
            self.device,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "rows": list(self.rows),
            "lengths": list(self.lengths),
            "alpha_s": [list(r) for r in self.alpha_s],
            "beta_s": {k: [list(r) for r in t] for k, t in self.beta_s.items()},
        }

    @staticmethod
    def from_json(data: Any) -> CostModel:
        try:
            return CostModel(
                rows=tuple(int(x) for x in data["rows"]),
                lengths=tuple(int(x) for x in data["lengths"]),
                alpha_s=tuple(tuple(float(v) for v in r) for r in data["alpha_s"]),
                beta_s={
                    str(k): tuple(tuple(float(v) for v in r) for r in t) for k, t in data.get("beta_s", {}).items()
                },
                device=str(data.get("device", "unknown")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"not a cost model: {e!r}") from e

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=1))

    @staticmethod
    def load(path: Path) -> CostModel:
        try:
            return CostModel.from_json(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"cannot read the cost model {path}: {e}") from e


def _envelope(table: Sequence[Sequence[float]]) -> tuple[tuple[float, ...], ...]:
    out: list[list[float]] = []
    for i, row in enumerate(table):
        out.append([])
        for j, v in enumerate(row):
            out[i].append(max(v, out[i][j - 1] if j else v, out[i - 1][j] if i else v))
    return tuple(tuple(r) for r in out)


def _look_up(
    table: Sequence[Sequence[float]], rows_axis: Sequence[int], len_axis: Sequence[int], rows: int, length: int
) -> float:
    """The entry at the next profiled (rows, length) at or above the asked one; beyond the last, scaled linearly."""
    i = min(bisect.bisect_left(rows_axis, rows), len(rows_axis) - 1)
    j = min(bisect.bisect_left(len_axis, length), len(len_axis) - 1)
    scale = max(1.0, rows / rows_axis[i]) * max(1.0, length / len_axis[j])
    return table[i][j] * scale


def split_sorted(
    longest: Sequence[int],
    sizes: Sequence[int],
    cost: Callable[[int, int], float],
    max_rows: int,
    steps: Sequence[int] | None = None,
) -> list[tuple[int, int]]:
    """PetS's program over items sorted by length (requests, or mini-batches of `sizes` rows): the split into
    consecutive groups [start, end) of at most max_rows rows that minimises sum cost(rows, longest), with
    state[j] = min over k of state[k] + cost(rows of items k..j-1, longest[j-1]). An item alone above max_rows is
    a group of its own.

    `steps` (a cost model's profiled rows): cost(rows, n) is non-decreasing in rows and n and equals
    cost(the next step >= rows, n) up to the last step. Then state[] is non-decreasing too (dropping a group's
    longest item never costs more), so among the k whose rows round up to one step the smallest k is best: each
    state[j] tries one k per step (and every k past the last step), not every k. Planning 1024 queued requests
    with groups of up to 256 took ~0.5 s with every k, held under the engine's lock."""
    n = len(longest)
    prefix = [0]
    for s in sizes:
        prefix.append(prefix[-1] + s)
    best = [0.0] + [float("inf")] * n
    cut = list(range(-1, n))  # the fallback: item j-1 alone
    caps = sorted({min(r, max_rows) for r in steps}) if steps else []
    # first[i]: the smallest k whose rows k..j-1 fit caps[i]; it only moves forward as j does (the rows of k..j-1
    # grow with j). A bisect per step and j in a set, sorted, cost a plan of 1,024 requests ~4 ms more on a 2-core
    # CPU, under the engine's lock.
    first = [0] * len(caps)
    for j in range(1, n + 1):
        if caps:  # j - 1, the smallest k whose rows fit each step, then every k with rows past the last step
            pj = prefix[j]
            candidates = [j - 1]
            for i, cap in enumerate(caps):  # ascending caps: the ks descend
                k = first[i]
                while k < j and pj - prefix[k] > cap:
                    k += 1
                first[i] = k
                if k < candidates[-1]:
                    candidates.append(k)
            k = min(first[-1], j - 1) - 1  # below every step's k: rows past the last step, up to max_rows
            while k >= 0 and pj - prefix[k] <= max_rows:
                candidates.append(k)
                k -= 1
        else:
            candidates = []
            k = j - 1
            while k >= 0 and (k == j - 1 or prefix[j] - prefix[k] <= max_rows):
                candidates.append(k)
                k -= 1
        for k in candidates:
            c = best[k] + cost(prefix[j] - prefix[k], longest[j - 1])
            if c < best[j]:
                best[j], cut[j] = c, k
    groups: list[tuple[int, int]] = []
    j = n
    while j > 0:
        groups.append((cut[j], j))
        j = cut[j]
    return groups[::-1]


@dataclass
class CoordinatedPolicy:
    """The next batch is the macro-batch (of PetS's two programs over the whole queue) that holds the oldest
    request. `kind_of(task)` names a task's PET kind for beta (None: beta is zero). `lookahead`: the engine lets
    `lookahead` batches' worth of requests queue (or the oldest wait max_delay) before the first choice, so the
    programs sort lengths across several batches: PetS plans all its queries at once, and a plan of one batch's
    worth (a burst's first max_batch requests) is that batch unsorted, padded like fixed batching's."""

    cost: CostModel
    kind_of: Callable[[str], str | None] = lambda task: None
    name: str = "coordinated"
    packed: bool = False
    lookahead: int = 4

    _planned: list[list[Any]] = field(default_factory=list, repr=False, compare=False)  # the last plan's batches

    def __post_init__(self) -> None:
        if isinstance(self.lookahead, bool) or not isinstance(self.lookahead, int) or self.lookahead < 1:
            raise InputError(f"lookahead must be an integer >= 1, got {self.lookahead!r}")
        self._model = self.cost.monotone()  # what the programs plan with (split_sorted's steps need it monotone)
        # The programs' look-ups, memoised per policy: a plan of 1,024 fig12 requests made ~9,000 of them at ~2.5 us
        # each (bisects, scaling), half of its 12.6 ms, under the engine's lock, once per batch while requests
        # arrive.
        self._alpha = functools.cache(self._model.alpha)
        self._betas: dict[str | None, Callable[[int, int], float]] = {}

    def select(self, queue: Sequence[Any], max_batch: int) -> list[int]:
        """The planned batch of the oldest request while it is whole (none of it ran, timed out or was
        cancelled) and no request arrived since the plan; else a new plan of the whole queue. Re-planning 1024
        queued requests for every batch cost ~40 ms a batch on the H200's host (coordinated ran at 0.44x fixed),
        so one plan serves the batches after it."""
        at = {id(r): i for i, r in enumerate(queue)}
        oldest = id(queue[0])
        if sum(len(b) for b in self._planned) < len(queue):
            self._planned = []  # requests arrived since the plan: plan them with the rest
        for batch in self._planned:
            if any(id(r) == oldest for r in batch):
                if len(batch) <= max_batch and all(id(r) in at for r in batch):
                    self._planned.remove(batch)
                    return sorted(at[id(r)] for r in batch)
                break
        self._planned = [[queue[i] for i in m] for m in self.plan(queue, max_batch)]
        chosen = next(b for b in self._planned if any(id(r) == oldest for r in b))
        self._planned.remove(chosen)
        return sorted(at[id(r)] for r in chosen)

    def plan(self, queue: Sequence[Any], max_batch: int) -> list[list[int]]:
        """Every macro-batch of the queue, as lists of queue indices."""
        model = self._model
        by_task: dict[str, list[int]] = {}
        for i, r in enumerate(queue):
            by_task.setdefault(r.task, []).append(i)
        minis: list[list[int]] = []
        for task, idx in by_task.items():
            idx.sort(key=lambda i: (queue[i].length, i))
            kind = self.kind_of(task)
            if model.beta_s.get(kind or "") is None:
                minis.extend([i] for i in idx)  # no task-op cost: each request its own mini-batch
                continue
            lengths = [queue[i].length for i in idx]
            beta = self._beta(kind)
            minis.extend(idx[a:b] for a, b in split_sorted(lengths, [1] * len(idx), beta, max_batch, model.rows))
        minis.sort(key=lambda m: (max(queue[i].length for i in m), min(m)))
        longest = [max(queue[i].length for i in m) for m in minis]
        sizes = [len(m) for m in minis]
        groups = split_sorted(longest, sizes, self._alpha, max_batch, model.rows)
        return [[i for m in minis[a:b] for i in m] for a, b in groups]

    def _beta(self, kind: str | None) -> Callable[[int, int], float]:
        if kind not in self._betas:
            self._betas[kind] = functools.cache(lambda rows, length: self._model.beta(kind, rows, length))
        return self._betas[kind]
