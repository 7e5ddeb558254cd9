"""Turn `pets run` request dicts into padded id/mask tensors, with one clear error per bad field."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pets_compiler.errors import InputError


@dataclass(frozen=True)
class Prepared:
    task: str
    ids: list[int]
    extra: dict[str, Any]  # fields passed through to the answer (e.g. "id")


class Tokenizer:
    """The base checkpoint's tokenizer; text longer than `max_length` tokens is truncated (documented policy)."""

    def __init__(self, directory: Path | None, max_length: int) -> None:
        self.directory = directory
        self.max_length = max_length
        self._tok: Any = None

    def __call__(self, text: str) -> list[int]:
        if self.directory is None:
            raise InputError("this artifact has no tokenizer: send input_ids instead of text")
        if self._tok is None:
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(str(self.directory), local_files_only=True)
        return list(self._tok(text, truncation=True, max_length=self.max_length)["input_ids"])


def prepare(index: int, request: Any, tokenizer: Tokenizer, vocab_size: int, max_positions: int) -> Prepared:
    """Validate one request: `task` plus `text` or `input_ids` (and an optional all-0/1 `attention_mask`)."""
    where = f"request {index}"
    if not isinstance(request, Mapping):
        raise InputError(f"{where}: must be a JSON object, got {type(request).__name__}")
    task = request.get("task")
    if not isinstance(task, str):
        raise InputError(f"{where}: field 'task' must be a string, got {task!r}")
    has_text, has_ids = "text" in request, "input_ids" in request
    if has_text == has_ids:
        raise InputError(f"{where}: give exactly one of 'text' or 'input_ids'")
    if has_text:
        text = request["text"]
        if not isinstance(text, str):
            raise InputError(f"{where}: field 'text' must be a string, got {type(text).__name__}")
        ids = tokenizer(text)
    else:
        ids = _check_ids(where, request["input_ids"], vocab_size, max_positions)
        mask = request.get("attention_mask")
        if mask is not None:
            ids = _apply_mask(where, ids, mask)
    extra = {"id": request["id"]} if "id" in request else {}
    return Prepared(task, ids, extra)


def _check_ids(where: str, ids: Any, vocab_size: int, max_positions: int) -> list[int]:
    # the common case in C-level builtins (a bool's type is not int; a generator over the ids cost ~60 ns a
    # token); the checks below name what is wrong
    fine = isinstance(ids, list) and ids and len(ids) <= max_positions and set(map(type, ids)) == {int}
    if fine and min(ids) >= 0 and max(ids) < vocab_size:
        return list(ids)
    if not isinstance(ids, list) or any(isinstance(row, list) for row in ids):
        raise InputError(f"{where}: 'input_ids' must be a flat list of integers (one sequence per request)")
    for i, v in enumerate(ids):
        if isinstance(v, bool) or not isinstance(v, int):
            raise InputError(f"{where}: input_ids[{i}] = {v!r} is not an integer")
        if not 0 <= v < vocab_size:
            raise InputError(f"{where}: input_ids[{i}] = {v} is outside the vocabulary [0, {vocab_size})")
    if not ids:
        raise InputError(f"{where}: 'input_ids' is empty; a request needs at least one token")
    if len(ids) > max_positions:
        raise InputError(f"{where}: {len(ids)} tokens, more than the model's {max_positions} positions")
    return list(ids)


def _apply_mask(where: str, ids: list[int], mask: Any) -> list[int]:
    if not isinstance(mask, list) or len(mask) != len(ids):
        got = len(mask) if isinstance(mask, list) else type(mask).__name__
        raise InputError(f"{where}: attention_mask length {got} does not match input_ids length {len(ids)}")
    if any(m not in (0, 1) or isinstance(m, bool) for m in mask):
        raise InputError(f"{where}: attention_mask must hold only 0 and 1")
    # A request is one sequence: masked positions must be trailing padding, which is simply dropped.
    kept = sum(mask)
    if kept == 0 or mask != [1] * kept + [0] * (len(mask) - kept):
        raise InputError(f"{where}: attention_mask must be ones followed by zeros, with at least one 1")
    return ids[:kept]


def pad(rows: Sequence[list[int]], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Right-pad id lists to one [batch, longest] tensor and its attention mask (built with numpy: a tensor per
    row cost ~20 us each)."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    longest = int(lengths.max())
    mask = np.arange(longest).reshape(1, -1) < lengths.reshape(-1, 1)
    ids = np.full((len(rows), longest), pad_id, dtype=np.int64)
    ids[mask] = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(lengths.sum()))
    return torch.from_numpy(ids), torch.from_numpy(mask.astype(np.int64))


def answer(p: Prepared, num_labels: int | None, labels: Sequence[str], logits: Any, embedding: Any) -> dict[str, Any]:
    """One request's `pets run` answer from its rows of the outputs (fp32 tensors or arrays, on the host): the
    first num_labels logits and their label for a task with a head, else (num_labels None) the embedding."""
    out: dict[str, Any] = {**p.extra, "task": p.task}
    if num_labels is None:
        out["embedding"] = embedding.tolist()
    else:
        row = logits[:num_labels]
        out["logits"] = row.tolist()
        out["label"] = labels[int(row.argmax())]
    return out
