"""Padding-free (packed) batches: the packing itself, and the packed program's answers against each task's own
model and against the padded program, for every PET kind, pooling mode and head, eagerly and through graphs."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pets_compiler
from pets_compiler.frontend.base import POOLING_MODES, Pooling, load_base
from pets_compiler.runtime.graphs import CudaGraphs, GraphConfig
from pets_compiler.runtime.packing import first_fit, pack, packed_inputs
from pets_compiler.runtime.requests import Prepared

from builders import (
    make_bitfit,
    make_peft_ia3,
    make_peft_lora,
    make_sparse_finetune,
    mixed_rows,
    own_output,
    rel_err,
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 300), st.sampled_from("abcd")), min_size=1, max_size=60),
    st.integers(1, 256),
)
def test_pack_places_every_request_once_in_rows_of_one_task(reqs: list[tuple[int, str]], row_tokens: int) -> None:
    lengths, tasks = [n for n, _ in reqs], [t for _, t in reqs]
    p = pack(lengths, tasks, row_tokens)
    placed = sorted(i for row in p.rows for i in row)
    assert placed == list(range(len(reqs)))
    assert p.width >= max(lengths)
    for row in p.rows:
        assert row and len({tasks[i] for i in row}) == 1
        assert sum(lengths[i] for i in row) <= p.width
    # never more tokens than padding every request to the longest (one request per row)
    assert p.tokens <= len(reqs) * max(lengths)
    assert p.tokens <= first_fit(lengths, tasks, max(lengths)).tokens


def test_pack_fills_rows() -> None:
    p = pack([64, 64, 32, 32, 100, 28], ["a"] * 6, 128)
    assert p.width == 128 and len(p.rows) == 3 and p.tokens == 384  # 100+28, 64+64, 32+32
    with pytest.raises(ValueError, match="lengths >= 1"):
        pack([3, 0], ["a", "a"])


def test_pack_minimises_the_cost_it_is_given() -> None:
    lengths, tasks = [50] * 4, ["a"] * 4
    plain = pack(lengths, tasks, 128)
    assert (plain.width, len(plain.rows)) == (50, 4)  # 200 tokens, one request a row
    # a graph pads the width to a multiple of 16: 4 x 50 runs 4 x 64 = 256, 2 x 112 runs 224
    graphed = pack(lengths, tasks, 128, cost=lambda rows, width: rows * -(-width // 16) * 16)
    assert (graphed.width, len(graphed.rows)) == (112, 2)


def test_pack_prefers_a_shape_with_a_graph_within_the_slack() -> None:
    """A packing whose shape replays a graph wins over a cheaper one that would capture a new graph, while it runs
    at most CAPTURED_SLACK times the tokens; else the cheapest stays; with no graph at all, the cheapest."""
    lengths, tasks = [50] * 4, ["a"] * 4
    widths = {}
    for w in (50, 64, 100, 128):
        p = first_fit(lengths, tasks, w)
        widths[w] = (len(p.rows), p.width, p.per_row)
    assert widths[50] == (4, 50, 1) and widths[100] == (2, 100, 2) and widths[128] == (2, 128, 2)
    only = lambda shape: lambda rows, width, per_row: (rows, width, per_row) == shape  # noqa: E731
    # cheapest 4 x 50 = 200 tokens; 2 x 128 = 256 is within 2x
    got = pack(lengths, tasks, 128, captured=only(widths[128]))
    assert (len(got.rows), got.width) == (2, 128)
    assert pack(lengths, tasks, 128, captured=only(widths[50])).width == 50  # the cheapest has a graph
    assert pack(lengths, tasks, 128, captured=lambda *shape: False).width == 50  # none has one
    # past the slack: 4 requests of 10 tokens (cheapest: 4 rows of 10, 40 tokens) against a graph of one 128-wide
    # row (128 tokens, more than 2 x 40)
    short = pack([10] * 4, ["a"] * 4, 128, captured=only((1, 128, 4)))
    assert short.width == 10 and len(short.rows) == 4


def test_packed_inputs_mark_each_request() -> None:
    batch = [Prepared("a", [5, 6, 7], {}), Prepared("a", [8, 9], {}), Prepared("b", [4], {})]
    p = first_fit([3, 2, 1], ["a", "a", "b"], 8)
    ids, segments = packed_inputs(batch, p, pad_id=0)
    assert ids.shape == (2, p.width) and segments.shape == (2, 2, p.width)
    for r, members in enumerate(p.rows):
        for k, i in enumerate(members):
            got = ids[r][segments[r, k].bool()].tolist()
            assert got == batch[i].ids
    assert int(segments.sum()) == 6


def answers_close(got: list[dict[str, Any]], want: list[dict[str, Any]], tol: float = 1e-5) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g["task"] == w["task"] and g.get("label") == w.get("label")
        key = "logits" if "logits" in w else "embedding"
        assert rel_err(torch.tensor(g[key]), torch.tensor(w[key])) < tol, (w["task"], key)


def prepared(runtime: pets_compiler.Runtime, n: int, seed: int) -> list[Prepared]:
    rows, names = mixed_rows(1000, runtime.task_names(), n, seed=seed)
    return [Prepared(t, r, {"id": i}) for i, (t, r) in enumerate(zip(names, rows, strict=True))]


def test_packed_answers_equal_own_models(runtime: pets_compiler.Runtime, own_models: dict) -> None:
    """The one rule: every request of a packed batch gets its own task model's output (fp32, 1e-5)."""
    batch = prepared(runtime, 24, seed=3)
    answers, tokens = runtime.run_batch(batch, packed=True)
    assert tokens < len(batch) * max(len(p.ids) for p in batch)  # fewer tokens than the padded batch
    for p, a in zip(batch, answers, strict=True):
        assert a["id"] == p.extra["id"] and a["task"] == p.task
        logits, emb = own_output(own_models[p.task], p.ids)
        if "logits" in a:
            assert logits is not None and rel_err(torch.tensor(a["logits"]), logits) < 1e-5
        else:
            assert rel_err(torch.tensor(a["embedding"]), emb) < 1e-5


def test_packed_answers_equal_padded_ones(runtime: pets_compiler.Runtime) -> None:
    batch = prepared(runtime, 40, seed=4)
    answers_close(runtime.run_batch(batch, packed=True)[0], runtime.run_prepared(batch))
    one = batch[:1]  # a single request: one row, one segment
    answers_close(runtime.run_batch(one, packed=True)[0], runtime.run_prepared(one))


@pytest.fixture(scope="module")
def every_kind(small_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("packed_kinds")
    return {
        "lora": make_peft_lora(small_base, root / "lora", r=3, alpha=6, targets=["query", "value"], num_labels=3),
        "bitfit": make_bitfit(small_base, root / "bitfit", num_labels=2, seed=1),
        "ia3": make_peft_ia3(
            small_base, root / "ia3", targets=["key", "value", "output.dense"], feedforward=["output.dense"], seed=2
        ),
        "diff": make_sparse_finetune(small_base, root / "diff", density=0.02, mask=False, seed=3),
        "mask": make_sparse_finetune(small_base, root / "mask", density=0.05, mask=True, seed=4),
        "plain": small_base,
    }


PAIRS = [("cls", False), ("max", True), ("mean", True), ("mean_sqrt_len", False), ("pooler", False)]


@pytest.mark.parametrize(("mode", "normalize"), PAIRS)
def test_packed_pooling_and_kinds(small_base: Path, every_kind: dict[str, Path], mode: str, normalize: bool) -> None:
    """Every pooling mode (headless tasks) and every PET kind (diff and mask reach the embeddings), packed vs
    padded."""
    assert {m for m, _ in PAIRS} == set(POOLING_MODES)
    base = dataclasses.replace(load_base(small_base), pooling=Pooling(mode, normalize))
    rt = pets_compiler.compile(base, every_kind)
    batch = prepared(rt, 30, seed=5)
    answers_close(rt.run_batch(batch, packed=True)[0], rt.run_prepared(batch))


def test_packed_adapters(tmp_path: Path) -> None:
    """AdapterHub's Pfeiffer and Houlsby adapters (with a LoRA task beside them), packed vs padded."""
    from tests.test_parity_all_kinds import FIXTURES

    base_dir = FIXTURES / "small" / "base"
    sources = {
        "pfeiffer": FIXTURES / "small" / "pfeiffer",
        "houlsby": FIXTURES / "small" / "houlsby",
        "lora": make_peft_lora(base_dir, tmp_path / "lora", r=2, alpha=4, targets=["query"], num_labels=2),
        "plain": base_dir,
    }
    rt = pets_compiler.compile(base_dir, sources)
    batch = prepared(rt, 30, seed=8)
    answers_close(rt.run_batch(batch, packed=True)[0], rt.run_prepared(batch))


def packed_graphs(runtime: pets_compiler.Runtime, eager: Any) -> tuple[CudaGraphs, Any]:
    """CUDA graphs with the stand-in capture (test_graphs.py) over the packed program, installed as the runtime's
    packed executor (restore `eager` after)."""
    from tests.runtime.test_graphs import StandInCapture

    capture = StandInCapture()
    graphs = CudaGraphs(
        eager.fn,
        runtime.tables,
        runtime.device,
        pad_id=0,
        max_positions=int(runtime.base.config.max_position_embeddings),
        config=GraphConfig(),
        capture=capture,
    )
    runtime._packed = graphs
    return graphs, capture


def test_packed_through_graphs_equals_eager(runtime: pets_compiler.Runtime) -> None:
    """Bucketed (rows, width, requests per row) shapes with padded rows, columns and request slots change no
    real answer; the stand-in capture runs the forward as a graph replay would."""
    batch = prepared(runtime, 19, seed=6)
    want = runtime.run_batch(batch, packed=True)[0]
    eager = runtime._packed_executor()
    graphs, _ = packed_graphs(runtime, eager)
    try:
        got = runtime.run_batch(batch, packed=True)[0]
        again = runtime.run_batch(batch, packed=True)[0]  # replayed
    finally:
        runtime._packed = eager
    answers_close(got, want)  # padded widths change float summation orders only
    answers_close(again, want)
    assert graphs.stats.captures == 1 and graphs.stats.replays == 2
    (shape,) = graphs.shapes()
    assert len(shape) == 3 and shape[2] & (shape[2] - 1) == 0  # requests per row: a power of two


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_packed_on_gpu_matches_own_models(small_base: Path, every_kind: dict[str, Path], dtype: str) -> None:
    """On CUDA (graphs on), every request of packed batches against its own model in fp32 (DESIGN.md's
    tolerances), twice (the second replays the captured graph)."""
    from pets_compiler.oracle import merged_model
    from tests.runtime.test_gpu_graphs import OWN  # the GPU tolerances against own models

    rt = pets_compiler.compile(small_base, every_kind, dtype=dtype).to("cuda")
    batch = prepared(rt, 40, seed=7)
    base = load_base(small_base)
    own = {t: merged_model(base, rt.task(t).to(torch.float32)) for t in rt.task_names()}  # fp32, on the CPU
    for _ in range(2):
        answers, _ = rt.run_batch(batch, packed=True)
        for p, a in zip(batch, answers, strict=True):
            logits, emb = own_output(own[p.task], p.ids)
            got, want = (a["logits"], logits) if "logits" in a else (a["embedding"], emb)
            assert want is not None and rel_err(torch.tensor(got), want) < OWN[dtype], p.task


def test_capture_graphs_ahead_of_packed_batches(runtime: pets_compiler.Runtime) -> None:
    """Runtime.capture_graphs with requests_per_row captures the packed program's graph for that bucket; a packed
    batch of that shape then replays it (no capture on its path) and answers as eager."""
    batch = prepared(runtime, 19, seed=8)
    want = runtime.run_batch(batch, packed=True)[0]
    eager = runtime._packed_executor()
    padded = runtime.executor
    try:
        learn, _ = packed_graphs(runtime, eager)  # the batch's bucket, as serving meets it
        runtime.run_batch(batch, packed=True)
        ((rows, seq, per_row),) = learn.shapes()
        graphs, capture = packed_graphs(runtime, eager)
        runtime.executor = learn  # capture_graphs needs graphs on (the padded program's executor)
        shapes = runtime.capture_graphs(rows=[rows], seqs=[seq], requests_per_row=[per_row])
        got = runtime.run_batch(batch, packed=True)[0]
    finally:
        runtime._packed, runtime.executor = eager, padded
    assert shapes == [(rows, seq, per_row)] and len(capture.captured) == 1
    assert graphs.stats.captures == 1 and graphs.stats.replays == 1
    answers_close(got, want)


def test_packed_batch_replays_a_larger_captured_graph(runtime: pets_compiler.Runtime) -> None:
    """With capture on demand off, a packed batch whose bucket has no graph replays a captured one with more rows
    and request slots (padded further), no capture and no eager forward on its path, and answers as eager."""
    batch = prepared(runtime, 19, seed=9)
    want = runtime.run_batch(batch, packed=True)[0]
    eager = runtime._packed_executor()
    padded = runtime.executor
    try:
        learn, _ = packed_graphs(runtime, eager)
        runtime.run_batch(batch, packed=True)
        ((rows, seq, per_row),) = learn.shapes()
        graphs, capture = packed_graphs(runtime, eager)
        runtime.executor = learn  # capture_graphs needs graphs on (the padded program's executor)
        larger = runtime.capture_graphs(rows=[2 * rows], seqs=[seq], requests_per_row=[2 * per_row])
        graphs.capture_on_demand = False
        got = runtime.run_batch(batch, packed=True)[0]
    finally:
        runtime._packed, runtime.executor = eager, padded
    assert larger == [(2 * rows, seq, 2 * per_row)] and len(capture.captured) == 1
    assert graphs.stats.fitted == 1 and graphs.stats.replays == 1 and graphs.stats.eager == 0
    answers_close(got, want)
