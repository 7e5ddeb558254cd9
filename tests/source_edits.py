"""Shared by the bad-source tests: edit copies of good task sources, and check a live runtime is unchanged."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from pets_compiler.runtime.requests import pad
from pets_compiler.runtime.runtime import Runtime

ROW_LENGTHS = (5, 11, 3, 8, 11, 2, 7)


def copy_source(src: Path, tmp: Path, name: str = "bad") -> Path:
    dst = tmp / name
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def edit_tensors(path: Path, edit: Callable[[dict[str, Tensor]], None]) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def batch_outputs(rt: Runtime, names: list[str]) -> tuple[Tensor, Tensor]:
    """A fixed padded batch (rows of ROW_LENGTHS tokens) run with one task name per row."""
    g = torch.Generator().manual_seed(0)
    ids, mask = pad([torch.randint(5, 1000, (n,), generator=g).tolist() for n in ROW_LENGTHS[: len(names)]])
    logits, embedding = rt.forward(ids, mask, names)
    return logits.clone(), embedding.clone()


@contextmanager
def unchanged(rt: Runtime) -> Iterator[None]:
    """The block must leave the task set, the table sizes and a fixed mixed batch's outputs bitwise unchanged."""
    names_before = rt.task_names()
    mix = [names_before[i % len(names_before)] for i in range(len(ROW_LENGTHS))]
    before = batch_outputs(rt, mix)
    sizes = dict(rt.tables.sizes)
    yield
    assert rt.task_names() == names_before
    assert rt.tables.sizes == sizes
    after = batch_outputs(rt, mix)
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1]), "outputs changed"
