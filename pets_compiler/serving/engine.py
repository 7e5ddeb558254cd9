"""The serving engine: requests arrive one by one, for any task and of any length; a background loop forms batches
with a policy (policies.py) and runs them on the runtime; each request gets a concurrent.futures.Future of its
`pets run` answer.

What a caller may count on: `submit` checks the request at once (a bad one raises and is not accepted), refuses
beyond `max_queue` (QueueFullError) and after `close()` (EngineClosedError); every accepted request ends exactly
once, as a result or as one of the typed errors (timeout, removed task, cancelled, or the runtime's own error), so
accepted = succeeded + failed; a timed-out request is answered when its time passes (not after the batch in
flight) and never runs later; `close()` runs or (cancel_pending=True) cancels everything accepted, then returns.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

from pets_compiler.errors import (
    EngineClosedError,
    InputError,
    QueueFullError,
    RequestCancelledError,
    RequestTimeoutError,
    TaskRemovedError,
    UnknownTaskError,
)
from pets_compiler.runtime.requests import Prepared
from pets_compiler.serving import switching
from pets_compiler.serving.policies import FixedPolicy, Policy, policy_named

LATENCY_WINDOW = 100_000  # latencies kept for the percentiles (the most recent)


@dataclass(eq=False)
class _Request:
    prepared: Prepared
    future: Future[dict[str, Any]]
    arrived: float
    deadline: float | None

    @property
    def task(self) -> str:
        return self.prepared.task

    @property
    def length(self) -> int:
        return len(self.prepared.ids)


@dataclass
class _Launched:
    todo: list[_Request]
    pending: Any  # the runtime's PendingBatch: result() -> (answers, tokens run)
    started: float


@dataclass
class Metrics:
    """Counts since the engine started; Engine.metrics() gives a snapshot with the derived figures."""

    started: float
    accepted: int = 0
    rejected: int = 0  # queue full: never accepted
    succeeded: int = 0
    failed: int = 0  # timed out, task removed, cancelled, or the runtime's error
    batches: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)  # size -> batches of that size
    real_tokens: int = 0
    padded_tokens: int = 0  # tokens the batches ran (padded or packed rows), real ones included
    policy_errors: int = 0  # selections a policy got wrong (the engine ran FIFO instead)
    latencies_s: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    # per batch: launch to answers (overlapping the launch of the next batch, on a GPU)
    batch_s: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    # per batch: the host's time to build its inputs and launch it (on a GPU, the device runs meanwhile)
    launch_s: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))

    def snapshot(self, queue_depth: int) -> dict[str, Any]:
        lat = self.latencies_s
        elapsed = time.monotonic() - self.started
        return {
            "accepted": self.accepted,
            "rejected": self.rejected,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "queue_depth": queue_depth,
            "batches": self.batches,
            "batch_sizes": dict(sorted(self.batch_sizes.items())),
            "mean_batch_size": self.succeeded / self.batches if self.batches else None,
            "padding_fraction": 1 - self.real_tokens / self.padded_tokens if self.padded_tokens else None,
            "latency_p50_ms": 1e3 * statistics.median(lat) if lat else None,
            "latency_p99_ms": 1e3 * _p99(lat) if lat else None,
            "throughput_rps": self.succeeded / elapsed if elapsed > 0 else None,
            "batch_time_p50_ms": 1e3 * statistics.median(self.batch_s) if self.batch_s else None,
            "batch_time_p99_ms": 1e3 * _p99(self.batch_s) if self.batch_s else None,
            "batch_time_max_ms": 1e3 * max(self.batch_s) if self.batch_s else None,
            "launch_time_p50_ms": 1e3 * statistics.median(self.launch_s) if self.launch_s else None,
            "policy_errors": self.policy_errors,
        }


class Engine:
    """Serve `runtime` (a pets_compiler.Runtime) to requests submitted from any thread.

    policy: "fixed", "sorted", "coordinated" (needs runtime.cost_model), "packed" or a Policy object; max_queue:
    accepted requests waiting at most; max_batch: requests per batch at most; max_delay_ms: how long the oldest
    waiting request may wait for a fuller batch (a batch forms once max_batch requests are queued, times the
    policy's lookahead: coordinated plans over several batches' worth; or once the oldest waited this long);
    deterministic: pad every batch to one shape, so that each answer is bitwise independent of the other requests in its
    batch (by default answers agree within float rounding, ~1e-7 relative in fp32); freeze_gc: collect once, then exempt
    every object alive from the cyclic garbage collector's scans (gc.freeze), as long-running servers do: a full
    collection scans every tracked object of the process while all threads wait (~0.5 s with torch and transformers
    loaded, on this project's CI machine; on the H200 each steady run of bench.batching had one batch of ~0.4 s against
    a 10-17 ms median, and the backlog behind it set the p99). Cycles among the frozen objects are never collected;
    objects made later are.
    switch_interval_ms: Python's thread switch interval while the engine is open (sys.setswitchinterval,
    process-wide; restored when the last engine closes; None leaves it): the engine's loop gives up the GIL at each
    torch call and waits up to this long to get it back from a thread that is submitting (switching.py).
    """

    def __init__(
        self,
        runtime: Any,
        policy: str | Policy = "sorted",
        max_queue: int = 1024,
        max_batch: int = 32,
        max_delay_ms: float = 5.0,
        deterministic: bool = False,
        freeze_gc: bool = True,
        switch_interval_ms: float | None = 0.5,
    ) -> None:
        for name, value, least in (("max_queue", max_queue, 1), ("max_batch", max_batch, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise InputError(f"{name} must be an integer >= {least}, got {value!r}")
        if not _is_number(max_delay_ms) or not max_delay_ms >= 0:
            raise InputError(f"max_delay_ms must be a number >= 0, got {max_delay_ms!r}")
        if switch_interval_ms is not None and not (_is_number(switch_interval_ms) and 0 < switch_interval_ms <= 1000):
            raise InputError(f"switch_interval_ms must be a number in (0, 1000] or None, got {switch_interval_ms!r}")
        self.runtime = runtime
        self.policy = policy_named(policy, runtime)
        self._packed = bool(getattr(self.policy, "packed", False))  # its batches run as packed rows
        if self._packed and hasattr(runtime, "prepare_packed"):
            runtime.prepare_packed()  # built here, not inside the first batch's latency
        # deterministic: every batch padded to one shape (max_batch rows x the model's positions), so an answer is
        # bitwise the same whatever shares its batch (at the cost of running that shape every time)
        self._shape: tuple[int, int] | None = None
        if deterministic:
            if self._packed:
                raise InputError(f"policy {self.policy.name!r} packs rows: it has no deterministic mode")
            self._shape = (max_batch, int(runtime.base.config.max_position_embeddings))
        self.max_queue, self.max_batch, self.max_delay_s = max_queue, max_batch, max_delay_ms / 1e3
        # a batch forms once this many requests are queued (the policy's lookahead batches' worth, at most
        # max_queue), or once the oldest has waited max_delay, or on close
        self._fill = min(max_queue, max_batch * max(1, int(getattr(self.policy, "lookahead", 1))))
        # a window's requests run without waiting once it filled (those that arrived by then): each later batch of
        # its plan is ready at once (a window of one batch releases nothing: fixed, sorted and packed keep waiting
        # for a full batch or max_delay)
        self._released_at = float("-inf")
        self._cv = threading.Condition()
        self._queue: list[_Request] = []
        # what makes a scan of the queue for expired requests worth its time (each scan reads every queued future;
        # a scan per submit made submitting 1024 requests quadratic): the earliest deadline of a queued request,
        # and whether a caller cancelled a queued future since the last scan
        self._earliest: float | None = None
        self._cancelled_since_scan = False
        self._closed = False
        if freeze_gc:
            gc.collect()
            gc.freeze()
        self._switch_s = None if switch_interval_ms is None else switch_interval_ms / 1e3
        if self._switch_s is not None:
            switching.hold(self._switch_s)
        self._metrics = Metrics(started=time.monotonic())
        self._worker = threading.Thread(target=self._serve, name="pets-engine", daemon=True)
        self._reaper = threading.Thread(target=self._reap, name="pets-engine-timeouts", daemon=True)
        self._worker.start()
        self._reaper.start()

    # ---- the caller's side ----------------------------------------------------------------------------------
    def submit(
        self,
        task: str,
        text: str | None = None,
        input_ids: Sequence[int] | None = None,
        timeout_s: float | None = None,
        **fields: Any,
    ) -> Future[dict[str, Any]]:
        """Accept one request (exactly one of text / input_ids; `fields`, e.g. id=..., come back in the answer).
        Raises at once, accepting nothing: InputError, UnknownTaskError, QueueFullError, EngineClosedError."""
        if timeout_s is not None and not _is_number(timeout_s):
            raise InputError(f"timeout_s must be a number of seconds or None, got {timeout_s!r}")
        if timeout_s is not None and not timeout_s > 0:
            raise InputError(f"timeout_s must be > 0, got {timeout_s!r}")
        request: dict[str, Any] = {**fields, "task": task}
        if text is not None:
            request["text"] = text
        if input_ids is not None:  # a tuple is taken as a list; anything else reaches the checks as given
            request["input_ids"] = list(input_ids) if isinstance(input_ids, list | tuple) else input_ids
        prepared = self.runtime.prepare([request])[0]
        future: Future[dict[str, Any]] = Future()
        with self._cv:
            if self._closed:
                raise EngineClosedError("the engine is closed: it accepts no new requests")
            if len(self._queue) >= self.max_queue:
                self._metrics.rejected += 1
                raise QueueFullError(f"the queue is full ({self.max_queue} requests, max_queue): request not accepted")
            now = time.monotonic()
            deadline = None if timeout_s is None else now + timeout_s
            self._queue.append(_Request(prepared, future, now, deadline))
            sooner = deadline is not None and (self._earliest is None or deadline < self._earliest)
            if sooner:
                self._earliest = deadline
            self._metrics.accepted += 1
            # Wake the loop and the reaper only where this request changes what they wait for: the first request
            # (the loop waits for one), a full window (it waits for _fill or the oldest's max_delay), a nearer
            # deadline (the reaper's). A wake-up per request cost the loop a GIL hand-over each: submitting 4096
            # requests woke it 4096 times while it was forming and launching batches.
            if len(self._queue) in (1, self._fill) or sooner:
                self._cv.notify_all()
        future.add_done_callback(self._on_done)
        return future

    def _on_done(self, future: Future[dict[str, Any]]) -> None:
        if future.cancelled():  # by the caller: the queue drops it at the next scan
            with self._cv:
                self._cancelled_since_scan = True
                self._cv.notify_all()

    async def submit_async(self, task: str, **kwargs: Any) -> dict[str, Any]:
        """submit, awaited on the running event loop."""
        return await asyncio.wrap_future(self.submit(task, **kwargs))

    def metrics(self) -> dict[str, Any]:
        """Counts, queue depth, batch sizes, padding fraction, latency p50/p99 and throughput so far."""
        with self._cv:
            return self._metrics.snapshot(len(self._queue))

    def close(self, cancel_pending: bool = False, timeout_s: float | None = None) -> None:
        """Accept nothing more; run what was accepted (or end it with RequestCancelledError), then stop."""
        dropped: list[_Request] = []
        with self._cv:
            self._closed = True
            if cancel_pending:
                dropped, self._queue = self._queue, []
            self._cv.notify_all()
        self._fail(dropped, lambda r: RequestCancelledError("the engine closed with cancel_pending=True"))
        self._worker.join(timeout_s)
        self._reaper.join(timeout_s)
        with self._cv:
            switch_s, self._switch_s = self._switch_s, None  # given back once, on the first close
        if switch_s is not None:
            switching.release(switch_s)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the loop -------------------------------------------------------------------------------------------
    def _serve(self) -> None:
        """Two batches in flight at most: while one runs on the device, the next is formed and launched (its inputs
        built on the host), then the first is answered; a batch runs alone when no other is ready."""
        running: _Launched | None = None
        while True:
            with self._cv:
                batch, expired = self._next_batch(wait=running is None)
            self._fail(expired, _timed_out)
            launched = self._start(batch) if batch else None
            if running is not None:
                self._finish(running)
            running = launched
            if batch is None and running is None:
                return

    def _next_batch(self, wait: bool = True) -> tuple[list[_Request] | None, list[_Request]]:
        """(the next batch, or None once closed and drained, or [] when none is ready and `wait` is false;
        requests expired meanwhile). Holds the lock."""
        expired: list[_Request] = []
        while True:
            expired += self._take_expired(time.monotonic())
            if not self._queue:
                if self._closed:
                    self._cv.notify_all()  # the reaper stops once closed and drained
                    return None, expired
                if not wait:
                    return [], expired
                self._cv.wait()
                continue
            ready_at = self._queue[0].arrived + self.max_delay_s
            now = time.monotonic()
            full = len(self._queue) >= self._fill
            released = self._queue[0].arrived <= self._released_at  # of a window that filled: planned, not waiting
            if not (full or released or self._closed or now >= ready_at):
                if not wait:
                    return [], expired
                self._cv.wait(ready_at - now)
                continue
            if full and self._fill > self.max_batch:
                self._released_at = self._queue[-1].arrived
            picked = self._select()
            chosen = set(picked)
            batch = [self._queue[i] for i in sorted(chosen)]
            self._queue = [r for i, r in enumerate(self._queue) if i not in chosen]
            self._cv.notify_all()  # the reaper's nearest deadline may have left the queue
            return batch, expired

    def _select(self) -> list[int]:
        picked = self.policy.select(self._queue, self.max_batch)
        ok = (
            0 < len(picked) <= self.max_batch
            and 0 in picked
            and len(set(picked)) == len(picked)
            and all(isinstance(i, int) and 0 <= i < len(self._queue) for i in picked)
        )
        if ok:
            return list(picked)
        self._metrics.policy_errors += 1
        return FixedPolicy().select(self._queue, self.max_batch)

    def _take_expired(self, now: float) -> list[_Request]:
        """Remove and return the queued requests whose deadline passed or that the caller cancelled. Holds the lock.
        Scans the queue only when a deadline passed or a future was cancelled since the last scan."""
        if not self._cancelled_since_scan and (self._earliest is None or now < self._earliest):
            return []
        self._cancelled_since_scan = False
        gone = [r for r in self._queue if r.future.cancelled() or (r.deadline is not None and now >= r.deadline)]
        if gone:
            ids = {id(r) for r in gone}
            self._queue = [r for r in self._queue if id(r) not in ids]
        self._earliest = min((r.deadline for r in self._queue if r.deadline is not None), default=None)
        return gone

    def _reap(self) -> None:
        """Answers timed-out requests when their time passes, also while the worker runs a batch."""
        while True:
            with self._cv:
                if self._closed and not self._queue:
                    return
                now = time.monotonic()
                expired = self._take_expired(now)
                if not expired:
                    earliest = self._earliest
                    self._cv.wait(max(0.0, earliest - now) if earliest is not None else None)
            self._fail(expired, _timed_out)

    def _start(self, batch: list[_Request]) -> _Launched | None:
        """Fail the batch's late, cancelled and removed requests and launch the rest (None if none is left or the
        launch failed: then every request of it has failed)."""
        now = time.monotonic()
        late = [r for r in batch if r.deadline is not None and now >= r.deadline]
        self._fail(late, _timed_out)
        live: list[_Request] = []
        for r in batch:
            if r.deadline is not None and now >= r.deadline:
                continue  # among `late`
            if r.future.set_running_or_notify_cancel():  # False: cancelled by the caller while queued
                live.append(r)
            else:
                self._count(failed=1)
        loaded = set(self.runtime.task_names())
        removed = [r for r in live if r.task not in loaded]
        self._fail(removed, lambda r: TaskRemovedError(f"task {r.task!r} was removed before the request ran"))
        todo = [r for r in live if r.task in loaded]
        for attempt in range(2):
            if not todo:
                return None
            try:
                started = time.monotonic()
                prepared = [r.prepared for r in todo]
                if self._shape is None:
                    pending = self.runtime.launch_batch(prepared, packed=self._packed)
                else:
                    pending = self.runtime.launch_batch(prepared, shape=self._shape)
                launched = time.monotonic()
                with self._cv:
                    self._metrics.launch_s.append(launched - started)
                return _Launched(todo, pending, started)
            except UnknownTaskError as e:  # removed between the check and the launch: drop those rows, run the rest
                loaded = set(self.runtime.task_names())
                gone = [r for r in todo if r.task not in loaded]
                if attempt == 1 or not gone:
                    self._fail(todo, _same(e))
                    return None
                self._fail(gone, lambda r: TaskRemovedError(f"task {r.task!r} was removed before it ran"))
                todo = [r for r in todo if r.task in loaded]
            except Exception as e:  # the runtime's own error reaches every request of the batch
                self._fail(todo, _same(e))
                return None
        return None

    def _finish(self, launched: _Launched) -> None:
        try:
            answers, tokens = launched.pending.result()
        except Exception as e:  # an error of the forward itself, surfacing when its outputs are read
            self._fail(launched.todo, _same(e))
            return
        self._succeed(launched.todo, answers, time.monotonic() - launched.started, tokens)

    # ---- ending requests ------------------------------------------------------------------------------------
    def _succeed(self, batch: list[_Request], answers: list[dict[str, Any]], ran_s: float, tokens: int) -> None:
        done = time.monotonic()
        with self._cv:
            m = self._metrics
            m.batches += 1
            m.batch_sizes[len(batch)] = m.batch_sizes.get(len(batch), 0) + 1
            m.real_tokens += sum(r.length for r in batch)
            m.padded_tokens += tokens
            m.succeeded += len(batch)
            m.latencies_s.extend(done - r.arrived for r in batch)
            m.batch_s.append(ran_s)
        for r, answer in zip(batch, answers, strict=True):
            r.future.set_result(answer)

    def _fail(self, requests: list[_Request], error: Callable[[_Request], BaseException]) -> None:
        if not requests:
            return
        self._count(failed=len(requests))
        for r in requests:
            if r.future.cancelled():
                continue
            try:
                if not r.future.running():
                    r.future.set_running_or_notify_cancel()
                r.future.set_exception(error(r))
            except InvalidStateError:  # cancelled by the caller in between: it ends as cancelled
                pass

    def _count(self, failed: int) -> None:
        with self._cv:
            self._metrics.failed += failed


def _is_number(value: Any) -> bool:
    """An int or float, not a bool (a bool is an int to isinstance)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _p99(values: Sequence[float] | deque[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def _same(error: BaseException) -> Callable[[_Request], BaseException]:
    return lambda _r: error


def _timed_out(r: _Request) -> RequestTimeoutError:
    waited = time.monotonic() - r.arrived
    return RequestTimeoutError(f"request for task {r.task!r} timed out after {waited:.3f} s unrun")
