"""The one rule: every row of a mixed batch equals its task's own model (peft's model or the merged HF model)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import pets_compiler
from pets_compiler.frontend.base import load_base
from pets_compiler.oracle import merged_model, peft_model
from pets_compiler.runtime.requests import pad

from builders import rel_err

TOL = 1e-5


@pytest.fixture(scope="session")
def runtime(base_dir: Path, task_sources: dict[str, Path]) -> pets_compiler.Runtime:
    return pets_compiler.compile(base_dir, task_sources)


@pytest.fixture(scope="session")
def own_models(base_dir: Path, task_sources: dict[str, Path], runtime: pets_compiler.Runtime) -> dict:
    base = load_base(base_dir)
    return {
        name: peft_model(base, src)
        if (src / "adapter_config.json").is_file()
        else merged_model(base, runtime.task(name))
        for name, src in task_sources.items()
    }


def mixed_rows(vocab: int, tasks: list[str], n: int, seed: int) -> tuple[list[list[int]], list[str]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 24, (n,), generator=g).tolist()
    rows = [[101, *torch.randint(1000, vocab, (length - 2,), generator=g).tolist(), 102] for length in lengths]
    names = [tasks[int(i)] for i in torch.randint(0, len(tasks), (n,), generator=g)]
    return rows, names


def own_output(model: torch.nn.Module, row: list[int]) -> tuple[torch.Tensor | None, torch.Tensor]:
    ids = torch.tensor([row])
    logits, emb = model(ids, torch.ones_like(ids))
    return (None if logits is None else logits[0]), emb[0]


def test_mixed_batch_rows_equal_own_models(runtime: pets_compiler.Runtime, own_models: dict) -> None:
    vocab = runtime.base.config.vocab_size
    rows, names = mixed_rows(min(vocab, 30000), sorted(own_models), 12, seed=0)
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
