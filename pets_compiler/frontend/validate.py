"""Check a TaskSpec against the base before anything is built: sites, shapes, dtypes, finite values."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pets_compiler.errors import TaskSourceError
from pets_compiler.frontend.base import BaseModel
from pets_compiler.frontend.taskset import TaskSpec


def _tensor(t: Tensor, what: str, shape: tuple[int, ...], task: str) -> None:
    if not isinstance(t, Tensor) or not t.is_floating_point():
        raise TaskSourceError(f"task {task!r}: {what} must be a floating-point tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise TaskSourceError(f"task {task!r}: {what} has shape {tuple(t.shape)}, expected {shape}")
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise TaskSourceError(f"task {task!r}: {what} has {bad} NaN/Inf values")


def validate_task(spec: TaskSpec, base: BaseModel) -> TaskSpec:
    sites = base.sites
    for site, pet in spec.sites.items():
        if pet.lora is not None or pet.bias is not None:
            if site not in sites.linear:
                raise TaskSourceError(f"task {spec.name!r}: {site!r} is not a linear layer of the base model")
            out_f, in_f = sites.linear[site]
            if pet.lora is not None:
                if pet.lora.a.dim() != 2 or pet.lora.b.dim() != 2:
                    raise TaskSourceError(
                        f"task {spec.name!r}: LoRA at {site} must have 2-D factors, got lora_A "
                        f"{tuple(pet.lora.a.shape)} and lora_B {tuple(pet.lora.b.shape)}"
                    )
                r = pet.lora.rank
                if r < 1:
                    raise TaskSourceError(f"task {spec.name!r}: LoRA at {site} has rank {r}")
                _tensor(pet.lora.a, f"{site} lora_A", (r, in_f), spec.name)
                _tensor(pet.lora.b, f"{site} lora_B", (out_f, r), spec.name)
                if not math.isfinite(pet.lora.scale):
                    raise TaskSourceError(f"task {spec.name!r}: LoRA scale at {site} is {pet.lora.scale}")
            if pet.bias is not None:
                _tensor(pet.bias, f"{site} bias delta", (out_f,), spec.name)
        if pet.layer_norm is not None:
            if site not in sites.layer_norm:
                raise TaskSourceError(f"task {spec.name!r}: {site!r} is not a LayerNorm of the base model")
            hidden = sites.layer_norm[site]
            _tensor(pet.layer_norm.weight, f"{site} LayerNorm weight delta", (hidden,), spec.name)
            _tensor(pet.layer_norm.bias, f"{site} LayerNorm bias delta", (hidden,), spec.name)
    if spec.head is not None:
        labels = spec.head.num_labels
        if labels < 1:
            raise TaskSourceError(f"task {spec.name!r}: head has no labels")
        _tensor(spec.head.weight, "head weight", (labels, base.config.hidden_size), spec.name)
        _tensor(spec.head.bias, "head bias", (labels,), spec.name)
        if len(spec.head.labels) != labels:
            raise TaskSourceError(
                f"task {spec.name!r}: head has {labels} outputs but {len(spec.head.labels)} label names"
            )
    return spec
