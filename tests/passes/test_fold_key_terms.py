"""fold_key_terms: structurally (the key's row terms leave it, its IA3 scale goes to the query's op, and the cases it
leaves alone) and numerically (the program equals the one without the pass up to rounding, the base's rows bitwise:
the pass drops a bias that softmax ignores, so unlike the fusing passes it is not bitwise)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_passes import KEY, PETS, QUERY, _random_tables, ops

from pets_compiler import passes
from pets_compiler.capture import capture
from pets_compiler.frontend.base import BaseModel, load_base
from pets_compiler.passes import CompileContext, SitePlan
from pets_compiler.passes.context import site_output


@pytest.fixture(scope="module")
def base(small_base: Path) -> BaseModel:
    return load_base(small_base)


def compiled(base: BaseModel, plan: SitePlan, fold: bool) -> tuple[torch.fx.GraphModule, CompileContext]:
    gm = capture(base)
    ctx = CompileContext(base, plan, base.pooling)
    for p in passes.PIPELINE:
        if fold or p is not passes.fold_key_terms:
            p(gm, ctx)
    return gm, ctx


PLAN = SitePlan(
    lora=(QUERY.format(0),),
    bias=(QUERY.format(0), KEY.format(0), QUERY.format(1), KEY.format(1)),
    ia3_out=(KEY.format(0), KEY.format(1)),
)


def test_key_terms_leave_the_key(base: BaseModel) -> None:
    """Layer 0 (query with LoRA and a bias: a linear_delta) takes the key's scale as its out_scale; layer 1 (query
    with a bias alone) a row_delta with it; both keys' bias deltas are dropped and check_graph still passes."""
    gm, ctx = compiled(base, PLAN, fold=True)
    assert ctx.dropped_key_bias == {KEY.format(0), KEY.format(1)}
    tables = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    for layer in (0, 1):
        k = ctx.linear_nodes[KEY.format(layer)]
        assert all(not str(u.target).startswith("pets.") for u in k.users)  # the head split reads the linear
        q_op = site_output(ctx.linear_nodes[QUERY.format(layer)])
        scale_table = tables[f"t_encoder_layer_{layer}_attention_self_key_ia3_out"]
        if layer == 0:
            assert q_op.target is PETS.linear_delta.default and q_op.args[8] is scale_table
        else:
            assert q_op.target is PETS.row_delta.default and q_op.args[3] is scale_table and q_op.args[4] is None
    # the key's bias tables stay inputs, unread
    for layer in (0, 1):
        assert not tables[f"t_encoder_layer_{layer}_attention_self_key_bias"].users
    assert ops(gm)["pets.scale.default"] == 0


def test_cases_left_alone(base: BaseModel) -> None:
    """A key with LoRA (its op is a linear_delta) keeps its terms; an IA3 scale at a key whose query has no task op
    stays at the key (a scale op at the query would cost the pass it saves)."""
    plan = SitePlan(
        lora=(KEY.format(0),),
        bias=(KEY.format(0),),
        ia3_out=(KEY.format(0), KEY.format(1)),
    )
    gm, ctx = compiled(base, plan, fold=True)
    assert not ctx.dropped_key_bias
    assert site_output(ctx.linear_nodes[KEY.format(0)]).target is PETS.linear_delta.default
    assert site_output(ctx.linear_nodes[KEY.format(1)]).target is PETS.scale.default
    assert site_output(ctx.linear_nodes[QUERY.format(1)]) is ctx.linear_nodes[QUERY.format(1)]
    assert passes.fold_key_terms(gm, ctx).changed == 0


def test_outputs_equal_the_unfolded_program(base: BaseModel) -> None:
    """On random tables the folded program answers a mixed batch (a padded row, slot 0 and tasks) as the unfolded
    one up to rounding, and slot 0's row (the base model) bitwise; a bias at the query changes the answers, one at
    the key does not (the control: the tables do reach the program)."""
    folded, ctx = compiled(base, PLAN, fold=True)
    unfolded, _ = compiled(base, PLAN, fold=False)
    ids = torch.randint(5, 1000, (4, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    tables = _random_tables(ctx)
    args = (ids, mask, torch.tensor([0, 1, 2, 1]), *tables)
    with torch.no_grad():
        got, want = folded(*args), unfolded(*args)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
            assert torch.equal(g[0], w[0])
        names = [n.name for n in folded.graph.nodes if n.op == "placeholder"][3:]
        for name, changes in (
            ("t_encoder_layer_0_attention_self_key_bias", False),
            ("t_encoder_layer_0_attention_self_query_bias", True),
        ):
            moved = list(tables)
            i = names.index(name)
            moved[i] = moved[i] + 1.0
            other = unfolded(ids, mask, torch.tensor([0, 1, 2, 1]), *moved)
            assert (not torch.allclose(other[1], want[1], rtol=1e-5, atol=1e-5)) == changes
