"""CUDA-graph serving, the parts that run without a GPU: shape buckets, padding (real rows unchanged), when the
task tables count as reallocated, and CudaGraphs' bookkeeping (LRU, invalidation, eager fallback) driven by a
stand-in capture that replays like a graph: the args it was captured with, outputs overwritten in place."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import Tensor

import pets_compiler
from pets_compiler.errors import InputError
from pets_compiler.runtime.graphs import (
    UNPADDED,
    CaptureError,
    CudaGraphs,
    Eager,
    Forward,
    GraphConfig,
    bucket,
    pad_inputs,
)
from pets_compiler.runtime.requests import pad
from pets_compiler.runtime.tables import GROWTH, SLOTS

from builders import make_bitfit, make_peft_lora, make_sparse_finetune, mixed_rows, rel_err


@pytest.mark.parametrize(
    ("batch", "seq", "want"),
    [
        ((1, 1), None, (1, 16)),
        ((3, 17), None, (4, 32)),
        ((64, 128), None, (64, 128)),
        ((65, 129), None, (80, 144)),  # above 16 rows: multiples of 16
        ((9, 8), None, (16, 16)),  # up to 16: powers of two
        ((2, 49), 50, (2, 50)),  # the sequence never passes the model's positions
        ((40, 8), None, (48, 16)),  # nor the batch max_batch
        ((49, 8), None, None),
        ((2, 51), 50, None),
    ],
)
def test_bucket(batch: tuple[int, int], seq: int | None, want: tuple[int, int] | None) -> None:
    config = GraphConfig(max_batch=48 if batch[0] in (40, 49) else 256)
    assert bucket(*batch, config, seq or 512) == want


def test_graph_config_refuses_nonpositive_limits() -> None:
    with pytest.raises(ValueError, match="max_graphs must be at least 1"):
        GraphConfig(max_graphs=0)


def test_padding_leaves_real_rows_unchanged(runtime: pets_compiler.Runtime) -> None:
    """Padded columns (masked) and rows (slot 0) do not change the real rows, for the pooler or mean pooling, beyond
    fp32 rounding (DESIGN.md's 1e-5: other shapes take other GEMM kernels; at (16, 64) the real rows moved by
    1.1e-6 on one machine, under 1e-6 on another). Control: unmasking a padded column moves them far beyond it."""
    rows, names = mixed_rows(1000, runtime.task_names(), 5, seed=11)
    ids, mask = pad(rows)
    slots = torch.tensor([runtime.slot(n) for n in names])
    eager = runtime.executor
    assert isinstance(eager, Eager)
    positions = int(runtime.base.config.max_position_embeddings)
    shapes = {bucket(*ids.shape, GraphConfig(), positions), (ids.shape[0] + 3, ids.shape[1] + 1), (16, 64)}
    with torch.inference_mode():
        want = eager(ids, mask, slots)
        for shape in shapes:
            assert shape is not None
            padded = pad_inputs(ids, mask, slots, shape, pad_id=0)
            assert padded[0].shape == padded[1].shape == shape and padded[2].shape == (shape[0],)
            assert torch.equal(padded[1][5:, 0], torch.ones(shape[0] - 5, dtype=torch.long))
            got = eager(*padded)
            for g, w in zip(got, want, strict=True):
                assert torch.isfinite(g).all()
                assert rel_err(g[:5], w) < 1e-5, shape
        leaky = pad_inputs(ids, mask, slots, (ids.shape[0] + 3, ids.shape[1] + 1), pad_id=0)
        leaky[1][:5, -1] = 1  # the real rows attend to a pad token
        assert max(rel_err(g[:5], w) for g, w in zip(eager(*leaky), want, strict=True)) > 1e-3


def test_pad_inputs_returns_a_fitting_batch_as_is() -> None:
    ids, mask = pad([[101, 5, 102], [101, 102]])
    slots = torch.tensor([1, 2])
    padded = pad_inputs(ids, mask, slots, (2, 3), pad_id=0)
    assert all(p is t for p, t in zip(padded, (ids, mask, slots), strict=True))


@pytest.fixture(scope="module")
def sources(small_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("graphs")
    return {
        "a": make_peft_lora(small_base, root / "a", r=2, alpha=4, targets=["query", "value"], num_labels=3),
        "b": make_bitfit(small_base, root / "b", num_labels=2, seed=1),
        "c": make_peft_lora(small_base, root / "c", r=3, alpha=6, targets=["key"], seed=2),
        "d": make_sparse_finetune(small_base, root / "d", density=0.01, mask=False, seed=4),
        # rank 8 > every rank the tables hold: its add grows the LoRA tables
        "big": make_peft_lora(small_base, root / "big", r=8, alpha=8, targets=["query"], num_labels=4, seed=3),
    }


@pytest.fixture()
def small(small_base: Path, sources: dict[str, Path]) -> pets_compiler.Runtime:
    return pets_compiler.compile(small_base, {k: v for k, v in sources.items() if k != "big"})


def test_table_generation_bumps_only_when_a_tensor_is_replaced(
    small: pets_compiler.Runtime, sources: dict[str, Path]
) -> None:
    tables = small.tables
    start, before = tables.generation, tables.inputs()

    def replaced() -> bool:
        return any(new is not old for new, old in zip(tables.inputs(), before, strict=True))

    small.to("cpu")  # already there: nothing moves
    small.remove_task("c")
    small.add_task("c2", sources["c"])  # the freed slot, the same rank: written in place
    small.remove_task("b")
    small.add_task("a2", sources["a"])  # b's slot, within the tables' ranks and labels: in place too
    assert tables.generation == start and not replaced()

    small.add_task("b", sources["b"])  # a new slot past the room of the 4 tasks: the slots grow to GROWTH x 4
    assert tables.generation > start and replaced()
    room, before, start = tables.sizes[SLOTS], tables.inputs(), tables.generation
    assert room - 1 == GROWTH * 4
    for i in range(small.slot("b") + 1, room):
        small.add_task(f"b{i}", sources["b"])  # new slots in the room: written in place
    assert tables.generation == start and not replaced()
    small.add_task("past", sources["b"])  # past the room: every per-slot table grows again
    assert tables.generation > start and replaced() and tables.sizes[SLOTS] - 1 == GROWTH * (room - 1)
    for i in range(small.slot("b") + 1, room):
        small.remove_task(f"b{i}")
    small.remove_task("past")
    before, grown = tables.inputs(), tables.generation
    small.remove_task("b")  # zeroes its slot; the tables keep their size
    assert tables.generation == grown and not replaced()

    small.remove_task("a2")
    small.add_task("big", sources["big"])  # a free slot, but rank 8 > 2 at the query site and 4 labels > 3
    assert small.slot("big") < len(small.task_names()) + 1
    assert tables.generation > grown and replaced()


def test_table_generation_bumps_on_pool_growth_and_compaction(
    small: pets_compiler.Runtime, sources: dict[str, Path]
) -> None:
    tables = small.tables
    tables.compact_threshold = 0  # compact on every removal
    start = tables.generation
    small.remove_task("d")  # its entries are reclaimed: the pools are compacted into new tensors
    assert tables.generation > start
    compacted = tables.generation
    small.add_task("d", sources["d"])  # compaction keeps a pool's size: d fits again
    assert tables.generation == compacted
    small.add_task("d2", sources["d"])  # the pools grow
    assert tables.generation > compacted


class StandInCapture:
    """Captures by running the forward once; replay reruns it on the same args (the tables as they were at
    capture) and writes into the same output tensors, as a CUDA graph does."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.fail = fail
        self.captured: list[tuple[int, ...]] = []

    def __call__(self, fn: Forward, args: tuple[Tensor, ...]) -> StandInGraph:
        if self.fail is not None:
            raise self.fail
        self.captured.append(tuple(args[0].shape))
        return StandInGraph(fn, args)


class StandInGraph:
    def __init__(self, fn: Forward, args: tuple[Tensor, ...]) -> None:
        self.fn, self.args = fn, args
        self.outputs = fn(*args)

    def replay(self) -> None:
        for static, new in zip(self.outputs, self.fn(*self.args), strict=True):
            static.copy_(new)


def use_graphs(
    runtime: pets_compiler.Runtime, capture: StandInCapture, **config: int | bool
) -> tuple[Eager, CudaGraphs]:
    eager = runtime.executor
    assert isinstance(eager, Eager)
    graphs = CudaGraphs(
        eager.fn,
        runtime.tables,
        runtime.device,
        pad_id=0,
        max_positions=int(runtime.base.config.max_position_embeddings),
        config=GraphConfig(**config),
        capture=capture,
        unpadded=eager.unpadded,
    )
    runtime.executor = graphs
    return eager, graphs


def check_against_eager(
    runtime: pets_compiler.Runtime, eager: Eager, tasks: list[str], n: int, seed: int, longest: int | None = None
) -> tuple[Tensor, Tensor]:
    """A mixed batch of n rows (the first `longest` tokens long) through the graphs equals it run eagerly (within
    1e-6); returns the graphed outputs."""
    rows, names = mixed_rows(1000, tasks, n, seed=seed)
    if longest is not None:
        rows[0] = [101, *[7] * (longest - 2), 102]
        assert max(len(r) for r in rows) == longest
    ids, mask = pad(rows)
    graphs = runtime.executor
    got = runtime.forward(ids, mask, names)
    runtime.executor = eager
    want = runtime.forward(ids, mask, names)
    runtime.executor = graphs
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and rel_err(g, w) < 1e-6
    return got


def test_graphs_are_kept_per_bucket_and_evicted_least_recently_used(small: pets_compiler.Runtime) -> None:
    capture = StandInCapture()
    eager, graphs = use_graphs(small, capture, max_batch=8, max_graphs=2)
    tasks = small.task_names()
    check_against_eager(small, eager, tasks, 3, seed=0, longest=24)  # bucket (4, 32)
    check_against_eager(small, eager, tasks, 4, seed=1, longest=30)  # the same bucket: replayed
    assert capture.captured == [(4, 32)] and graphs.stats.replays == 2
    check_against_eager(small, eager, tasks, 7, seed=2, longest=24)  # (8, 32)
    check_against_eager(small, eager, tasks, 3, seed=3, longest=17)  # (4, 32), now the most recent
    check_against_eager(small, eager, tasks, 1, seed=4, longest=10)  # (1, 16) evicts (8, 32)
    assert capture.captured == [(4, 32), (8, 32), (1, 16)] and graphs.shapes() == [(4, 32), (1, 16)]
    check_against_eager(small, eager, tasks, 9, seed=5)  # past max_batch: eager
    check_against_eager(small, eager, tasks, 7, seed=2, longest=24)  # captured again
    assert graphs.stats.eager == 1 and graphs.stats.captures == 4 and graphs.stats.replays == 6
    assert graphs.shapes() == [(1, 16), (8, 32)]


def test_graphs_follow_task_adds_and_removes(small: pets_compiler.Runtime, sources: dict[str, Path]) -> None:
    capture = StandInCapture()
    eager, graphs = use_graphs(small, capture, max_batch=16)
    before = check_against_eager(small, eager, ["a", "b", "c", "d"], 12, seed=5)
    small.remove_task("c")
    small.add_task("c2", sources["c"])  # written in place: the graph sees it at its next replay
    check_against_eager(small, eager, ["a", "c2", "d"], 12, seed=6)
    assert graphs.stats.invalidations == 0 and len(capture.captured) == 1
    small.add_task("big", sources["big"])  # the tables grow: the graphs read old tensors and must go
    check_against_eager(small, eager, ["a", "big", "c2"], 12, seed=7)
    assert graphs.stats.invalidations == 1 and len(capture.captured) == 2
    small.remove_task("big")
    after = check_against_eager(small, eager, ["a", "b", "c2", "d"], 12, seed=5)
    logits0, emb0 = before
    logits1, emb1 = after
    assert rel_err(logits1[:, :3], logits0) < 1e-6 and rel_err(emb1, emb0) < 1e-6


def test_a_failed_capture_falls_back_to_eager_for_good(
    small: pets_compiler.Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    failure = CaptureError("RuntimeError: CUDA error: operation not permitted when stream is capturing")
    eager, graphs = use_graphs(small, StandInCapture(fail=failure))
    with caplog.at_level(logging.WARNING, logger="pets_compiler.runtime.graphs"):
        check_against_eager(small, eager, small.task_names(), 5, seed=8)
    assert graphs.disabled is not None and "operation not permitted when stream is capturing" in graphs.disabled
    assert "CUDA graphs disabled" in caplog.text
    check_against_eager(small, eager, small.task_names(), 5, seed=9)
    assert graphs.stats.eager == 2 and graphs.stats.replays == 0


def test_accelerate_choices_on_cpu(small: pets_compiler.Runtime) -> None:
    module = small.executor
    assert isinstance(module, Eager)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device; this runtime would serve on cpu"):
        small.accelerate(cuda_graphs=True)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        small.to("cpu", cuda_graphs=True)
    with pytest.raises(ValueError, match=r"unknown torch\.compile mode 'fast'"):
        small.accelerate(compile="fast")
    with pytest.raises(ValueError, match="graph_config applies to CUDA graphs"):
        small.accelerate(graph_config=GraphConfig())
    small.accelerate(compile=True)  # wraps the program; compiling waits for the first call
    assert isinstance(small.executor, Eager) and small.executor.fn is not module.fn
    small.accelerate()
    assert isinstance(small.executor, Eager) and small.executor.fn is module.fn


def test_an_error_of_the_forward_itself_reaches_the_caller_and_keeps_graphs(small: pets_compiler.Runtime) -> None:
    _, graphs = use_graphs(small, StandInCapture(fail=ValueError("warm-up failed")))
    ids, mask = pad([[101, 5, 102]])
    with pytest.raises(ValueError, match="warm-up failed"):
        small.forward(ids, mask, ["a"])
    assert graphs.disabled is None


def test_capture_graphs_ahead_of_serving(small: pets_compiler.Runtime) -> None:
    """Runtime.capture_graphs captures each bucket of the given sizes once (sizes past the limits left out), and
    batches of those buckets then replay them: no capture on a request's path, outputs as eager."""
    capture = StandInCapture()
    eager, graphs = use_graphs(small, capture, max_batch=16)
    shapes = small.capture_graphs(rows=[3, 4, 16, 40], seqs=[20, 30])
    assert shapes == [(4, 32), (16, 32)] and capture.captured == [(4, 32), (16, 32)]
    assert small.capture_graphs(rows=[4], seqs=[32]) == [(4, 32)] and len(capture.captured) == 2  # kept
    assert graphs.has_graph(3, 24) and graphs.has_graph(16, 30)
    assert not graphs.has_graph(8, 24) and not graphs.has_graph(40, 24)  # not captured; past max_batch
    tasks = small.task_names()
    check_against_eager(small, eager, tasks, 3, seed=10, longest=24)
    check_against_eager(small, eager, tasks, 13, seed=11, longest=30)
    assert graphs.stats.captures == 2 and graphs.stats.replays == 2


def test_capture_graphs_refusals(small: pets_compiler.Runtime) -> None:
    with pytest.raises(InputError, match="capture_graphs needs CUDA graphs"):
        small.capture_graphs(rows=[4], seqs=[32])
    use_graphs(small, StandInCapture())
    with pytest.raises(InputError, match=r"at least 1, got \[0\], \[32\], \[\]"):
        small.capture_graphs(rows=[0], seqs=[32])
    with pytest.raises(InputError, match="the packed program runs without CUDA graphs"):
        small.capture_graphs(rows=[4], seqs=[32], requests_per_row=[2])


def test_capture_on_demand_off_serves_new_shapes_eagerly(small: pets_compiler.Runtime) -> None:
    """With capture on demand off, a bucket captured ahead replays and a new one runs eagerly (no capture on the
    request's path), with the same outputs; turned back on, the new bucket is captured. GraphConfig sets it too."""
    capture = StandInCapture()
    eager, graphs = use_graphs(small, capture, max_batch=16)
    small.capture_graphs(rows=[4], seqs=[32])
    small.capture_on_demand(False)
    tasks = small.task_names()
    check_against_eager(small, eager, tasks, 3, seed=12, longest=24)  # (4, 32): captured ahead, replayed
    check_against_eager(small, eager, tasks, 9, seed=13, longest=24)  # (16, 32): eager, not captured
    assert capture.captured == [(4, 32)] and graphs.stats.replays == 1 and graphs.stats.eager == 1
    assert small.capture_graphs(rows=[9], seqs=[24]) == [(16, 32)]  # capturing ahead still works while it is off
    small.capture_on_demand(True)
    check_against_eager(small, eager, tasks, 2, seed=14, longest=40)  # (2, 48): captured on demand again
    assert capture.captured == [(4, 32), (16, 32), (2, 48)] and graphs.stats.eager == 1
    small.executor = eager
    _, off = use_graphs(small, StandInCapture(), capture_on_demand=False)
    check_against_eager(small, eager, tasks, 2, seed=14, longest=40)
    assert off.capture_on_demand is False and off.stats.eager == 1 and off.stats.captures == 0


def test_batches_without_padding_replay_the_unmasked_programs_graph(small: pets_compiler.Runtime) -> None:
    """Rows that all fill a bucket's length replay the unmasked program's graph (key ending in UNPADDED), with
    eager's outputs; rows of one length short of a bucket need padded columns and take the masked graph; with
    capture on demand off and no unmasked graph, the masked graph captured ahead serves (no eager run)."""
    capture = StandInCapture()
    eager, graphs = use_graphs(small, capture, max_batch=16)
    tasks = small.task_names()

    def batch(n: int, length: int, seed: int) -> tuple[torch.Tensor, list[str]]:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(5, 1000, (n, length), generator=g)
        return ids, [tasks[int(i)] for i in torch.randint(0, len(tasks), (n,), generator=g)]

    def check(ids: torch.Tensor, names: list[str]) -> None:
        got = small.forward(ids, None, names)
        small.executor = eager
        want = small.forward(ids, torch.ones_like(ids), names)
        small.executor = graphs
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape and rel_err(g, w) < 1e-6

    check(*batch(3, 32, seed=30))  # (4, 32): a new row of pad tokens, no padded column
    assert graphs.shapes() == [(4, 32, UNPADDED)] and capture.captured == [(4, 32)]
    check(*batch(4, 30, seed=31))  # 30 pads to 32 columns: the masked program
    assert graphs.shapes() == [(4, 32, UNPADDED), (4, 32)] and graphs.stats.replays == 2
    ids, _ = batch(3, 32, seed=32)
    assert small.forward(ids, torch.ones_like(ids), ["a"] * 3)[0].shape[0] == 3  # a host mask of all ones: the same
    assert graphs.shapes()[-1] == (4, 32, UNPADDED) and graphs.stats.captures == 2
    keys = small.capture_graphs(rows=[8], seqs=[24, 32], unpadded=True)
    assert keys == [(8, 32), (8, 32, UNPADDED)]  # 24 pads its columns: no unmasked graph for it
    assert small.capture_graphs(rows=[16], seqs=[32]) == [(16, 32)]  # the masked program's alone
    small.capture_on_demand(False)
    check(*batch(12, 32, seed=33))
    assert graphs.shapes()[-1] == (16, 32) and graphs.stats.eager == 0 and graphs.stats.captures == 5


def test_capture_on_demand_off_replays_a_larger_captured_graph(small: pets_compiler.Runtime) -> None:
    """With capture on demand off, a batch whose bucket has no graph replays the smallest captured graph it fits
    in (more rows and columns of padding), with eager's outputs; one that fits none runs eagerly."""
    capture = StandInCapture()
    eager, graphs = use_graphs(small, capture, max_batch=16)
    assert small.capture_graphs(rows=[8], seqs=[32]) == [(8, 32)]
    assert small.capture_graphs(rows=[16], seqs=[48]) == [(16, 48)]
    small.capture_on_demand(False)
    tasks = small.task_names()
    check_against_eager(small, eager, tasks, 3, seed=40, longest=24)  # (4, 32): into (8, 32), the smaller of two
    check_against_eager(small, eager, tasks, 9, seed=41, longest=40)  # (16, 48): its own graph
    check_against_eager(small, eager, tasks, 10, seed=42, longest=30)  # (16, 32): into (16, 48)
    assert graphs.stats.fitted == 2 and graphs.stats.eager == 0 and capture.captured == [(8, 32), (16, 48)]
    check_against_eager(small, eager, tasks, 3, seed=43, longest=60)  # (4, 64): none fits (the model's 64 positions)
    assert graphs.stats.eager == 1 and graphs.stats.fitted == 2 and graphs.stats.replays == 3
    assert small.graph_shapes() == {"padded": [(8, 32), (16, 48)]}  # least recently used first
