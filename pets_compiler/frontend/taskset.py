"""The normalized task representation: for each site, each task's PET tensors by kind.

This module is the one place that knows what a task's tensors mean; importers produce `TaskSpec`s, the runtime
writes them into task tables, the oracle merges them into a plain HF model.

A *site* is an HF module path of the base BertModel: a linear (`encoder.layer.0.attention.self.query`) or a
LayerNorm (`encoder.layer.0.output.LayerNorm`). Semantics (DESIGN.md, "PET semantics"):
- LoRA at a linear site: y = x W^T + b + scale * (x A^T) B^T, A [r, in], B [out, r].
- bias delta at a linear site: y = x W^T + (b + db).
- LayerNorm delta: LN(x; w + dw, b + db).
- head: logits = pooled @ weight^T + bias, weight [num_labels, hidden].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class LoRA:
    a: Tensor  # [r, in]
    b: Tensor  # [out, r]
    scale: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass(frozen=True)
class LayerNormDelta:
    weight: Tensor  # [hidden]
    bias: Tensor  # [hidden]


@dataclass(frozen=True)
class Head:
    weight: Tensor  # [num_labels, hidden]
    bias: Tensor  # [num_labels]
    labels: tuple[str, ...]

    @property
    def num_labels(self) -> int:
        return int(self.weight.shape[0])


@dataclass
class SitePET:
    """Everything one task changes at one site. Kinds compose in field order."""

    lora: LoRA | None = None
    bias: Tensor | None = None  # delta of a linear's bias, [out]
    layer_norm: LayerNormDelta | None = None

    def kinds(self) -> list[str]:
        return [k for k in ("lora", "bias", "layer_norm") if getattr(self, k) is not None]

    def is_empty(self) -> bool:
        return not self.kinds()


@dataclass
class TaskSpec:
    """One task: its PET per site, an optional head, and where it came from."""

    name: str
    sites: dict[str, SitePET] = field(default_factory=dict)
    head: Head | None = None
    source: str = "native"

    def site(self, name: str) -> SitePET:
        return self.sites.setdefault(name, SitePET())

    def kinds(self) -> list[str]:
        """The PET kinds this task uses, in a stable order, `head` included."""
        found = {k for pet in self.sites.values() for k in pet.kinds()}
        if self.head is not None:
            found.add("head")
        return [k for k in ("lora", "bias", "layer_norm", "head") if k in found]

    def prune(self) -> TaskSpec:
        """Drop sites that change nothing (all-zero deltas, LoRA with a zero factor stay: they are exact)."""
        self.sites = {s: p for s, p in self.sites.items() if not p.is_empty()}
        return self

    def to(self, dtype: torch.dtype) -> TaskSpec:
        def cast(t: Tensor) -> Tensor:
            return t.to(dtype)

        sites = {}
        for s, p in self.sites.items():
            sites[s] = SitePET(
                lora=None if p.lora is None else LoRA(cast(p.lora.a), cast(p.lora.b), p.lora.scale),
                bias=None if p.bias is None else cast(p.bias),
                layer_norm=None
                if p.layer_norm is None
                else LayerNormDelta(cast(p.layer_norm.weight), cast(p.layer_norm.bias)),
            )
        head = None if self.head is None else Head(cast(self.head.weight), cast(self.head.bias), self.head.labels)
        return TaskSpec(self.name, sites, head, self.source)
