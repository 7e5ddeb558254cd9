"""A real export past 2 GB (issue 6: "weights past 2 GB go to external data"), not forced: a bert-large-sized random
base (24 x 1024, fp32, 1.34 GB) with LoRA tasks of rank 256 on query/key/value/dense (~200 MB each) is compiled,
exported with `pets export-onnx`, and run in onnxruntime (CPU) against the runtime on mixed rows.

    python -m scripts.check_onnx_large [--tasks 5] [--dir /tmp/pets-onnx-large]

Needs ~12 GB of memory and a few minutes; not a test (CI's machine is too small for it to be routine). Prints
the files written and their sizes, and the largest relative error per task (the tests' bound is 1e-4).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

import pets_compiler
from bench.models import BERT_LARGE, MAX_POSITIONS, VOCAB
from pets_compiler.cli import main as pets
from pets_compiler.export.onnx_runner import OnnxRunner
from pets_compiler.runtime.requests import pad
from tests.builders import make_peft_lora, make_small_base, mixed_rows, rel_err

LARGE = {**BERT_LARGE, "vocab_size": VOCAB, "max_position_embeddings": MAX_POSITIONS}
TOL = 1e-4


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--tasks", type=int, default=5)
    p.add_argument("--dir", type=Path, default=Path("/tmp/pets-onnx-large"))
    args = p.parse_args()
    root: Path = args.dir
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    base = make_small_base(root / "base", **LARGE)
    tasks = {
        f"t{i}": make_peft_lora(
            base, root / f"t{i}", r=256, alpha=16, targets=["query", "key", "value", "dense"], seed=i
        )
        for i in range(args.tasks)
    }
    artifact = root / "artifact"
    argv = ["compile", str(base), "-o", str(artifact)] + [a for n, d in tasks.items() for a in ("--task", f"{n}={d}")]
    if pets(argv) != 0:
        return 1
    print(f"sources and artifact: {time.perf_counter() - t0:.0f} s")
    t0 = time.perf_counter()
    model = root / "onnx" / "model.onnx"
    if pets(["export-onnx", str(artifact), "-o", str(model)]) != 0:
        return 1
    files = {f.name: f.stat().st_size for f in model.parent.iterdir()}
    print(f"export: {time.perf_counter() - t0:.0f} s, files {files}")
    runtime = pets_compiler.load(artifact)
    runner = OnnxRunner(model)
    names = runtime.task_names()
    rows, row_tasks = mixed_rows(LARGE["vocab_size"], names, 11, seed=0)
    ids, mask = pad(rows)
    got = [torch.from_numpy(a) for a in runner.forward(ids, mask, row_tasks)]
    want = runtime.forward(ids, mask, row_tasks)
    worst = 0.0
    for name in sorted(set(row_tasks)):
        at = [i for i, t in enumerate(row_tasks) if t == name]
        err = rel_err(got[1][at], want[1][at])
        worst = max(worst, err)
        print(f"{name}: embedding rel err {err:.2e}")
    external = len(files) > 1 and sum(files.values()) > 2**31
    print(f"past 2 GB in all: {sum(files.values()) > 2**31}; weights beside the model: {len(files) > 1}")
    return 0 if external and worst < TOL else 1


if __name__ == "__main__":
    sys.exit(main())
