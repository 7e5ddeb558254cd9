"""How many tasks one card serves (PetS Table 5): tasks loaded into one runtime, in growing steps, while it serves
batches of bs64 x s128, against SeqS (one merged model per task).

    python -m bench.capacity                         # GPU: bert-base, fp16, the kinds of DEFAULT_KINDS (~2 minutes)
    python -m bench.capacity --kinds all --seconds-per-kind 60 --max-tasks 1000000
    python -m bench.capacity --smoke                 # CPU, tiny config, fp32: checks that the script runs

For each kind, SeqS first: `seqs_models` merged models of the kind's tasks are loaded (bytes per model from the
allocator), one serves a batch, and the models that would fit in the memory left are projected. Then the kind's
runtime is compiled and grown (loading.Served, Runtime.add_task) to start, start x factor, ... tasks, up to
`max_tasks`, out of memory (caught, freed, recorded), or `seconds_per_kind` (compile and SeqS included: a step the
add rate measured so far says would overrun it is cut to what fits, and is the last). At each step a batch with
each row's task drawn uniformly over the loaded tasks is served and timed; at the first, its rows are checked
against their tasks' own models before anything is timed. Each step records bytes per task (allocator and tables)
and the count projected at full memory: loaded + (free memory - the batch's transient) / bytes per task, where
free memory is what the device reports free once the allocator's cache is emptied (the host's available memory
on the CPU). A projection assumes the tables grow in place; growing them by reallocation needs the old and the new
tables at once. One JSON record per kind; a short table last.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from bench.baselines import own_model
from bench.check import check_sampled
from bench.kinds import KINDS, Kind, kinds_arg, make_kinds
from bench.loading import Served, allocated
from bench.measure import draw, failure
from bench.models import MODELS, make_base
from bench.pets_exec import pets_forward
from bench.precision import Precision
from bench.records import RecordFile, describe_env, environment
from bench.throughput import RESULTS
from bench.timing import on_device, timed
from pets_compiler.frontend.base import BaseModel

# PetS's Table 5 runs tasks of random PET types (the mix); LoRA r8 is our smallest dense task, the Pfeiffer adapter
# and MaskBERT PetS's kinds at either end of its size range. Compiling takes 7-20 s a kind on the H200's host: all
# of KINDS (--kinds all) take ~4.5 minutes at the default seconds per kind.
DEFAULT_KINDS = ("mix", "lora_r8", "pfeiffer", "mask")
PETS_CLAIM = "PetS Table 5 (V100-32GB): up to 25x more concurrent tasks than SeqS"


@dataclass
class Config(Precision):
    model: str = "bert-base"
    device: str = "cuda"
    dtype: str = "float16"
    kinds: tuple[str, ...] = DEFAULT_KINDS
    batch: int = 64
    seq: int = 128
    start: int = 128  # PetS starts at 128 tasks (and adds 8 at a time); here each step multiplies by `factor`
    factor: int = 2
    max_tasks: int = 1 << 20
    seconds_per_kind: float = 28.0  # everything of a kind: SeqS, compile, loading, checking, serving
    seqs_models: int = 2
    warmup: int = 3
    iters: int = 10
    seed: int = 0
    out: Path = RESULTS
    smoke: bool = False


SMOKE = Config(
    model="tiny",
    device="cpu",
    dtype="float32",
    kinds=("lora_r8", "mix"),
    batch=4,
    seq=16,
    start=8,
    max_tasks=16,
    seconds_per_kind=30.0,
    warmup=1,
    iters=2,
    smoke=True,
)


def free_bytes(device: str) -> tuple[int, str]:
    """Memory more tasks could take now, and where the number comes from."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()  # the allocator's cached blocks are free for tables too
        return torch.cuda.mem_get_info()[0], "torch.cuda.mem_get_info free, after empty_cache"
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "host: available physical pages (sysconf)"


def transient_bytes(fn: Callable[[], object], device: str) -> int | None:
    """Allocator bytes one call takes beyond what it leaves allocated (activations); None on the CPU."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def projection(noun: str, loaded: int, per_item: float, device: str, transient: int | None) -> dict[str, Any]:
    """What is loaded plus what the free memory, less the serving transient, would hold (a projection)."""
    if per_item <= 0:
        raise ValueError(f"projection of {noun}: {per_item} bytes per item (the allocator saw no growth)")
    free, how = free_bytes(device)
    room = free - (transient or 0)
    return {
        "free_bytes": free,
        "free_bytes_how": how,
        "serving_transient_bytes": transient,
        f"projected_{noun}_at_full_memory": loaded + max(0, int(room // per_item)),
    }


def seqs_capacity(cfg: Config, base: BaseModel, kind: Kind) -> dict[str, Any]:
    """SeqS: merged models of the kind's first tasks, bytes per model, one serving a batch, the projected count."""
    before = allocated(cfg.device)
    models = [own_model(base, kind.task(i), cfg.device, cfg.torch_dtype) for i in range(cfg.seqs_models)]
    after = allocated(cfg.device)
    params = sum(t.numel() * t.element_size() for t in (*models[0].parameters(), *models[0].buffers()))
    per_model = params if before is None or after is None else (after - before) / len(models)
    ids, mask, _ = draw(1, cfg.batch, cfg.seq, cfg.seed, cfg.device)

    def serve() -> object:
        with torch.inference_mode():
            return models[0](ids, mask)

    timing = timed(serve, cfg.device, cfg.warmup, cfg.iters)
    projected = projection("models", len(models), per_model, cfg.device, transient_bytes(serve, cfg.device))
    return {
        "models_loaded": len(models),
        "bytes_per_model": per_model,
        "bytes_per_model_how": "parameters and buffers" if after is None else "allocator, over the models loaded",
        "parameter_bytes": params,
        "batch_timing": timing.to_json(),
        **projected,
    }


def check_first(cfg: Config, served: Served, rows: list[int], ids: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
    """The batch's sampled rows against their tasks' own fp32 models."""
    runtime, kind = served.runtime, served.kind
    assert runtime is not None
    names = [kind.task_name(i) for i in rows]
    part_of = {kind.task_name(i): kind.part(i).name for i in set(rows)}
    outputs = pets_forward(runtime, ids, mask, names)()
    result = check_sampled(runtime, served.base, outputs, ids, mask, names, part_of, cfg.device, cfg.tolerance)
    gc.collect()  # the own models go before free memory is measured
    return result.to_json()


def step(cfg: Config, served: Served, check: bool) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Serve a batch of the loaded tasks (checked first when `check`): the step's record and the check."""
    runtime, n = served.runtime, served.loaded
    assert runtime is not None
    ids, mask, rows = draw(n, cfg.batch, cfg.seq, cfg.seed, cfg.device)
    checked = check_first(cfg, served, rows, ids, mask) if check else None
    record: dict[str, Any] = {"tasks_loaded": n, "memory": served.memory()}
    if checked is not None and not checked["passed"]:
        return record, checked
    forward = pets_forward(runtime, ids, mask, [served.kind.task_name(i) for i in rows])
    timing = timed(forward, cfg.device, cfg.warmup, cfg.iters)
    per_task = record["memory"]["bytes_per_task"]
    record.update(
        batch_timing=timing.to_json(),
        seq_per_s=cfg.batch / timing.median_s,
        distinct_tasks_in_batch=len(set(rows)),
        **projection("tasks", n, per_task, cfg.device, transient_bytes(forward, cfg.device)),
    )
    return record, checked


def targets(cfg: Config, first: int) -> list[int]:
    out, n = [], cfg.start
    while n <= cfg.max_tasks:
        if n > first:
            out.append(n)
        n *= cfg.factor
    return out or [first]


def grow(cfg: Config, served: Served, record: dict[str, Any], started: float) -> str:
    """Load and serve step after step; each step's record goes to record["steps"]. Returns why it stopped."""
    served.load(min(served.kind.cycle + 1, cfg.max_tasks))  # compile, then one add: the first measured add rate
    spent = served.make_s + served.add_s
    rate = spent / max(1, served.loaded - served.compiled_with)
    for target in targets(cfg, served.loaded):
        left = cfg.seconds_per_kind - (time.perf_counter() - started)
        affordable = served.loaded + int(max(0.0, left) / max(rate, 1e-9))
        cut = affordable < target
        if cut and (affordable <= served.loaded and record["steps"]):
            return "seconds"
        before, n_before = served.make_s + served.add_s, served.loaded
        served.load(max(served.loaded, min(target, affordable)))
        if served.loaded > n_before:  # the last step's rate: sparse pools make each add dearer as they grow
            rate = (served.make_s + served.add_s - before) / (served.loaded - n_before)
        entry, checked = step(cfg, served, check=not record["steps"])
        entry["elapsed_s"] = time.perf_counter() - started
        record["steps"].append(entry)
        if checked is not None:
            record["check"] = checked
            if not checked["passed"]:
                record["error"] = f"correctness check failed: max relative error {checked['max_rel_err']:.3g}"
                return "check failed"
        if cut:
            return "seconds"
    return "max_tasks"


def capacity_of(cfg: Config, base: BaseModel, kind: Kind, env: dict[str, Any]) -> dict[str, Any]:
    """The kind's record: SeqS's count, then the runtime's steps; errors (out of memory included) are recorded."""
    started = time.perf_counter()
    record: dict[str, Any] = {
        "experiment": "capacity",
        "kind": kind.name,
        "model": cfg.model,
        "model_config": {
            k: getattr(base.config, k)
            for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        },
        "dtype": cfg.dtype,
        **env,
        "setup": {**asdict(cfg), "task_draw": "uniform per row", "token_ids": "uniform in [1000, 30000)"},
        "pets_reference": PETS_CLAIM,
        "steps": [],
        "error": None,
    }
    try:
        record["seqs"] = seqs_capacity(cfg, base, kind)
    except Exception as e:  # the runtime's count stands without SeqS's
        record["seqs"] = failure(e)
    gc.collect()
    served = Served(kind, base, cfg.device, cfg.dtype, "default")
    try:
        record["stopped_by"] = grow(cfg, served, record, started)
    except torch.OutOfMemoryError as e:
        record["stopped_by"] = "out of memory"
        in_runtime = None if served.runtime is None else len(served.runtime.task_names())
        record["out_of_memory"] = {
            "tasks_before_step": served.loaded,
            "tasks_in_runtime": in_runtime,
            "message": str(e).split("\n")[0],
        }
    except Exception as e:  # one kind failing must not stop the others
        record["stopped_by"] = "error"
        record.update(failure(e))
    finally:
        record.update(compile_s=served.compile_s, make_tasks_s=served.make_s, add_tasks_s=served.add_s)
        served.free()
    record["seconds"] = time.perf_counter() - started
    record.update(summary(record))
    return record


def summary(record: dict[str, Any]) -> dict[str, Any]:
    """The headline of a kind: its last step against SeqS."""
    last = record["steps"][-1] if record["steps"] else {}
    ours = last.get("projected_tasks_at_full_memory")
    seqs = (record.get("seqs") or {}).get("projected_models_at_full_memory")
    return {
        "tasks_loaded": last.get("tasks_loaded"),
        "bytes_per_task": (last.get("memory") or {}).get("bytes_per_task"),
        "projected_tasks_at_full_memory": ours,
        "seqs_projected_models_at_full_memory": seqs,
        "projected_over_seqs": ours / seqs if ours and seqs else None,
    }


def table(records: list[dict[str, Any]]) -> str:
    head = ("kind", "loaded", "bytes/task", "batch ms", "projected", "SeqS proj.", "ours/SeqS", "stopped by")
    widths = (9, 7, 11, 9, 11, 10, 9, 0)
    lines = [" ".join(f"{h:>{w}}" if w else h for h, w in zip(head, widths, strict=True))]
    for r in records:
        last = r["steps"][-1] if r["steps"] else {}
        ms = (last.get("batch_timing") or {}).get("median_s")
        cells = (
            r["kind"],
            _fmt(r.get("tasks_loaded"), "d"),
            _fmt(r.get("bytes_per_task"), ".3g"),
            _fmt(None if ms is None else ms * 1e3, ".2f"),
            _fmt(r.get("projected_tasks_at_full_memory"), ",d"),
            _fmt(r.get("seqs_projected_models_at_full_memory"), ",d"),
            _fmt(r.get("projected_over_seqs"), ".1f"),
            r.get("stopped_by", "-") + (f" ({r['error'][:60]})" if r.get("error") else ""),
        )
        lines.append(" ".join(f"{c:>{w}}" if w else c for c, w in zip(cells, widths, strict=True)))
    return "\n".join(lines)


def _fmt(value: float | int | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def run(cfg: Config) -> list[dict[str, Any]]:
    """Every kind of `cfg`; the records, also written to cfg.out as each kind finishes."""
    with on_device(cfg.device):
        started = time.perf_counter()
        print(f"capacity: {len(cfg.kinds)} kinds x {cfg.seconds_per_kind:g} s at most, on {cfg.device}", flush=True)
        base = make_base(MODELS[cfg.model], cfg.seed)
        env = environment(cfg.device)
        out = RecordFile.for_run(cfg.out, "capacity", cfg.smoke)
        for kind in make_kinds(base, cfg.kinds).values():
            record = capacity_of(cfg, base, kind, env)
            out.write(record)
            print(f"  {kind.name}: {record['stopped_by']} after {record['seconds']:.0f} s", flush=True)
        print(out.summary(started))
        print(f"{describe_env(env)}  ({PETS_CLAIM})")
        print(table(out.records))
        return out.records


def parse(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny config on the CPU, fp32, lora_r8 and the mix")
    p.add_argument(
        "--kinds", help=f"comma-separated from {','.join(KINDS)}, or all (default {','.join(DEFAULT_KINDS)})"
    )
    p.add_argument("--max-tasks", type=int, help="tasks loaded at most per kind")
    p.add_argument("--seconds-per-kind", type=float, help="seconds per kind at most, compile included (default 28)")
    p.add_argument("--start", type=int, help="tasks at the first step (default 128)")
    p.add_argument("--seqs-models", type=int, help="merged models SeqS loads per kind (default 2)")
    p.add_argument("--out", type=Path, help="directory for the JSON Lines records (default bench/results)")
    args = p.parse_args(argv)
    cfg = SMOKE if args.smoke else Config()
    if args.kinds:
        cfg = replace(cfg, kinds=kinds_arg(p, args.kinds))
    for flag, key in (
        ("max_tasks", "max_tasks"),
        ("seconds_per_kind", "seconds_per_kind"),
        ("start", "start"),
        ("seqs_models", "seqs_models"),
        ("out", "out"),
    ):
        if getattr(args, flag) is not None:
            cfg = replace(cfg, **{key: getattr(args, flag)})
    if cfg.max_tasks < 1 or cfg.start < 1 or cfg.seqs_models < 1:
        p.error("--max-tasks, --start and --seqs-models must be at least 1")
    return cfg


def main(argv: list[str] | None = None) -> None:
    run(parse(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
