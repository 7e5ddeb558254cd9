"""bench.check: a row passes within the tolerance of its fp32 own model or of its own model in the runtime's dtype, or
no further from the fp32 one than the tolerance plus that dtype model is; beyond all three it fails, and the failure
names the row and output."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from bench.check import CheckResult, check_rows

IDS, MASK = torch.ones(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.long)
WANT_LOGITS, WANT_EMB = torch.tensor([[2.0, -1.0]]), torch.tensor([[1.0, 2.0, 3.0]])


def own(_: str):  # the fp32 own model of every task
    return lambda ids, mask: (WANT_LOGITS, WANT_EMB)


def run(logits_factor: float, in_dtype: bool = True, low_logits: float = 1.05) -> CheckResult:
    """The check of two rows (tasks a and b, a head of 2 labels each) whose logits are `logits_factor` times the
    own model's and whose embeddings are the own model's; the own model in a lower precision (unless not
    `in_dtype`) is `low_logits` times off on the logits (5% by default) and 1% on the embedding."""
    spec = lambda _: SimpleNamespace(head=SimpleNamespace(num_labels=2))  # noqa: E731
    own_low = lambda _: lambda ids, mask: (WANT_LOGITS * low_logits, WANT_EMB * 1.01)  # noqa: E731
    logits, embedding = WANT_LOGITS.repeat(2, 1) * logits_factor, WANT_EMB.repeat(2, 1)
    return check_rows(
        logits, embedding, IDS, MASK, ["a", "b"], [0, 1], own=own, spec=spec, tolerance=1e-2,
        own_in_dtype=own_low if in_dtype else None,
    )  # fmt: skip


def test_within_the_fp32_own_model() -> None:
    got = run(1.0).to_json()
    assert got["passed"] and got["max_rel_err"] == 0.0
    for row in got["rows"]:
        assert abs(row["own_dtype_err_logits"] - 0.05) < 1e-6  # max |diff| 0.1 / max |want| 2
        assert abs(row["own_dtype_err_embedding"] - 0.01) < 1e-6  # 0.03 / 3
        assert abs(row["dtype_rel_err_logits"] - 0.1 / 2.1) < 1e-6  # the runtime against the low model


def test_within_the_own_model_in_the_dtype() -> None:
    """5% off fp32 on the logits, as the own model in the dtype is: that model is the row's own model in fp16."""
    got = run(1.05)
    assert got.passed and abs(got.max_rel_err - 0.05) < 1e-6
    assert all(row["dtype_rel_err_logits"] < 1e-6 for row in got.rows)


def test_as_far_from_fp32_as_the_dtype_model_on_the_other_side() -> None:
    """5% below fp32 where the dtype model is 5% above: 0.095 from that model, but no further from fp32 than it."""
    got = run(0.95)
    assert got.passed
    assert all(abs(row["dtype_rel_err_logits"] - 0.2 / 2.1) < 1e-6 for row in got.rows)
    assert not run(0.93).passed  # 0.07 from fp32 > 0.01 + 0.05


def test_the_dtype_slack_is_capped() -> None:
    """An own model 20% off in the dtype widens the fp32 bound by 5 tolerances at most."""
    assert run(0.95, low_logits=1.2).passed  # 0.05 from fp32 <= 0.01 + 0.05
    assert not run(0.9, low_logits=1.2).passed  # 0.1 from fp32 > 0.01 + 0.05, and 0.25 from the dtype model


def test_beyond_both_fails() -> None:
    got = run(1.1)  # 0.1 off fp32, 0.048 off the low model
    assert not got.passed
    message = got.failure()
    assert message.startswith("correctness check failed: max relative error 0.1 > 0.01 at row 0 (a) logits: 0.1")
    assert "(own model in dtype: 0.0476)" in message and "row 1 (b) logits" in message
    assert "the own model in the runtime's dtype is itself beyond it at row 0 (a): logits 0.05" in message
    assert "embedding" not in message.split(";")[0]


def test_without_the_dtype_model_only_fp32_counts() -> None:
    got = run(1.05, in_dtype=False)
    assert not got.passed
    assert got.failure() == (
        "correctness check failed: max relative error 0.05 > 0.01 at row 0 (a) logits: 0.05, row 1 (b) logits: 0.05"
    )
