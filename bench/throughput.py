"""Mixed-task throughput of the pets runtime against the backbone alone, peft's mixed batch and SeqS (issue 4), and
PetS's fixed-length grid against SeqS, ParS and peft (its Fig. 7/8, issue 7: pets_grid.py).

    python -m bench.throughput                       # GPU: bert-base config, random weights, fp16, the large batches
    python -m bench.throughput --kinds lora_r8,ia3 --tasks 1,32 --shapes 64x128
    python -m bench.throughput --grid                # PetS's grid instead (pets_grid.py: its flags, its suite)
    python -m bench.throughput --suite               # bench.all's subset of both (pets_grid.py says which)
    python -m bench.throughput --smoke               # CPU, tiny config, fp32: checks that the script runs

For each PET kind (kinds.py) and task count, the kind's tasks are loaded into one runtime (loading.py); for each
shape, each row's task is drawn uniformly, the runtime's rows are checked against their tasks' own merged models,
then the backbone alone (eager and CUDA graph; the faster is the ratio's denominator, timed before and after the
others), the pets runtime, peft's mixed batch (LoRA kinds) and SeqS are timed in this process (CUDA-event medians
after warm-up), and the pets ops are profiled against their floors (floors.py). One JSON record per configuration
goes to --out as it finishes (JSON Lines); a short table is printed last. Goals are reported, not asserted.
The grid's records (experiment "throughput_grid") go to the same file, after the large batches'.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench.baselines import PeftMixed, SeqS, backbone_model, plain_runtime
from bench.floors import measure_device
from bench.kinds import KINDS, Kind, kinds_arg, make_kinds
from bench.loading import Served
from bench.measure import Shared, failure, measure_config
from bench.models import MODELS, make_base
from bench.pets_exec import EXEC_MODES
from bench.pets_grid import GRID_TASKS, PETS_SHAPES, SMOKE_GRID, SUITE_GRID, GridRun, grid_table, release, run_grid
from bench.pets_grid import progress as grid_progress
from bench.precision import Precision
from bench.records import RecordFile, describe_env, environment, table
from bench.timing import on_device

RESULTS = Path(__file__).parent / "results"


@dataclass
class Config(Precision):
    model: str = "bert-base"
    device: str = "cuda"
    dtype: str = "float16"
    kinds: tuple[str, ...] = KINDS
    tasks: tuple[int, ...] = (1, 32, 128, 1024)
    shapes: tuple[tuple[int, int], ...] = ((64, 128), (128, 64))
    warmup: int = 10
    iters: int = 50
    budget_s: float = 10.0  # backbone and pets: timed calls stop after this long (a slow path costs seconds)
    baseline_budget_s: float = 3.0  # peft and SeqS (~0.1 s a batch): timed calls stop after this long
    pets_exec: str = "default"
    profile_forwards: int = 3
    large_batches: bool = True  # issue 4's part: kinds x tasks x shapes against the backbone
    grid: tuple[GridRun, ...] = ()  # PetS's grid (pets_grid.py), after the large batches
    pars_streams: tuple[int, ...] = (4, 16)  # the grid's ParS: CUDA streams (PetS used 2-16)
    time_budget_s: float | None = None  # the grid's points left once this has passed are skipped
    seed: int = 0
    out: Path = RESULTS
    smoke: bool = False


SMOKE = Config(
    model="tiny",
    device="cpu",
    dtype="float32",
    kinds=("lora_r8", "mix"),  # LoRA for peft; the mix with 8 tasks has every kind (7 parts) in one runtime
    tasks=(1, 8),
    shapes=((4, 16),),
    warmup=1,
    iters=2,
    baseline_budget_s=0.5,
    profile_forwards=1,
    grid=SMOKE_GRID,
    smoke=True,
)
# bench.all's share: pets_grid.SUITE_GRID, large batches included (263 s on the H200 with 6 bert-base task counts)
SUITE = Config(
    large_batches=False,
    grid=SUITE_GRID,
    pars_streams=(16,),
    warmup=3,
    iters=20,
    budget_s=1.0,
    baseline_budget_s=0.3,
    time_budget_s=150.0,
)


def bench_kind(s: Shared, kind: Kind, report: Callable[[dict[str, Any]], None]) -> None:
    cfg = s.cfg
    served = Served(kind, s.base, cfg.device, cfg.dtype, cfg.pets_exec)
    seqs = SeqS(s.base, cfg.device, cfg.torch_dtype)
    peft = PeftMixed.build(s.base, kind.lora_rank, cfg.device, cfg.torch_dtype) if kind.lora_rank else None
    peft_s = 0.0
    try:
        for n in sorted(cfg.tasks):
            try:
                served.load(n)
                if peft is not None:
                    t0 = time.perf_counter()
                    for i in range(len(peft.names), n):
                        name = kind.task_name(i)
                        peft.add(name, served.runtime.task(name))  # type: ignore[union-attr]
                    peft.ready()
                    peft_s += time.perf_counter() - t0
            except Exception as e:
                for batch, seq in cfg.shapes:
                    report(
                        {
                            "experiment": "throughput",
                            "kind": kind.name,
                            "tasks": n,
                            "batch": batch,
                            "seq": seq,
                            **s.env,
                            **failure(e),
                            "stage": f"loading {n} tasks",
                            "goals": {},
                        }
                    )
                served.free()
                continue
            for batch, seq in cfg.shapes:
                record = measure_config(s, kind, served, peft, seqs, n, batch, seq)
                if peft is not None:
                    record["peft_build_s"] = peft_s
                report(record)
                if record["error"]:  # an OOM's tensors are garbage now: give the memory back before going on
                    release(cfg.device)
    finally:
        served.free()
        seqs.models.clear()
        del peft
        release(cfg.device)


def progress(record: dict[str, Any]) -> None:
    r = record.get("ratios") or {}
    status = record["error"] or (f"pets/backbone {r.get('pets_over_backbone'):.3f}" if r else "")
    print(f"  {record['kind']} tasks={record['tasks']} {record['batch']}x{record['seq']}: {status}", flush=True)


def run(cfg: Config) -> list[dict[str, Any]]:
    """Every configuration of `cfg`; the records, also written to cfg.out as they finish."""
    with on_device(cfg.device):
        return _run(cfg)


def _run(cfg: Config) -> list[dict[str, Any]]:
    started = time.perf_counter()
    env = environment(cfg.device)
    records = RecordFile.for_run(cfg.out, "throughput", cfg.smoke)
    if cfg.large_batches:
        large_batches(cfg, env, records)
        release(cfg.device)  # the backbone and the plain runtime went with large_batches's frame
    if cfg.grid:
        run_grid(cfg, env, records, grid_progress)
    print(records.summary(started))
    print(f"{describe_env(env)}  pets exec: {cfg.pets_exec}")
    large = [r for r in records.records if r.get("experiment") == "throughput"]
    if large:
        print(table(large))
    grid = [r for r in records.records if r.get("experiment") == "throughput_grid"]
    if grid:
        print(grid_table(grid))
    return records.records


def large_batches(cfg: Config, env: dict[str, Any], records: RecordFile) -> None:
    """Issue 4's part: each kind x task count x shape against the backbone alone, peft and SeqS."""
    planned = len(cfg.kinds) * len(cfg.tasks) * len(cfg.shapes)
    print(
        f"planned: {planned} configurations ({len(cfg.kinds)} kinds x tasks {list(cfg.tasks)} x shapes "
        f"{['x'.join(map(str, s)) for s in cfg.shapes]}) on {cfg.device}, {cfg.model}, {cfg.dtype}; "
        f"{estimate(cfg)}",
        flush=True,
    )
    base = make_base(MODELS[cfg.model], cfg.seed)
    floors = measure_device(cfg.device, cfg.torch_dtype)
    print(
        f"device {env['device']}: {floors.bandwidth_bytes_per_s / 1e9:.0f} GB/s, "
        f"{floors.peak_flops / 1e12:.1f} TFLOP/s measured",
        flush=True,
    )
    backbone = backbone_model(base, cfg.device, cfg.torch_dtype)
    plain = plain_runtime(base, cfg.device, cfg.torch_dtype, cfg.pets_exec)
    shared = Shared(cfg, base, env, floors, backbone, records, plain)

    def report(record: dict[str, Any]) -> None:
        shared.records.write(record)
        progress(record)

    for kind in make_kinds(base, cfg.kinds).values():
        print(f"{kind.name}:", flush=True)
        t0 = time.perf_counter()
        bench_kind(shared, kind, report)
        print(f"  ({kind.name}: {time.perf_counter() - t0:.0f} s)", flush=True)


def estimate(cfg: Config) -> str:
    """A guess at the duration on an H100/H200 (bert-base, fp16) from the costs of each step, to plan runs that fit
    a 10-minute call; the per-kind times printed as the run goes are the numbers to plan the next run with."""
    if cfg.device != "cuda" or cfg.model != "bert-base":
        return "no duration estimate off the GPU"
    top, total = max(cfg.tasks), 30.0  # base model, backbone, device floors
    for k in cfg.kinds:
        recompile = k.startswith("mix") and min(cfg.tasks) < 7
        total += 10 * (2 if recompile else 1)  # compile + move to the device
        total += top * {"mask": 0.15, "diff": 0.1, "mix": 0.1}.get(k, 0.05)  # make and add the tasks
        total += min(32, top) * 0.5  # SeqS's merged models
        per_config = 6 + cfg.baseline_budget_s + (cfg.baseline_budget_s + 1 if k.startswith("lora") else 0)
        total += per_config * len(cfg.tasks) * len(cfg.shapes)
    return f"guessed duration {math.ceil(total / 60)} min on an H100/H200"


def parse(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(description=" ".join((__doc__ or "").split("\n\n")[0].split()))
    p.add_argument(
        "--smoke", action="store_true", help="tiny config on the CPU, fp32: a few kinds, tasks and a small grid"
    )
    p.add_argument("--suite", action="store_true", help="bench.all's GPU subset (pets_grid.py's docstring)")
    p.add_argument("--kinds", help=f"comma-separated, from {','.join(KINDS)} (default: all)")
    p.add_argument("--tasks", help="comma-separated task counts (default 1,32,128,1024)")
    p.add_argument("--shapes", help="comma-separated BATCHxSEQ (default 64x128,128x64)")
    p.add_argument("--model", choices=sorted(MODELS), help="the model (default bert-base; --grid-models for the grid)")
    p.add_argument("--grid", action="store_true", help="PetS's grid (Fig. 7/8) only (the --grid-* flags imply it)")
    p.add_argument(
        "--grid-models",
        help=f"the grid's models, from {','.join(MODELS)} (default bert-base); the --grid-* flags make the grid every "
        "model x kind x task count x shape they give (what they leave out: as the first part of the grid)",
    )
    p.add_argument("--grid-kinds", help="the grid's kinds (default mix)")
    p.add_argument("--grid-tasks", help=f"the grid's task counts (default {','.join(map(str, GRID_TASKS))})")
    p.add_argument("--grid-shapes", help=f"per-task BSxSEQ (default PetS's {_show(PETS_SHAPES)})")
    p.add_argument("--pars-streams", help="the grid's ParS stream counts (default 4,16)")
    p.add_argument("--time-budget", type=float, help="seconds for the grid: points left after it are skipped")
    p.add_argument("--iters", type=int, help="timed calls per measurement (default 50)")
    p.add_argument("--warmup", type=int, help="untimed calls first (default 10)")
    p.add_argument("--budget", type=float, help="seconds of timed calls at most for peft, SeqS, ParS (default 3)")
    p.add_argument("--pets-exec", choices=sorted(EXEC_MODES), help="the runtime's execution path (default: as set up)")
    p.add_argument("--out", type=Path, help="directory for the JSON Lines records (default bench/results)")
    args = p.parse_args(argv)
    cfg = SMOKE if args.smoke else SUITE if args.suite else Config()
    if args.model:
        cfg = replace(cfg, model=args.model)
    if args.kinds:
        cfg = replace(cfg, kinds=kinds_arg(p, args.kinds))
    if args.tasks:
        cfg = replace(cfg, tasks=_ints(p, args.tasks, "--tasks"))
    if args.shapes:
        cfg = replace(cfg, shapes=_pairs(p, args.shapes, "--shapes"))
    if args.grid and not cfg.grid:
        cfg = replace(cfg, grid=(GridRun(cfg.model),))
    if args.grid:
        cfg = replace(cfg, large_batches=False)
    if any(getattr(args, f) for f in ("grid_models", "grid_kinds", "grid_tasks", "grid_shapes")):
        like = cfg.grid[0] if cfg.grid else GridRun(cfg.model)
        models = tuple(m.strip() for m in args.grid_models.split(",")) if args.grid_models else (like.model,)
        if unknown := [m for m in models if m not in MODELS]:
            p.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
        kinds = kinds_arg(p, args.grid_kinds) if args.grid_kinds else like.kinds
        tasks = _ints(p, args.grid_tasks, "--grid-tasks") if args.grid_tasks else like.tasks
        shapes = _pairs(p, args.grid_shapes, "--grid-shapes") if args.grid_shapes else like.shapes
        cfg = replace(cfg, large_batches=False, grid=tuple(GridRun(m, kinds, tasks, shapes) for m in models))
    if args.pars_streams:
        cfg = replace(cfg, pars_streams=_ints(p, args.pars_streams, "--pars-streams"))
    for flag, key in (
        ("time_budget", "time_budget_s"),
        ("iters", "iters"),
        ("warmup", "warmup"),
        ("budget", "baseline_budget_s"),
        ("pets_exec", "pets_exec"),
        ("out", "out"),
    ):
        if getattr(args, flag) is not None:
            cfg = replace(cfg, **{key: getattr(args, flag)})
    return cfg


def _ints(p: argparse.ArgumentParser, text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        p.error(f"{flag} {text!r}: expected comma-separated integers")
    if any(v < 1 for v in values):
        p.error(f"{flag}: every value must be at least 1")
    return values


def _pairs(p: argparse.ArgumentParser, text: str, flag: str) -> tuple[tuple[int, int], ...]:
    try:
        pairs = [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",")]
    except ValueError:
        pairs = []
    if not pairs or any(len(s) != 2 or min(s) < 1 for s in pairs):
        p.error(f"{flag} {text!r}: expected BATCHxSEQ[,BATCHxSEQ...], e.g. 64x128")
    return tuple((s[0], s[1]) for s in pairs)


def _show(shapes: tuple[tuple[int, int], ...]) -> str:
    return ",".join(f"{bs}x{seq}" for bs, seq in shapes)


def main(argv: list[str] | None = None) -> None:
    run(parse(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
