"""fold_context_scale: structurally (the scale before an attention output linear goes to the value, where it is exact
and only there) and numerically (every row of a runtime with folded tables equals its own model, tasks added after
compile too)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_passes import assert_packed_answers_as_padded, assert_rows_are_own_models, ops, run_until
from torch.fx import GraphModule, Node

import pets_compiler
from bench.kinds import make_kinds
from pets_compiler import passes
from pets_compiler.capture import capture
from pets_compiler.frontend.base import BaseModel, load_base
from pets_compiler.frontend.taskset import TaskSpec
from pets_compiler.passes import CompileContext, SitePlan
from pets_compiler.runtime.tables import TableSpec

from builders import make_peft_ia3

PETS = torch.ops.pets
SELF_OUT, VALUE, FFN_OUT = (
    f"encoder.layer.{{}}.{m}" for m in ("attention.output.dense", "attention.self.value", "output.dense")
)


@pytest.fixture(scope="module")
def base(small_base: Path) -> BaseModel:
    return load_base(small_base)


def reads_scale(gm: GraphModule) -> list[str]:
    """The linears whose input is a pets.scale (an IA3 input scale left as its own op)."""
    linears = [n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default]
    return [str(n.args[1]) for n in linears if n.args[0].target is PETS.scale.default]


def table_specs(gm: GraphModule, ctx: CompileContext) -> dict[Node, TableSpec]:
    """Table input -> spec, checking that the graph's table inputs are ctx.tables in order (FX lower-cases names)."""
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"][3:]
    assert [n.name for n in inputs] == [t.arg_name.lower() for t in ctx.tables]
    return dict(zip(inputs, ctx.tables, strict=True))


def test_fold_context_scale(base: BaseModel) -> None:
    """Layer 0: the input scale merges into the value's planned output scale; layer 1: it moves to the value as a new
    output scale; layer 2: a LoRA op also reads the context unscaled, so its scale stays."""
    plan = SitePlan(
        ia3_in=tuple(SELF_OUT.format(i) for i in range(3)),
        ia3_out=(VALUE.format(0),),
        lora=(SELF_OUT.format(2),),
    )
    gm = capture(base)
    ctx = CompileContext(base, plan, base.pooling)
    run_until(gm, ctx, "attach_ia3")
    assert ops(gm)["pets.scale.default"] == 4 and len(reads_scale(gm)) == 3
    result = passes.fold_context_scale(gm, ctx)
    assert result.changed == 2 and "(1 into an existing one, 1 new)" in result.detail
    assert reads_scale(gm) == ["encoder_layer_2_attention_output_dense_weight"]
    specs = table_specs(gm, ctx)
    assert {(t.site, t.kind, t.fold_in) for t in ctx.tables if t.kind.startswith("ia3")} == {
        (VALUE.format(0), "ia3_out", SELF_OUT.format(0)),
        (VALUE.format(1), "ia3_out", SELF_OUT.format(1)),
        (SELF_OUT.format(2), "ia3_in", None),
    }
    for i in (0, 1):  # the value's output is scaled by its folded table, and only the head split reads it
        (scaled,) = [u for u in ctx.linear_nodes[VALUE.format(i)].users if u.target is PETS.scale.default]
        assert specs[scaled.args[2]].fold_in == SELF_OUT.format(i)
        assert [u.target for u in scaled.users] == [torch.ops.aten.view.default]
        assert ctx.linear_nodes[SELF_OUT.format(i)].args[0].target is torch.ops.aten.reshape.default
    before = ops(gm)
    assert passes.fold_context_scale(gm, ctx).changed == 0 and ops(gm) == before
    for p in passes.PIPELINE[passes.PIPELINE.index(passes.fold_context_scale) + 1 :]:
        p(gm, ctx)  # check_graph counts the merged scale once


def test_fold_context_scale_leaves_other_scales(base: BaseModel) -> None:
    """No task scales an attention context: the FFN output's input scale (after a GELU, no softmax) stays."""
    plan = SitePlan(ia3_in=(FFN_OUT.format(0),), ia3_out=(VALUE.format(0),))
    gm = capture(base)
    ctx = CompileContext(base, plan, base.pooling)
    run_until(gm, ctx, "attach_ia3")
    before, tables = ops(gm), list(ctx.tables)
    result = passes.fold_context_scale(gm, ctx)
    assert result.changed == 0 and ops(gm) == before and ctx.tables == tables
    assert reads_scale(gm) == ["encoder_layer_0_output_dense_weight"]


def test_table_spec_keeps_fold_in() -> None:
    spec = TableSpec("v.ia3_out", "ia3_out", "v", "scale", ("slots", 8), fold_in="o")
    assert TableSpec.from_json(spec.to_json()) == spec
    assert "fold_in" not in TableSpec("v.ia3_out", "ia3_out", "v", "scale", ("slots", 8)).to_json()


@pytest.fixture(scope="module")
def ia3_sources(small_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """peft IA3 tasks: both scales (key, value, both output.dense linears), input scales only, the value's only."""
    root = tmp_path_factory.mktemp("ia3_fold")
    make = make_peft_ia3
    return {
        "ia3": make(small_base, root / "ia3", targets=["key", "value", "output.dense"], feedforward=["output.dense"]),
        "ia3_in": make(small_base, root / "in", targets=["output.dense"], feedforward=["output.dense"], seed=1),
        "ia3_v": make(small_base, root / "v", targets=["value"], feedforward=[], seed=2),
    }


def assert_folded(runtime: pets_compiler.Runtime) -> None:
    """No attention output linear reads an IA3 scale op, and every value's output scale carries its input scale."""
    layers = range(runtime.base.config.num_hidden_layers)
    assert not [t for t in runtime.info.tables if t.kind == "ia3_in" and t.site.endswith("attention.output.dense")]
    folded = {t.site: t.fold_in for t in runtime.info.tables if t.fold_in is not None}
    assert folded == {VALUE.format(i): SELF_OUT.format(i) for i in layers}
    assert not reads_scale(runtime.program.graph_module)


def test_mix_dense_with_ia3_equals_own_models(small_base: Path, base: BaseModel, ia3_sources: dict[str, Path]) -> None:
    """The benchmark's dense mix with a peft IA3 task compiled in, then IA3 tasks with one of the two scales added
    (one into a freed slot): every row equals its own model, padded and packed."""
    kind = make_kinds(base, ("mix_dense",))["mix_dense"]
    sources: dict[str, Path | TaskSpec] = {kind.task_name(i): kind.task(i) for i in range(kind.cycle)}
    sources |= {"ia3": ia3_sources["ia3"], "plain": small_base}
    runtime = pets_compiler.compile(small_base, sources)
    assert_folded(runtime)
    assert_rows_are_own_models(runtime, sources)
    runtime.remove_task(kind.task_name(0))
    for name in ("ia3_in", "ia3_v"):
        runtime.add_task(name, ia3_sources[name])
        sources[name] = ia3_sources[name]
    del sources[kind.task_name(0)]
    assert_rows_are_own_models(runtime, sources)
    # The packed program folds alike (it reads the same tables) and answers as the padded one.
    assert_packed_answers_as_padded(runtime)


def test_value_scale_added_by_the_fold_serves_later_tasks(
    small_base: Path, tmp_path: Path, ia3_sources: dict[str, Path]
) -> None:
    """Compiled with input scales only, the value gets a folded output scale of its own: a task that scales the value
    too is served without recompiling, also after a save and load."""
    runtime = pets_compiler.compile(small_base, {"ia3_in": ia3_sources["ia3_in"], "plain": small_base})
    assert_folded(runtime)
    runtime.add_task("ia3_v", ia3_sources["ia3_v"])
    runtime.save(tmp_path / "artifact")
    loaded = pets_compiler.load(tmp_path / "artifact")
    assert loaded.info.tables == runtime.info.tables
    sources = {name: ia3_sources[name] for name in ("ia3_in", "ia3_v")} | {"plain": small_base}
    assert_rows_are_own_models(loaded, sources)
