"""Import a peft adapter directory (as `PeftModel.save_pretrained` writes it) into a TaskSpec: LoRA or IA3.

LoRA: factors per site with peft's scaling (alpha / r, or alpha / sqrt(r) with use_rslora; rank_pattern and
alpha_pattern), bias deltas (bias="all" / "lora_only") and a `modules_to_save` classifier head.
IA3: `ia3_l` per site; shape (1, in) scales the input (peft's feedforward modules), (out, 1) the output.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pets_compiler.errors import TaskSourceError
from pets_compiler.frontend.base import BaseModel
from pets_compiler.frontend.taskset import IA3, Head, LayerNormDelta, LoRA, TaskSpec
from pets_compiler.frontend.weights_io import find_weights_file, read_json_object, read_weights

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_PREFIX = "base_model.model."
# adapter_config options whose non-default value changes the math in a way this importer does not compile.
_REFUSED_OPTIONS = {
    "use_dora": False,
    "fan_in_fan_out": False,
    "lora_bias": False,
    "layer_replication": None,
    "trainable_token_indices": None,
    "use_qalora": False,
    "use_bdlora": None,
    "target_parameters": None,
    "alora_invocation_tokens": None,
}
_HEAD_MODULES = ("classifier", "score")
SUPPORTED_TYPES = ("LORA", "IA3")


def is_peft_dir(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's rank_pattern / alpha_pattern lookup: a key matches a module path ending in it (as a regex)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _check_options(cfg: dict[str, Any], where: Path) -> None:
    peft_type = cfg.get("peft_type")
    if peft_type not in SUPPORTED_TYPES:
        raise TaskSourceError(
            f"{where}: peft_type {peft_type!r} is not supported (supported: {', '.join(SUPPORTED_TYPES)})"
        )
    for option, default in _REFUSED_OPTIONS.items():
        value = cfg.get(option, default)
        if value not in (default, False, None, [], {}):
            raise TaskSourceError(f"{where}: peft option {option}={value!r} is not supported")
    if peft_type == "IA3":
        return
    if cfg.get("bias", "none") not in ("none", "all", "lora_only"):
        raise TaskSourceError(f"{where}: peft bias={cfg.get('bias')!r} is not one of none, all, lora_only")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), int | float) or cfg[key] <= 0:
            raise TaskSourceError(f"{where}: adapter_config {key}={cfg.get(key)!r} must be a positive number")


def _split_key(key: str, where: Path) -> tuple[str, str, str]:
    """`base_model.model.bert.encoder...query.lora_A.weight` -> (`encoder...query`, `lora_A.weight`, and the module
    path as peft matched its patterns against: `bert.encoder...query`)."""
    if not key.startswith(_PREFIX):
        raise TaskSourceError(f"{where}: tensor {key!r} does not start with 'base_model.model.'")
    key = key[len(_PREFIX) :]
    for suffix in ("lora_A.weight", "lora_B.weight", "ia3_l", "bias", "weight"):
        if key.endswith("." + suffix):
            # peft keeps a LoRA-wrapped linear's own bias under `base_layer` (bias="all" / "lora_only").
            peft_module = key[: -len(suffix) - 1].removesuffix(".base_layer")
            return peft_module.removeprefix("bert."), suffix, peft_module
    raise TaskSourceError(f"{where}: tensor {key!r} is not a LoRA factor, IA3 vector, bias or saved module weight")


def load_peft_dir(path: Path, name: str, base: BaseModel) -> TaskSpec:
    """The adapter's PET per site (LoRA or IA3), bias deltas and a saved classifier head."""
    cfg = read_json_object(path / "adapter_config.json")
    _check_options(cfg, path)
    tensors = read_weights(find_weights_file(path, ADAPTER_FILES))
    shapes = base.sites.linear
    grouped: dict[str, dict[str, Tensor]] = {}
    peft_names: dict[str, str] = {}
    for key, tensor in tensors.items():
        module, suffix, peft_names[module] = _split_key(key, path)
        head, _, wrapper = module.rpartition(".")
        if head in _HEAD_MODULES and wrapper in ("original_module", "modules_to_save"):
            # bias="all" also saves the head wrapper's biases: the untrained original (not this task's) and a copy
            # of the trained head, which is saved as `classifier.*` too.
            if wrapper == "original_module":
                continue
            module = head
        parts = grouped.setdefault(module, {})
        if suffix in parts and not torch.equal(parts[suffix], tensor):
            raise TaskSourceError(f"{path}: {module} {suffix} is saved twice with different values")
        parts[suffix] = tensor

    spec = TaskSpec(name=name, source=f"peft:{path}")
    for module, parts in sorted(grouped.items()):
        if module in _HEAD_MODULES:
            spec.head = _head(parts, module, path, base)
            continue
        if module in base.sites.layer_norm and set(parts) == {"bias"}:
            delta = parts["bias"] - base.state_dict[f"{module}.bias"].to(parts["bias"].dtype)
            spec.site(module).layer_norm = LayerNormDelta(weight=delta.new_zeros(delta.shape), bias=delta)
            continue
        if module not in shapes:
            raise TaskSourceError(f"{path}: module {module!r} is not a linear layer of the base model")
        out_f, in_f = shapes[module]
        if "lora_A.weight" in parts or "lora_B.weight" in parts:
            spec.site(module).lora = _lora(parts, module, peft_names[module], cfg, (out_f, in_f), path)
        if "ia3_l" in parts:
            spec.site(module).ia3 = _ia3(parts["ia3_l"], module, (out_f, in_f), path)
        if "bias" in parts:
            spec.site(module).bias = parts["bias"] - base.state_dict[f"{module}.bias"].to(parts["bias"].dtype)
        if "weight" in parts:
            raise TaskSourceError(f"{path}: modules_to_save {module!r} is not supported (only a classifier head)")
    return spec


def _lora(
    parts: dict[str, Tensor], module: str, peft_module: str, cfg: dict[str, Any], shape: tuple[int, int], where: Path
) -> LoRA:
    if "lora_A.weight" not in parts or "lora_B.weight" not in parts:
        raise TaskSourceError(f"{where}: {module} has only one of lora_A / lora_B")
    a, b = parts["lora_A.weight"], parts["lora_B.weight"]
    out_f, in_f = shape
    rank = int(_pattern_value(cfg.get("rank_pattern") or {}, peft_module, cfg["r"]))
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_f or b.shape[0] != out_f:
        raise TaskSourceError(
            f"{where}: {module} lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the base linear "
            f"(out {out_f}, in {in_f}): expected lora_A ({rank}, {in_f}) and lora_B ({out_f}, {rank})"
        )
    if a.shape[0] != rank or b.shape[1] != rank:
        raise TaskSourceError(
            f"{where}: {module} rank mismatch: adapter_config says r={rank}, "
            f"lora_A is {tuple(a.shape)}, lora_B is {tuple(b.shape)}"
        )
    alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, peft_module, cfg["lora_alpha"]))
    scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    return LoRA(a=a, b=b, scale=scale)


def _ia3(vector: Tensor, module: str, shape: tuple[int, int], where: Path) -> IA3:
    """peft stores a feedforward module's vector as (1, in) (it scales the input), any other as (out, 1)."""
    out_f, in_f = shape
    if vector.dim() == 2 and tuple(vector.shape) == (1, in_f):
        return IA3(input=vector.reshape(in_f))
    if vector.dim() == 2 and tuple(vector.shape) == (out_f, 1):
        return IA3(output=vector.reshape(out_f))
    raise TaskSourceError(
        f"{where}: {module} ia3_l has shape {tuple(vector.shape)}; the base linear (out {out_f}, in {in_f}) takes "
        f"(1, {in_f}) for a feedforward module or ({out_f}, 1) otherwise"
    )


def _head(parts: dict[str, Tensor], module: str, where: Path, base: BaseModel) -> Head:
    weight, bias = parts.get("weight"), parts.get("bias")
    hidden = base.config.hidden_size
    if weight is None or bias is None or weight.dim() != 2 or weight.shape[1] != hidden:
        got = None if weight is None else tuple(weight.shape)
        raise TaskSourceError(f"{where}: head {module!r} weight {got} does not fit hidden size {hidden}")
    if bias.shape != (weight.shape[0],):
        raise TaskSourceError(f"{where}: head bias {tuple(bias.shape)} does not match weight {tuple(weight.shape)}")
    labels = tuple(f"LABEL_{i}" for i in range(weight.shape[0]))
    return Head(weight=weight, bias=bias, labels=labels)
