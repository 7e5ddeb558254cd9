"""capture() keeps the last bases it exported: a second capture of the same base, dtype and program is a copy of the
graph (no torch.export), over the same weights; a pass rewriting one copy leaves the others; anything that changes
the export (weights, config, dtype, packed) is another entry."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import pets_compiler
from pets_compiler import capture as capture_module
from pets_compiler.capture import capture
from pets_compiler.frontend.base import fingerprint, load_base
from pets_compiler.passes import CompileContext, run_pipeline
from pets_compiler.runtime.requests import pad

from builders import make_peft_lora, mixed_rows, rel_err


@pytest.fixture
def exports(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bool]]:
    """An empty cache, and a list that gets an entry per torch.export.export that capture() runs."""
    monkeypatch.setattr(capture_module, "_captured", type(capture_module._captured)())
    calls: list[bool] = []
    real = torch.export.export

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(True)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.export, "export", counted)
    yield calls


def lora(base: Path, out: Path, seed: int) -> Path:
    return make_peft_lora(base, out, r=4, alpha=8, targets=["query", "value"], seed=seed)


def weights(gm: torch.fx.GraphModule) -> dict[str, int]:
    return {name: t.data_ptr() for name, t in gm.state_dict().items()}


def test_a_second_capture_copies_the_graph_over_the_same_weights(small_base: Path, exports: list[bool]) -> None:
    base = load_base(small_base)
    first = capture(base)
    second = capture(base)
    assert len(exports) == 1
    assert first is not second and first.graph is not second.graph
    assert [n.format_node() for n in first.graph.nodes] == [n.format_node() for n in second.graph.nodes]
    assert weights(first) == weights(second)
    ids = torch.tensor([[1, 5, 7, 2]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(first(ids, mask), second(ids, mask), strict=True))


def test_passes_on_one_copy_leave_the_next(small_base: Path, exports: list[bool], tmp_path: Path) -> None:
    base = load_base(small_base)
    pristine = [n.format_node() for n in capture(base).graph.nodes]
    gm = capture(base)
    spec = pets_compiler.compile(
        base, {"t": make_peft_lora(small_base, tmp_path / "t", r=4, alpha=8, targets=["query", "value"])}
    ).task("t")
    run_pipeline(
        gm,
        CompileContext(base=base, plan=pets_compiler.compiler.plan_sites(base, [spec], "used"), pooling=base.pooling),
    )
    assert [n.format_node() for n in gm.graph.nodes] != pristine  # the pipeline rewrote its copy
    assert [n.format_node() for n in capture(base).graph.nodes] == pristine


def test_what_changes_the_export_is_another_entry(small_base: Path, exports: list[bool]) -> None:
    base = load_base(small_base)
    capture(base)
    capture(base, torch.float16)
    capture(base, packed=True)
    state = {k: v.clone() for k, v in base.state_dict.items()}
    name = next(k for k in state if k.endswith("query.weight"))
    state[name][0, 0] += 1.0
    capture(replace(base, state_dict=state, fingerprint=fingerprint(base.config, state)))
    config = base.config.__class__(**{**base.config.to_dict(), "layer_norm_eps": 1e-6})
    capture(replace(base, config=config))
    assert len(exports) == 5
    capture(replace(base, config=config))  # the last two are kept (CAPTURE_CACHE)
    assert len(exports) == 5 and len(capture_module._captured) == capture_module.CAPTURE_CACHE


def test_compiles_from_a_cached_capture_equal_fresh_ones(small_base: Path, exports: list[bool], tmp_path: Path) -> None:
    base = load_base(small_base)
    tasks = {
        "a": lora(small_base, tmp_path / "a", 1),
        "b": lora(small_base, tmp_path / "b", 2),
    }
    first = pets_compiler.compile(base, tasks)
    second = pets_compiler.compile(base, tasks)
    assert len(exports) == 3  # the base captured once, then each compile exports its program
    rows, names = mixed_rows(1000, ["a", "b"], 6, seed=5)
    ids, mask = pad(rows)
    want, got = first.forward(ids, mask, names), second.forward(ids, mask, names)
    assert rel_err(got[1], want[1]) == 0.0
