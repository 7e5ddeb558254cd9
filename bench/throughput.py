"""Mixed-task throughput against the backbone alone and peft's mixed-batch LoRA, in one process.

    python -m bench.throughput            # GPU: bert-base config, random weights, fp16
    python -m bench.throughput --smoke    # CPU, tiny config: checks that the script runs

Each configuration is checked for correctness before it is timed (the runtime's rows against each task's own
merged model); times are CUDA-event medians after warm-up. One JSON record per configuration is written to
bench/results/. This is the issue-4 harness in its first form: LoRA only, ops through the CUDA fallback.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import BertConfig, BertModel

import pets_compiler
from pets_compiler.frontend.base import BaseModel, fingerprint, read_pooling
from pets_compiler.frontend.taskset import LoRA, TaskSpec
from pets_compiler.oracle import merged_model

RESULTS = Path(__file__).parent / "results"
BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)


@dataclass
class Config:
    device: str = "cuda"
    dtype: str = "float16"
    model: dict[str, int] = field(default_factory=lambda: dict(BERT_BASE))
    shapes: tuple[tuple[int, int], ...] = ((64, 128), (128, 64))
    tasks: tuple[int, ...] = (1, 32)
    rank: int = 8
    warmup: int = 10
    iters: int = 50


def make_base(cfg: Config) -> BaseModel:
    torch.manual_seed(0)
    config = BertConfig(**cfg.model, vocab_size=30522, max_position_embeddings=512)
    state = {
        k: v for k, v in BertModel(config).state_dict().items() if not k.endswith(("position_ids", "token_type_ids"))
    }
    return BaseModel(
        Path("."), config, state, read_pooling(Path("/nonexistent"), True), None, 512, fingerprint(config, state)
    )


def lora_task(base: BaseModel, name: str, rank: int, seed: int) -> TaskSpec:
    g = torch.Generator().manual_seed(seed)
    spec = TaskSpec(name, source="bench")
    for site, (out_f, in_f) in base.sites.linear.items():
        if site.endswith(("query", "value")):
            a = torch.randn(rank, in_f, generator=g) / in_f**0.5
            spec.site(site).lora = LoRA(a, torch.randn(out_f, rank, generator=g) * 0.05, 2.0)
    return spec


def timed(fn: Callable[[], object], cfg: Config) -> float:
    """Median seconds per call."""
    for _ in range(cfg.warmup):
        fn()
    times = []
    for _ in range(cfg.iters):
        if cfg.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def check(runtime: pets_compiler.Runtime, base: BaseModel, ids: torch.Tensor, names: list[str], tol: float) -> float:
    """Worst relative error of a few rows against their own merged fp32 model (on the CPU)."""
    _, emb = runtime.forward(ids, torch.ones_like(ids), names)
    worst = 0.0
    for i in range(min(3, len(names))):
        own = merged_model(base, runtime.task(names[i]).to(torch.float32))
        _, want = own(ids[i : i + 1].cpu(), torch.ones_like(ids[i : i + 1]).cpu())
        worst = max(worst, float((emb[i].float().cpu() - want[0]).abs().max() / want[0].abs().max()))
    if worst > tol:
        raise SystemExit(f"correctness check failed: relative error {worst:.2e} > {tol}")
    return worst


def environment(cfg: Config) -> dict[str, str]:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    # The GPU machine gets a copy of the tree without .git: the caller passes the commit in PETS_COMMIT.
    stamp = commit.stdout.strip() or os.environ.get("PETS_COMMIT", "unknown")
    import peft
    import transformers

    return {
        "device": torch.cuda.get_device_name() if cfg.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "commit": stamp,
    }


def peft_mixed(
    base: BaseModel, cfg: Config, tasks: int, dtype: torch.dtype
) -> Callable[[torch.Tensor, list[str]], object]:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(base.build(), LoraConfig(r=cfg.rank, target_modules=["query", "value"]), adapter_name="t0")
    for t in range(1, tasks):
        model.add_adapter(f"t{t}", LoraConfig(r=cfg.rank, target_modules=["query", "value"]))
    model = model.to(cfg.device, dtype).eval()

    def run(ids: torch.Tensor, names: list[str]) -> object:
        with torch.inference_mode():
            return model(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names)

    return run


def measure(
    backbone: torch.nn.Module,
    runtime: pets_compiler.Runtime,
    peft_run: Callable[[torch.Tensor, list[str]], object],
    ids: torch.Tensor,
    names: list[str],
    cfg: Config,
) -> tuple[tuple[float, float], float, float]:
    """Seconds per batch: the backbone alone, the pets runtime, peft's mixed batch; same ids, same process.
    The backbone is timed before and after the others and the two medians averaged, so that a drift of the
    (shared) card's speed during the run does not favour either side; both are in the record."""
    mask = torch.ones_like(ids)

    def base() -> object:
        with torch.inference_mode():
            return backbone(input_ids=ids, attention_mask=mask)

    first = timed(base, cfg)
    ours, peft_s = timed(lambda: runtime.forward(ids, mask, names), cfg), timed(lambda: peft_run(ids, names), cfg)
    second = timed(base, cfg)
    return (first, second), ours, peft_s


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="tiny config on the CPU, one shape, few iterations")
    args = parser.parse_args()
    cfg = Config()
    if args.smoke:
        cfg = Config(
            device="cpu", dtype="float32", model=dict(TINY), shapes=((4, 16),), tasks=(1, 4), warmup=1, iters=2
        )
    dtype = getattr(torch, cfg.dtype)
    base = make_base(cfg)
    env = environment(cfg)
    backbone = base.build().to(cfg.device, dtype)
    records = []
    for tasks in cfg.tasks:
        t0 = time.perf_counter()
        specs = {f"t{i}": lora_task(base, f"t{i}", cfg.rank, seed=i) for i in range(tasks)}
        runtime = pets_compiler.compile(base, specs, dtype=cfg.dtype).to(cfg.device)
        compile_s = time.perf_counter() - t0
        peft_run = peft_mixed(base, cfg, tasks, dtype)
        for batch, seq in cfg.shapes:
            g = torch.Generator().manual_seed(batch * seq)
            ids = torch.randint(1000, 30000, (batch, seq), generator=g).to(cfg.device)
            names = [f"t{int(i)}" for i in torch.randint(0, tasks, (batch,), generator=g)]
            error = check(runtime, base, ids, names, tol=1e-2 if cfg.dtype != "float32" else 1e-4)
            (base_first, base_second), ours_s, peft_s = measure(backbone, runtime, peft_run, ids, names, cfg)
            base_s = (base_first + base_second) / 2
            record = {
                "experiment": "throughput",
                "config": asdict(cfg),
                "kind": f"lora_r{cfg.rank}_qv",
                "tasks": tasks,
                "batch": batch,
                "seq": seq,
                "check_max_rel_err": error,
                "compile_s": compile_s,
                "backbone_s_before_after": [base_first, base_second],
                "seq_per_s": {"backbone": batch / base_s, "pets": batch / ours_s, "peft_mixed": batch / peft_s},
                "ratio_pets_over_backbone": base_s / ours_s,
                "ratio_pets_over_peft": peft_s / ours_s,
                **env,
            }
            records.append(record)
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = RESULTS / f"throughput-{'smoke-' if args.smoke else ''}{stamp}.json"
    out.write_text(json.dumps(records, indent=1))
    print(f"device: {env['device']}  torch {env['torch']}  commit {env['commit']}  -> {out}")
    header = ("tasks", "bs", "seq", "backbone/s", "pets/s", "peft/s", "pets/bb", "pets/peft")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (5, 4, 4, 11, 9, 9, 8, 9), strict=True)))
    for r in records:
        s = r["seq_per_s"]
        print(
            f"{r['tasks']:>5} {r['batch']:>4} {r['seq']:>4} {s['backbone']:>11.0f} {s['pets']:>9.0f} "
            f"{s['peft_mixed']:>9.0f} {r['ratio_pets_over_backbone']:>8.3f} {r['ratio_pets_over_peft']:>9.2f}"
        )


if __name__ == "__main__":
    main()
