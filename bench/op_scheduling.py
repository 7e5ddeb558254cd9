"""Task-op scheduling (PetS's Fig. 11): the task ops of one layer site for a batch spread over many tasks, run as
a per-task loop on one stream, per-task on S CUDA streams (task t on stream t % S, PetS's multi-stream way), and
as our single segmented launch.

    python -m bench.op_scheduling                 # GPU, fp16: 128 rows, seq 4-64, 32/64/128 tasks, both ops
    python -m bench.op_scheduling --smoke         # CPU, fp32, toy sizes: checks that the script runs

Ops, at bert-base's hidden size 768, a batch of `rows` rows (128) split evenly over the tasks, each task's rows
contiguous (PetS's layout):
- lora: a LoRA r8 delta on a 768 -> 768 projection, y + scale_t (x A_t^T) B_t^T. Per task: two matmuls and an
  add on its rows; segmented: torch.ops.pets.lora_delta.
- adapter: a Pfeiffer (AdapterHub seq_bn) bottleneck-64 adapter with the sublayer's residual add and LayerNorm,
  LN_t(z + residual) with z = up_t(relu(down_t(LN_t(h + residual)))) + h. Per task: two LayerNorms, two linears, a
  relu and the adds on its rows; segmented: torch.ops.pets.adapter.
Per-task tables (LayerNorm weight plus delta, Python floats for scales) are prepared before timing, as PetS's
PET manager keeps them. Launch modes: eager (every call launches its kernels from Python: host time counts, as it
did for PetS's C++ loop, though a Python launch costs more) and graph (the call captured once in a CUDA graph and
replayed: device time only; the streams stay concurrent branches of the graph). Every scheme's output is checked
against the op's torch reference (pets_compiler/custom_ops/reference.py, in fp32) before it is timed; in graph
mode, the replayed output. One record per (op, tasks, seq, mode) with every scheme's CUDA-event median; a short
table last. PetS on a V100: multi-stream up to ~1.15x the single stream, below 1x at seq 4.

The suite (`--suite`, bench.all's ~1 minute on an H200, a guess until timed there): everything above with fewer
timed calls; configurations left when its time budget has passed are skipped and listed.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import pets_compiler  # noqa: F401  (loads the op library)
from bench.check import rel_err
from bench.models import MODELS
from bench.precision import Precision
from bench.records import RecordFile, describe_env, environment
from bench.throughput import RESULTS
from bench.timing import on_device, timed
from pets_compiler.custom_ops.reference import adapter_ref, lora_delta_ref

OPS = ("lora", "adapter")
MODES = ("eager", "graph")


@dataclass
class Config(Precision):
    model: str = "bert-base"  # its hidden size is the op's
    device: str = "cuda"
    dtype: str = "float16"
    rank: int = 8
    bottleneck: int = 64
    rows: int = 128
    seqs: tuple[int, ...] = (4, 8, 16, 32, 64)
    tasks: tuple[int, ...] = (32, 64, 128)
    streams: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    ops: tuple[str, ...] = OPS
    modes: tuple[str, ...] = MODES
    warmup: int = 5
    iters: int = 30
    budget_s: float = 0.5  # timed calls of one scheme stop after this long (bench/timing.py)
    time_budget_s: float | None = None  # configurations left once this has passed are skipped
    seed: int = 0
    out: Path = RESULTS
    smoke: bool = False

    @property
    def hidden(self) -> int:
        return int(MODELS[self.model]["hidden_size"])


SMOKE = Config(
    model="tiny",
    device="cpu",
    dtype="float32",
    rank=4,
    bottleneck=16,
    rows=16,
    seqs=(4, 8),
    tasks=(4, 8),
    streams=(1, 2),
    modes=("eager",),
    warmup=1,
    iters=3,
    budget_s=0.1,
    smoke=True,
)
SUITE = Config(warmup=3, iters=20, budget_s=0.2, time_budget_s=50.0)


@dataclass
class Case:
    """One op at one (tasks, seq): its inputs and tables, the per-task pieces, and the segmented call."""

    name: str
    spans: list[tuple[int, int]]  # each task's rows [lo, hi)
    prepare: Callable[[], Tensor]  # the output buffer, on the current stream
    task_op: Callable[[Tensor, int], None]  # task t's work on its rows of the output
    segmented: Callable[[], Tensor]
    reference: Tensor  # fp32


def spans_of(rows: int, tasks: int) -> list[tuple[int, int]]:
    """Rows split as evenly as possible, task t's contiguous."""
    counts = [rows // tasks + (t < rows % tasks) for t in range(tasks)]
    ends = torch.tensor(counts).cumsum(0).tolist()
    return [(end - c, end) for c, end in zip(counts, ends, strict=True)]


def _fp32(*tensors: Tensor) -> list[Tensor]:
    return [t.float() if t.is_floating_point() else t for t in tensors]


def lora_case(cfg: Config, tasks: int, seq: int, g: torch.Generator) -> Case:
    h, r, dev, dt = cfg.hidden, cfg.rank, cfg.device, cfg.torch_dtype
    spans = spans_of(cfg.rows, tasks)
    ids = torch.repeat_interleave(torch.arange(tasks), torch.tensor([hi - lo for lo, hi in spans])).to(dev)
    x, y = (torch.randn(cfg.rows, seq, h, generator=g).to(dev, dt) for _ in range(2))
    a = (torch.randn(tasks, r, h, generator=g) / h**0.5).to(dev, dt)
    b = (torch.randn(tasks, h, r, generator=g) * 0.1).to(dev, dt)
    scales = [2.0] * tasks
    scale, rank = torch.tensor(scales).to(dev, dt), torch.full((tasks,), r, device=dev)

    def task_op(out: Tensor, t: int) -> None:
        lo, hi = spans[t]
        out[lo:hi].add_(torch.matmul(torch.matmul(x[lo:hi], a[t].T), b[t].T), alpha=scales[t])

    return Case(
        "lora",
        spans,
        y.clone,
        task_op,
        lambda: torch.ops.pets.lora_delta(y, x, ids, a, b, scale, rank),
        lora_delta_ref(*_fp32(y, x, ids, a, b, scale, rank)),
    )


def adapter_case(cfg: Config, tasks: int, seq: int, g: torch.Generator) -> Case:
    h, r, dev, dt, eps = cfg.hidden, cfg.bottleneck, cfg.device, cfg.torch_dtype, 1e-12
    spans = spans_of(cfg.rows, tasks)
    ids = torch.repeat_interleave(torch.arange(tasks), torch.tensor([hi - lo for lo, hi in spans])).to(dev)

    def rand(*shape: int, std: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=g) * std).to(dev, dt)

    hid, res = rand(cfg.rows, seq, h), rand(cfg.rows, seq, h)
    ln_w, ln_b, ln_wd, ln_bd = rand(h, std=0.1) + 1, rand(h, std=0.1), rand(tasks, h, std=0.1), rand(tasks, h, std=0.1)
    down_w, down_b = rand(tasks, r, h, std=h**-0.5), rand(tasks, r, std=0.02)
    up_w, up_b = rand(tasks, h, r, std=0.1), rand(tasks, h, std=0.02)
    scaling = torch.ones(tasks, device=dev, dtype=dt)  # AdapterHub's default: the per-task loop leaves it out
    # Pfeiffer: enabled, original_ln_before, residual_before_ln, original_ln_after, relu, bottleneck r
    config = torch.tensor([[1, 1, 1, 1, 1, r]] * tasks, device=dev)
    gamma, beta = ln_w + ln_wd, ln_b + ln_bd  # per task, as a PET manager keeps them

    def task_op(out: Tensor, t: int) -> None:
        lo, hi = spans[t]
        h_t, r_t = hid[lo:hi], res[lo:hi]
        a_in = F.layer_norm(h_t + r_t, (h,), gamma[t], beta[t], eps)
        z = F.linear(F.relu(F.linear(a_in, down_w[t], down_b[t])), up_w[t], up_b[t]) + h_t
        out[lo:hi] = F.layer_norm(z + r_t, (h,), gamma[t], beta[t], eps)

    args = (hid, res, ids, ln_w, ln_b, ln_wd, ln_bd)
    tables = (down_w, down_b, up_w, up_b, scaling, config)
    h32, res32, ids32, w32, b32, wd32, bd32, dw32, db32, uw32, ub32, s32, config32 = _fp32(*args, *tables)
    return Case(
        "adapter",
        spans,
        lambda: torch.empty_like(hid),
        task_op,
        lambda: torch.ops.pets.adapter(*args, eps, *tables),
        adapter_ref(h32, res32, ids32, w32, b32, wd32, bd32, eps, dw32, db32, uw32, ub32, s32, config32),
    )


CASES: dict[str, Callable[[Config, int, int, torch.Generator], Case]] = {"lora": lora_case, "adapter": adapter_case}


def per_task(case: Case, streams: int | None, device: str) -> Callable[[], Tensor]:
    """The per-task schedule: task t's op on its rows, t = 0, 1, ...; with `streams`, task t on CUDA stream
    t % streams, forked from and joined into the current stream (on the CPU: in turn)."""
    pool = [torch.cuda.Stream() for _ in range(streams)] if streams and device == "cuda" else []

    def run() -> Tensor:
        out = case.prepare()
        if not pool:
            for t in range(len(case.spans)):
                case.task_op(out, t)
            return out
        main = torch.cuda.current_stream()
        for stream in pool:
            stream.wait_stream(main)
        for t in range(len(case.spans)):
            with torch.cuda.stream(pool[t % len(pool)]):
                case.task_op(out, t)
        for stream in pool:
            main.wait_stream(stream)
        return out

    return run


def schemes(case: Case, cfg: Config) -> dict[str, Callable[[], Tensor]]:
    out = {"loop": per_task(case, None, cfg.device)}
    out.update({f"streams_{s}": per_task(case, s, cfg.device) for s in cfg.streams})
    out["segmented"] = case.segmented
    return out


def graphed(fn: Callable[[], Tensor]) -> tuple[Callable[[], None], Tensor]:
    """fn captured in a CUDA graph (after one warm-up call on a side stream): its replay, and the output tensor
    the replays write."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = fn()
    return graph.replay, output


def measure(cfg: Config, op: str, tasks: int, seq: int, mode: str, env: dict[str, Any]) -> dict[str, Any]:
    """Every scheme of `op` at (tasks, seq) in `mode`, each checked against the reference, then timed."""
    g = torch.Generator().manual_seed(cfg.seed * 7919 + tasks * 131 + seq)
    case = CASES[op](cfg, tasks, seq, g)
    record: dict[str, Any] = {
        "experiment": "op_scheduling",
        "op": op,
        "tasks": tasks,
        "rows": cfg.rows,
        "seq": seq,
        "mode": mode,
        "model": cfg.model,
        "hidden": cfg.hidden,
        "dtype": cfg.dtype,
        **env,
        "setup": {
            **asdict(cfg),
            "rows_per_task": sorted({hi - lo for lo, hi in case.spans}),
            "streams_note": None
            if cfg.device == "cuda"
            else "no streams on the CPU: the streams_S schemes run the loop",
        },
        "check": {},
        "time_us": {},
        "timings": {},
        "error": None,
    }
    for scheme, fn in schemes(case, cfg).items():
        try:
            call: Callable[[], object] = fn
            if mode == "graph":
                call, output = graphed(fn)
                call()
            else:
                output = fn()
            err = rel_err(output, case.reference)
            record["check"][scheme] = err
            if err > cfg.tolerance:
                record["error"] = f"{scheme}: relative error {err:.3g} against the reference > {cfg.tolerance}"
                continue
            t = timed(call, cfg.device, cfg.warmup, cfg.iters, cfg.budget_s)
        except Exception as e:  # a scheme failing (capture, OOM) is recorded; the others still run
            record["error"] = f"{scheme}: {type(e).__name__}: {e}"
            continue
        record["timings"][scheme] = t.to_json()
        record["time_us"][scheme] = t.median_s * 1e6
    record.update(speedups(record["time_us"]))
    return record


def speedups(time_us: dict[str, float]) -> dict[str, Any]:
    """Each scheme over the loop on one stream (> 1: faster), and the best stream count."""
    loop = time_us.get("loop")
    over = {k: loop / v for k, v in time_us.items() if loop and k != "loop"}
    streams = {k: v for k, v in over.items() if k.startswith("streams_")}
    best = max(streams, key=lambda k: streams[k], default=None)
    return {
        "over_loop": over,
        "best_streams": None if best is None else int(best.removeprefix("streams_")),
        "best_streams_over_loop": None if best is None else streams[best],
    }


def run(cfg: Config) -> list[dict[str, Any]]:
    with on_device(cfg.device):
        return _run(cfg)


def _run(cfg: Config) -> list[dict[str, Any]]:
    modes = cfg.modes if cfg.device == "cuda" else tuple(m for m in cfg.modes if m == "eager")
    env = environment(cfg.device)
    out = RecordFile.for_run(cfg.out, "op_scheduling", cfg.smoke)
    started, skipped = time.perf_counter(), []
    for op in cfg.ops:
        for tasks in cfg.tasks:
            for seq in cfg.seqs:
                for mode in modes:
                    if cfg.time_budget_s is not None and time.perf_counter() - started > cfg.time_budget_s:
                        skipped.append(f"{op} {tasks} tasks seq {seq} {mode}")
                        continue
                    record = measure(cfg, op, tasks, seq, mode, env)
                    out.write(record)
                    progress(record)
    print(out.summary(started))
    if skipped:
        print(f"time budget {cfg.time_budget_s} s spent: skipped {', '.join(skipped)}")
    print(describe_env(env))
    print(table(out.records))
    return out.records


def progress(r: dict[str, Any]) -> None:
    t = r["time_us"]
    status = r["error"] or ", ".join(f"{k} {v:.0f} us" for k, v in t.items() if k in ("loop", "segmented"))
    print(f"  {r['op']} tasks={r['tasks']} seq={r['seq']} {r['mode']}: {status}", flush=True)


def table(records: list[dict[str, Any]]) -> str:
    lines = ["op       mode   tasks seq   loop us  best streams (S, x loop)  segmented us (x loop)  check"]
    for r in records:
        t, over = r["time_us"], r["over_loop"]
        loop, seg = t.get("loop"), t.get("segmented")
        best = r["best_streams"]
        streams = "-" if best is None else f"S={best}, {r['best_streams_over_loop']:.2f}x"
        segmented = "-" if seg is None else f"{seg:.0f} ({over['segmented']:.1f}x)"
        lines.append(
            f"{r['op']:<8} {r['mode']:<6} {r['tasks']:>5} {r['seq']:>3} {'-' if loop is None else f'{loop:.0f}':>9}"
            f"  {streams:>24}  {segmented:>21}  {'FAILED' if r['error'] else 'ok'}"
        )
    lines.append("PetS on a V100: multi-stream up to ~1.15x one stream, below 1x at seq 4.")
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(description=" ".join((__doc__ or "").split("\n\n")[0].split()))
    p.add_argument("--smoke", action="store_true", help="toy sizes on the CPU, fp32, eager only")
    p.add_argument("--suite", action="store_true", help="bench.all's configuration (about a minute on an H200)")
    p.add_argument("--ops", help=f"comma-separated, from {','.join(OPS)} (default: both)")
    p.add_argument("--tasks", help="comma-separated task counts (default 32,64,128)")
    p.add_argument("--seqs", help="comma-separated sequence lengths (default 4,8,16,32,64)")
    p.add_argument("--streams", help="comma-separated stream counts (default 1,2,4,8,16,32)")
    p.add_argument("--modes", help=f"comma-separated, from {','.join(MODES)} (default: both)")
    p.add_argument("--iters", type=int, help="timed calls per scheme at most (default 30)")
    p.add_argument("--time-budget", type=float, help="seconds: configurations left after it are skipped")
    p.add_argument("--out", type=Path, help="directory for the JSON Lines records (default bench/results)")
    args = p.parse_args(argv)
    cfg = SMOKE if args.smoke else SUITE if args.suite else Config()
    for flag, choices in (("ops", OPS), ("modes", MODES)):
        if getattr(args, flag):
            names: Any = tuple(v.strip() for v in getattr(args, flag).split(","))
            if unknown := [v for v in names if v not in choices]:
                p.error(f"--{flag}: unknown {unknown}; choose from {', '.join(choices)}")
            cfg = replace(cfg, **{flag: names})
    for flag in ("tasks", "seqs", "streams"):
        if getattr(args, flag):
            try:
                values: Any = tuple(int(v) for v in getattr(args, flag).split(","))
            except ValueError:
                p.error(f"--{flag}: expected comma-separated integers")
            if any(v < 1 for v in values):
                p.error(f"--{flag}: every value must be at least 1")
            cfg = replace(cfg, **{flag: values})
    if any(t > cfg.rows for t in cfg.tasks):
        p.error(f"--tasks: at most {cfg.rows} (the batch's rows), so that every task has a row")
    for flag, key in (("iters", "iters"), ("time_budget", "time_budget_s"), ("out", "out")):
        if getattr(args, flag) is not None:
            cfg = replace(cfg, **{key: getattr(args, flag)})
    return cfg


def main(argv: list[str] | None = None) -> None:
    run(parse(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
