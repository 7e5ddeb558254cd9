"""PetS's fixed-length throughput grid (its Fig. 7/8): the pets runtime against SeqS, ParS and peft's mixed batch,
on batches where each of N tasks brings bs rows of seq tokens; run by `python -m bench.throughput --grid`.

A configuration is (model, kind, N tasks, per-task bs, seq): a batch of N x bs rows, the rows of one task
contiguous (PetS's layout, which its per-task shadow ops need; the pets runtime takes any order), token ids
uniform in [1000, 30000), an all-ones mask. PetS gives each task a random PET type: the `mix` kind cycles task i
through the 7 kinds of bench/kinds.py (LoRA r8 and r16, BitFit, Pfeiffer, IA3, diff, mask) with a head each, so a
runtime of 2 or 4 mix tasks holds only those tasks' kinds and one of 7 or more holds every kind. `lora_r8` is the
second kind, the one peft's mixed batch can serve.

Before timing: the pets runtime's rows of tasks 0..CHECK_TASKS-1 against each task's own fp32 model (bench/check.py),
SeqS's rows against the same models, ParS's outputs against SeqS's, peft's pooled outputs against the runtime's.
Then, each timed in this process (CUDA-event medians after warm-up, bench/timing.py): ours (the runtime's public
forward: its CUDA-graph path on a GPU), SeqS (each task's own merged model on its rows, in turn), ParS (the same
models, task t on CUDA stream t % S, for each S in `pars_streams`; the ratio uses the fastest S) and peft (LoRA
kinds). queries/s = rows/s. SeqS's and ParS's models are real per-task models (no reuse), their unchanged
parameters shared (baselines.SeqS; the record gives distinct and unshared bytes). The baselines run eagerly (HF
modules, a Python launch per op; PetS's ran on a C++ runtime); `--pets-exec eager` times ours that way too.

Suite (`--suite`, bench.all's share of ~3 minutes on an H200; the printed per-part times are what to tune it with):
bert-base over four of PetS's six shapes (bs1 s128, bs1 s64, bs2 s32, bs4 s16) at 2-64 tasks (PetS's range; 128
by `--grid-tasks`), the mix kind; the large batches bs64 s128 and bs128 s64 at 32 tasks (2 and 4 rows per task) for
the mix and LoRA r8 (peft); distilbert at bs1 s128 and bs4 s16 with 8 and 16 tasks, bert-large there with 8; ParS
on 16 streams. Points left when the time budget runs out are skipped and listed. The full grid: `--grid` with
`--grid-models bert-base,distilbert,bert-large --grid-kinds mix,lora_r8 --grid-tasks 2,4,8,16,32,64,128`.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from bench.baselines import Group, PeftMixed, SeqS, assemble, in_turn, on_streams, own_model
from bench.check import CheckResult, check_rows, rel_err
from bench.kinds import Kind, make_kinds
from bench.loading import Served
from bench.measure import failure
from bench.models import MODELS, make_base
from bench.pets_exec import describe, pets_forward
from bench.records import RecordFile
from bench.timing import Timing, timed
from pets_compiler.frontend.base import BaseModel
from pets_compiler.oracle import OwnModel

if TYPE_CHECKING:
    from bench.throughput import Config

PETS_SHAPES = ((1, 128), (1, 64), (2, 64), (2, 32), (4, 32), (4, 16))  # per-task (bs, seq) of PetS's Fig. 7/8
GRID_TASKS = (2, 4, 8, 16, 32, 64, 128)
CHECK_TASKS = 8  # tasks 0..7: every kind of the mix, and 8 fp32 own models kept per part
# PetS on a V100, read off its Fig. 7/8 (seeds/ and /work/shared/PETS.md)
PETS_V100_OVER_SEQS = (1.5, 1.84)
PETS_V100 = (
    "PetS on a V100: 1.5-1.84x a single task's throughput (SeqS, ~190-200 q/s flat); at bs1 s128 with 2-16 tasks "
    "ParS ~320-375 q/s, PetS ~280-365 q/s"
)


@dataclass(frozen=True)
class GridRun:
    """Part of the grid: every kind x task count x per-task (bs, seq) of one model."""

    model: str
    kinds: tuple[str, ...] = ("mix",)
    tasks: tuple[int, ...] = GRID_TASKS
    shapes: tuple[tuple[int, int], ...] = PETS_SHAPES


# The issue's large batches, bs64 s128 and bs128 s64, as 32 tasks of 2 and 4 rows
LARGE = GridRun("bert-base", ("mix", "lora_r8"), (32,), ((2, 128), (4, 64)))
# bert-base at 2-64 tasks took ~160 s of the suite's 245 on the H200 (e918a44): 4 task counts of PetS's 1-64; at
# 44476b4 its six shapes and the large batches took the whole 130 s budget, leaving out distilbert and bert-large:
# 4 shapes (bs 1, 2, 4; 16-128 tokens a task), the other models before LoRA's large batches
SUITE_GRID = (
    GridRun("bert-base", ("mix",), (2, 8, 32, 64), ((1, 128), (1, 64), (2, 32), (4, 16))),
    GridRun("distilbert", ("mix",), (8, 16), ((1, 128), (4, 16))),
    GridRun("bert-large", ("mix",), (8,), ((1, 128), (4, 16))),
    LARGE,
)
# 8 and 16 mix tasks: one compile (every part from task 7 on), then grown
SMOKE_GRID = (GridRun("tiny", ("mix",), (8, 16), ((1, 16), (2, 8))), GridRun("tiny", ("lora_r8",), (2, 8), ((2, 8),)))


def points(runs: tuple[GridRun, ...]) -> dict[tuple[str, str], list[tuple[int, int, int]]]:
    """(model, kind) -> its (tasks, bs, seq) points, tasks ascending (one runtime grows through them), in the order
    the runs name them."""
    out: dict[tuple[str, str], set[tuple[int, int, int]]] = {}
    for run in runs:
        for kind in run.kinds:
            out.setdefault((run.model, kind), set()).update((n, bs, seq) for n in run.tasks for bs, seq in run.shapes)
    return {key: sorted(todo) for key, todo in out.items()}


@dataclass
class Part:
    """One (model, kind) of the grid: its runtime, baselines and fp32 own models, kept across its points."""

    cfg: Config
    model: str
    base: BaseModel
    kind: Kind
    env: dict[str, Any]
    max_tasks: int  # SeqS keeps a model for each task up to this many
    served: Served = field(init=False)
    seqs: SeqS = field(init=False)
    peft: PeftMixed | None = field(init=False)
    own: dict[str, OwnModel] = field(default_factory=dict)
    peft_s: float = 0.0

    def __post_init__(self) -> None:
        cfg = self.cfg
        self.served = Served(self.kind, self.base, cfg.device, cfg.dtype, cfg.pets_exec)
        self.seqs = SeqS(self.base, cfg.device, cfg.torch_dtype, max_models=self.max_tasks)
        rank = self.kind.lora_rank
        self.peft = PeftMixed.build(self.base, rank, cfg.device, cfg.torch_dtype) if rank else None

    def load(self, n: int) -> None:
        self.served.load(n)
        if self.peft is not None and len(self.peft.names) < n:
            t0 = time.perf_counter()
            for i in range(len(self.peft.names), n):
                name = self.kind.task_name(i)
                self.peft.add(name, self.runtime.task(name))
            self.peft.ready()
            self.peft_s += time.perf_counter() - t0

    @property
    def runtime(self) -> Any:
        assert self.served.runtime is not None
        return self.served.runtime

    def own_model(self, name: str) -> OwnModel:
        if name not in self.own:
            self.own[name] = own_model(self.base, self.runtime.task(name), self.cfg.device, torch.float32)
        return self.own[name]

    def check(
        self, logits: Tensor, embedding: Tensor, ids: Tensor, mask: Tensor, names: list[str], bs: int
    ) -> CheckResult:
        """The rows of tasks 0..CHECK_TASKS-1 (the first of each) against their own fp32 models."""
        rows = [t * bs for t in range(min(len(names) // bs, CHECK_TASKS))]
        return check_rows(
            logits, embedding, ids, mask, names, rows, self.own_model, self.runtime.task, self.cfg.tolerance
        )

    def measure(self, n: int, bs: int, seq: int) -> dict[str, Any]:
        """The record of n tasks x bs rows of seq tokens: checks first (a failed check of ours is the record), then
        ours, SeqS, ParS and peft timed. Errors are recorded, not raised."""
        cfg = self.cfg
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + n * 7919 + bs * 131 + seq)
        ids = torch.randint(1000, 30000, (n * bs, seq), generator=g).to(cfg.device)
        mask = torch.ones_like(ids)
        names = [self.kind.task_name(t) for t in range(n) for _ in range(bs)]
        record: dict[str, Any] = {
            "experiment": "throughput_grid",
            "model": self.model,
            "model_config": {
                k: getattr(self.base.config, k)
                for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
            },
            "kind": self.kind.name,
            "tasks": n,
            "per_task_batch": bs,
            "batch": n * bs,
            "seq": seq,
            "dtype": cfg.dtype,
            **self.env,
            "setup": {
                **asdict(cfg),
                "rows": "each task's bs rows contiguous, tasks in order (PetS's layout)",
                "token_ids": "uniform in [1000, 30000)",
                "attention_mask": "all ones (SeqS and ParS pass None: baselines.SeqS says why)",
                "baselines_run": "eagerly (HF modules); ours as pets_exec says",
                "pets_reference": PETS_V100,
            },
            "error": None,
        }
        try:
            self.load(n)
            record["compile_s"], record["add_tasks_s"] = self.served.compile_s, self.served.add_s
            record["memory"] = self.served.memory()
            forward = pets_forward(self.runtime, ids, mask, names)
            logits, embedding = forward()
            check = self.check(logits, embedding, ids, mask, names, bs)
            record["check"] = check.to_json()
            t0 = time.perf_counter()
            groups, record["seqs"] = self.seqs.groups(names, self.runtime.task)
            record["seqs"]["build_s"] = time.perf_counter() - t0  # the merged models of tasks new to this part
            if not check.passed:
                # The same rows through the merged own models in the same dtype: how far plain fp16 is from fp32.
                self.run_seqs(groups, ids, mask, names, bs, record["seqs"])
                record["error"] = check.failure()
                return record
            pets_t = timed(forward, cfg.device, cfg.warmup, cfg.iters, cfg.budget_s)
            record["pets_exec"] = describe(self.runtime, cfg.pets_exec)
            seqs_t, seqs_out = self.time_seqs(groups, ids, mask, names, bs, record["seqs"])
            pars_t, record["pars"] = self.time_pars(groups, ids, mask, seqs_out)
            peft_t, record["peft_mixed"] = self.time_peft(ids, mask, names, embedding)
            record.update(rates(n * bs, pets_t, seqs_t, pars_t, peft_t))
        except Exception as e:  # one configuration failing (OOM, a kernel error) must not stop the others
            record.update(failure(e))
        return record

    def time_seqs(
        self, groups: list[Group], ids: Tensor, mask: Tensor, names: list[str], bs: int, info: dict[str, Any]
    ) -> tuple[Timing | None, tuple[Tensor, Tensor]]:
        """SeqS checked (run_seqs) and timed; info gets what happened."""
        run, out, passed = self.run_seqs(groups, ids, mask, names, bs, info)
        if not passed:
            return None, out
        t = timed(run, self.cfg.device, min(self.cfg.warmup, 3), self.cfg.iters, self.cfg.baseline_budget_s)
        info["timing"] = t.to_json()
        return t, out

    def run_seqs(
        self, groups: list[Group], ids: Tensor, mask: Tensor, names: list[str], bs: int, info: dict[str, Any]
    ) -> tuple[Callable[[], Any], tuple[Tensor, Tensor], bool]:
        """SeqS run once and its rows checked against the same own models as ours: (the run, its outputs, passed);
        info gets the check and the models' weight bytes."""
        run = in_turn(groups, ids, self.seqs.mask_arg(mask))
        out = assemble(run(), groups, len(names))
        check = self.check(*out, ids, mask, names, bs)
        info.update(check=check.to_json(), weight_bytes=self.seqs.weight_bytes())
        if not check.passed:
            info["error"] = f"SeqS's own models fail the check: max relative error {check.max_rel_err:.3g}"
        return run, out, check.passed

    def time_pars(
        self, groups: list[Group], ids: Tensor, mask: Tensor, seqs_out: tuple[Tensor, Tensor]
    ) -> tuple[Timing | None, dict[str, Any]]:
        """ParS at each stream count, each checked against SeqS's outputs; the fastest timing."""
        cfg = self.cfg
        runs: list[dict[str, Any]] = []
        best: Timing | None = None
        for streams in cfg.pars_streams if cfg.device == "cuda" else (0,):
            run, info = on_streams(groups, ids, self.seqs.mask_arg(mask), streams, cfg.device)
            logits, embedding = assemble(run(), groups, int(ids.shape[0]))
            err = max(rel_err(embedding, seqs_out[1]), rel_err(logits, seqs_out[0]) if logits.numel() else 0.0)
            entry = {**info, "rel_err_vs_seqs": err, "agrees": err <= cfg.tolerance}
            if entry["agrees"]:
                t = timed(run, cfg.device, min(cfg.warmup, 3), cfg.iters, cfg.baseline_budget_s)
                entry["timing"] = t.to_json()
                best = t if best is None or t.median_s < best.median_s else best
            runs.append(entry)
        fastest = min((r for r in runs if "timing" in r), key=lambda r: r["timing"]["median_s"], default=None)
        return best, {"runs": runs, "best_streams": None if fastest is None else fastest["streams"]}

    def time_peft(
        self, ids: Tensor, mask: Tensor, names: list[str], embedding: Tensor
    ) -> tuple[Timing | None, dict[str, Any]]:
        if self.peft is None:
            return None, {"available": False, "reason": f"peft mixes LoRA adapters only, not {self.kind.name}"}
        agree = rel_err(self.peft.pooled(ids, mask, names), embedding)
        info = {"available": True, "adapters": len(self.peft.names), "build_s": self.peft_s, "rel_err_vs_pets": agree}
        if agree > self.cfg.tolerance:
            return None, {**info, "error": "peft's outputs differ from the pets runtime's"}
        cfg = self.cfg
        t = timed(self.peft.run(ids, mask, names), cfg.device, min(cfg.warmup, 3), cfg.iters, cfg.baseline_budget_s)
        return t, {**info, "timing": t.to_json()}

    def free(self) -> None:
        self.served.free()
        self.seqs.models.clear()
        self.own.clear()
        self.peft = None
        release(self.cfg.device)


def rates(rows: int, pets: Timing, seqs: Timing | None, pars: Timing | None, peft: Timing | None) -> dict[str, Any]:
    """Seconds per batch, queries (rows) per second, and ours over each baseline (> 1: ours is faster)."""
    times = {"pets": pets, "seqs": seqs, "pars": pars, "peft_mixed": peft}
    sec = {k: None if t is None else t.median_s for k, t in times.items()}
    ratio = {f"pets_over_{k}": None if s is None else s / pets.median_s for k, s in sec.items() if k != "pets"}
    ratio["pars_over_seqs"] = None if sec["seqs"] is None or sec["pars"] is None else sec["seqs"] / sec["pars"]
    return {
        "time_s": sec,
        "queries_per_s": {k: None if s is None else rows / s for k, s in sec.items()},
        "ratios": ratio,
        "pets_timing": pets.to_json(),
    }


def release(device: str) -> None:
    """Collect garbage and give the allocator's cached blocks back (after a failure, between parts)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def run_grid(cfg: Config, env: dict[str, Any], out: RecordFile, report: Callable[[dict[str, Any]], None]) -> None:
    """Every point of cfg.grid, a record each; points left once cfg.time_budget_s has passed are skipped."""
    started = time.perf_counter()
    skipped: list[str] = []
    bases: dict[str, BaseModel] = {}
    for (model, kind_name), todo in points(cfg.grid).items():
        if cfg.time_budget_s is not None and time.perf_counter() - started > cfg.time_budget_s:
            skipped += [f"{model} {kind_name} {n}x({bs}x{seq})" for n, bs, seq in todo]
            continue
        if model not in bases:
            bases.clear()  # one model's weights at a time
            bases[model] = make_base(MODELS[model], cfg.seed)
        t0 = time.perf_counter()
        print(f"grid {model} {kind_name}:", flush=True)
        kind = make_kinds(bases[model], (kind_name,))[kind_name]
        part = Part(cfg, model, bases[model], kind, env, max(n for n, _, _ in todo))
        try:
            for n, bs, seq in todo:
                if cfg.time_budget_s is not None and time.perf_counter() - started > cfg.time_budget_s:
                    skipped.append(f"{model} {kind_name} {n}x({bs}x{seq})")
                    continue
                record = part.measure(n, bs, seq)
                out.write(record)
                report(record)
                if record["error"]:
                    release(cfg.device)
        finally:
            part.free()
        print(f"  ({model} {kind_name}: {time.perf_counter() - t0:.0f} s)", flush=True)
    if skipped:
        print(f"time budget {cfg.time_budget_s} s spent: skipped {len(skipped)} points: {', '.join(skipped)}")


def progress(r: dict[str, Any]) -> None:
    q, ratio = r.get("queries_per_s") or {}, r.get("ratios") or {}
    status = r["error"] or (
        f"ours {_fmt(q.get('pets'), '.0f')} q/s, SeqS {_fmt(q.get('seqs'), '.0f')}, ParS {_fmt(q.get('pars'), '.0f')}"
        f", ours/SeqS {_fmt(ratio.get('pets_over_seqs'), '.2f')}"
    )
    print(f"  {r['kind']} tasks={r['tasks']} {r['per_task_batch']}x{r['seq']}: {status}", flush=True)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def grid_table(records: list[dict[str, Any]]) -> str:
    """The grid's closing table: queries/s of each system and ours over each baseline, one line per point."""
    head = "model       kind     tasks bs seq   ours q/s  SeqS q/s  ParS q/s  peft q/s  /SeqS  /ParS  /peft  check"
    lines = [head]
    for r in records:
        q, ratio = r.get("queries_per_s") or {}, r.get("ratios") or {}
        check = "FAILED" if r["error"] else ("ok" if (r.get("check") or {}).get("passed") else "-")
        lines.append(
            f"{r['model']:<11} {r['kind']:<8} {r['tasks']:>5} {r['per_task_batch']:>2} {r['seq']:>3} "
            + " ".join(f"{_fmt(q.get(k), '.0f'):>9}" for k in ("pets", "seqs", "pars", "peft_mixed"))
            + " "
            + " ".join(f"{_fmt(ratio.get(f'pets_over_{k}'), '.2f'):>6}" for k in ("seqs", "pars", "peft_mixed"))
            + f"  {check}"
        )
    over = [v for r in records if (v := (r.get("ratios") or {}).get("pets_over_seqs")) is not None]
    if over:
        lines.append(f"ours / SeqS here: {min(over):.2f}-{max(over):.2f}x. {PETS_V100}.")
    return "\n".join(lines)
