"""Several kinds in one task (issue 3, point 5): peft LoRA with layers_to_transform, rank/alpha patterns,
bias="lora_only" and a head, in one batch with other tasks; each row equals peft's own model."""

from __future__ import annotations

from pathlib import Path

import pytest

import pets_compiler
from pets_compiler.frontend.base import load_base
from pets_compiler.oracle import peft_model
from pets_compiler.runtime.requests import pad

from builders import make_bitfit, make_peft_lora, mixed_rows, own_output, rel_err


def test_combined_peft_options_match_peft(small_base: Path, tmp_path: Path) -> None:
    combo = make_peft_lora(
        small_base,
        tmp_path / "combo",
        r=4,
        alpha=8,
        targets=["query", "value", "dense"],
        num_labels=5,
        bias="lora_only",
        seed=11,
        layers_to_transform=[0, 2],
        rank_pattern={"value": 2},
        alpha_pattern={"query": 3},
    )
    runtime = pets_compiler.compile(
        small_base, {"combo": combo, "bitfit": make_bitfit(small_base, tmp_path / "bf", num_labels=2)}
    )
    spec = runtime.task("combo")
    layers = {site.split(".")[2] for site in spec.sites if site.startswith("encoder.layer.")}
    assert layers == {"0", "2"}  # layers_to_transform
    assert spec.sites["encoder.layer.0.attention.self.value"].lora.rank == 2  # type: ignore[union-attr]
    assert spec.sites["encoder.layer.0.attention.self.query"].lora.scale == pytest.approx(3 / 4)  # type: ignore[union-attr]
    assert spec.sites["encoder.layer.2.attention.self.query"].bias is not None  # bias="lora_only"
    assert spec.kinds() == ["lora", "bias", "head"] and spec.head is not None and spec.head.num_labels == 5
    own = peft_model(load_base(small_base), combo)
    rows, names = mixed_rows(1000, ["combo", "bitfit"], 8, seed=13)
    assert names.count("combo") >= 2
    ids, mask = pad(rows)
    logits, _ = runtime.forward(ids, mask, names)
    for i, name in enumerate(names):
        if name == "combo":
            want, _ = own_output(own, rows[i])
            assert want is not None and rel_err(logits[i], want) < 1e-5
        else:
            assert not logits[i, 2:].any()  # a 2-label head in a batch with a 5-label one: padded columns are 0
