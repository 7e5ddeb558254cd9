"""The attention_mask pass: every attention reads one additive mask built once (padded program: the key padding
mask [batch, 1, 1, seq]; packed: the block-diagonal mask as captured), the outputs unchanged; and its check that a
captured mask is the key padding mask, shown to refuse masks that are not."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.fx import GraphModule, symbolic_trace

from pets_compiler.capture import capture
from pets_compiler.frontend.base import BaseModel, load_base
from pets_compiler.passes import CompileContext, SitePlan
from pets_compiler.passes.attention_mask import _is_key_padding, attention_mask

from builders import rel_err

SDPA = torch.ops.aten.scaled_dot_product_attention.default


@pytest.fixture(scope="module")
def base(small_base: Path) -> BaseModel:
    return load_base(small_base)


def masks(gm: GraphModule) -> list[torch.fx.Node]:
    return [n.args[3] if len(n.args) > 3 else n.kwargs["attn_mask"] for n in gm.graph.nodes if n.target is SDPA]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_program_reads_one_additive_key_padding_mask(base: BaseModel, dtype: torch.dtype) -> None:
    gm = capture(base, dtype)
    ids = torch.randint(5, base.config.vocab_size, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 4:], mask[2, 1:] = 0, 0
    with torch.no_grad():
        before = gm(ids, mask)
    assert all(m.meta["val"].dtype == torch.bool for m in masks(gm))
    result = attention_mask(gm, CompileContext(base, SitePlan(), base.pooling))
    assert result.changed == base.config.num_hidden_layers and "key padding" in result.detail
    (shared,) = set(masks(gm))
    with torch.no_grad():
        after = gm(ids, mask)
        got = GraphModule(gm, _output_of(gm, shared))(ids, mask)
    assert got.dtype == dtype and tuple(got.shape) == (3, 1, 1, 9)
    assert torch.equal(got == 0, mask.bool()[:, None, None, :]) and torch.isneginf(got[:, 0, 0][mask == 0]).all()
    for b, a in zip(before, after, strict=True):
        assert rel_err(a.float(), b.float()) < (1e-6 if dtype == torch.float32 else 1e-2)


def test_packed_program_converts_its_mask_once(base: BaseModel) -> None:
    gm = capture(base, torch.float32, packed=True)
    ids = torch.randint(5, base.config.vocab_size, (2, 8))
    segments = torch.zeros(2, 3, 8, dtype=torch.long)
    segments[0, 0, :3], segments[0, 1, 3:7], segments[1, 0, :8] = 1, 1, 1
    with torch.no_grad():
        before = gm(ids, segments)
        (captured,) = set(masks(gm))
        keep = GraphModule(gm, _output_of(gm, captured))(ids, segments)  # the captured boolean mask
    result = attention_mask(gm, CompileContext(base, SitePlan(), base.pooling))
    assert result.changed == base.config.num_hidden_layers and "[rows, 1, seq, seq]" in result.detail
    (shared,) = set(masks(gm))
    with torch.no_grad():
        after = gm(ids, segments)
        got = GraphModule(gm, _output_of(gm, shared))(ids, segments)
    assert got.dtype == torch.float32 and got.shape == keep.shape == (2, 1, 8, 8)
    assert torch.equal(got == 0, keep) and torch.isneginf(got[~keep]).all()
    for b, a in zip(before, after, strict=True):
        assert rel_err(a, b) < 1e-6


def test_key_padding_check_refuses_other_masks() -> None:
    """The check runs the mask's nodes on an example: the key padding mask passes, a query padding mask or a
    causal one (same input, same shape) does not."""

    def key(m: torch.Tensor) -> torch.Tensor:
        return m.bool()[:, None, None, :].expand(m.shape[0], 1, m.shape[1], m.shape[1])

    def query(m: torch.Tensor) -> torch.Tensor:
        return m.bool()[:, None, :, None].expand(m.shape[0], 1, m.shape[1], m.shape[1])

    def causal(m: torch.Tensor) -> torch.Tensor:
        return key(m) & torch.ones_like(key(m)).tril()

    for fn, want in ((key, True), (query, False), (causal, False)):
        gm = symbolic_trace(fn)
        placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
        out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        assert _is_key_padding(out, placeholder) is want, fn.__name__


def _output_of(gm: GraphModule, node: torch.fx.Node) -> torch.fx.Graph:
    """A copy of gm's graph that returns `node` instead."""
    graph = torch.fx.Graph()
    copies: dict[torch.fx.Node, torch.fx.Node] = {}
    graph.graph_copy(gm.graph, copies, return_output_node=False)
    graph.output(copies[node])
    return graph
