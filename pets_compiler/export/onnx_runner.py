"""`pets run --backend onnxruntime`: answer `pets run` requests with an exported model in onnxruntime.

Requests are checked and tokenized as the runtime does (runtime/requests.py, with the tokenizer and limits the
model's `pets.model` metadata carries), run in padded batches, and answered as `Runtime.run` answers them.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from pets_compiler.errors import ArtifactError, InputError, UnknownTaskError
from pets_compiler.export.onnx_export import INPUTS, MODEL_KEY, OUTPUTS, TASKS_KEY
from pets_compiler.runtime.requests import Prepared, Tokenizer, answer, pad, prepare


def providers() -> list[str]:
    """CUDA where onnxruntime-gpu provides it (the `onnx-gpu` extra), else the CPU."""
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OnnxRunner:
    """An exported model (`pets export-onnx`) in an onnxruntime session, with its tasks and request checks."""

    def __init__(self, path: str | Path, session_providers: Sequence[str] | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"{path}: no such ONNX model (write one with `pets export-onnx`)")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: its constant folding warns of CastLike nodes it leaves
        try:
            self.session = ort.InferenceSession(str(path), options, providers=list(session_providers or providers()))
        except Exception as e:  # onnxruntime raises its own (pybind) exception types
            raise ArtifactError(f"{path}: onnxruntime cannot load it: {e}") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if TASKS_KEY not in meta or MODEL_KEY not in meta:
            raise ArtifactError(f"{path} was not written by `pets export-onnx`: its {TASKS_KEY} metadata is missing")
        names = [i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()]
        if names != (list(INPUTS), list(OUTPUTS)):
            raise ArtifactError(f"{path}: inputs and outputs {names}, expected {list(INPUTS)} and {list(OUTPUTS)}")
        self.tasks: dict[str, dict[str, Any]] = json.loads(meta[TASKS_KEY])
        self.model: dict[str, Any] = json.loads(meta[MODEL_KEY])
        self._tokenizer_dir = tempfile.TemporaryDirectory(prefix="pets-onnx-tokenizer-")
        directory = Path(self._tokenizer_dir.name)
        for name, text in self.model["tokenizer"].items():
            (directory / Path(name).name).write_text(text)
        self.tokenizer = Tokenizer(directory if self.model["tokenizer"] else None, int(self.model["max_length"]))

    def task_id(self, name: str) -> int:
        if name not in self.tasks:
            loaded = ", ".join(sorted(self.tasks)) or "none"
            raise UnknownTaskError(f"unknown task {name!r}; this ONNX model serves: {loaded}")
        return int(self.tasks[name]["id"])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, tasks: Sequence[str]) -> list[np.ndarray]:
        """[logits [batch, max labels], embedding [batch, hidden]] for a padded batch, one task name per row."""
        task_ids = np.array([self.task_id(t) for t in tasks], dtype=np.int64)
        feeds = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy(), "task_ids": task_ids}
        return list(self.session.run(list(OUTPUTS), feeds))

    def run(self, requests: Sequence[Mapping[str, Any]], batch_size: int = 32) -> list[dict[str, Any]]:
        """Answer `pets run` requests in input order; every request is checked before any runs."""
        if batch_size < 1:
            raise InputError(f"batch_size must be at least 1, got {batch_size}")
        vocab, positions = int(self.model["vocab_size"]), int(self.model["max_position_embeddings"])
        prepared = [prepare(i, r, self.tokenizer, vocab, positions) for i, r in enumerate(requests)]
        for p in prepared:
            self.task_id(p.task)
        answers: list[dict[str, Any]] = []
        for start in range(0, len(prepared), batch_size):
            answers.extend(self._run_batch(prepared[start : start + batch_size]))
        return answers

    def _run_batch(self, batch: Sequence[Prepared]) -> list[dict[str, Any]]:
        ids, mask = pad([p.ids for p in batch])  # as the runtime pads
        logits, embedding = self.forward(ids, mask, [p.task for p in batch])
        tasks = [self.tasks[p.task] for p in batch]
        return [
            answer(p, t["num_labels"], t["labels"] or (), logits[i], embedding[i])
            for i, (p, t) in enumerate(zip(batch, tasks, strict=True))
        ]
