"""Extract a task from a full fine-tuned HF checkpoint by comparing it with the base.

A fine-tune that differs from the base only in biases and LayerNorm parameters is a BitFit task (plus its
classification head). One that changed a weight matrix is refused here, naming the parameter and how much of it
changed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from pets_compiler.errors import TaskSourceError
from pets_compiler.frontend.base import WEIGHT_FILES, BaseModel, strip_prefix
from pets_compiler.frontend.taskset import Head, LayerNormDelta, TaskSpec
from pets_compiler.frontend.weights_io import find_weights_file, read_weights

_ARCH_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
_IGNORED = ("embeddings.position_ids",)


def is_finetune_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any((path / f).is_file() for f in WEIGHT_FILES)


def _check_config(path: Path, base: BaseModel) -> list[str]:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TaskSourceError(f"{path}/config.json: {e}") from None
    if not isinstance(cfg, dict):
        raise TaskSourceError(f"{path}/config.json: holds JSON {type(cfg).__name__}, expected an object")
    if cfg.get("model_type") != "bert":
        raise TaskSourceError(f"{path}: model_type {cfg.get('model_type')!r} is not supported; only 'bert' is")
    for key in _ARCH_KEYS:
        if key in cfg and cfg[key] != getattr(base.config, key):
            raise TaskSourceError(f"{path}: {key} is {cfg[key]}, the base has {getattr(base.config, key)}")
    id2label = cfg.get("id2label") or {}
    return [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(len(id2label))]


def _changed(name: str, tuned: Tensor, ref: Tensor, path: Path) -> Tensor | None:
    if tuned.shape != ref.shape:
        raise TaskSourceError(f"{path}: {name} has shape {tuple(tuned.shape)}, the base has {tuple(ref.shape)}")
    # Compared in the base's dtype: a base served in fp16 (a loaded fp16 artifact) equals the fp32 fine-tune's
    # untouched weights rounded to fp16. The delta itself keeps the fine-tune's precision.
    if torch.equal(tuned.to(ref.dtype), ref):
        return None
    wide = torch.promote_types(tuned.dtype, torch.float32)
    return tuned.to(wide) - ref.to(wide)


def load_finetune(path: Path, name: str, base: BaseModel) -> TaskSpec:
    """BitFit deltas for every bias (embeddings LayerNorm and pooler included) and the classifier head."""
    labels = _check_config(path, base)
    tuned = {k: v for k, v in strip_prefix(read_weights(find_weights_file(path, WEIGHT_FILES))).items()}
    spec = TaskSpec(name=name, source=f"finetune:{path}")
    missing = [k for k in base.state_dict if k not in tuned]
    if missing:
        raise TaskSourceError(f"{path}: {len(missing)} base parameters are missing, e.g. {missing[:3]}")
    sites = base.sites
    for key, ref in base.state_dict.items():
        delta = _changed(key, tuned[key], ref, path)
        if delta is None:
            continue
        module, _, param = key.rpartition(".")
        if module in sites.linear and param == "bias":
            spec.site(module).bias = delta
        elif module in sites.layer_norm:
            site = spec.site(module)
            old = site.layer_norm or LayerNormDelta(torch.zeros_like(delta), torch.zeros_like(delta))
            site.layer_norm = LayerNormDelta(
                weight=delta if param == "weight" else old.weight, bias=delta if param == "bias" else old.bias
            )
        else:
            frac = float((tuned[key].to(ref.dtype) != ref).float().mean())
            raise TaskSourceError(
                f"{path}: {key} changed ({frac:.1%} of its entries): only biases and LayerNorm parameters may "
                "differ from the base in a BitFit fine-tune"
            )
    extra = [k for k in tuned if k not in base.state_dict and k not in _IGNORED and not k.startswith("classifier.")]
    if extra:
        raise TaskSourceError(f"{path}: parameters not in a BERT sequence classifier: {extra[:3]}")
    if "classifier.weight" in tuned:
        weight, bias = tuned["classifier.weight"], tuned.get("classifier.bias")
        if weight.dim() != 2 or weight.shape[1] != base.config.hidden_size or bias is None:
            raise TaskSourceError(f"{path}: classifier.weight {tuple(weight.shape)} does not fit the base hidden size")
        if len(labels) != weight.shape[0]:
            labels = [f"LABEL_{i}" for i in range(weight.shape[0])]
        spec.head = Head(weight=weight, bias=bias, labels=tuple(labels))
    return spec
