"""Correctness before timing: sampled rows of a mixed batch against each row's own merged model, in fp32 and (for a
runtime in fp16 / bf16) in the runtime's dtype: a row passes within the tolerance of either, or no further from the
fp32 one than the tolerance plus the distance of its own model in the dtype from fp32, counted up to 5 tolerances
(DESIGN.md's rule: fp16 on GPU within 1e-2 of the row's own model; that model in fp16 can itself be further than 1e-2
from fp32, 0.030 on a mix_dense row's logits in sessions 11-13, and two fp16 runs of it can land on either side: an
fp32-only bound would fail whatever ran the task)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from bench.baselines import own_model
from pets_compiler.frontend.base import BaseModel
from pets_compiler.frontend.taskset import TaskSpec
from pets_compiler.oracle import OwnModel

MIN_ROWS, MAX_ROWS = 4, 8


def rel_err(got: Tensor, want: Tensor) -> float:
    """max |got - want| / max |want| (DESIGN.md's bound)."""
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).abs().max() / want.abs().max().clamp(min=1e-30))


def sample_rows(names: list[str], kind_of: Callable[[str], str]) -> list[int]:
    """Rows to check: one per kind present first (mixes), then rows of tasks not yet checked, MIN_ROWS at least
    (fewer only if the batch is smaller), MAX_ROWS at most."""
    rows: list[int] = []
    kinds: set[str] = set()
    for i, name in enumerate(names):
        if kind_of(name) not in kinds and len(rows) < MAX_ROWS:
            kinds.add(kind_of(name))
            rows.append(i)
    tasks = {names[i] for i in rows}
    for i, name in enumerate(names):
        if len(rows) >= MIN_ROWS:
            break
        if name not in tasks:
            tasks.add(name)
            rows.append(i)
    for i in range(len(names)):  # a batch with fewer tasks than MIN_ROWS: other rows of the same tasks
        if len(rows) >= MIN_ROWS:
            break
        if i not in rows:
            rows.append(i)
    return sorted(rows)


OUTPUTS = ("embedding", "logits")
MAX_DTYPE_SLACK = 5.0  # tolerances; the largest own-model fp16 error seen on a check row: 0.030 (3 tolerances)


@dataclass
class CheckResult:
    """Per row: `rel_err_<output>` against the fp32 own model; with a runtime in fp16 / bf16 also
    `dtype_rel_err_<output>` against the own model in that dtype and `own_dtype_err_<output>`, that model's own
    error against fp32 (for reading the others)."""

    tolerance: float
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def max_rel_err(self) -> float:
        """Against the fp32 own models."""
        errs = [float(e) for r in self.rows for k, e in r.items() if k.startswith("rel_err")]
        return max(errs, default=float("nan"))

    def _failing(self, row: dict[str, Any]) -> list[str]:
        """The outputs of a row beyond the tolerance of both own models and further from the fp32 one than the
        tolerance plus the dtype slack."""
        inf = float("inf")
        return [
            o
            for o in OUTPUTS
            if f"rel_err_{o}" in row
            and float(row[f"rel_err_{o}"]) > self.tolerance + self._dtype_slack(row, o)
            and float(row.get(f"dtype_rel_err_{o}", inf)) > self.tolerance
        ]

    def _dtype_slack(self, row: dict[str, Any], output: str) -> float:
        """What the fp32 bound widens by: the own model in the runtime's dtype's distance from fp32, at most
        MAX_DTYPE_SLACK tolerances (an own model that far off in fp16 does not vouch for anything)."""
        return min(float(row.get(f"own_dtype_err_{output}", 0.0)), MAX_DTYPE_SLACK * self.tolerance)

    @property
    def passed(self) -> bool:
        return bool(self.rows) and not any(self._failing(r) for r in self.rows)

    def to_json(self) -> dict[str, object]:
        return {"passed": self.passed, "tolerance": self.tolerance, "max_rel_err": self.max_rel_err, "rows": self.rows}

    def failure(self) -> str:
        """The record's error for a failed check: the rows and outputs that fail (_failing), then the rows whose own
        model in the runtime's dtype is itself beyond the tolerance of the fp32 one."""
        failing = [
            f"row {r['row']} ({r['task']}) {o}: {float(r[f'rel_err_{o}']):.3g}"
            + (f" (own model in dtype: {float(r[f'dtype_rel_err_{o}']):.3g})" if f"dtype_rel_err_{o}" in r else "")
            for r in self.rows
            for o in self._failing(r)
        ]
        message = f"correctness check failed: max relative error {self.max_rel_err:.3g} > {self.tolerance}"
        if failing:
            message += " at " + ", ".join(failing)
        beyond = [
            f"row {r['row']} ({r['task']}): {k.removeprefix('own_dtype_err_')} {float(e):.3g}"
            for r in self.rows
            for k, e in r.items()
            if k.startswith("own_dtype_err_") and float(e) > self.tolerance
        ]
        if beyond:
            message += "; the own model in the runtime's dtype is itself beyond it at " + ", ".join(beyond)
        return message


def check_rows(
    logits: Tensor,
    embedding: Tensor,
    ids: Tensor,
    mask: Tensor,
    names: list[str],
    rows: list[int],
    own: Callable[[str], OwnModel],
    spec: Callable[[str], TaskSpec],
    tolerance: float,
    own_in_dtype: Callable[[str], OwnModel] | None = None,
) -> CheckResult:
    """Compare the runtime's outputs of `rows` with each row's own fp32 model run alone on that row; with
    `own_in_dtype` (the own model in the runtime's fp16 / bf16) also with that model (a row passes within the
    tolerance of either), and record that model's error against the fp32 one (`own_dtype_err_*`)."""
    result = CheckResult(tolerance)
    models: dict[str, OwnModel] = {}
    low: dict[str, OwnModel] = {}
    for i in rows:
        name = names[i]
        if name not in models:
            models[name] = own(name)
        want_logits, want_emb = models[name](ids[i : i + 1], mask[i : i + 1])
        entry: dict[str, Any] = {"row": i, "task": name, "rel_err_embedding": rel_err(embedding[i], want_emb[0])}
        head = spec(name).head
        with_logits = head is not None and want_logits is not None
        if with_logits:
            entry["rel_err_logits"] = rel_err(logits[i, : head.num_labels], want_logits[0])
        if own_in_dtype is not None:
            if name not in low:
                low[name] = own_in_dtype(name)
            low_logits, low_emb = low[name](ids[i : i + 1], mask[i : i + 1])
            entry["dtype_rel_err_embedding"] = rel_err(embedding[i], low_emb[0])
            entry["own_dtype_err_embedding"] = rel_err(low_emb[0], want_emb[0])
            if head is not None and with_logits and low_logits is not None:
                entry["dtype_rel_err_logits"] = rel_err(logits[i, : head.num_labels], low_logits[0])
                entry["own_dtype_err_logits"] = rel_err(low_logits[0], want_logits[0])
        result.rows.append(entry)
    return result


def check_sampled(
    runtime: Any,
    base: BaseModel,
    outputs: tuple[Tensor, Tensor],
    ids: Tensor,
    mask: Tensor,
    names: list[str],
    part_of: Mapping[str, str],
    device: str,
    tolerance: float,
) -> CheckResult:
    """check_rows on one sampled row per kind (`part_of`: task -> its kind) against each task's own fp32 model and,
    in fp16 / bf16, the own model in that dtype."""
    dtype = outputs[1].dtype
    return check_rows(
        *outputs,
        ids,
        mask,
        names,
        sample_rows(names, lambda t: part_of[t]),
        own=lambda t: own_model(base, runtime.task(t), device, torch.float32),
        spec=runtime.task,
        tolerance=tolerance,
        own_in_dtype=None if dtype == torch.float32 else lambda t: own_model(base, runtime.task(t), device, dtype),
    )
