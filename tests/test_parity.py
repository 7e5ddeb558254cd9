"""The one rule: every row of a mixed batch equals its task's own model (peft's model or the merged HF model)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import pets_compiler
from pets_compiler.runtime.requests import pad

from builders import mixed_rows, own_output, rel_err

TOL = 1e-5


def test_mixed_batch_rows_equal_own_models(runtime: pets_compiler.Runtime, own_models: dict) -> None:
    vocab = runtime.base.config.vocab_size
    rows, names = mixed_rows(vocab, sorted(own_models), 12, seed=0)
    assert len(set(names)) == 4 and len({len(r) for r in rows}) > 3  # all four tasks, different lengths
    ids, mask = pad(rows)
    logits, embedding = runtime.forward(ids, mask, names)
    for i, (row, name) in enumerate(zip(rows, names, strict=True)):
        want_logits, want_emb = own_output(own_models[name], row)
        head = runtime.task(name).head
        if head is None:
            assert rel_err(embedding[i], want_emb) < TOL, (name, i)
        else:
            assert want_logits is not None
            assert rel_err(logits[i, : head.num_labels], want_logits) < TOL, (name, i)
            assert torch.all(logits[i, head.num_labels :] == 0)


def test_pet_changes_the_output(runtime: pets_compiler.Runtime) -> None:
    """Control: the PET tasks really differ from the base, so the parity check above could fail."""
    rows, _ = mixed_rows(1000, ["x"], 1, seed=3)
    ids, mask = pad(rows)
    _, plain = runtime.forward(ids, mask, ["plain"])
    _, lora = runtime.forward(ids, mask, ["lora_kd"])
    assert rel_err(lora, plain) > 1e-3


def test_run_answers_in_input_order(runtime: pets_compiler.Runtime, own_models: dict) -> None:
    rows, names = mixed_rows(1000, sorted(own_models), 7, seed=4)
    requests = [{"id": i, "task": n, "input_ids": r} for i, (r, n) in enumerate(zip(rows, names, strict=True))]
    answers = runtime.run(requests, batch_size=3)
    assert [a["id"] for a in answers] == list(range(7))
    for a, row in zip(answers, rows, strict=True):
        want_logits, want_emb = own_output(own_models[a["task"]], row)
        if "logits" in a:
            assert want_logits is not None
            assert rel_err(torch.tensor(a["logits"]), want_logits) < TOL
            head = runtime.task(a["task"]).head
            assert head is not None and a["label"] == head.labels[int(want_logits.argmax())]
        else:
            assert rel_err(torch.tensor(a["embedding"]), want_emb) < TOL


def test_saved_artifact_reloads_bitwise(runtime: pets_compiler.Runtime, tmp_path: Path) -> None:
    runtime.save(tmp_path / "art")
    loaded = pets_compiler.load(tmp_path / "art")
    rows, names = mixed_rows(runtime.base.config.vocab_size, runtime.task_names(), 8, seed=5)
    ids, mask = pad(rows)
    for got, want in zip(loaded.forward(ids, mask, names), runtime.forward(ids, mask, names), strict=True):
        assert torch.equal(got, want)


# bf16 keeps 8 mantissa bits to fp16's 11: over 3 layers its rows drift to ~1.1e-2 of the fp32 model.
HALF_TOL = {torch.float16: 1e-2, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_program(
    small_base: Path, tmp_path: Path, dtype: torch.dtype, own_models_small: dict[str, dict]
) -> None:
    """fp16/bf16 artifacts on the CPU: rows near the fp32 own model; a fine-tune can be added after load."""
    sources = {k: v for k, v in own_models_small["sources"].items() if k != "bitfit"}  # type: ignore[union-attr]
    runtime = pets_compiler.compile(small_base, sources, dtype=dtype, sites="all")
    runtime.save(tmp_path / "art")
    runtime = pets_compiler.load(tmp_path / "art")
    runtime.add_task("bitfit", own_models_small["sources"]["bitfit"])  # type: ignore[index]
    rows, names = mixed_rows(1000, sorted(own_models_small["models"]), 10, seed=6)  # type: ignore[arg-type]
    ids, mask = pad(rows)
    logits, embedding = runtime.forward(ids, mask, names)
    assert logits.dtype == dtype
    for i, name in enumerate(names):
        want_logits, want_emb = own_output(own_models_small["models"][name], rows[i])  # type: ignore[index]
        head = runtime.task(name).head
        got, want = (embedding[i], want_emb) if head is None else (logits[i, : head.num_labels], want_logits)
        assert want is not None and rel_err(got.float(), want) < HALF_TOL[dtype], name
