"""Extract a task from a full fine-tuned HF checkpoint by comparing it with the base.

Per parameter that differs from the base:
- a bias of a linear -> BitFit bias delta; a LayerNorm weight or bias -> LayerNorm delta;
- a weight matrix (linear or embedding) changed in at most `max_density` of its entries -> a sparse delta:
  "mask" (MaskBERT) when every changed entry became exactly 0 (W_t = W * M), else "diff" (diff-pruning);
- anything denser is refused as "not a PET task", naming the parameter and its density.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from pets_compiler.errors import TaskSourceError
from pets_compiler.frontend.base import WEIGHT_FILES, BaseModel, strip_prefix
from pets_compiler.frontend.taskset import Head, LayerNormDelta, SparseDelta, TaskSpec
from pets_compiler.frontend.weights_io import find_weights_file, read_json_object, read_weights

DEFAULT_MAX_DENSITY = 0.10
_ARCH_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
_IGNORED = ("embeddings.position_ids",)


def is_finetune_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any((path / f).is_file() for f in WEIGHT_FILES)


def _check_config(path: Path, base: BaseModel) -> list[str]:
    cfg = read_json_object(path / "config.json")
    if cfg.get("model_type") != "bert":
        raise TaskSourceError(f"{path}: model_type {cfg.get('model_type')!r} is not supported; only 'bert' is")
    for key in _ARCH_KEYS:
        if key in cfg and cfg[key] != getattr(base.config, key):
            raise TaskSourceError(f"{path}: {key} is {cfg[key]}, the base has {getattr(base.config, key)}")
    id2label = cfg.get("id2label") or {}
    return [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(len(id2label))]


def sparse_delta(name: str, tuned: Tensor, ref: Tensor, max_density: float, where: Path) -> SparseDelta:
    """The changed entries of a weight matrix as a mask or diff delta, or a refusal when too many changed."""
    changed = tuned != ref
    density = float(changed.float().mean())
    if density > max_density:
        raise TaskSourceError(
            f"{where}: {name} changed in {density:.1%} of its entries, more than the {max_density:.0%} a sparse "
            "(diff-pruning / MaskBERT) task may change: not a PET task"
        )
    index = changed.nonzero().t().contiguous()  # row-major, unique
    new = tuned[changed]
    kind = "mask" if bool((new == 0).all()) else "diff"
    values = new - ref[changed] if kind == "diff" else -ref[changed]
    return SparseDelta(kind, index, values.contiguous(), (int(ref.shape[0]), int(ref.shape[1])))


def load_finetune(path: Path, name: str, base: BaseModel, max_density: float = DEFAULT_MAX_DENSITY) -> TaskSpec:
    """Every kind a full fine-tune can be reduced to: BitFit, LayerNorm deltas, diff-pruning, MaskBERT, head."""
    labels = _check_config(path, base)
    tuned = strip_prefix(read_weights(find_weights_file(path, WEIGHT_FILES)))
    spec = TaskSpec(name=name, source=f"finetune:{path}")
    missing = [k for k in base.state_dict if k not in tuned]
    if missing:
        raise TaskSourceError(f"{path}: {len(missing)} base parameters are missing, e.g. {missing[:3]}")
    sites = base.sites
    for key, ref in base.state_dict.items():
        value = tuned[key]
        if value.shape != ref.shape:
            raise TaskSourceError(f"{path}: {key} has shape {tuple(value.shape)}, the base has {tuple(ref.shape)}")
        # Compared in the base's dtype: a base served in fp16 equals the fp32 fine-tune's untouched weights rounded
        # to fp16. Deltas keep the fine-tune's precision.
        value = value.to(ref.dtype) if torch.equal(value.to(ref.dtype), ref) else value
        if torch.equal(value, ref):
            continue
        wide = torch.promote_types(value.dtype, torch.float32)
        module, _, param = key.rpartition(".")
        if module in sites.linear and param == "bias":
            spec.site(module).bias = value.to(wide) - ref.to(wide)
        elif module in sites.layer_norm:
            site = spec.site(module)
            delta = value.to(wide) - ref.to(wide)
            old = site.layer_norm or LayerNormDelta(torch.zeros_like(delta), torch.zeros_like(delta))
            site.layer_norm = LayerNormDelta(
                weight=delta if param == "weight" else old.weight, bias=delta if param == "bias" else old.bias
            )
        elif param == "weight" and (module in sites.linear or module in sites.embedding):
            spec.site(module).sparse = sparse_delta(key, value.to(wide), ref.to(wide), max_density, path)
        else:
            raise TaskSourceError(f"{path}: {key} changed, and no PET kind of this project covers it")
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
