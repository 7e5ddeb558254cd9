"""The runtime on a CUDA device (issue 4 groundwork): every kind runs there and matches the CPU runtime (fp32) and
each task's own model (fp16 within 1e-2, DESIGN.md). The ops run through cuda_fallback (torch references) until
the CUDA kernels land."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import pets_compiler
from pets_compiler.runtime.requests import pad

from builders import mixed_rows, rel_err

pytestmark = pytest.mark.gpu
FIXTURES = Path(__file__).parents[1] / "fixtures" / "adapterhub" / "small"  # all_kinds (conftest) is built on it


def batch(names: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    rows, picked = mixed_rows(1000, names, 16, seed=3)
    ids, mask = pad(rows)
    return ids, mask, picked


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_gpu_runtime_matches_cpu(all_kinds: dict[str, Path], dtype: str, tmp_path: Path) -> None:
    cpu = pets_compiler.compile(FIXTURES / "base", all_kinds)
    gpu = pets_compiler.compile(FIXTURES / "base", all_kinds, dtype=dtype).to("cuda")
    ids, mask, names = batch(sorted(all_kinds))
    want_logits, want_emb = cpu.forward(ids, mask, names)
    logits, emb = gpu.forward(ids, mask, names)
    assert logits.is_cuda and logits.dtype == getattr(torch, dtype)
    tol = 1e-4 if dtype == "float32" else 1e-2
    for i, name in enumerate(names):
        head = cpu.task(name).head
        got, want = (
            (emb[i], want_emb[i]) if head is None else (logits[i, : head.num_labels], want_logits[i, : head.num_labels])
        )
        assert rel_err(got.float().cpu(), want) < tol, (name, dtype)
    # A runtime serving on the GPU saves a portable (CPU) artifact.
    gpu.save(tmp_path / "art")
    again = pets_compiler.load(tmp_path / "art")
    assert again.device.type == "cpu" and again.task_names() == gpu.task_names()
