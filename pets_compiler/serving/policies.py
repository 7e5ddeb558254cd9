"""Batch policies: which queued requests run together next. One interface, chosen by name."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from pets_compiler.errors import InputError


class Queued(Protocol):
    """What a policy sees of a queued request."""

    @property
    def task(self) -> str: ...

    @property
    def length(self) -> int: ...

    @property
    def arrived(self) -> float: ...


class Policy(Protocol):
    """select(queue, max_batch): indices into `queue` (oldest first) of the next batch, 1..max_batch of them.
    The engine calls it with a non-empty queue; a policy must include the oldest request (index 0), so none waits
    behind newer ones for ever. A policy whose `packed` is true has its batches run padding-free
    (Runtime.run_batch(packed=True)); others run padded batches. `lookahead`: how many batches' worth of requests
    (max_batch each) the policy wants queued before it chooses; the engine forms a batch once that many are queued
    (at most max_queue), or once the oldest request has waited max_delay."""

    name: str
    packed: bool
    lookahead: int

    def select(self, queue: Sequence[Queued], max_batch: int) -> list[int]: ...


class FixedPolicy:
    """FIFO: the oldest max_batch requests, whatever their lengths (the padded baseline)."""

    name = "fixed"
    packed = False
    lookahead = 1

    def select(self, queue: Sequence[Queued], max_batch: int) -> list[int]:
        return list(range(min(max_batch, len(queue))))


class SortedPolicy:
    """Length-aware: the oldest request and the max_batch - 1 queued requests closest to it in length (ties to
    the older), so a batch pads little and the oldest request is never passed over."""

    name = "sorted"
    packed = False
    lookahead = 1

    def select(self, queue: Sequence[Queued], max_batch: int) -> list[int]:
        anchor = queue[0].length
        others = sorted(range(1, len(queue)), key=lambda i: (abs(queue[i].length - anchor), i))
        return [0, *sorted(others[: max_batch - 1])]


class PackedPolicy(FixedPolicy):
    """Padding-free: the oldest max_batch requests, whatever their lengths (FixedPolicy's choice), run as packed
    rows (several requests of one task to a row, positions and attention per request: runtime/packing.py), so
    lengths cost no padding beyond the ends of rows."""

    name = "packed"
    packed = True


def _coordinated(runtime: Any) -> Policy:
    from pets_compiler.serving.coordinated import CoordinatedPolicy

    cost = getattr(runtime, "cost_model", None)
    if cost is None:
        raise InputError(
            "the coordinated policy needs the runtime's cost model: runtime.cost_model = "
            "pets_compiler.serving.profile_costs(runtime) (saved with the artifact by runtime.save)"
        )
    return CoordinatedPolicy(cost)


# Each name's policy for a runtime ("coordinated" uses the runtime's cost model).
POLICIES: dict[str, Callable[[Any], Policy]] = {
    "fixed": lambda runtime: FixedPolicy(),
    "sorted": lambda runtime: SortedPolicy(),
    "coordinated": _coordinated,
    "packed": lambda runtime: PackedPolicy(),
}


def policy_named(policy: str | Policy, runtime: Any = None) -> Policy:
    """A policy object from its name (or the object itself)."""
    if not isinstance(policy, str):
        return policy
    if policy not in POLICIES:
        raise InputError(f"unknown batch policy {policy!r}: choose one of {', '.join(POLICIES)}")
    return POLICIES[policy](runtime)
