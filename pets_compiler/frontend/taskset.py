"""The normalized task representation: for each site, each task's PET tensors by kind.

This module is the one place that knows what a task's tensors mean; importers produce `TaskSpec`s, the runtime
writes them into task tables, the oracle merges them into a plain HF model.

A *site* is an HF module path of the base BertModel: a linear (`encoder.layer.0.attention.self.query`), a
LayerNorm (`encoder.layer.0.output.LayerNorm`), an embedding (`embeddings.word_embeddings`) or a sublayer end
(`encoder.layer.0.output`, where AdapterHub puts its bottleneck adapters). Semantics at a linear site, all kinds
composed (DESIGN.md, "PET semantics"), with l_in = l_out = 1 where IA3 is absent:

    y = ((x * l_in) W^T + b + db + scale * (x A^T) B^T + x D^T) * l_out

where D is the diff-pruning delta, or -(W * (1 - M)) for a MaskBERT mask M. At a LayerNorm: LN(x; w + dw, b + db).
At an embedding: E + D. At a sublayer end: the adapter (see `Adapter`). A head maps the pooled output to logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import TypeVar, cast

import torch
from torch import Tensor

KINDS = ("lora", "ia3", "bias", "layer_norm", "diff", "mask", "adapter", "head")


@dataclass(frozen=True)
class LoRA:
    a: Tensor  # [r, in]
    b: Tensor  # [out, r]
    scale: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass(frozen=True)
class IA3:
    """Learned rescaling (peft IA3): `input` scales x (feedforward modules), `output` scales y; None = 1."""

    input: Tensor | None = None  # [in]
    output: Tensor | None = None  # [out]


@dataclass(frozen=True)
class LayerNormDelta:
    weight: Tensor  # [hidden]
    bias: Tensor  # [hidden]


@dataclass(frozen=True)
class SparseDelta:
    """A sparse delta D on a weight matrix [rows, cols] (linear [out, in] or embedding [num, dim]).

    `kind` "diff": D holds the fine-tune's changes; "mask": D = -(W * (1 - M)) holds minus the base values at the
    positions the binary mask zeroes (MaskBERT), so W + D = W * M. `index` is int64 [2, nnz] (row, col), row-major
    sorted and unique; `values` [nnz].
    """

    kind: str
    index: Tensor
    values: Tensor
    shape: tuple[int, int]

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @property
    def density(self) -> float:
        return self.nnz / max(1, self.shape[0] * self.shape[1])

    def dense(self) -> Tensor:
        out = torch.zeros(self.shape, dtype=self.values.dtype)
        out[self.index[0], self.index[1]] = self.values
        return out


@dataclass(frozen=True)
class Adapter:
    """An AdapterHub bottleneck adapter at a sublayer end (h = dropout(dense(x)), residual = sublayer input).

        a_in = LN(h + residual) if original_ln_before else h
        res  = h if residual_before_ln else a_in
        z    = act(a_in @ down_w.T + down_b) @ up_w.T + up_b) * scaling + res
        out  = LN(z + residual) if original_ln_after else z

    with LN the sublayer's own LayerNorm (and its task deltas). Without an adapter: out = LN(h + residual).
    """

    down_w: Tensor  # [bottleneck, hidden]
    down_b: Tensor  # [bottleneck]
    up_w: Tensor  # [hidden, bottleneck]
    up_b: Tensor  # [hidden]
    scaling: float
    activation: str
    original_ln_before: bool
    residual_before_ln: bool
    original_ln_after: bool

    @property
    def bottleneck(self) -> int:
        return int(self.down_w.shape[0])


@dataclass(frozen=True)
class Head:
    """logits = weight @ act(dense_w @ c + dense_b) + bias (the dense layer optional, act = tanh), with c the BERT
    pooler output (HF BertForSequenceClassification) or, with use_cls, the [CLS] hidden state (AdapterHub)."""

    weight: Tensor  # [num_labels, hidden]
    bias: Tensor  # [num_labels]
    labels: tuple[str, ...]
    dense_w: Tensor | None = None  # [hidden, hidden]
    dense_b: Tensor | None = None  # [hidden]
    use_cls: bool = False

    @property
    def num_labels(self) -> int:
        return int(self.weight.shape[0])


@dataclass
class SitePET:
    """Everything one task changes at one site."""

    lora: LoRA | None = None
    ia3: IA3 | None = None
    bias: Tensor | None = None  # delta of a linear's bias, [out]
    layer_norm: LayerNormDelta | None = None
    sparse: SparseDelta | None = None  # diff-pruning or MaskBERT delta of the site's weight
    adapter: Adapter | None = None

    def kinds(self) -> list[str]:
        found = [f.name for f in fields(self) if getattr(self, f.name) is not None and f.name != "sparse"]
        if self.sparse is not None:
            found.append(self.sparse.kind)
        return [k for k in KINDS if k in found]

    def is_empty(self) -> bool:
        return not self.kinds()


T = TypeVar("T")


def _cast(value: T, dtype: torch.dtype) -> T:
    """Floating tensors (also inside the PET dataclasses) to `dtype`; indices, flags and scalars unchanged."""
    if isinstance(value, Tensor):
        return cast(T, value.to(dtype) if value.is_floating_point() else value)
    if isinstance(value, LoRA | IA3 | LayerNormDelta | SparseDelta | Adapter | Head | SitePET):
        return cast(T, replace(value, **{f.name: _cast(getattr(value, f.name), dtype) for f in fields(value)}))
    return value


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
        return [k for k in KINDS if k in found]

    def prune(self) -> TaskSpec:
        """Drop sites that change nothing."""
        self.sites = {s: p for s, p in self.sites.items() if not p.is_empty()}
        return self

    def renamed(self, name: str) -> TaskSpec:
        return TaskSpec(name, dict(self.sites), self.head, self.source)

    def to(self, dtype: torch.dtype) -> TaskSpec:
        sites = {s: _cast(p, dtype) for s, p in self.sites.items()}
        return TaskSpec(self.name, sites, _cast(self.head, dtype), self.source)
