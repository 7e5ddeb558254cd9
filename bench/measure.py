"""One configuration of the throughput bench (a kind, a task count, a shape): draw a batch, check it, time the
pets runtime and the baselines, profile the pets ops against their floors, and return the record."""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from transformers import BertModel

import pets_compiler
from bench.baselines import PLAIN_TASK, GraphedBackbone, PeftMixed, SeqS, backbone_eager, backbone_graph
from bench.check import check_sampled, rel_err
from bench.floors import BatchStats, DeviceFloors, backbone_floor, profile_ops
from bench.kinds import Kind
from bench.loading import Served
from bench.pets_exec import describe, eager, pets_forward
from bench.records import RecordFile, goals
from bench.timing import Timing, timed
from pets_compiler.frontend.base import BaseModel

if TYPE_CHECKING:
    from bench.throughput import Config


@dataclass
class Shared:
    """What every configuration of a run uses: the base, the backbone, the device floors, the records."""

    cfg: Config
    base: BaseModel
    env: dict[str, Any]
    floors: DeviceFloors
    backbone: BertModel
    records: RecordFile
    plain: pets_compiler.Runtime | None = None  # baselines.plain_runtime
    graphs: dict[tuple[int, int], GraphedBackbone] = field(default_factory=dict)


def draw(n: int, batch: int, seq: int, seed: int, device: str) -> tuple[Tensor, Tensor, list[int]]:
    """Token ids in [1000, 30000), an all-ones mask, and each row's task index drawn uniformly from n."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + n * 7919 + batch * 131 + seq)
    ids = torch.randint(1000, 30000, (batch, seq), generator=g)
    rows = torch.randint(0, n, (batch,), generator=g).tolist()
    return ids.to(device), torch.ones_like(ids).to(device), rows


def time_backbone(s: Shared, ids: Tensor, mask: Tensor, graph: GraphedBackbone | None) -> dict[str, Timing]:
    """The backbone alone: eager, and replayed from its CUDA graph when there is one."""
    cfg = s.cfg
    out = {"eager": timed(backbone_eager(s.backbone, ids, mask), cfg.device, cfg.warmup, cfg.iters, cfg.budget_s)}
    if graph is not None:
        graph.static_ids.copy_(ids)
        out["graph"] = timed(graph.run, cfg.device, cfg.warmup, cfg.iters, cfg.budget_s)
    if s.plain is not None:
        names = [PLAIN_TASK] * int(ids.shape[0])
        plain = pets_forward(s.plain, ids, mask, names)
        out["pets_plain"] = timed(plain, cfg.device, cfg.warmup, cfg.iters, cfg.budget_s)
    return out


def graph_for(s: Shared, ids: Tensor) -> tuple[GraphedBackbone | None, str | None]:
    """The backbone's CUDA graph for this shape (captured once per run), or None and why."""
    if s.cfg.device != "cuda":
        return None, "no CUDA graphs on the CPU"
    key = (int(ids.shape[0]), int(ids.shape[1]))
    if key not in s.graphs:
        try:
            s.graphs[key] = backbone_graph(s.backbone, ids)
        except Exception as e:  # the eager backbone is still a valid denominator; say why there is no graph
            return None, f"capture failed: {type(e).__name__}: {e}"
    return s.graphs[key], None


def measure_config(
    s: Shared, kind: Kind, served: Served, peft: PeftMixed | None, seqs: SeqS, n: int, batch: int, seq: int
) -> dict[str, Any]:
    """The record of `kind` with `n` tasks loaded at batch x seq: the check first (a failed check is the record),
    then the backbone, pets, peft, SeqS, the backbone again, and the op profile. Errors are recorded, not raised."""
    cfg = s.cfg
    runtime = served.runtime
    assert runtime is not None
    ids, mask, rows = draw(n, batch, seq, cfg.seed, cfg.device)
    names = [kind.task_name(i) for i in rows]
    part_of = {kind.task_name(i): kind.part(i).name for i in set(rows)}
    record: dict[str, Any] = {
        "experiment": "throughput",
        "kind": kind.name,
        "tasks": n,
        "batch": batch,
        "seq": seq,
        "model": cfg.model,
        "model_config": {
            k: getattr(s.base.config, k)
            for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        },
        "dtype": cfg.dtype,
        **s.env,
        "setup": {
            **asdict(cfg),
            "task_draw": "uniform per row",
            "distinct_tasks_in_batch": len(set(rows)),
            "token_ids": "uniform in [1000, 30000)",
            "attention_mask": "all ones",
        },
        "compile_s": served.compile_s,
        "make_tasks_s": served.make_s,
        "add_tasks_s": served.add_s,
        "compiled_with_tasks": served.compiled_with,
        "memory": served.memory(),
        "error": None,
    }
    forward = pets_forward(runtime, ids, mask, names)
    try:
        logits, embedding = forward()
        check = check_sampled(
            runtime, s.base, (logits, embedding), ids, mask, names, part_of, cfg.device, cfg.tolerance
        )
        record["check"] = check.to_json()
        record["pets_exec"] = describe(runtime, cfg.pets_exec)
        if not check.passed:
            record["error"] = check.failure()
            return record
        graph, no_graph = graph_for(s, ids)
        before = time_backbone(s, ids, mask, graph)
        pets_t = timed(forward, cfg.device, cfg.warmup, cfg.iters, cfg.budget_s)
        record["pets_exec"] = describe(runtime, cfg.pets_exec)
        peft_t, record["peft_mixed"] = time_peft(s, peft, kind, ids, mask, names, embedding)
        seqs_t, record["seqs"] = time_seqs(s, seqs, ids, mask, names, runtime.task)
        after = time_backbone(s, ids, mask, graph)
        record.update(times(s, before, after, pets_t, peft_t, seqs_t, batch, no_graph, graph, ids, mask))
        with eager(runtime, cfg.pets_exec) as how:
            stats = batch_stats(kind, rows, n, s.cfg.torch_dtype, runtime)
            forwards = cfg.profile_forwards if pets_t.median_s < 0.5 else 1  # a slow path: one forward tells enough
            record["ops"] = {"ran": how, **profile_ops(forward, cfg.device, stats, s.floors, forwards)}
        record["floors"] = {
            "device": s.floors.to_json(),
            "backbone": backbone_floor(s.base.config, batch, seq, s.floors, stats.act_bytes),
        }
    except Exception as e:  # one configuration failing (OOM, a kernel error) must not stop the others
        record.update(failure(e))
    finally:
        record["goals"] = goals(record)
    return record


def failure(e: BaseException) -> dict[str, str]:
    return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=8)}


def time_peft(
    s: Shared, peft: PeftMixed | None, kind: Kind, ids: Tensor, mask: Tensor, names: list[str], pets_embedding: Tensor
) -> tuple[Timing | None, dict[str, Any]]:
    if peft is None:
        return None, {
            "available": False,
            "reason": f"peft has no mixed batch (adapter_names=) for {kind.name}: it mixes LoRA adapters only",
        }
    try:
        agree = rel_err(peft.pooled(ids, mask, names), pets_embedding)
        t = timed(peft.run(ids, mask, names), s.cfg.device, min(s.cfg.warmup, 3), s.cfg.iters, s.cfg.baseline_budget_s)
    except Exception as e:  # the pets numbers stand without this baseline
        return None, {"available": True, **failure(e)}
    return t, {
        "available": True,
        "adapters": len(peft.names),
        "built_with": peft.how,
        "rel_err_vs_pets": agree,  # the same LoRA weights: peft computes what the runtime does
        "agrees": agree <= s.cfg.tolerance,
        "timing": t.to_json(),
    }


def time_seqs(
    s: Shared, seqs: SeqS, ids: Tensor, mask: Tensor, names: list[str], spec: Callable[[str], Any]
) -> tuple[Timing | None, dict[str, Any]]:
    try:
        run, info = seqs.plan(ids, mask, names, spec)
        t = timed(run, s.cfg.device, min(s.cfg.warmup, 3), s.cfg.iters, s.cfg.baseline_budget_s)
    except Exception as e:  # the pets numbers stand without this baseline
        return None, failure(e)
    return t, {**info, "timing": t.to_json()}


def times(
    s: Shared,
    before: dict[str, Timing],
    after: dict[str, Timing],
    pets_t: Timing,
    peft_t: Timing | None,
    seqs_t: Timing | None,
    batch: int,
    no_graph: str | None,
    graph: GraphedBackbone | None,
    ids: Tensor,
    mask: Tensor,
) -> dict[str, Any]:
    """Times, seq/s and ratios. The backbone's denominator is its fastest path at its better time (before or after
    the pets, peft and SeqS timings): a disturbance in one backbone timing makes the ratio stricter, never kinder."""
    best = {k: min(before[k].median_s, after[k].median_s) for k in before}
    path = min(best, key=lambda k: best[k])
    denominator = best[path]
    backbone: dict[str, Any] = {k: {"before": before[k].to_json(), "after": after[k].to_json()} for k in before}
    backbone["denominator"] = path
    backbone["graph_note"] = no_graph or "captured with attention_mask=None (all ones: the same attention)"
    if graph is not None:
        with torch.inference_mode():
            eager_pooled = s.backbone(input_ids=ids, attention_mask=mask).pooler_output
        graph.run()
        backbone["graph_rel_err_vs_eager"] = rel_err(graph.output, eager_pooled)
    pets = pets_t.median_s
    peft_s, seqs_s = (t.median_s if t else None for t in (peft_t, seqs_t))
    return {
        "backbone": backbone,
        "time_s": {"backbone": denominator, "pets": pets, "peft_mixed": peft_s, "seqs": seqs_s},
        "pets_timing": pets_t.to_json(),
        "seq_per_s": {
            "backbone": batch / denominator,
            "pets": batch / pets,
            "peft_mixed": batch / peft_s if peft_s else None,
            "seqs": batch / seqs_s if seqs_s else None,
        },
        "ratios": {
            "pets_over_backbone": denominator / pets,
            "pets_over_peft": peft_s / pets if peft_s else None,
            "pets_over_seqs": seqs_s / pets if seqs_s else None,
        },
    }


def batch_stats(kind: Kind, rows: list[int], n: int, dtype: torch.dtype, runtime: Any) -> BatchStats:
    sparse = [kind.part(i).sparse is not None for i in range(n)]
    col = [t for key, t in runtime.tables.tensors.items() if key.endswith("sparse_col")]
    return BatchStats(
        rows=len(rows),
        distinct_tasks=len(set(rows)),
        sparse_rows=sum(sparse[i] for i in rows),
        sparse_distinct=len({i for i in rows if sparse[i]}),
        sparse_loaded=sum(sparse),
        act_bytes=torch.empty(0, dtype=dtype).element_size(),
        index_bytes=col[0].element_size() if col else 8,
    )
