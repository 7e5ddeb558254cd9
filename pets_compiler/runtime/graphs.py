"""How the runtime executes its program: op by op (`Eager`), or by replaying captured CUDA graphs (`CudaGraphs`).

Run eagerly, the exported program costs more host time (Python dispatch of hundreds of nodes and task ops) than
the GPU needs for it; a CUDA graph replays the whole forward in one launch. `CudaGraphs` keeps one graph per
padded input shape (batch up to a power of two up to 16 rows, a multiple of 16 above; sequence up to a multiple of
16), least recently used first out.
Padding leaves the real rows' outputs alone: extra columns are masked out of attention and pooling, and extra rows
are one-token rows of slot 0 (the base model) whose outputs are dropped.

A batch whose mask is None (no token is padding) runs the program without attention mask where one is given
(unmasked.py) and its shape needs no column padding: its graph's key ends in UNPADDED.

A graph reads the task tables in place, at the addresses they had when it was captured: writing or clearing a
task's slot needs nothing, since a replay sees what the tables hold then; when TaskTables replaces a tensor (rank,
label or slot growth, pool growth or compaction, a move), its `generation` changes and every graph is dropped and
captured again on demand.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from pets_compiler.runtime.tables import TaskTables

log = logging.getLogger(__name__)

# The program's signature: (input_ids, attention_mask, task_ids, *tables) -> (logits, embedding).
Forward = Callable[..., tuple[Tensor, Tensor]]

# The last entry of the key of a graph of the program without attention mask ([rows, seq] shapes; packed keys end in
# the requests a row, at least 1).
UNPADDED = 0


@dataclass(frozen=True)
class GraphConfig:
    """Which shapes get a graph: batch and sequence within the limits (sequence also within the model's
    positions); larger shapes run eagerly. `warmup` forwards run on the capture stream before each capture."""

    max_batch: int = 256
    max_seq: int = 512
    seq_multiple: int = 16
    batch_multiple: int = 16  # above it, batches pad to a multiple of it (below, to a power of two)
    # batch buckets x sequence buckets of the shapes a server meets: 16 thrashed; with 64, batches of up to 256
    # requests of the batching bench still met new shapes (a 0.4-0.8 s capture each) in timed passes. The graphs
    # share one memory pool: each keeps only its static inputs and outputs.
    max_graphs: int = 256
    # forwards before a capture: the first initialises what a capture cannot (cuBLAS workspaces, lazy modules);
    # each costs an eager forward (tens of ms for bert-base), and a server meets new shapes while it serves
    warmup: int = 1
    # False: a shape without a graph replays the smallest captured graph it fits in, or runs eagerly where none
    # fits, instead of being captured on the request's path (a capture is ~0.1-0.5 s); only
    # Runtime.capture_graphs captures. Runtime.capture_on_demand switches it while serving.
    capture_on_demand: bool = True

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_seq", "seq_multiple", "batch_multiple", "max_graphs", "warmup"):
            if getattr(self, name) < 1:
                raise ValueError(f"GraphConfig.{name} must be at least 1, got {getattr(self, name)}")


def bucket(batch: int, seq: int, config: GraphConfig, max_positions: int) -> tuple[int, int] | None:
    """The padded (batch, seq) whose graph serves a [batch, seq] input, or None if it runs eagerly."""
    seq_limit = min(config.max_seq, max_positions)
    if batch > config.max_batch or seq > seq_limit:
        return None
    padded_batch = 1 << max(batch - 1, 0).bit_length()
    if padded_batch > config.batch_multiple:  # powers of two would pad packed rows (any count) by up to 2x
        padded_batch = -(-batch // config.batch_multiple) * config.batch_multiple
    padded_seq = -(-seq // config.seq_multiple) * config.seq_multiple
    return min(padded_batch, config.max_batch), min(padded_seq, seq_limit)


def pad_inputs(
    ids: Tensor, mask: Tensor, slots: Tensor, shape: tuple[int, ...], pad_id: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Pad a batch to `shape`: new columns are masked `pad_id` tokens; new rows are one unmasked `pad_id` token of
    slot 0 (a fully masked row would be all -inf in attention). Packed batches (mask = segments [rows, K, seq],
    shape (batch, seq, K)): new columns and requests are empty, new rows one one-token request."""
    batch, seq = shape[:2]
    rows, cols = ids.shape
    if (rows, cols, *mask.shape[1:-1]) == (batch, seq, *shape[2:]):
        return ids, mask, slots
    padded_ids = ids.new_full((batch, seq), pad_id)
    padded_ids[:rows, :cols] = ids
    if mask.dim() == 3:
        padded_mask = mask.new_zeros((batch, shape[2], seq))
        padded_mask[:rows, : mask.shape[1], :cols] = mask
        padded_mask[rows:, 0, 0] = 1
    else:
        padded_mask = mask.new_zeros((batch, seq))
        padded_mask[:rows, :cols] = mask
        padded_mask[rows:, 0] = 1
    padded_slots = slots.new_zeros(batch)
    padded_slots[:rows] = slots
    return padded_ids, padded_mask, padded_slots


class Executor(Protocol):
    """Runs the program on (input_ids, attention_mask, task slots) from any device; outputs on the runtime's. A mask
    of None: every token is real (the program without attention mask runs where there is one)."""

    def __call__(self, ids: Tensor, mask: Tensor | None, slots: Tensor) -> tuple[Tensor, Tensor]: ...

    def tokens_run(self, rows: int, seq: int) -> int:
        """The tokens a [rows, seq] input really runs (padding included)."""
        ...


class Eager:
    """The program run op by op, on the tables as they are at each call; `unpadded`, the program without attention
    mask, for calls without a mask."""

    def __init__(self, fn: Forward, tables: TaskTables, device: torch.device, unpadded: Forward | None = None) -> None:
        self.fn, self.tables, self.device, self.unpadded = fn, tables, device, unpadded

    def __call__(self, ids: Tensor, mask: Tensor | None, slots: Tensor) -> tuple[Tensor, Tensor]:
        d = self.device
        fn = self.fn
        if mask is None:
            # `is None`, not `or`: a torch.compile'd module's truth value calls len(), which a GraphModule refuses
            mask, fn = torch.ones_like(ids), self.fn if self.unpadded is None else self.unpadded
        logits, embedding = fn(ids.to(d), mask.to(d), slots.to(d), *self.tables.inputs())
        return logits, embedding

    def tokens_run(self, rows: int, seq: int) -> int:
        return rows * seq


class Graph(Protocol):
    """A captured forward: `replay()` recomputes `outputs` from the tensors it was captured with."""

    @property
    def outputs(self) -> Sequence[Tensor]: ...

    def replay(self) -> None: ...


# (forward, args) -> the forward captured on those args; the args stay the graph's inputs.
Capture = Callable[[Forward, tuple[Tensor, ...]], Graph]


class CaptureError(RuntimeError):
    """The forward ran (warm-up) but could not be captured: an op synchronised with the host, say."""


@dataclass
class _CudaGraph:
    graph: torch.cuda.CUDAGraph
    outputs: tuple[Tensor, ...]

    def replay(self) -> None:
        self.graph.replay()


class CudaCapture:
    """Captures forwards on one CUDA device: warm-up and capture on one side stream (as the torch docs prescribe),
    one memory pool shared by every graph (only one replays at a time, and its outputs are copied out at once)."""

    def __init__(self, device: torch.device, warmup: int) -> None:
        self.device, self.warmup = device, warmup
        self.stream = torch.cuda.Stream(device)
        self.pool = torch.cuda.graph_pool_handle()

    def __call__(self, fn: Forward, args: tuple[Tensor, ...]) -> Graph:
        with torch.cuda.device(self.device):
            current = torch.cuda.current_stream()
            self.stream.wait_stream(current)
            with torch.cuda.stream(self.stream):
                for _ in range(self.warmup):  # lazy initialisation (cuBLAS workspaces, compiled kernels) happens here
                    fn(*args)
            current.wait_stream(self.stream)
            graph = torch.cuda.CUDAGraph()
            # thread_local: another thread's CUDA calls (a server answering other requests) must not break the
            # capture; a synchronising call on this thread still fails it, as it must.
            try:
                with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
                    outputs = fn(*args)
            except Exception as e:
                raise CaptureError(f"{type(e).__name__}: {e}") from e
        return _CudaGraph(graph, tuple(outputs))


@dataclass
class GraphStats:
    captures: int = 0
    replays: int = 0
    # calls served eagerly: shapes past the limits, shapes without a graph while capture on demand is off, or
    # graphs given up
    eager: int = 0
    invalidations: int = 0  # times every graph was dropped because the tables were reallocated
    # calls that replayed a larger captured graph, their own shape without one while capture on demand is off
    fitted: int = 0


@dataclass
class _Entry:
    inputs: tuple[Tensor, Tensor, Tensor]  # static ids, mask (or segments), slots
    graph: Graph


class CudaGraphs:
    """Serves each call by replaying the graph of its padded shape (captured on first use), or eagerly past the
    limits. If a capture fails (CaptureError), graphs are given up for good, with a warning: every later call runs
    eagerly and `disabled` says why. An error of the forward itself (in warm-up) reaches the caller as it would
    eagerly, and graphs stay on. With capture on demand off, a call whose shape has no graph replays the smallest
    captured graph it fits in (padded further), and runs eagerly only where none fits. `unpadded`: the program
    without attention mask, for calls without a mask whose shape needs no padded columns (else they take the masked
    program with an all-ones mask)."""

    def __init__(
        self,
        fn: Forward,
        tables: TaskTables,
        device: torch.device,
        *,
        pad_id: int,
        max_positions: int,
        config: GraphConfig | None = None,
        capture: Capture | None = None,
        unpadded: Forward | None = None,
    ) -> None:
        self.fn, self.tables, self.device, self.unpadded = fn, tables, device, unpadded
        self.pad_id, self.max_positions = pad_id, max_positions
        self.config = config or GraphConfig()
        self.capture = capture or CudaCapture(device, self.config.warmup)
        self.eager = Eager(fn, tables, device, unpadded)
        self.stats = GraphStats()
        self.disabled: str | None = None
        self.capture_on_demand = self.config.capture_on_demand
        self._graphs: OrderedDict[tuple[int, ...], _Entry] = OrderedDict()
        self._generation = tables.generation

    def shapes(self) -> list[tuple[int, ...]]:
        """The keys of the graphs, least recently used first: padded shapes (rows, seq), (rows, seq, UNPADDED) for
        the program without mask, (rows, seq, requests a row) for the packed program."""
        return list(self._graphs)

    def tokens_run(self, rows: int, seq: int) -> int:
        """The tokens of the padded shape whose graph serves [rows, seq] (rows x seq where it runs eagerly)."""
        shape = None if self.disabled else bucket(rows, seq, self.config, self.max_positions)
        return rows * seq if shape is None else shape[0] * shape[1]

    def __call__(self, ids: Tensor, mask: Tensor | None, slots: Tensor) -> tuple[Tensor, Tensor]:
        rows, cols = ids.shape
        given = mask
        if mask is None:
            outputs = self._run_unpadded(ids, slots)
            if outputs is not None:
                return outputs
            mask = torch.ones_like(ids)
        packed = mask.dim() == 3  # segments [rows, K, seq]
        shape = self._shape(rows, cols, mask.shape[1] if packed else None)
        if shape is None:
            self.stats.eager += 1
            return self.eager(ids, given, slots)
        self._follow_tables()
        padded = pad_inputs(ids, mask, slots, shape, self.pad_id)
        entry = self._entry(shape, padded, self.fn)
        if entry is None:
            larger = self._fitting(shape)
            if larger is None:
                self.stats.eager += 1
                return self.eager(ids, given, slots)
            shape, entry = larger, self._graphs[larger]
            self._graphs.move_to_end(shape)
            padded = pad_inputs(ids, mask, slots, shape, self.pad_id)
            self.stats.fitted += 1
        logits, embedding = self._replay(entry, padded)
        if packed:  # [rows * K, ...] of the padded shape

            def real(o: Tensor) -> Tensor:
                return o.unflatten(0, (shape[0], shape[2]))[:rows, : mask.shape[1]].flatten(0, 1).clone()

            return real(logits), real(embedding)
        return logits[:rows].clone(), embedding[:rows].clone()

    def _fitting(self, shape: tuple[int, ...]) -> tuple[int, ...] | None:
        """The captured graph of fewest tokens that a batch of `shape` fits in, padded (rows, columns, and for packed
        batches requests a row, each at least the batch's), or None. A replay of a larger graph costs its extra
        tokens (~0.5 us each for bert-base on the H200); a capture on a request's path 0.1-0.5 s, an eager forward
        of a new shape up to ~1.4 s."""
        fits = [k for k in self._graphs if len(k) == len(shape) and all(a >= b for a, b in zip(k, shape, strict=True))]
        return min(fits, key=lambda k: (k[0] * k[1], k)) if fits else None

    def _run_unpadded(self, ids: Tensor, slots: Tensor) -> tuple[Tensor, Tensor] | None:
        """A call without padding through the unmasked program's graph; None where it takes the masked path: no
        such program, a shape that pads columns or runs eagerly, or no graph while capture on demand is off."""
        shape = self._unpadded_shape(*ids.shape)
        if shape is None:
            return None
        self._follow_tables()
        # new rows are rows of pad tokens, all kept: the unmasked program attends to every token anyway
        padded = pad_inputs(ids, torch.ones_like(ids), slots, shape[:2], self.pad_id)
        assert self.unpadded is not None  # (_unpadded_shape is None without it)
        entry = self._entry(shape, padded, self.unpadded)
        if entry is None:
            return None
        logits, embedding = self._replay(entry, padded)
        return logits[: ids.shape[0]].clone(), embedding[: ids.shape[0]].clone()

    def _entry(self, shape: tuple[int, ...], padded: tuple[Tensor, Tensor, Tensor], fn: Forward) -> _Entry | None:
        """The graph of `shape`, captured now (of `fn` on `padded`) if it has none and capture on demand is on."""
        entry = self._graphs.get(shape)
        if entry is not None:
            self._graphs.move_to_end(shape)
            return entry
        return self._capture(shape, padded, fn) if self.capture_on_demand else None

    def _replay(self, entry: _Entry, padded: tuple[Tensor, Tensor, Tensor]) -> Sequence[Tensor]:
        """The graph's outputs on `padded`: they live in the graphs' shared pool, where the next replay of any graph
        may overwrite them."""
        for static, new in zip(entry.inputs, padded, strict=True):
            # From pinned memory: CUDA may synchronise a copy from pageable memory with its stream (to stage it),
            # i.e. wait for the batch in flight (on the H200, launching a packed batch, whose segments are
            # megabytes, took 13.6 ms of host time at the median against 1.8 for padded batches of 32). The host
            # allocator keeps the pinned block until the copy is done.
            pinned = static.is_cuda and new.device.type == "cpu"
            static.copy_(new.pin_memory() if pinned else new, non_blocking=True)
        entry.graph.replay()
        self.stats.replays += 1
        return entry.graph.outputs

    def has_graph(self, rows: int, seq: int, requests_per_row: int | None = None) -> bool:
        """Whether a [rows, seq] batch (packed: of up to requests_per_row requests a row) would replay a graph
        captured already (the tables unchanged since)."""
        shape = self._shape(rows, seq, requests_per_row)
        return shape is not None and self.tables.generation == self._generation and shape in self._graphs

    def warm(
        self, rows: int, seq: int, requests_per_row: int | None = None, *, unpadded: bool = False
    ) -> tuple[int, ...] | None:
        """Capture, ahead of serving, the graph that [rows, seq] batches (packed: rows of up to `requests_per_row`
        requests; unpadded: batches without padding, through the program without mask) will replay, so that no
        capture falls on a request's path; returns its key (already captured or not), or None where such a batch
        has no graph (runs eagerly, or unpadded: no such program or a seq that pads columns). The capture runs on
        inputs of that shape (pad tokens, slot 0): a graph depends on the shape, not the values."""
        if requests_per_row is not None and requests_per_row < 1:
            raise ValueError(f"requests_per_row must be at least 1, got {requests_per_row}")
        if unpadded and requests_per_row is not None:
            raise ValueError("a packed batch has no unpadded graph: pass requests_per_row or unpadded, not both")
        shape = self._unpadded_shape(rows, seq) if unpadded else self._shape(rows, seq, requests_per_row)
        if shape is None:
            return None
        self._follow_tables()
        if shape in self._graphs:
            return shape
        ids = torch.full(shape[:2], self.pad_id, dtype=torch.long)
        if requests_per_row is None:
            mask = torch.ones(shape[:2], dtype=torch.long)
        else:  # one request filling each row
            mask = torch.zeros(shape[0], shape[2], shape[1], dtype=torch.long)
            mask[:, 0] = 1
        fn = self.unpadded if unpadded and self.unpadded is not None else self.fn  # (shape is None without it)
        entry = self._capture(shape, (ids, mask, torch.zeros(shape[0], dtype=torch.long)), fn)
        return None if entry is None else shape

    def _shape(self, rows: int, seq: int, requests_per_row: int | None) -> tuple[int, ...] | None:
        """The padded shape whose graph serves [rows, seq] (packed: and up to requests_per_row requests a row, to a
        power of two), or None where such a batch runs eagerly."""
        fits = None if self.disabled else bucket(rows, seq, self.config, self.max_positions)
        if fits is None or requests_per_row is None:
            return fits
        return (*fits, 1 << max(requests_per_row - 1, 0).bit_length())

    def _unpadded_shape(self, rows: int, seq: int) -> tuple[int, ...] | None:
        """The key of the unmasked program's graph for [rows, seq] without padding, or None: no such program, or
        seq is not a bucket's length (its columns would be padded), or such a batch runs eagerly."""
        fits = None if self.unpadded is None else self._shape(rows, seq, None)
        return None if fits is None or fits[1] != seq else (*fits, UNPADDED)

    def _follow_tables(self) -> None:
        """Drop every graph if the task tables were reallocated since: they read the old tensors' addresses."""
        if self.tables.generation != self._generation:
            self._graphs.clear()
            self._generation = self.tables.generation
            self.stats.invalidations += 1

    def _capture(self, shape: tuple[int, ...], padded: tuple[Tensor, Tensor, Tensor], fn: Forward) -> _Entry | None:
        while len(self._graphs) >= self.config.max_graphs:
            self._graphs.popitem(last=False)
        inputs = (
            padded[0].to(self.device, copy=True),
            padded[1].to(self.device, copy=True),
            padded[2].to(self.device, copy=True),
        )
        try:
            graph = self.capture(fn, (*inputs, *self.tables.inputs()))
        except CaptureError as e:  # the eager path still serves correctly
            self.disable(f"capturing shape {shape} failed: {e}")
            return None
        self.stats.captures += 1
        entry = _Entry(inputs, graph)
        self._graphs[shape] = entry
        return entry

    def disable(self, reason: str) -> None:
        """Give up graphs (freeing them); later calls run eagerly."""
        self.disabled = reason
        self._graphs.clear()
        log.warning("CUDA graphs disabled, serving eagerly: %s", reason)
