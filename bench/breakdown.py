"""Where a forward of 8 tasks spends its time (PetS Fig. 9): shared ops (aten: cuBLAS GEMMs, SDPA, elementwise)
against task ops (the `pets::*` ops), at PetS's per-task shapes bs1 x s64 and bs2 x s32.

    python -m bench.breakdown                   # GPU: bert-base, fp16, the mix and PetS's kinds with LoRA
    python -m bench.breakdown --kinds all       # every kind
    python -m bench.breakdown --smoke           # CPU, tiny config, fp32: checks that the script runs

For each kind, 8 tasks are loaded into one runtime (the mix: each task another kind, as PetS gives each task a
random PET type); each task's rows are contiguous (8 x bs rows of seq tokens). The rows are checked against their
tasks' own models, the forward is timed as served (CUDA graphs on a GPU), its host time measured (the call alone,
the device idle at its start) as served and op by op, and a few op-by-op forwards are profiled (torch.profiler):
device kernel time on a GPU, CPU time on the CPU. The task ops' time and share come from floors.profile_ops (each
outermost pets op with all it launched; the shared ops are the rest); the families are the forward's top-level
ops by name from a second profile. One JSON record per (kind, shape); a short table last.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, cast

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from bench.check import check_sampled
from bench.floors import DeviceFloors, measure_device, profile_ops
from bench.kinds import KINDS, Kind, kinds_arg, make_kinds
from bench.loading import Served
from bench.measure import batch_stats, draw, failure
from bench.models import MODELS, make_base
from bench.pets_exec import eager, pets_forward
from bench.precision import Precision
from bench.records import RecordFile, describe_env, environment
from bench.throughput import RESULTS
from bench.timing import on_device, timed
from pets_compiler.frontend.base import BaseModel

DEFAULT_KINDS = ("mix", "lora_r8", "bitfit", "pfeiffer", "diff", "mask")  # PetS's kinds, LoRA, and PetS's mix
PETS_CLAIM = "PetS Fig. 9 (V100): the PET operators take a small share of the execution time"


@dataclass
class Config(Precision):
    model: str = "bert-base"
    device: str = "cuda"
    dtype: str = "float16"
    kinds: tuple[str, ...] = DEFAULT_KINDS
    tasks: int = 8
    shapes: tuple[tuple[int, int], ...] = ((1, 64), (2, 32))  # (rows per task, tokens)
    warmup: int = 10
    iters: int = 30
    profile_forwards: int = 5
    top: int = 12  # op families recorded, by time
    seed: int = 0
    out: Path = RESULTS
    smoke: bool = False


SMOKE = Config(
    model="tiny",
    device="cpu",
    dtype="float32",
    kinds=("mix",),
    warmup=1,
    iters=3,
    profile_forwards=2,
    smoke=True,
)


def host_s(forward: Callable[[], object], device: str, iters: int) -> float:
    """Median host time of one call, the device idle at its start: the launch cost a forward adds."""
    times = []
    for _ in range(iters):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        forward()
        times.append(time.perf_counter() - t0)
    if device == "cuda":
        torch.cuda.synchronize()
    return statistics.median(times)


def families(forward: Callable[[], object], device: str, forwards: int, top: int) -> dict[str, Any]:
    """The forward's top-level ops by name (a pets op with what it calls, an aten op with its kernels), per forward:
    device time on a GPU, CPU time on the CPU; the `top` longest, the rest summed."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(forwards):
            forward()
        if device == "cuda":
            torch.cuda.synchronize()
    attr = "device_time_total" if device == "cuda" else "cpu_time_total"
    spent: dict[str, list[float]] = {}
    for e in prof.events():
        if e.cpu_parent is None and e.device_type == DeviceType.CPU:  # kernels are events too, without a parent
            row = spent.setdefault(e.name, [0.0, 0.0])
            row[0] += float(getattr(e, attr)) / forwards
            row[1] += 1 / forwards
    ranked = sorted(spent.items(), key=lambda kv: -kv[1][0])
    return {
        "top": {
            name: {"us": us, "calls": calls, "task_op": name.startswith("pets::")} for name, (us, calls) in ranked[:top]
        },
        "rest_us": sum(us for _, (us, _) in ranked[top:]),
        "total_us": sum(us for _, (us, _) in ranked),
    }


def measure_shape(
    cfg: Config, served: Served, floors: DeviceFloors, env: dict[str, Any], per_task: int, seq: int
) -> dict[str, Any]:
    """The record of one (kind, shape): the check first (a failed check is the record), then times and profiles."""
    runtime, kind, n = served.runtime, served.kind, served.loaded
    assert runtime is not None
    rows = [t for t in range(n) for _ in range(per_task)]  # each task's rows contiguous, as PetS batches them
    ids, mask, _ = draw(n, len(rows), seq, cfg.seed, cfg.device)
    names = [kind.task_name(t) for t in rows]
    part_of = {kind.task_name(t): kind.part(t).name for t in range(n)}
    record: dict[str, Any] = {
        "experiment": "breakdown",
        "kind": kind.name,
        "parts": sorted(set(part_of.values())),
        "tasks": n,
        "rows_per_task": per_task,
        "batch": len(rows),
        "seq": seq,
        "model": cfg.model,
        "model_config": {
            k: getattr(served.base.config, k)
            for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        },
        "dtype": cfg.dtype,
        **env,
        "setup": {**asdict(cfg), "token_ids": "uniform in [1000, 30000)", "attention_mask": "all ones"},
        "pets_reference": PETS_CLAIM,
        "compile_s": served.compile_s,
        "error": None,
    }
    forward = pets_forward(runtime, ids, mask, names)
    try:
        check = check_sampled(runtime, served.base, forward(), ids, mask, names, part_of, cfg.device, cfg.tolerance)
        record["check"] = check.to_json()
        if not check.passed:
            record["error"] = check.failure()
            return record
        record["timing"] = timed(forward, cfg.device, cfg.warmup, cfg.iters).to_json()
        record["host_s"] = {"served": host_s(forward, cfg.device, cfg.iters)}
        stats = batch_stats(kind, rows, n, cfg.torch_dtype, runtime)
        with eager(runtime, "default") as how:
            record["host_s"]["op_by_op"] = host_s(forward, cfg.device, cfg.iters)
            ops = profile_ops(forward, cfg.device, stats, floors, cfg.profile_forwards)
            record["families"] = families(forward, cfg.device, cfg.profile_forwards, cfg.top)
        record["ops"] = {"ran": how, **ops}
        share = cast(float | None, ops["pets_ops_share"])
        record["shares"] = {
            "time": ops["time"],
            "task_ops": share,
            "shared_ops": None if share is None else 1 - share,
            "how": "task ops: each outermost pets op with all it launched; shared ops: everything else",
        }
    except Exception as e:  # one configuration failing must not stop the others
        record.update(failure(e))
    return record


def table(records: list[dict[str, Any]]) -> str:
    lines = ["kind       bs x seq (per task)  rows  served ms  host ms (served / op by op)  task ops  shared ops"]
    for r in records:
        shares, host = r.get("shares") or {}, r.get("host_s") or {}
        ms = (r.get("timing") or {}).get("median_s")
        task, shared = shares.get("task_ops"), shares.get("shared_ops")
        per_task, seq, rows = (r.get(k, "-") for k in ("rows_per_task", "seq", "batch"))  # "-": loading failed
        lines.append(
            f"{r['kind']:<10} {per_task!s:>3} x {seq!s:<14} {rows!s:>5} "
            f"{'-' if ms is None else f'{ms * 1e3:.2f}':>10} "
            f"{_ms(host.get('served')):>13} / {_ms(host.get('op_by_op')):<11} "
            f"{'-' if task is None else f'{task:.1%}':>8} {'-' if shared is None else f'{shared:.1%}':>11}"
            + (f"  {r['error'][:60]}" if r.get("error") else "")
        )
    return "\n".join(lines)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"


def breakdown_kind(
    cfg: Config, base: BaseModel, kind: Kind, floors: DeviceFloors, env: dict[str, Any]
) -> list[dict[str, Any]]:
    served = Served(kind, base, cfg.device, cfg.dtype, "default")
    try:
        served.load(cfg.tasks)
    except Exception as e:
        served.free()
        return [{"experiment": "breakdown", "kind": kind.name, **env, **failure(e), "stage": "loading"}]
    try:
        return [measure_shape(cfg, served, floors, env, per_task, seq) for per_task, seq in cfg.shapes]
    finally:
        served.free()


def run(cfg: Config) -> list[dict[str, Any]]:
    """Every (kind, shape) of `cfg`; the records, also written to cfg.out as each kind finishes."""
    with on_device(cfg.device):
        started = time.perf_counter()
        base = make_base(MODELS[cfg.model], cfg.seed)
        env = environment(cfg.device)
        floors = measure_device(cfg.device, cfg.torch_dtype)
        out = RecordFile.for_run(cfg.out, "breakdown", cfg.smoke)
        for kind in make_kinds(base, cfg.kinds).values():
            t0 = time.perf_counter()
            for record in breakdown_kind(cfg, base, kind, floors, env):
                record["floors"] = floors.to_json()
                out.write(record)
            print(f"  {kind.name}: {time.perf_counter() - t0:.0f} s", flush=True)
        print(out.summary(started))
        print(f"{describe_env(env)}  ({PETS_CLAIM})")
        print(table(out.records))
        return out.records


def parse(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny config on the CPU, fp32, the mix")
    p.add_argument(
        "--kinds", help=f"comma-separated from {','.join(KINDS)}, or all (default {','.join(DEFAULT_KINDS)})"
    )
    p.add_argument("--tasks", type=int, help="tasks loaded (default 8)")
    p.add_argument("--out", type=Path, help="directory for the JSON Lines records (default bench/results)")
    args = p.parse_args(argv)
    cfg = SMOKE if args.smoke else Config()
    if args.kinds:
        cfg = replace(cfg, kinds=kinds_arg(p, args.kinds))
    if args.tasks is not None:
        if args.tasks < 1:
            p.error("--tasks must be at least 1")
        cfg = replace(cfg, tasks=args.tasks)
    if args.out is not None:
        cfg = replace(cfg, out=args.out)
    return cfg


def main(argv: list[str] | None = None) -> None:
    run(parse(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
