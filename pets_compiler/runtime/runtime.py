"""The multi-task runtime: the exported program, its task tables and the name -> slot registry."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.export import ExportedProgram
from torch.export.passes import move_to_device_pass
from tqdm import tqdm

from pets_compiler.errors import DuplicateTaskError, InputError, UnknownTaskError
from pets_compiler.frontend.base import BaseModel, Pooling
from pets_compiler.frontend.finetune import DEFAULT_MAX_DENSITY
from pets_compiler.frontend.names import check_task_name
from pets_compiler.frontend.sources import load_task_source
from pets_compiler.frontend.taskset import Head, TaskSpec
from pets_compiler.passes.context import SitePlan
from pets_compiler.runtime.graphs import CudaGraphs, Eager, Executor, GraphConfig, pad_inputs
from pets_compiler.runtime.packing import ROW_TOKENS, pack, packed_inputs
from pets_compiler.runtime.requests import Prepared, Tokenizer, answer, pad, prepare
from pets_compiler.runtime.tables import TableSpec, TaskTables
from pets_compiler.runtime.unmasked import without_attention_mask
from pets_compiler.serving.coordinated import CostModel


@dataclass(frozen=True)
class ProgramInfo:
    """What the manifest records about the compiled program."""

    dtype: torch.dtype
    config: dict[str, Any]
    fingerprint: str
    pooling: Pooling
    max_length: int
    plan: SitePlan
    tables: tuple[TableSpec, ...]

    @staticmethod
    def of(base: BaseModel, plan: SitePlan, tables: Sequence[TableSpec], dtype: torch.dtype) -> ProgramInfo:
        return ProgramInfo(
            dtype, base.config.to_dict(), base.fingerprint, base.pooling, base.max_length, plan, tuple(tables)
        )


@dataclass
class _Task:
    spec: TaskSpec
    slot: int


COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")
_GRAPHING_MODES = ("reduce-overhead", "max-autotune")  # torch.compile's own CUDA graphs


def _execution(device: torch.device, cuda_graphs: bool | None, compile: bool | str) -> tuple[bool, str | None]:
    """(use CUDA graphs, torch.compile mode or None), checked: graphs need CUDA and exclude compile modes that
    capture graphs themselves."""
    graphs = device.type == "cuda" if cuda_graphs is None else cuda_graphs
    if graphs and device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device; this runtime would serve on {device}")
    if compile is False:
        return graphs, None
    mode = "default" if compile is True else compile
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown torch.compile mode {mode!r}; use one of {', '.join(COMPILE_MODES)}")
    if graphs and mode in _GRAPHING_MODES:
        raise ValueError(
            f"torch.compile mode {mode!r} captures CUDA graphs itself: with cuda_graphs use 'default' or "
            "'max-autotune-no-cudagraphs', or pass cuda_graphs=False"
        )
    return graphs, mode


class Runtime:
    """Serves mixed batches: every row runs the shared program with its own task's slot in the tables."""

    def __init__(self, program: ExportedProgram, info: ProgramInfo, base: BaseModel) -> None:
        self.program = program  # what serves, on self.device
        self.portable_program = program  # the CPU program artifacts store, whatever device serves
        self.info = info
        self.base = base
        self.tables = TaskTables(list(info.tables), info.dtype)
        self.tokenizer = Tokenizer(base.tokenizer_dir, info.max_length)
        # read once: an attribute of a transformers 5 config costs ~1.7 us (its __getattribute__ hooks), and
        # prepare() reads two a request
        config = base.config
        self._vocab = int(config.vocab_size)
        self._positions = int(config.max_position_embeddings)
        self._pad_id = int(getattr(config, "pad_token_id", None) or 0)
        self.report: list[str] = []
        self.program_sha256: str | None = None  # set once the program is saved or loaded
        self.cost_model: CostModel | None = None  # the coordinated policy's (serving/profile.py), saved with it
        self._module = program.module()
        self._unpadded = without_attention_mask(self._module)  # for batches without padding (unmasked.py)
        self.device = torch.device("cpu")
        self._tasks: dict[str, _Task] = {}
        self._lock = threading.RLock()
        # how forward runs: accelerate()
        self.executor: Executor = Eager(self._module, self.tables, self.device, self._unpadded)
        self._execution: tuple[bool, str | None, GraphConfig | None] = (False, None, None)
        self._packed_program: ExportedProgram | None = None  # the packed program (run_batch), built on first use
        self._packed: Executor | None = None
        self._on_demand: bool | None = None  # capture_on_demand(): None keeps the graph config's choice

    # ---- task registry -------------------------------------------------------------------------------------
    def task_names(self) -> list[str]:
        return sorted(self._tasks)

    def task(self, name: str) -> TaskSpec:
        return self._entry(name).spec

    def slot(self, name: str) -> int:
        return self._entry(name).slot

    def _entry(self, name: str) -> _Task:
        try:
            return self._tasks[name]
        except KeyError:
            loaded = ", ".join(self.task_names()) or "none"
            raise UnknownTaskError(
                f"unknown task {name!r}; loaded tasks: {loaded} (list them with `pets tasks ARTIFACT_DIR list`)"
            ) from None

    def _free_slot(self) -> int:
        used = {t.slot for t in self._tasks.values()}
        return next(s for s in range(1, len(used) + 2) if s not in used)

    def add_task(
        self,
        name: str,
        source: str | Path | TaskSpec,
        *,
        slot: int | None = None,
        max_density: float = DEFAULT_MAX_DENSITY,
    ) -> None:
        """Load, validate and add a task; nothing changes if any check fails. No retrace, no recompile."""
        check_task_name(name)
        with self._lock:
            if name in self._tasks:
                raise DuplicateTaskError(f"task {name!r} is already loaded; remove it first to replace it")
        spec = load_task_source(name, source, self.base, max_density).to(self.info.dtype)
        with self._lock:
            if name in self._tasks:
                raise DuplicateTaskError(f"task {name!r} is already loaded; remove it first to replace it")
            self.tables.check_fits(spec)
            target = slot if slot is not None else self._free_slot()
            if target < 1 or any(t.slot == target for t in self._tasks.values()):
                raise ValueError(f"task {name!r}: slot {target} is not free")
            try:
                self.tables.write(target, spec)
            except BaseException:
                self.tables.clear(target)
                raise
            self._tasks[name] = _Task(spec, target)

    def to(
        self, device: torch.device | str, *, cuda_graphs: bool | None = None, compile: bool | str = False
    ) -> Runtime:
        """Serve on `device` (e.g. "cuda"): the program's weights and constants and the task tables move there;
        `cuda_graphs` and `compile` then choose how forward runs there, as `accelerate` says."""
        target = torch.device(device)
        if target.type == "cuda" and target.index is None:
            # The program's device checks must name the tensors' device exactly: torch.compile's fake tensors
            # tell "cuda" from "cuda:0".
            target = torch.device("cuda", torch.cuda.current_device())
        graphs, mode = _execution(target, cuda_graphs, compile)
        with self._lock:
            self.program = move_to_device_pass(self.program, str(target))
            self._module = self.program.module()
            self._unpadded = without_attention_mask(self._module)
            self.tables.to(target)
            self.device = target
            if self._packed_program is not None:
                self._packed_program = move_to_device_pass(self._packed_program, str(target))
            self._set_executor(graphs, mode, None)
        return self

    def accelerate(
        self, *, cuda_graphs: bool | None = None, compile: bool | str = False, graph_config: GraphConfig | None = None
    ) -> Runtime:
        """Choose how forward runs on this runtime's device; outputs agree either way within float rounding.

        cuda_graphs: replay one captured CUDA graph per padded batch shape (graphs.py); None: on for a CUDA
        device, off elsewhere. compile: torch.compile the program first (True: the default mode, or a mode name
        from COMPILE_MODES); off by default. graph_config: the shapes that get graphs and how many are kept.
        """
        graphs, mode = _execution(self.device, cuda_graphs, compile)
        if graph_config is not None and not graphs:
            raise ValueError("graph_config applies to CUDA graphs, which this call leaves off")
        with self._lock:
            self._set_executor(graphs, mode, graph_config)
        return self

    def _set_executor(self, graphs: bool, mode: str | None, config: GraphConfig | None) -> None:
        self._execution = (graphs, mode, config)
        self.executor = self._executor_of(self._module, self._unpadded)
        self._packed = None if self._packed_program is None else self._executor_of(self._packed_program.module())

    def _executor_of(self, module: torch.nn.Module, unpadded: torch.nn.Module | None = None) -> Executor:
        graphs, mode, config = self._execution
        fn, unpadded_fn = (module, unpadded) if mode is None else _compiled(mode, module, unpadded)
        if not graphs:
            return Eager(fn, self.tables, self.device, unpadded_fn)
        cuda_graphs = CudaGraphs(
            fn,
            self.tables,
            self.device,
            pad_id=self._pad_id,
            max_positions=self._positions,
            config=config,
            unpadded=unpadded_fn,
        )
        if self._on_demand is not None:
            cuda_graphs.capture_on_demand = self._on_demand
        return cuda_graphs

    def capture_on_demand(self, on: bool) -> None:
        """Whether a batch whose padded shape has no CUDA graph captures one first (on, the default) or (off)
        replays the smallest captured graph it fits in, padded further, and runs eagerly only where none fits: a
        server that captured its buckets ahead (capture_graphs) turns it off so that no capture (~0.1-0.5 s) falls on
        a request's path; graph_stats()' `fitted` and `eager` count those batches. Applies to the
        padded and the packed program, now and after accelerate(). Graphs dropped when the task tables are
        reallocated (a larger rank, more slots or pool) are not captured again while it is off: call
        capture_graphs again after such a change."""
        with self._lock:
            self._on_demand = bool(on)
            for executor in self._graph_executors().values():
                executor.capture_on_demand = self._on_demand

    def graph_stats(self) -> dict[str, dict[str, int]]:
        """CUDA graph counts (captures, replays, eager calls, invalidations) of the padded and, once built, the
        packed program; empty where forward runs without graphs."""
        return {k: asdict(e.stats) for k, e in self._graph_executors().items()}

    def graph_shapes(self) -> dict[str, list[tuple[int, ...]]]:
        """The keys of the captured CUDA graphs (graphs.py: padded shapes, (rows, seq, UNPADDED), packed (rows, seq,
        requests a row)) of the padded and, once built, the packed program; empty where forward runs without
        graphs."""
        return {k: e.shapes() for k, e in self._graph_executors().items()}

    def _graph_executors(self) -> dict[str, CudaGraphs]:
        """The padded and (once built) the packed program's executors that run CUDA graphs."""
        executors = {"padded": self.executor, "packed": self._packed}
        return {k: e for k, e in executors.items() if isinstance(e, CudaGraphs)}

    def capture_graphs(
        self,
        rows: Sequence[int],
        seqs: Sequence[int],
        *,
        requests_per_row: Sequence[int] = (),
        unpadded: bool = False,
    ) -> list[tuple[int, ...]]:
        """Capture now the CUDA graphs that batches of these row counts and lengths will replay (each bucket once),
        so that a server meets no capture (~0.1-0.5 s each) while it answers requests. With `requests_per_row`,
        the packed program's graphs for rows holding up to that many requests (the program is built if need be)
        instead of the padded program's; with `unpadded`, also the graphs of batches without padding (the program
        without attention mask, at each seq that is a bucket's length; unmasked.py). Returns the keys of the graphs
        (graphs.py: padded shapes, (rows, seq, UNPADDED), (rows, seq, requests a row)); sizes past the graphs' limits
        run eagerly and are left out. Needs CUDA graphs on (Runtime.to("cuda"))."""
        if any(n < 1 for n in (*rows, *seqs, *requests_per_row)):
            raise InputError(
                f"rows, seqs and requests_per_row must be at least 1, got {list(rows)}, {list(seqs)}, "
                f"{list(requests_per_row)}"
            )
        if not isinstance(self.executor, CudaGraphs):
            raise InputError("capture_graphs needs CUDA graphs: serve on a CUDA device with cuda_graphs on")
        executor = self._packed_executor() if requests_per_row else self.executor
        if not isinstance(executor, CudaGraphs):
            raise InputError("capture_graphs: the packed program runs without CUDA graphs")
        if unpadded and requests_per_row:
            raise InputError(
                "capture_graphs: packed batches have no unpadded graphs; pass requests_per_row or unpadded"
            )
        per_row: Sequence[int | None] = requests_per_row or [None]
        shapes: list[tuple[int, ...]] = []
        with self._lock, torch.inference_mode():
            for n in rows:
                for seq in seqs:
                    for k in per_row:
                        shape = executor.warm(n, seq, k)
                        if shape is not None and shape not in shapes:
                            shapes.append(shape)
                    full = executor.warm(n, seq, unpadded=True) if unpadded else None
                    if full is not None and full not in shapes:
                        shapes.append(full)
        return shapes

    def prepare_packed(self) -> None:
        """Build the packed program now (packed batches build it on first use otherwise: a few seconds)."""
        self._packed_executor()

    def _packed_executor(self) -> Executor:
        """The packed program (capture.py's _PackedBert through the same passes, on the same tables), built on
        first use: a few seconds, like a compile."""
        if self._packed is None:
            from pets_compiler.compiler import build_program  # compiler imports this module

            program, tables, _ = build_program(self.base, self.info.plan, self.info.dtype, packed=True)
            if tuple(tables) != self.info.tables:
                raise RuntimeError("the packed program's task tables differ from the runtime's; recompile the artifact")
            if self.device.type != "cpu":
                program = move_to_device_pass(program, str(self.device))
            self._packed_program = program
            self._packed = self._executor_of(program.module())
        return self._packed

    def remove_task(self, name: str) -> None:
        """Free the task's slot; other tasks' outputs are unchanged."""
        with self._lock:
            entry = self._entry(name)
            self.tables.clear(entry.slot)
            del self._tasks[name]

    # ---- execution ------------------------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None, tasks: Sequence[str]) -> tuple[Tensor, Tensor]:
        """(logits [batch, max labels], embedding [batch, hidden]) for a padded batch, one task name per row. A mask
        of None, or one on the host that keeps every token, runs the program without attention mask (unmasked.py)
        where it can; a mask on the GPU is taken as it is (reading it would wait for the GPU)."""
        if attention_mask is None:  # on the host, where an all-ones mask is read as "no padding"
            attention_mask = torch.ones(input_ids.shape, dtype=torch.long)
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise InputError(
                f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
                "must both be [batch, seq]"
            )
        if input_ids.dtype != torch.long or attention_mask.dtype != torch.long:
            raise InputError(
                f"input_ids and attention_mask must be int64, got {input_ids.dtype} and {attention_mask.dtype}"
            )
        if len(tasks) != input_ids.shape[0]:
            raise InputError(f"{len(tasks)} task names for a batch of {input_ids.shape[0]} rows")
        with self._lock, torch.inference_mode():
            slots = torch.tensor([self._entry(t).slot for t in tasks], dtype=torch.long)
            return self.executor(input_ids, _unless_all_kept(attention_mask), slots)

    def prepare(self, requests: Sequence[Any]) -> list[Prepared]:
        """Check and tokenize requests (every one before any runs); unknown tasks are refused here."""
        prepared = [prepare(i, r, self.tokenizer, self._vocab, self._positions) for i, r in enumerate(requests)]
        for p in prepared:
            self._entry(p.task)
        return prepared

    def run(
        self, requests: Sequence[Mapping[str, Any]], batch_size: int = 32, progress: bool = False
    ) -> list[dict[str, Any]]:
        """Answer `pets run` requests in input order; every request is checked before any runs."""
        if batch_size < 1:
            raise InputError(f"batch_size must be at least 1, got {batch_size}")
        prepared = self.prepare(requests)
        answers: list[dict[str, Any]] = []
        starts = range(0, len(prepared), batch_size)
        for start in tqdm(starts, desc="pets run", unit="batch", disable=not progress or len(starts) < 2):
            answers.extend(self.run_prepared(prepared[start : start + batch_size]))
        return answers

    def run_prepared(self, batch: Sequence[Prepared]) -> list[dict[str, Any]]:
        """One padded batch of checked requests (see prepare), answered in order as `pets run` lines."""
        return self.run_batch(batch)[0]

    def run_batch(
        self, batch: Sequence[Prepared], *, packed: bool = False, shape: tuple[int, int] | None = None
    ) -> tuple[list[dict[str, Any]], int]:
        """(answers in order, tokens run) for checked requests: one padded batch, or (packed) rows of one task
        each holding several requests (packing.py), with no padding beyond the ends of rows. `shape` (rows,
        tokens): pad the batch to exactly that shape (rows of slot 0); with one shape for every batch, a request's
        answer is bitwise the same whichever requests share its batch (the engine's deterministic mode)."""
        return self.launch_batch(batch, packed=packed, shape=shape).result()

    def launch_batch(
        self, batch: Sequence[Prepared], *, packed: bool = False, shape: tuple[int, int] | None = None
    ) -> PendingBatch:
        """run_batch in two halves: this one checks the tasks, builds the inputs and starts the forward (on a GPU
        it returns while the forward runs, its outputs on their way to the host); `result()` waits for them and
        answers. A server prepares its next batch in between."""
        if packed and shape is not None:
            raise InputError("a packed batch has no fixed shape: pass packed or shape, not both")
        if packed:
            return self._launch_packed(batch)
        ids, mask = pad([p.ids for p in batch])
        if shape is not None and (len(batch) > shape[0] or ids.shape[1] > shape[1]):
            raise InputError(f"a batch of {tuple(ids.shape)} does not fit the fixed shape {shape}")
        with self._lock, torch.inference_mode():
            entries = [self._entry(p.task) for p in batch]
            slots = torch.tensor([e.slot for e in entries], dtype=torch.long)
            if shape is not None:  # one program for every batch: never the unmasked one
                ids, mask, slots = pad_inputs(ids, mask, slots, shape, self._pad_id)
            outputs = _to_host_async(*self.executor(ids, mask if shape is not None else _unless_all_kept(mask), slots))
        return PendingBatch(outputs, batch, [e.spec.head for e in entries], range(len(batch)), ids.numel())

    def _launch_packed(self, batch: Sequence[Prepared]) -> PendingBatch:
        executor = self._packed_executor()
        lengths, tasks = [len(p.ids) for p in batch], [p.task for p in batch]
        captured = executor.has_graph if isinstance(executor, CudaGraphs) else None
        packing = pack(lengths, tasks, min(ROW_TOKENS, self._positions), executor.tokens_run, captured)
        ids, segments = packed_inputs(batch, packing, self._pad_id)
        with self._lock, torch.inference_mode():
            entries = [self._entry(p.task) for p in batch]
            slots = torch.tensor([entries[r[0]].slot for r in packing.rows], dtype=torch.long)
            outputs = _to_host_async(*executor(ids, segments, slots))  # [rows * K, ...]
        per_row = packing.per_row
        at = {i: r * per_row + k for r, members in enumerate(packing.rows) for k, i in enumerate(members)}
        heads = [e.spec.head for e in entries]
        return PendingBatch(outputs, batch, heads, [at[i] for i in range(len(batch))], packing.tokens)

    def save(self, directory: str | Path) -> None:
        from pets_compiler.runtime.artifact import save_artifact

        save_artifact(self, Path(directory))


class PendingBatch:
    """A launched batch (Runtime.launch_batch): result() waits for its own outputs only (an event recorded after
    their copy to the host, not the whole device) and answers each request from its output row (`at`), with the
    head its task had at launch."""

    def __init__(
        self,
        outputs: tuple[Tensor, Tensor, torch.cuda.Event | None],
        batch: Sequence[Prepared],
        heads: Sequence[Head | None],
        at: Sequence[int],
        tokens: int,
    ) -> None:
        self._outputs, self._batch, self._heads, self._at, self.tokens = outputs, batch, heads, at, tokens

    def result(self) -> tuple[list[dict[str, Any]], int]:
        logits, embedding, done = self._outputs
        if done is not None:
            done.synchronize()
        # numpy views of the host outputs: a row, slice and argmax of a tensor cost ~6 us a request in dispatch,
        # of an array ~0.7 us
        logits_np, embedding_np = logits.numpy(), embedding.numpy()
        rows = zip(self._batch, self._heads, self._at, strict=True)
        return [_answer(p, head, logits_np[i], embedding_np[i]) for p, head, i in rows], self.tokens


def _unless_all_kept(mask: Tensor) -> Tensor | None:
    """None (every token is real) for a host mask of all ones, else the mask."""
    return None if mask.device.type == "cpu" and bool(mask.all()) else mask


def _compiled(mode: str, module: torch.nn.Module, unpadded: torch.nn.Module | None) -> tuple[Any, Any]:
    """torch.compile of the program and of its unmasked copy (each compiles on its first call)."""
    return torch.compile(module, mode=mode), None if unpadded is None else torch.compile(unpadded, mode=mode)


def _to_host_async(logits: Tensor, embedding: Tensor) -> tuple[Tensor, Tensor, torch.cuda.Event | None]:
    """A batch's outputs as fp32 on the host, each in one copy (answers read them per request: on the GPU each read
    would be a synchronising copy of its own); from a GPU into pinned memory without waiting, with the event that
    marks the copies done."""
    if logits.device.type != "cuda":
        return logits.float(), embedding.float(), None
    host = []
    for t in (logits, embedding):
        buffer = torch.empty(t.shape, dtype=torch.float32, pin_memory=True)
        buffer.copy_(t, non_blocking=True)
        host.append(buffer)
    done = torch.cuda.Event()
    done.record()
    return host[0], host[1], done


def _answer(p: Prepared, head: Head | None, logits: Any, embedding: Any) -> dict[str, Any]:
    if head is None:
        return answer(p, None, (), logits, embedding)
    return answer(p, head.num_labels, head.labels, logits, embedding)
