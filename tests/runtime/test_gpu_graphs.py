"""CUDA graphs on the GPU: the graphed forward equals the eager one of the same runtime (several shapes, replays
with new data), follows task adds and removes (in-place writes, table growth, pool compaction), keeps every kind
within DESIGN.md's tolerance of its own model in fp16 and bf16, and works under torch.compile and while another
thread changes the tasks."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from torch import Tensor

import pets_compiler
from pets_compiler.frontend.base import load_base
from pets_compiler.oracle import peft_model
from pets_compiler.runtime.graphs import UNPADDED, CudaGraphs, bucket, pad_inputs
from pets_compiler.runtime.requests import pad

from builders import (
    assert_rows_match_own,
    make_bitfit,
    make_peft_lora,
    make_sparse_finetune,
    mixed_rows,
    own_models_of,
    own_output,
    rel_err,
)

pytestmark = pytest.mark.gpu
BASE = Path(__file__).parents[1] / "fixtures" / "adapterhub" / "small" / "base"  # all_kinds' base (conftest)
# Graphed vs eager on the same padded shape (the same kernels); vs eager on the unpadded batch (other shapes, so
# other kernels); vs each task's own fp32 model (DESIGN.md).
SAME_SHAPE = {"float32": 1e-6, "float16": 1e-3, "bfloat16": 1e-2}
PADDED = {"float32": 1e-5, "float16": 5e-3, "bfloat16": 2e-2}
OWN = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 2e-2}

Outputs = tuple[Tensor, Tensor]


def graphs_of(runtime: pets_compiler.Runtime) -> CudaGraphs:
    graphs = runtime.executor
    assert isinstance(graphs, CudaGraphs)
    assert graphs.disabled is None, graphs.disabled
    return graphs


def run_both(runtime: pets_compiler.Runtime, rows: list[list[int]], names: list[str]) -> tuple[Outputs, ...]:
    """One batch: (graphed, eager on the padded shape cut to the real rows, eager on the batch as it is)."""
    graphs = graphs_of(runtime)
    ids, mask = pad(rows)
    got = runtime.forward(ids, mask, names)
    graphs_of(runtime)  # the capture did not fail
    slots = torch.tensor([runtime.slot(n) for n in names])
    shape = bucket(*ids.shape, graphs.config, graphs.max_positions)
    assert shape is not None
    with torch.inference_mode():
        logits, emb = graphs.eager(*pad_inputs(ids, mask, slots, shape, graphs.pad_id))
        unpadded = graphs.eager(ids, mask, slots)
    return got, (logits[: len(rows)], emb[: len(rows)]), unpadded


def assert_close(got: Outputs, want: Outputs, tol: float, what: object) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape, (what, g.shape, w.shape)
        err = rel_err(g.float().cpu(), w.float().cpu())
        assert err < tol, (what, err)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_graphed_forward_equals_eager(all_kinds: dict[str, Path], dtype: str) -> None:
    runtime = pets_compiler.compile(BASE, all_kinds, dtype=dtype).to("cuda")
    graphs = graphs_of(runtime)
    tasks = runtime.task_names()
    cases = [(16, 0), (16, 1), (3, 2), (37, 3), (1, 4), (16, 5), (64, 6)]
    buckets = set()
    for n, seed in cases:
        rows, names = mixed_rows(1000, tasks, n, seed=seed)
        got, same, unpadded = run_both(runtime, rows, names)
        assert got[0].is_cuda and got[0].dtype == getattr(torch, dtype)
        assert_close(got, same, SAME_SHAPE[dtype], (n, seed, "same shape"))
        assert_close(got, unpadded, PADDED[dtype], (n, seed, "unpadded"))
        buckets.add(bucket(n, max(len(r) for r in rows), graphs.config, graphs.max_positions))
    assert len(buckets) < len(cases)  # some graphs replayed on new data
    assert graphs.stats.captures == len(buckets) and graphs.stats.replays == len(cases) and graphs.stats.eager == 0
    # Returned outputs are copies: the next replay of the same graph leaves them alone.
    rows, names = mixed_rows(1000, tasks, 16, seed=0)
    first = runtime.forward(*pad(rows), names)
    kept = [t.clone() for t in first]
    rows, names = mixed_rows(1000, tasks, 16, seed=1)
    runtime.forward(*pad(rows), names)
    assert all(torch.equal(a, b) for a, b in zip(first, kept, strict=True))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_graphed_runtime_matches_own_models(all_kinds: dict[str, Path], dtype: str) -> None:
    runtime = pets_compiler.compile(BASE, all_kinds, dtype=dtype).to("cuda")
    own = own_models_of(BASE, all_kinds)
    rows, names = mixed_rows(1000, sorted(all_kinds), 24, seed=9)
    assert set(names) == set(all_kinds)
    logits, emb = runtime.forward(*pad(rows), names)
    assert graphs_of(runtime).stats.replays == 1
    assert_rows_match_own(runtime, own, rows, names, (logits, emb), OWN[dtype])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_batches_without_padding_run_unmasked_as_own_models(all_kinds: dict[str, Path], dtype: str) -> None:
    """Rows of one bucket length replay the unmasked program's graph (cuDNN attention without a mask) and equal
    their own models and the masked program (given the mask on the GPU, which the runtime does not read)."""
    runtime = pets_compiler.compile(BASE, all_kinds, dtype=dtype).to("cuda")
    own = own_models_of(BASE, all_kinds)
    _, names = mixed_rows(1000, sorted(all_kinds), 24, seed=10)
    g = torch.Generator().manual_seed(10)
    rows = [[101, *torch.randint(5, 1000, (30,), generator=g).tolist(), 102] for _ in names]
    ids, mask = pad(rows)
    logits, emb = runtime.forward(ids, None, names)
    graphs = graphs_of(runtime)
    assert graphs.shapes() == [(32, 32, UNPADDED)]
    masked = runtime.forward(ids, mask.cuda(), names)
    assert graphs.shapes() == [(32, 32, UNPADDED), (32, 32)]
    assert_close((logits, emb), masked, PADDED[dtype], "unmasked vs masked program")
    assert_rows_match_own(runtime, own, rows, names, (logits, emb), OWN[dtype])


@pytest.fixture(scope="module")
def lifecycle(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gpu_graphs")
    return {
        "a": make_peft_lora(BASE, root / "a", r=2, alpha=4, targets=["query", "value"], num_labels=3),
        "b": make_bitfit(BASE, root / "b", num_labels=2, seed=1),
        "c": make_peft_lora(BASE, root / "c", r=3, alpha=6, targets=["key"], seed=2),
        "d": make_sparse_finetune(BASE, root / "d", density=0.01, mask=False, seed=4),
        # rank 8 > every rank the tables hold, 4 labels > 3: its add grows the tables
        "big": make_peft_lora(BASE, root / "big", r=8, alpha=8, targets=["query"], num_labels=4, seed=3),
    }


def compile_lifecycle(lifecycle: dict[str, Path], dtype: str) -> pets_compiler.Runtime:
    return pets_compiler.compile(BASE, {k: v for k, v in lifecycle.items() if k != "big"}, dtype=dtype).to("cuda")


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_graphs_follow_task_adds_and_removes(lifecycle: dict[str, Path], dtype: str) -> None:
    runtime = compile_lifecycle(lifecycle, dtype)
    graphs = graphs_of(runtime)
    runtime.tables.compact_threshold = 0  # compact the pools on every removal

    def check(tasks: list[str], seed: int) -> tuple[list[list[int]], list[str], Outputs]:
        rows, names = mixed_rows(1000, tasks, 12, seed=seed)
        got, same, unpadded = run_both(runtime, rows, names)
        assert_close(got, same, SAME_SHAPE[dtype], (tasks, "same shape"))
        assert_close(got, unpadded, PADDED[dtype], (tasks, "unpadded"))
        return rows, names, got

    *_, before = check(["a", "b", "c", "d"], seed=5)
    runtime.remove_task("c")
    runtime.add_task("c2", lifecycle["c"])  # c's slot, written in place: the graph stays and sees it
    *_, after = check(["a", "b", "c2", "d"], seed=5)  # the same rows, c's rows now c2's
    assert graphs.stats.invalidations == 0 and graphs.stats.captures == 1
    assert_close(after, before, SAME_SHAPE[dtype], "c2 = c")

    runtime.add_task("big", lifecycle["big"])  # the tables grow: the graph read the old tensors
    rows, names, (logits, _) = check(["a", "big", "c2"], seed=7)
    assert graphs.stats.invalidations == 1 and graphs.stats.captures == 2
    own = peft_model(load_base(BASE), lifecycle["big"])
    assert "big" in names
    for i, name in enumerate(names):
        if name == "big":
            want, _ = own_output(own, rows[i])
            assert want is not None and rel_err(logits[i, :4].float().cpu(), want) < OWN[dtype]

    runtime.remove_task("big")  # zeroes its slot in place
    runtime.remove_task("d")  # the pools are compacted into new tensors
    check(["a", "b", "c2"], seed=8)
    assert graphs.stats.invalidations == 2 and graphs.stats.captures == 3


def test_compiled_program_replays_in_graphs(all_kinds: dict[str, Path]) -> None:
    runtime = pets_compiler.compile(BASE, all_kinds, dtype="float16").to("cuda", compile=True)
    plain = pets_compiler.compile(BASE, all_kinds, dtype="float16").to("cuda", cuda_graphs=False)
    graphs = graphs_of(runtime)
    for n, seed in [(16, 0), (5, 1), (16, 2)]:
        rows, names = mixed_rows(1000, runtime.task_names(), n, seed=seed)
        ids, mask = pad(rows)
        got = runtime.forward(ids, mask, names)
        assert_close(got, plain.forward(ids, mask, names), OWN["float16"], (n, seed))
    graphs_of(runtime)
    assert graphs.stats.captures == 2 and graphs.stats.replays == 3


def test_serving_while_another_thread_changes_tasks(lifecycle: dict[str, Path]) -> None:
    """RELIABILITY 9 under graphs: rows of tasks left alone keep their outputs while others come and go (the first
    add of `big` grows the tables, so graphs are dropped and captured again mid-serving)."""
    runtime = compile_lifecycle(lifecycle, "float16")
    rows, names = mixed_rows(1000, ["a", "b"], 8, seed=10)
    ids, mask = pad(rows)
    want_logits, want_emb = runtime.forward(ids, mask, names)
    errors: list[BaseException] = []
    stop = threading.Event()
    served = 0

    def serve() -> None:
        nonlocal served
        try:
            while not stop.is_set():
                logits, emb = runtime.forward(ids, mask, names)
                labels = want_logits.shape[1]
                assert_close((logits[:, :labels], emb), (want_logits, want_emb), PADDED["float16"], "a, b")
                assert not logits[:, labels:].any()
                served += 1
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        for _ in range(3):
            runtime.add_task("big", lifecycle["big"])
            runtime.remove_task("big")
            runtime.remove_task("c")
            runtime.add_task("c", lifecycle["c"])
    finally:
        stop.set()
        thread.join()
    assert not errors, errors[0]
    assert served > 0
    logits, emb = runtime.forward(ids, mask, names)
    assert_close((logits[:, : want_logits.shape[1]], emb), (want_logits, want_emb), PADDED["float16"], "after")
    # big's first add grew the tables (a new slot, rank and labels); nothing else reallocated them
    assert graphs_of(runtime).stats.invalidations == 1


def test_graphs_captured_ahead_replay_on_real_batches(all_kinds: dict[str, Path]) -> None:
    """Runtime.capture_graphs on CUDA: graphs captured on pad inputs replay real batches of their buckets, padded
    and packed, with no capture on the way and outputs as the eager forward's."""
    runtime = pets_compiler.compile(BASE, all_kinds, dtype="float16").to("cuda")
    graphs = graphs_of(runtime)
    assert runtime.capture_graphs(rows=[4, 16], seqs=[32]) == [(4, 32), (16, 32)]
    tasks = runtime.task_names()
    for n, seed in [(3, 20), (16, 21)]:
        rows, names = mixed_rows(1000, tasks, n, seed=seed)
        rows = [r[:32] for r in rows]
        got, same, _ = run_both(runtime, rows, names)
        assert_close(got, same, SAME_SHAPE["float16"], (n, seed, "captured ahead"))
    assert graphs.stats.captures == 2 and graphs.stats.replays == 2
    packed = runtime.capture_graphs(rows=[8], seqs=[64], requests_per_row=[1, 2, 4])
    assert packed == [(8, 64, 1), (8, 64, 2), (8, 64, 4)]
    stats = runtime.graph_stats()["packed"]
    assert stats["captures"] == 3 and stats["eager"] == 0
    runtime.capture_on_demand(False)  # a new bucket replays a captured one it fits in, else runs eagerly
    rows, names = mixed_rows(1000, tasks, 7, seed=22)
    got, _, unpadded = run_both(runtime, [r[:20] for r in rows], names)  # (8, 32): into (16, 32)
    assert_close(got, unpadded, PADDED["float16"], "a larger graph while capture on demand is off")
    assert graphs.stats.captures == 2 and graphs.stats.fitted == 1 and graphs.stats.eager == 0
    got, _, unpadded = run_both(runtime, [[101, *r[1:-1] * 3, 102][:40] for r in rows], names)  # (8, 48): none fits
    assert_close(got, unpadded, SAME_SHAPE["float16"], "eager while capture on demand is off")
    assert graphs.stats.captures == 2 and graphs.stats.eager == 1
