"""fuse_norm_inputs: structurally (which terms move into which LayerNorm or adapter, and the cases it leaves alone)
and numerically (bitwise the program without it, on the CPU). The served programs' structure (padded and packed) is
checked with the other fused terms in test_passes.py."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from test_passes import (
    ATEN,
    FFN_OUT,
    SELF_OUT,
    assert_same_outputs,
    broadcast_ffn_add,
    norm_input_terms,
    ops,
    row_delta_terms,
    run_until,
    with_and_without,
)

from pets_compiler import passes
from pets_compiler.capture import capture
from pets_compiler.frontend.base import BaseModel, load_base
from pets_compiler.passes import CompileContext, SitePlan


@pytest.fixture(scope="module")
def base(small_base: Path) -> BaseModel:
    return load_base(small_base)


def test_fuse_norm_inputs(base: BaseModel) -> None:
    """A row_delta of a bias delta and a residual before a per-task LayerNorm, a residual add alone before one and a
    bias delta before an adapter become arguments of the op after them; a row_delta with an IA3 scale, an add that
    broadcasts and a LayerNorm that is not per-task stay as they are; check_graph counts the terms."""
    plan = SitePlan(
        bias=(SELF_OUT.format(0), SELF_OUT.format(1), FFN_OUT.format(0), FFN_OUT.format(1)),
        ia3_out=(SELF_OUT.format(1),),
        layer_norm=tuple(s for s in base.sites.layer_norm if s != "encoder.layer.2.output.LayerNorm"),
        adapter=("encoder.layer.0.output",),
    )
    gm = capture(base)
    ctx = CompileContext(base, plan, base.pooling)
    run_until(gm, ctx, "fuse_activation")
    broadcast_ffn_add(gm, ctx)
    passes.fuse_row_terms(gm, ctx)
    before = ops(gm)
    result = passes.fuse_norm_inputs(gm, ctx)
    counts = ops(gm)
    assert result.changed == 3 and result.detail == (
        "fused 1 bias deltas and 2 residual adds into 2 LayerNorms, 1 bias deltas into adapters"
    )
    assert norm_input_terms(gm.graph.nodes) == Counter(
        {"layer_norm bias+residual": 1, "layer_norm residual": 1, "adapter bias": 1, "layer_norm": 3}
    )
    assert counts["pets.row_delta.default"] == before["pets.row_delta.default"] - 1 == 1
    assert counts["pets.bias_delta.default"] == before["pets.bias_delta.default"] - 1 == 1  # the broadcast add's
    assert counts["aten.add.Tensor"] == before["aten.add.Tensor"] - 1
    # Layer 0's attention: the dense output, its bias delta table and the attention's input as the residual.
    ln = ctx.layer_norm_nodes["encoder.layer.0.attention.output.LayerNorm"]
    assert ln.args[0] is ctx.linear_nodes[SELF_OUT.format(0)] and ln.args[1] is ctx.task_ids
    assert ln.args[7].name.endswith("layer_0_attention_output_dense_bias")
    assert ln.args[8] is ctx.layer_norm_nodes["embeddings.LayerNorm"]
    adapter = ctx.layer_norm_nodes["encoder.layer.0.output.LayerNorm"]
    assert adapter.args[0] is ctx.linear_nodes[FFN_OUT.format(0)] and adapter.args[1] is ln
    assert adapter.args[14].name.endswith("layer_0_output_dense_bias")
    # Layer 1's attention output is scaled: its row_delta stays. Layer 2's attention: the residual add alone.
    scaled = ctx.layer_norm_nodes["encoder.layer.1.attention.output.LayerNorm"]
    assert len(scaled.args) == 7 and row_delta_terms([scaled.args[0]]) == Counter({(True, True, True): 1})
    plain = ctx.layer_norm_nodes["encoder.layer.2.attention.output.LayerNorm"]
    assert plain.args[0] is ctx.linear_nodes[SELF_OUT.format(2)] and plain.args[7] is None
    assert ctx.layer_norm_nodes["encoder.layer.2.output.LayerNorm"].target is ATEN.layer_norm.default
    assert passes.fuse_norm_inputs(gm, ctx).changed == 0 and ops(gm) == counts
    passes.attach_heads(gm, ctx)
    passes.check_graph(gm, ctx)


def test_fuse_norm_inputs_changes_no_cpu_result(base: BaseModel) -> None:
    """The program with the pass equals the one without it bitwise on the CPU (the ops round each sum as the unfused
    ops did), with every linear's bias delta, per-task LayerNorms and adapters (Pfeiffer's and Houlsby's) at the FFN
    outputs."""
    layers = range(base.config.num_hidden_layers)
    plan = SitePlan(
        bias=tuple(base.sites.linear),
        layer_norm=tuple(base.sites.layer_norm),
        adapter=tuple(f"encoder.layer.{i}.output" for i in layers),
    )
    fused, unfused, ctx = with_and_without(base, plan, passes.fuse_norm_inputs)
    per_layer = {"layer_norm bias+residual": len(layers), "adapter bias": len(layers)}
    assert norm_input_terms(fused.graph.nodes) == Counter(per_layer) + Counter({"layer_norm": 1})
    assert norm_input_terms(unfused.graph.nodes) == Counter({"layer_norm": len(layers) + 1, "adapter": len(layers)})
    assert_same_outputs(fused, unfused, ctx)
