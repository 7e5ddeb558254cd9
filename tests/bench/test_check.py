"""bench.check: the own model in the runtime's dtype is recorded beside the check, never part of it."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from bench.check import CheckResult, check_rows

IDS, MASK = torch.ones(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.long)
WANT_LOGITS, WANT_EMB = torch.tensor([[2.0, -1.0]]), torch.tensor([[1.0, 2.0, 3.0]])


def own(_: str):  # the fp32 own model of every task
    return lambda ids, mask: (WANT_LOGITS, WANT_EMB)


def own_low(_: str):  # the same in a lower precision: 5% off on the logits, 1% on the embedding
    return lambda ids, mask: (WANT_LOGITS * 1.05, WANT_EMB * 1.01)


def run(logits_factor: float, in_dtype: bool = True) -> CheckResult:
    """The check of two rows (tasks a and b, a head of 2 labels each) whose logits are `logits_factor` times the
    own model's and whose embeddings are the own model's."""
    spec = lambda _: SimpleNamespace(head=SimpleNamespace(num_labels=2))  # noqa: E731
    logits, embedding = WANT_LOGITS.repeat(2, 1) * logits_factor, WANT_EMB.repeat(2, 1)
    return check_rows(
        logits, embedding, IDS, MASK, ["a", "b"], [0, 1], own=own, spec=spec, tolerance=1e-2,
        own_in_dtype=own_low if in_dtype else None,
    )  # fmt: skip


def test_own_dtype_error_is_recorded_but_not_checked() -> None:
    got = run(1.0).to_json()
    assert got["passed"] and got["max_rel_err"] == 0.0
    for row in got["rows"]:
        assert abs(row["own_dtype_err_logits"] - 0.05) < 1e-6  # max |diff| 0.1 / max |want| 2
        assert abs(row["own_dtype_err_embedding"] - 0.01) < 1e-6  # 0.03 / 3


def test_the_runtime_error_still_fails_the_check() -> None:
    got = run(1.05).to_json()
    assert not got["passed"] and abs(got["max_rel_err"] - 0.05) < 1e-6


def test_the_failure_names_rows_beyond_the_dtype() -> None:
    beyond = run(1.05).failure()
    assert beyond.startswith("correctness check failed: max relative error 0.05 > 0.01")
    assert "row 0 (a): logits 0.05" in beyond and "row 1 (b): logits 0.05" in beyond and "embedding" not in beyond
    assert run(1.05, in_dtype=False).failure() == "correctness check failed: max relative error 0.05 > 0.01"
