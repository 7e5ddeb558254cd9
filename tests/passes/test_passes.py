"""Each pass structurally (what must and must not be in the graph, a case it leaves unchanged) and numerically."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest
import torch
from torch.fx import GraphModule, Node

import pets_compiler
from bench.kinds import make_kinds
from pets_compiler import passes
from pets_compiler.capture import capture
from pets_compiler.compiler import build_program, plan_sites
from pets_compiler.errors import CompileError
from pets_compiler.frontend.base import BaseModel, load_base
from pets_compiler.frontend.taskset import TaskSpec
from pets_compiler.oracle import merged_model, peft_model
from pets_compiler.passes import CompileContext, SitePlan
from pets_compiler.passes.attach_heads import pool_embedding
from pets_compiler.passes.context import site_output
from pets_compiler.runtime.requests import Prepared, pad

from builders import make_bitfit, make_peft_ia3, make_small_base, mixed_rows, own_output, rel_err

ATEN = torch.ops.aten
PETS = torch.ops.pets
INTERMEDIATE, FFN_OUT = "encoder.layer.{}.intermediate.dense", "encoder.layer.{}.output.dense"


@pytest.fixture(scope="module")
def base(small_base: Path) -> BaseModel:
    return load_base(small_base)


def ops(gm: GraphModule) -> Counter[str]:
    return Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")


def run_until(gm: GraphModule, ctx: CompileContext, last: str) -> None:
    for p in passes.PIPELINE:
        p(gm, ctx)
        if p.__name__ == last:
            return


def table_inputs(ctx: CompileContext, slots: int = 2) -> list[torch.Tensor]:
    """All-zero tables: every slot computes the base model."""
    sizes = {d: (slots if d == "slots" else 1) for t in ctx.tables for d in t.dims if isinstance(d, str)}
    return [
        torch.zeros(
            [sizes[d] if isinstance(d, str) else d for d in t.dims], dtype=torch.long if t.integer else torch.float32
        )
        for t in ctx.tables
    ]


def test_pipeline_order_is_printable() -> None:
    text = passes.describe()
    names = [p.__name__ for p in passes.PIPELINE]
    assert names[0] == "find_sites" and names[-1] == "check_graph"
    assert [line.split(".", 1)[1].split(":")[0].strip() for line in text.splitlines()] == names


def test_find_sites_maps_every_site_and_changes_nothing(base: BaseModel) -> None:
    gm = capture(base)
    before = ops(gm)
    ctx = CompileContext(base, SitePlan(), base.pooling)
    result = passes.find_sites(gm, ctx)
    assert result.changed == 0 and ops(gm) == before
    assert set(ctx.linear_nodes) == set(base.sites.linear) and set(ctx.layer_norm_nodes) == set(base.sites.layer_norm)
    node = ctx.linear_nodes["encoder.layer.1.attention.self.query"]
    assert node.target is ATEN.linear.default and node.args[1].target == "encoder.layer.1.attention.self.query.weight"


def test_drop_training_nodes_removes_dropout_and_is_idempotent(base: BaseModel) -> None:
    gm = capture(base)
    ctx = CompileContext(base, SitePlan(), base.pooling)
    assert ops(gm)["aten.dropout.default"] > 0
    first = passes.drop_training_nodes(gm, ctx)
    assert first.changed > 0 and ops(gm)["aten.dropout.default"] == 0
    before = ops(gm)
    assert passes.drop_training_nodes(gm, ctx).changed == 0 and ops(gm) == before


def test_empty_plan_attaches_nothing(base: BaseModel) -> None:
    gm = capture(base)
    ctx = CompileContext(base, SitePlan(), base.pooling)
    run_until(gm, ctx, "fuse_site_ops")
    assert not [k for k in ops(gm) if k.startswith("pets.")]
    assert ops(gm)["aten.layer_norm.default"] == len(base.sites.layer_norm)


def test_attach_and_fuse(base: BaseModel) -> None:
    q = "encoder.layer.0.attention.self.query"
    plan = SitePlan(lora=(q,), bias=(q, "pooler.dense"), layer_norm=("embeddings.LayerNorm",))
    gm = capture(base)
    ctx = CompileContext(base, plan, base.pooling)
    run_until(gm, ctx, "attach_bias_delta")
    counts = ops(gm)
    assert counts["pets.lora_delta.default"] == 1 and counts["pets.bias_delta.default"] == 2
    lora = next(n for n in gm.graph.nodes if n.target is torch.ops.pets.lora_delta.default)
    assert lora.args[0] is ctx.linear_nodes[q] and lora.args[1] is ctx.linear_nodes[q].args[0]
    assert [u.target for u in lora.users] == [torch.ops.pets.bias_delta.default]
    passes.fuse_site_ops(gm, ctx)
    counts = ops(gm)
    assert counts["pets.linear_delta.default"] == 1 and counts["pets.lora_delta.default"] == 0
    assert counts["pets.bias_delta.default"] == 1  # the pooler has no LoRA: nothing to fuse there
    passes.attach_layer_norm_delta(gm, ctx)
    counts = ops(gm)
    assert counts["pets.layer_norm.default"] == 1
    assert counts["aten.layer_norm.default"] == len(base.sites.layer_norm) - 1
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    assert placeholders[:3] == ["input_ids", "attention_mask", "task_ids"]
    assert len(placeholders) == 3 + len(ctx.tables)


def test_attach_sparse_ia3_and_adapters(base: BaseModel) -> None:
    q, ffn_out = "encoder.layer.0.attention.self.query", "encoder.layer.1.output.dense"
    plan = SitePlan(
        sparse=(q, "embeddings.word_embeddings", "embeddings.position_embeddings"),
        ia3_in=(ffn_out,),
        ia3_out=(q,),
        adapter=("encoder.layer.1.output",),
    )
    gm = capture(base)
    ctx = CompileContext(base, plan, base.pooling)
    run_until(gm, ctx, "attach_layer_norm_delta")
    counts = ops(gm)
    assert counts["pets.sparse_delta.default"] == 1 and counts["pets.embedding_delta.default"] == 2
    assert counts["pets.scale.default"] == 2 and counts["pets.adapter.default"] == 1
    assert counts["aten.layer_norm.default"] == len(base.sites.layer_norm) - 1  # the adapter took one over
    # IA3 input scale feeds only its linear; the output scale comes after the sparse delta of the same site.
    scale_in = ctx.linear_nodes[ffn_out].args[0]
    assert scale_in.target is torch.ops.pets.scale.default and list(scale_in.users) == [ctx.linear_nodes[ffn_out]]
    sparse = next(iter(ctx.linear_nodes[q].users))
    assert sparse.target is torch.ops.pets.sparse_delta.default
    assert [u.target for u in sparse.users] == [torch.ops.pets.scale.default]
    # Position embeddings are looked up once for [1, seq]: their delta runs on the batch-expanded lookup.
    pos = ctx.embedding_nodes["embeddings.position_embeddings"]
    (expanded,) = pos.users
    assert expanded.target is torch.ops.aten.expand.default
    assert [u.target for u in expanded.users] == [torch.ops.pets.embedding_delta.default]
    adapter = ctx.layer_norm_nodes["encoder.layer.1.output.LayerNorm"]
    assert adapter.target is torch.ops.pets.adapter.default
    assert adapter.args[0] is ctx.linear_nodes["encoder.layer.1.output.dense"]


def test_adapter_pattern_mismatch_is_named(base: BaseModel) -> None:
    gm = capture(base)
    ctx = CompileContext(base, SitePlan(adapter=("encoder.layer.0.output",)), base.pooling)
    run_until(gm, ctx, "attach_ia3")
    ln = ctx.layer_norm_nodes["encoder.layer.0.output.LayerNorm"]
    ln.args = (ln.args[0].args[1], *ln.args[1:])  # LayerNorm(residual) alone: not the sublayer pattern
    with pytest.raises(RuntimeError, match=r"encoder.layer.0.output: expected LayerNorm\(dense\(x\) \+ residual\)"):
        passes.attach_adapters(gm, ctx)


def test_fuse_activation(base: BaseModel) -> None:
    """BitFit's bias delta before a GELU and IA3's input scale after it become one gelu_delta, each alone too; a
    GELU that another op also reads keeps its scale apart."""
    plan = SitePlan(
        bias=(INTERMEDIATE.format(0), INTERMEDIATE.format(1)),
        ia3_in=(FFN_OUT.format(0), FFN_OUT.format(2)),
        sparse=(FFN_OUT.format(2),),  # reads the GELU's output unscaled
    )
    gm = capture(base)
    ctx = CompileContext(base, plan, base.pooling)
    run_until(gm, ctx, "attach_layer_norm_delta")
    assert ops(gm)["aten.gelu.default"] == 3 and ops(gm)["pets.scale.default"] == 2
    result = passes.fuse_activation(gm, ctx)
    counts = ops(gm)
    assert result.changed == 2 and "2 bias deltas, 1 IA3 scales" in result.detail
    assert counts["pets.gelu_delta.default"] == 2 and counts["aten.gelu.default"] == 1
    assert counts["pets.bias_delta.default"] == 0 and counts["pets.scale.default"] == 1
    fused = {n.args[0]: n for n in gm.graph.nodes if n.target is PETS.gelu_delta.default}
    both = fused[ctx.linear_nodes[INTERMEDIATE.format(0)]]
    _, task_ids, bias, scale, approximate = both.args
    assert task_ids is ctx.task_ids and approximate == "none"
    assert bias.name.endswith("layer_0_intermediate_dense_bias") and scale.name.endswith("layer_0_output_dense_ia3_in")
    assert list(both.users) == [ctx.linear_nodes[FFN_OUT.format(0)]]
    bias_only = fused[ctx.linear_nodes[INTERMEDIATE.format(1)]]
    assert bias_only.args[2] is not None and bias_only.args[3] is None
    assert list(bias_only.users) == [ctx.linear_nodes[FFN_OUT.format(1)]]
    (gelu,) = [n for n in gm.graph.nodes if n.target is ATEN.gelu.default]
    assert gelu.args[0] is ctx.linear_nodes[INTERMEDIATE.format(2)]
    assert {u.target for u in gelu.users} == {PETS.scale.default, PETS.sparse_delta.default}
    assert passes.fuse_activation(gm, ctx).changed == 0 and ops(gm) == counts


def _random_tables(ctx: CompileContext, slots: int = 3) -> list[torch.Tensor]:
    """table_inputs with random float rows in slots 1.. (slot 0 stays zero), and adapters in slots 1 (Pfeiffer: the
    LayerNorm before it, the residual from h, relu) and 2 (Houlsby's: h itself, swish), of bottleneck 1."""
    g = torch.Generator().manual_seed(0)
    tables = table_inputs(ctx, slots)
    for spec, t in zip(ctx.tables, tables, strict=True):
        if t.is_floating_point():
            t[1:] = torch.randn(t[1:].shape, generator=g) * 0.3
        elif spec.kind == "adapter" and spec.field == "config":
            t[1:3] = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 0, 1, 1, 2, 1]])
    return tables


def broadcast_ffn_add(gm: GraphModule, ctx: CompileContext) -> Node:
    """Makes layer 1's residual add after its FFN output an add that broadcasts (the LayerNorm's weight [H] instead
    of the residual), a case the fusing passes must leave alone; returns the add."""
    (add,) = site_output(ctx.linear_nodes[FFN_OUT.format(1)]).users
    weight = next(n for n in gm.graph.nodes if n.target == "encoder.layer.1.output.LayerNorm.weight")
    add.args = (add.args[0], weight)
    return add


def assert_packed_answers_as_padded(runtime: pets_compiler.Runtime) -> None:
    """The packed program answers a mixed batch of the runtime's tasks as the padded one (within 1e-5)."""
    rows, names = mixed_rows(runtime.base.config.vocab_size, runtime.task_names(), 16, seed=7)
    batch = [Prepared(t, r, {}) for t, r in zip(names, rows, strict=True)]
    for got, want in zip(runtime.run_batch(batch, packed=True)[0], runtime.run_prepared(batch), strict=True):
        key = "logits" if "logits" in want else "embedding"
        assert rel_err(torch.tensor(got[key]), torch.tensor(want[key])) < 1e-5, want["task"]


def with_and_without(
    base: BaseModel, plan: SitePlan, skipped: object
) -> tuple[GraphModule, GraphModule, CompileContext]:
    """The program of `plan` through the whole pipeline and through it without the pass `skipped`, and the first's
    context. Both leave out fold_key_terms, the one pass that is exact only up to rounding (it drops a bias softmax
    ignores): whether it applies depends on the passes before it, and the fused programs are compared bitwise."""
    graphs = []
    full = tuple(p for p in passes.PIPELINE if p is not passes.fold_key_terms)
    for pipeline in (full, tuple(p for p in full if p is not skipped)):
        gm = capture(base)
        ctx = CompileContext(base, plan, base.pooling)
        for p in pipeline:
            p(gm, ctx)
        graphs.append((gm, ctx))
    (fused, ctx), (unfused, _) = graphs
    return fused, unfused, ctx


def assert_same_outputs(fused: GraphModule, unfused: GraphModule, ctx: CompileContext) -> None:
    """The two programs answer a mixed batch (a padded row, slot 0 and tasks) bitwise alike, on random tables."""
    ids = torch.randint(5, 1000, (4, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    args = (ids, mask, torch.tensor([0, 1, 2, 1]), *_random_tables(ctx))
    with torch.no_grad():
        for got, want in zip(fused(*args), unfused(*args), strict=True):
            assert torch.equal(got, want)


@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh"])
def test_fuse_activation_changes_no_cpu_result(act: str, tmp_path: Path) -> None:
    """The program with the pass equals the one without it bitwise on the CPU, for both of aten.gelu's forms."""
    base = load_base(make_small_base(tmp_path / "base", hidden_act=act))  # type: ignore[arg-type]
    layers = range(base.config.num_hidden_layers)
    plan = SitePlan(
        bias=tuple(INTERMEDIATE.format(i) for i in layers),
        ia3_in=tuple(FFN_OUT.format(i) for i in layers),
        layer_norm=tuple(base.sites.layer_norm),
    )
    fused, unfused, ctx = with_and_without(base, plan, passes.fuse_activation)
    approximate = "tanh" if act == "gelu_pytorch_tanh" else "none"
    assert [n.args[4] for n in fused.graph.nodes if n.target is PETS.gelu_delta.default] == [approximate] * len(layers)
    assert ops(unfused)["pets.gelu_delta.default"] == 0
    assert_same_outputs(fused, unfused, ctx)


@pytest.fixture(scope="module")
def ffn_sources(small_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ffn_terms")
    ia3_targets = ["key", "value", "output.dense"]
    return {
        "bitfit": make_bitfit(small_base, root / "bitfit", num_labels=2, seed=2),
        "ia3": make_peft_ia3(small_base, root / "ia3", targets=ia3_targets, feedforward=["output.dense"]),
    }


@pytest.mark.parametrize("tasks", [("bitfit",), ("ia3",), ("bitfit", "ia3")], ids=["bitfit", "ia3", "mix"])
def test_bitfit_and_ia3_serve_through_gelu_delta(
    small_base: Path, ffn_sources: dict[str, Path], tasks: tuple[str, ...]
) -> None:
    """Each FFN's GELU and the terms around it are one gelu_delta in the served program, and every row (the base's
    too) still equals its task's own model."""
    sources = {name: ffn_sources[name] for name in tasks} | {"plain": small_base}
    runtime = pets_compiler.compile(small_base, sources)
    nodes = list(runtime.program.graph.nodes)
    fused = [n for n in nodes if n.target is PETS.gelu_delta.default]
    assert len(fused) == runtime.base.config.num_hidden_layers
    assert not [n for n in nodes if n.target is ATEN.gelu.default]
    for n in fused:  # the intermediate linear in, the output linear out: no bias_delta or scale between
        assert n.args[0].target is ATEN.linear.default and [u.target for u in n.users] == [ATEN.linear.default]
        assert (n.args[2] is not None, n.args[3] is not None) == ("bitfit" in tasks, "ia3" in tasks)
    assert_rows_are_own_models(runtime, sources)


def assert_rows_are_own_models(runtime: pets_compiler.Runtime, sources: Mapping[str, Path | TaskSpec]) -> None:
    """Every row of a mixed batch (the base's too) equals its task's own model: peft's for a peft adapter dir, the
    merged HF model otherwise."""
    base = runtime.base
    own = {
        name: peft_model(base, src)
        if isinstance(src, Path) and (src / "adapter_config.json").is_file()
        else merged_model(base, runtime.task(name))
        for name, src in sources.items()
    }
    rows, names = mixed_rows(base.config.vocab_size, sorted(sources), len(sources) + 8, seed=5)
    names[: len(sources)] = sorted(sources)  # every task has a row
    ids, mask = pad(rows)
    logits, embedding = runtime.forward(ids, mask, names)
    for i, name in enumerate(names):
        want_logits, want_emb = own_output(own[name], rows[i])
        head = runtime.task(name).head
        got, want = (embedding[i], want_emb) if head is None else (logits[i, : head.num_labels], want_logits)
        assert want is not None and rel_err(got, want) < 1e-5, (name, i)


SELF_OUT, KEY, QUERY = (f"encoder.layer.{{}}.attention.{m}" for m in ("output.dense", "self.key", "self.query"))


def unfused_row_terms(nodes: Iterable[Node]) -> list[str]:
    """Bias deltas and IA3 scales that still feed a scale or an add: the chains fuse_row_terms fuses."""
    terms, after = (PETS.bias_delta.default, PETS.scale.default), (PETS.scale.default, ATEN.add.Tensor)
    return [n.name for n in nodes if n.target in terms and any(u.target in after for u in n.users)]


def row_delta_terms(nodes: Iterable[Node]) -> Counter[tuple[bool, ...]]:
    """(bias, scale, residual) given, of each row_delta."""
    return Counter(tuple(a is not None for a in n.args[2:]) for n in nodes if n.target is PETS.row_delta.default)


def norm_input_terms(nodes: Iterable[Node]) -> Counter[str]:
    """The input terms each per-task LayerNorm or adapter carries (fuse_norm_inputs): "layer_norm bias+residual",
    "layer_norm residual", "adapter bias", ...; "layer_norm" and "adapter" where they carry none."""

    def given(n: Node, names: dict[int, str]) -> str:
        return "+".join(name for i, name in names.items() if len(n.args) > i and n.args[i] is not None)

    terms = Counter[str]()
    for n in nodes:
        if n.target is PETS.layer_norm.default:
            terms[f"layer_norm {given(n, {7: 'bias', 8: 'residual'})}".strip()] += 1
        elif n.target is PETS.adapter.default:
            terms[f"adapter {given(n, {14: 'bias'})}".strip()] += 1
    return terms


def test_fuse_row_terms(base: BaseModel) -> None:
    """Each chain of a linear site's row terms (and the residual add after them) becomes one row_delta; a term
    alone, the add an adapter took and an add that broadcasts stay as they are; check_graph counts the terms."""
    plan = SitePlan(
        bias=(
            QUERY.format(0),
            KEY.format(0),
            *(SELF_OUT.format(i) for i in (0, 1)),
            FFN_OUT.format(0),
            FFN_OUT.format(1),
        ),
        ia3_out=(KEY.format(0), SELF_OUT.format(1), SELF_OUT.format(2)),
        adapter=("encoder.layer.0.output",),
    )
    gm = capture(base)
    ctx = CompileContext(base, plan, base.pooling)
    run_until(gm, ctx, "fuse_activation")
    add = broadcast_ffn_add(gm, ctx)
    assert len(unfused_row_terms(gm.graph.nodes)) == 6
    result = passes.fuse_row_terms(gm, ctx)
    counts = ops(gm)
    assert result.changed == 4 and "(3 bias deltas, 3 IA3 scales, 3 residual adds)" in result.detail
    assert counts["pets.bias_delta.default"] == 3 and counts["pets.scale.default"] == 0
    fused = {n.args[0]: n for n in gm.graph.nodes if n.target is PETS.row_delta.default}
    site_of = {node: site for site, node in ctx.linear_nodes.items()}
    assert {site_of[y]: tuple(a is not None for a in n.args[2:]) for y, n in fused.items()} == {
        KEY.format(0): (True, True, False),
        SELF_OUT.format(0): (True, False, True),
        SELF_OUT.format(1): (True, True, True),
        SELF_OUT.format(2): (False, True, True),
    }
    # The residual is the attention's input; the sum goes on to the sublayer's LayerNorm.
    row_delta = fused[ctx.linear_nodes[SELF_OUT.format(0)]]
    assert row_delta.args[1] is ctx.task_ids and row_delta.args[4] is ctx.layer_norm_nodes["embeddings.LayerNorm"]
    assert list(row_delta.users) == [ctx.layer_norm_nodes["encoder.layer.0.attention.output.LayerNorm"]]
    assert unfused_row_terms(gm.graph.nodes) == [add.args[0].name]  # the broadcast add's
    assert ctx.layer_norm_nodes["encoder.layer.0.output.LayerNorm"].args[0].target is PETS.bias_delta.default
    assert passes.fuse_row_terms(gm, ctx).changed == 0 and ops(gm) == counts
    passes.attach_heads(gm, ctx)
    passes.check_graph(gm, ctx)


def test_fuse_row_terms_changes_no_cpu_result(base: BaseModel) -> None:
    """The program with the pass equals the one without it bitwise on the CPU (pets::row_delta's CPU kernel does the
    unfused ops' arithmetic), with every linear's bias delta, IA3 output scales and per-task LayerNorms."""
    layers = range(base.config.num_hidden_layers)
    plan = SitePlan(
        bias=tuple(base.sites.linear),
        ia3_out=tuple(s.format(i) for i in layers for s in (KEY, SELF_OUT, FFN_OUT)),
        layer_norm=tuple(base.sites.layer_norm),
    )
    fused, unfused, ctx = with_and_without(base, plan, passes.fuse_row_terms)
    assert row_delta_terms(fused.graph.nodes) == Counter(
        {(True, True, False): len(layers), (True, True, True): 2 * len(layers)}
    )
    assert not unfused_row_terms(fused.graph.nodes) and ops(unfused)["pets.row_delta.default"] == 0
    assert_same_outputs(fused, unfused, ctx)


def out_scaled(nodes: Iterable[Node]) -> dict[Node, tuple[bool, bool]]:
    """(LoRA, bias) given, of each linear_delta carrying an IA3 output scale, by its site's linear node."""
    return {
        n.args[0]: (n.args[3] is not None, n.args[7] is not None)
        for n in nodes
        if n.target is PETS.linear_delta.default and len(n.args) > 8 and n.args[8] is not None
    }


def test_fuse_row_terms_puts_output_scales_into_linear_delta(base: BaseModel) -> None:
    """An IA3 output scale right after a site's LoRA op goes into it (linear_delta's out_scale), with or without a
    bias delta there; one followed by a residual add goes to a row_delta with that add; the CPU results are bitwise
    the unfused program's and check_graph counts the scales."""
    value = "encoder.layer.{}.attention.self.value"
    plan = SitePlan(
        lora=(value.format(0), value.format(1), SELF_OUT.format(0)),
        bias=(value.format(0),),
        ia3_out=(value.format(0), value.format(1), SELF_OUT.format(0)),
    )
    fused, unfused, ctx = with_and_without(base, plan, passes.fuse_row_terms)
    site_of = {node: site for site, node in ctx.linear_nodes.items()}
    assert {site_of[y]: terms for y, terms in out_scaled(fused.graph.nodes).items()} == {
        value.format(0): (True, True),
        value.format(1): (True, False),
    }
    assert ops(fused)["pets.lora_delta.default"] == 1 and ops(fused)["pets.scale.default"] == 0
    assert row_delta_terms(fused.graph.nodes) == Counter({(False, True, True): 1})  # the attention output's
    assert ops(unfused)["pets.scale.default"] == 3 and not out_scaled(unfused.graph.nodes)
    assert_same_outputs(fused, unfused, ctx)


@pytest.fixture(scope="module")
def row_sources(small_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("row_terms")
    # IA3 output scales at key, value and the attention's output dense (the one before a residual add)
    ia3 = make_peft_ia3(small_base, root / "ia3", targets=["key", "value", "attention.output.dense"], feedforward=[])
    return {"bitfit": make_bitfit(small_base, root / "bitfit", num_labels=2, seed=2), "ia3": ia3}


# Of each layer, for the tasks served: the row_deltas by the terms they carry (bias, scale, residual), and the
# per-task LayerNorms by the terms of their input they carry (norm_input_terms).
LAYER_TERMS: dict[tuple[str, ...], tuple[dict[tuple[bool, ...], int], dict[str, int]]] = {
    # both dense outputs' bias delta and residual add, in the LayerNorm after them
    ("bitfit",): ({}, {"layer_norm bias+residual": 2}),
    # the attention's output dense, scaled (no per-task LayerNorm)
    ("ia3",): ({(False, True, True): 1}, {}),
    # key and value, and the attention's output dense, scaled: its LayerNorm takes x as it is; the FFN's output dense
    ("bitfit", "ia3"): (
        {(True, True, False): 2, (True, True, True): 1},
        {"layer_norm": 1, "layer_norm bias+residual": 1},
    ),
}


@pytest.mark.parametrize("tasks", list(LAYER_TERMS), ids=["bitfit", "ia3", "mix"])
def test_bitfit_and_ia3_serve_through_fused_row_terms(
    small_base: Path, row_sources: dict[str, Path], tasks: tuple[str, ...]
) -> None:
    """A linear site's bias delta, IA3 output scale and the residual add after them are one row_delta in the served
    program, or part of the per-task LayerNorm after them where no scale is among them; every row (the base's too)
    still equals its task's own model."""
    sources: dict[str, Path | TaskSpec] = {name: row_sources[name] for name in tasks} | {"plain": small_base}
    runtime = pets_compiler.compile(small_base, sources)
    nodes = list(runtime.program.graph.nodes)
    layers = runtime.base.config.num_hidden_layers
    row_deltas, norms = LAYER_TERMS[tasks]
    assert row_delta_terms(nodes) == Counter({k: v * layers for k, v in row_deltas.items()})
    embeddings = Counter({"layer_norm": 1}) if "bitfit" in tasks else Counter[str]()  # its adds broadcast
    assert norm_input_terms(nodes) == Counter({k: v * layers for k, v in norms.items()}) + embeddings
    assert not unfused_row_terms(nodes)
    assert_rows_are_own_models(runtime, sources)


def test_mix_dense_serves_through_fused_terms(small_base: Path, base: BaseModel) -> None:
    """The benchmark's mix of dense kinds (LoRA, BitFit, Pfeiffer, IA3): the key has no task op left (its bias delta
    dropped, its IA3 scale part of the query's linear_delta), the attention output's bias delta and residual add are
    part of its LayerNorm, the FFN output's bias delta part of the adapter, the value's IA3 scale part of its site's
    linear_delta with its LoRA and bias terms; the packed program alike, where the embeddings' position add is
    elementwise too. Every row still equals its task's own model, packed or not."""
    kind = make_kinds(base, ("mix_dense",))["mix_dense"]
    sources: dict[str, Path | TaskSpec] = {kind.task_name(i): kind.task(i) for i in range(kind.cycle)}
    sources["plain"] = small_base
    runtime = pets_compiler.compile(small_base, sources)
    layers = runtime.base.config.num_hidden_layers
    per_layer = Counter({"layer_norm bias+residual": layers, "adapter bias": layers})
    packed, _, _ = build_program(runtime.base, runtime.info.plan, runtime.info.dtype, packed=True)
    for program, embeddings in [(runtime.program, "layer_norm"), (packed, "layer_norm residual")]:
        nodes = list(program.graph.nodes)
        assert not row_delta_terms(nodes)
        assert norm_input_terms(nodes) == per_layer + Counter({embeddings: 1})
        assert list(out_scaled(nodes).values()) == [(True, True)] * 2 * layers  # query and value
        assert not unfused_row_terms(nodes) and not any(n.target is PETS.scale.default for n in nodes)
    assert_rows_are_own_models(runtime, sources)
    assert_packed_answers_as_padded(runtime)


def test_full_pipeline_with_zero_tables_is_the_base_model(base: BaseModel) -> None:
    """No pass changes what a row of the base computes (the invariant of passes/README.md)."""
    plan = plan_sites(base, [], "all")
    gm = capture(base)
    ctx = CompileContext(base, plan, base.pooling)
    results = passes.run_pipeline(gm, ctx)
    assert [r.name for r in results] == [p.__name__ for p in passes.PIPELINE]
    assert ops(gm)["aten.dropout.default"] == 0 and ops(gm)["aten.layer_norm.default"] == 0
    ids = torch.randint(5, 1000, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    with torch.no_grad():
        logits, emb = gm(ids, mask, torch.tensor([0, 1, 0]), *table_inputs(ctx))
        hidden, pooled = base.build()(input_ids=ids, attention_mask=mask, return_dict=False)[:2]
    want = pool_embedding(hidden, pooled, mask, base.pooling.mode, base.pooling.normalize)
    assert rel_err(emb, want) < 1e-6
    assert logits.shape == (3, 1) and not logits.any()


def test_a_failing_pass_is_named_with_the_passes_before_it(base: BaseModel) -> None:
    gm = capture(base)
    ctx = CompileContext(base, SitePlan(lora=("encoder.layer.0.nonexistent",)), base.pooling)
    before = "find_sites, drop_training_nodes, attention_mask, add_task_ids"
    with pytest.raises(CompileError, match=rf"pass attach_lora failed \(after: {before}\)"):
        passes.run_pipeline(gm, ctx)
