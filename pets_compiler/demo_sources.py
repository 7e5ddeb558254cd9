"""Synthetic task sources in the formats users bring (peft, AdapterHub, full fine-tunes), for `pets demo`.

The weights are random (there is no training here); the files follow each library's layout exactly, so the demo
exercises the same importers a user's real files go through.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification

from pets_compiler.frontend.base import BaseModel
from pets_compiler.frontend.weights_io import write_safetensors


def _peft_dir(out: Path, config: dict[str, object], tensors: dict[str, torch.Tensor]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=1))
    write_safetensors(tensors, out / "adapter_model.safetensors")
    return out


def _head(g: torch.Generator, prefix: str, labels: int, hidden: int) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight": torch.randn(labels, hidden, generator=g) * 0.2, f"{prefix}.bias": torch.zeros(labels)}


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
    config: dict[str, object] = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": targets}
    if labels:
        tensors |= _head(g, "base_model.model.classifier", labels, base.config.hidden_size)
        config |= {"task_type": "SEQ_CLS", "modules_to_save": ["classifier"]}
    return _peft_dir(out, config, tensors)


def write_ia3_dir(base: BaseModel, out: Path, *, targets: list[str], feedforward: list[str], seed: int) -> Path:
    """An IA3 task in peft's layout: `ia3_l` (1, in) for feedforward modules (input scale), (out, 1) otherwise."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for site, (out_f, in_f) in base.sites.linear.items():
        if any(site == t or site.endswith("." + t) for t in targets):
            ff = any(site == t or site.endswith("." + t) for t in feedforward)
            shape = (1, in_f) if ff else (out_f, 1)
            tensors[f"base_model.model.{site}.ia3_l"] = 1 + 0.2 * torch.randn(shape, generator=g)
    config: dict[str, object] = {"peft_type": "IA3", "target_modules": targets, "feedforward_modules": feedforward}
    return _peft_dir(out, config, tensors)


def write_adapterhub_dir(
    base: BaseModel, out: Path, *, preset: str, reduction_factor: int, labels: list[str] | None, seed: int
) -> Path:
    """A bottleneck adapter in AdapterHub's `save_adapter` layout: "pfeiffer" (output sublayers, adapter after
    the LayerNorm'd sum) or "houlsby" (both sublayers, before the LayerNorm), with a 2-layer head if `labels`."""
    g = torch.Generator().manual_seed(seed)
    hidden = base.config.hidden_size
    m = hidden // reduction_factor
    pfeiffer = preset == "pfeiffer"
    tensors = {}
    for sublayer in base.sites.sublayer:
        if pfeiffer and "attention" in sublayer:
            continue
        key = f"{sublayer}.adapters.{out.name}"
        tensors[f"{key}.adapter_down.0.weight"] = torch.randn(m, hidden, generator=g) / hidden**0.5
        tensors[f"{key}.adapter_down.0.bias"] = torch.randn(m, generator=g) * 0.1
        tensors[f"{key}.adapter_up.weight"] = torch.randn(hidden, m, generator=g) * 0.05
        tensors[f"{key}.adapter_up.bias"] = torch.randn(hidden, generator=g) * 0.01
    config = {
        "mh_adapter": not pfeiffer,
        "output_adapter": True,
        "reduction_factor": reduction_factor,
        "non_linearity": "relu" if pfeiffer else "swish",
        "original_ln_before": pfeiffer,
        "original_ln_after": True,
        "residual_before_ln": True,
        "scaling": 1.0,
    }
    meta = {
        "config": config,
        "hidden_size": hidden,
        "model_type": "bert",
        "name": out.name,
        "version": "adapters.1.3.0",
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(json.dumps(meta, indent=1))
    write_safetensors(tensors, out / "adapter.safetensors")
    if labels:
        head = {f"heads.{out.name}.1.weight": torch.randn(hidden, hidden, generator=g) / hidden**0.5}
        head[f"heads.{out.name}.1.bias"] = torch.zeros(hidden)
        head |= _head(g, f"heads.{out.name}.4", len(labels), hidden)
        head_cfg = {"head_type": "classification", "layers": 2, "activation_function": "tanh", "use_pooler": False}
        head_cfg |= {"num_labels": len(labels), "label2id": {label: i for i, label in enumerate(labels)}}
        (out / "head_config.json").write_text(json.dumps({"config": head_cfg, "name": out.name}, indent=1))
        write_safetensors(head, out / "model_head.safetensors")
    return out


def write_finetune_dir(base: BaseModel, out: Path, *, kind: str, density: float, labels: list[str], seed: int) -> Path:
    """A full fine-tuned BertForSequenceClassification: "bitfit" changed biases and LayerNorms only, "diff"
    changed `density` of every weight matrix (embeddings too), "mask" zeroed `density` of them (MaskBERT)."""
    g = torch.Generator().manual_seed(seed)
    cfg = BertConfig.from_dict({**base.config.to_dict(), "id2label": dict(enumerate(labels))})
    model = BertForSequenceClassification(cfg)
    model.bert.load_state_dict(base.state_dict, strict=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("classifier"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif kind == "bitfit" and (name.endswith(".bias") or "LayerNorm" in name):
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
            elif kind in ("diff", "mask") and p.dim() == 2:
                chosen = torch.rand(p.shape, generator=g) < density
                p[chosen] = 0.0 if kind == "mask" else p[chosen] + 0.05 * torch.randn(int(chosen.sum()), generator=g)
    model.save_pretrained(out)
    return out
