"""Check a TaskSpec against the base before anything is built: sites, shapes, dtypes, finite values."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pets_compiler.custom_ops.reference import ADAPTER_ACTIVATIONS
from pets_compiler.errors import TaskSourceError
from pets_compiler.frontend.base import BaseModel
from pets_compiler.frontend.taskset import Adapter, SitePET, SparseDelta, TaskSpec


class _Checker:
    def __init__(self, spec: TaskSpec, base: BaseModel) -> None:
        self.task, self.base, self.sites = spec.name, base, base.sites

    def fail(self, message: str) -> TaskSourceError:
        return TaskSourceError(f"task {self.task!r}: {message}")

    def tensor(self, t: object, what: str, shape: tuple[int, ...]) -> None:
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise self.fail(f"{what} must be a floating-point tensor, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise self.fail(f"{what} has shape {tuple(t.shape)}, expected {shape}")
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise self.fail(f"{what} has {bad} NaN/Inf values")

    def scalar(self, value: float, what: str) -> None:
        if not math.isfinite(value):
            raise self.fail(f"{what} is {value}")

    def site(self, site: str, pet: SitePET) -> None:
        linear_kinds = [k for k in ("lora", "ia3", "bias") if getattr(pet, k) is not None]
        if linear_kinds and site not in self.sites.linear:
            raise self.fail(f"{site!r} is not a linear layer of the base model (needed by {', '.join(linear_kinds)})")
        if pet.layer_norm is not None:
            if site not in self.sites.layer_norm:
                raise self.fail(f"{site!r} is not a LayerNorm of the base model")
            hidden = self.sites.layer_norm[site]
            self.tensor(pet.layer_norm.weight, f"{site} LayerNorm weight delta", (hidden,))
            self.tensor(pet.layer_norm.bias, f"{site} LayerNorm bias delta", (hidden,))
        if pet.adapter is not None:
            if site not in self.sites.sublayer:
                raise self.fail(f"{site!r} is not a sublayer end (attention.output / output) of the base model")
            self.adapter(site, pet.adapter, self.sites.sublayer[site])
        if pet.sparse is not None:
            self.sparse(site, pet.sparse)
        if not linear_kinds:
            return
        out_f, in_f = self.sites.linear[site]
        if pet.lora is not None:
            a, b = pet.lora.a, pet.lora.b
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] < 1:
                raise self.fail(
                    f"LoRA at {site} needs 2-D factors of rank >= 1, got {tuple(a.shape)}, {tuple(b.shape)}"
                )
            self.tensor(a, f"{site} lora_A", (pet.lora.rank, in_f))
            self.tensor(b, f"{site} lora_B", (out_f, pet.lora.rank))
            self.scalar(pet.lora.scale, f"LoRA scale at {site}")
        if pet.ia3 is not None:
            if pet.ia3.input is not None:
                self.tensor(pet.ia3.input, f"{site} IA3 input scale", (in_f,))
            if pet.ia3.output is not None:
                self.tensor(pet.ia3.output, f"{site} IA3 output scale", (out_f,))
        if pet.bias is not None:
            self.tensor(pet.bias, f"{site} bias delta", (out_f,))

    def sparse(self, site: str, delta: SparseDelta) -> None:
        shape = self.sites.linear.get(site) or self.sites.embedding.get(site)
        if shape is None:
            raise self.fail(f"{delta.kind} at {site!r}: not a linear or embedding weight of the base model")
        if tuple(delta.shape) != tuple(shape):
            raise self.fail(f"{delta.kind} at {site} is for a {tuple(delta.shape)} weight, the base has {tuple(shape)}")
        if delta.kind not in ("diff", "mask"):
            raise self.fail(f"sparse delta at {site} has kind {delta.kind!r}, expected 'diff' or 'mask'")
        index = delta.index
        if index.dtype != torch.long or index.dim() != 2 or index.shape[0] != 2:
            raise self.fail(
                f"{delta.kind} index at {site} must be int64 [2, nnz], got {index.dtype} {tuple(index.shape)}"
            )
        self.tensor(delta.values, f"{site} {delta.kind} values", (index.shape[1],))
        if index.numel():
            rows, cols = index
            if int(rows.min()) < 0 or int(cols.min()) < 0 or int(rows.max()) >= shape[0] or int(cols.max()) >= shape[1]:
                raise self.fail(f"{delta.kind} index at {site} has a position outside the {tuple(shape)} weight")
            flat = rows * shape[1] + cols
            if bool((flat[1:] <= flat[:-1]).any()):
                raise self.fail(f"{delta.kind} index at {site} is not sorted row-major without duplicates")

    def adapter(self, site: str, adapter: Adapter, hidden: int) -> None:
        r = adapter.bottleneck
        if r < 1:
            raise self.fail(f"adapter at {site} has bottleneck {r}")
        self.tensor(adapter.down_w, f"{site} adapter down weight", (r, hidden))
        self.tensor(adapter.down_b, f"{site} adapter down bias", (r,))
        self.tensor(adapter.up_w, f"{site} adapter up weight", (hidden, r))
        self.tensor(adapter.up_b, f"{site} adapter up bias", (hidden,))
        self.scalar(adapter.scaling, f"adapter scaling at {site}")
        if adapter.activation not in ADAPTER_ACTIVATIONS:
            names = ", ".join(sorted(ADAPTER_ACTIVATIONS))
            raise self.fail(f"adapter at {site} uses non_linearity {adapter.activation!r}, not one of {names}")

    def head(self, spec: TaskSpec) -> None:
        if spec.head is None:
            return
        labels = spec.head.num_labels
        if labels < 1:
            raise self.fail("head has no labels")
        self.tensor(spec.head.weight, "head weight", (labels, self.base.config.hidden_size))
        self.tensor(spec.head.bias, "head bias", (labels,))
        if len(spec.head.labels) != labels:
            raise self.fail(f"head has {labels} outputs but {len(spec.head.labels)} label names")
        hidden = self.base.config.hidden_size
        if (spec.head.dense_w is None) != (spec.head.dense_b is None):
            raise self.fail("head dense layer needs both its weight and its bias")
        if spec.head.dense_w is not None:
            self.tensor(spec.head.dense_w, "head dense weight", (hidden, hidden))
            self.tensor(spec.head.dense_b, "head dense bias", (hidden,))


def validate_task(spec: TaskSpec, base: BaseModel) -> TaskSpec:
    checker = _Checker(spec, base)
    for site, pet in spec.sites.items():
        checker.site(site, pet)
    checker.head(spec)
    return spec
