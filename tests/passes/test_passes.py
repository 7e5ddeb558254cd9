"""Each pass structurally (what must and must not be in the graph, a case it leaves unchanged) and numerically."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.fx import GraphModule

from pets_compiler import passes
from pets_compiler.capture import capture
from pets_compiler.compiler import plan_sites
from pets_compiler.errors import CompileError
from pets_compiler.frontend.base import BaseModel, load_base
from pets_compiler.passes import CompileContext, SitePlan
from pets_compiler.passes.attach_heads import pool_embedding

from builders import rel_err

ATEN = torch.ops.aten


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
    with pytest.raises(
        CompileError, match=r"pass attach_lora failed \(after: find_sites, drop_training_nodes, add_task_ids\)"
    ):
        passes.run_pipeline(gm, ctx)
