"""Random-weight tasks of every PET kind the throughput bench serves, as TaskSpecs on a BaseModel.

Each kind makes task i from its own seed, so task i is the same whichever task count a run loads. Tensors are drawn
in one call per site (1024 LoRA tasks of bert-base take seconds). The kinds (issue 4):

- lora_r8, lora_r16: LoRA on query and value (peft's default targets for BERT), scale 2 (lora_alpha = 2r)
- bitfit: a delta on every bias, LayerNorm biases included (LayerNorm weights unchanged), as the frontend reads a
  BitFit fine-tune
- pfeiffer: an AdapterHub `seq_bn` adapter with bottleneck 64 at every layer's output (not after attention)
- ia3: peft's default IA3 for BERT: output scales on key and value, input scales on both `output.dense` linears
- diff: diff-pruning, a sparse delta on 1% of every linear weight
- mask: MaskBERT, 5% of every linear weight zeroed (stored as minus the base values there)
- mix: tasks cycling through all the kinds above; mix_dense: the same without diff and mask. Mix tasks also
  carry a classification head (2-4 labels), so the check covers the logits too.

Sparse positions come from a few shared patterns per kind (task i uses pattern i % SPARSE_PATTERNS, values its
own): drawing fresh positions for 1024 tasks takes minutes, and the runtime stores every task's entries apart anyway.
"""

from __future__ import annotations

import argparse
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pets_compiler.frontend.base import BaseModel, SiteShapes
from pets_compiler.frontend.taskset import IA3, Adapter, Head, LayerNormDelta, LoRA, SparseDelta, TaskSpec

SPARSE_PATTERNS = 16
ADAPTER_BOTTLENECK = 64


@dataclass
class SparsePatterns:
    """Row-major sorted, unique positions of `density` of every linear weight; pattern j drawn from its own seed."""

    sites: SiteShapes
    density: float
    seed: int
    cache: dict[int, dict[str, Tensor]] = field(default_factory=dict)

    def get(self, j: int) -> dict[str, Tensor]:
        if j not in self.cache:
            g = torch.Generator().manual_seed(self.seed * 1000 + j)
            self.cache[j] = {
                site: _positions(rows, cols, self.density, g) for site, (rows, cols) in self.sites.linear.items()
            }
        return self.cache[j]


def _positions(rows: int, cols: int, density: float, g: torch.Generator) -> Tensor:
    """int64 [2, nnz] (row, col), nnz = round(density * rows * cols), sorted row-major without duplicates."""
    n, nnz = rows * cols, round(density * rows * cols)
    chosen = torch.zeros(n, dtype=torch.bool)
    while int(chosen.sum()) < nnz:  # draws with replacement lose ~density/2 to duplicates: draw a few more
        missing = nnz - int(chosen.sum())
        chosen[torch.randint(n, (math.ceil(missing * (1 + density)) + 64,), generator=g)] = True
    flat = chosen.nonzero().squeeze(1)  # sorted, unique
    flat = flat[torch.randperm(flat.numel(), generator=g)[:nnz].sort().values]
    return torch.stack([flat // cols, flat % cols])


def _generator(name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


def lora(rank: int) -> Callable[[BaseModel, str, int, Kind], TaskSpec]:
    def make(base: BaseModel, name: str, i: int, kind: Kind) -> TaskSpec:
        g = _generator(name)
        spec = TaskSpec(name, source=f"bench:lora_r{rank}")
        for site, (out_f, in_f) in kind.sites.linear.items():
            if site.endswith(("attention.self.query", "attention.self.value")):
                a = torch.randn(rank, in_f, generator=g) / in_f**0.5
                spec.site(site).lora = LoRA(a, torch.randn(out_f, rank, generator=g) * 0.05, 2.0)
        return spec

    return make


def bitfit(base: BaseModel, name: str, i: int, kind: Kind) -> TaskSpec:
    g = _generator(name)
    spec = TaskSpec(name, source="bench:bitfit")
    for site, (out_f, _) in kind.sites.linear.items():
        spec.site(site).bias = torch.randn(out_f, generator=g) * 0.05
    for site, hidden in kind.sites.layer_norm.items():
        spec.site(site).layer_norm = LayerNormDelta(torch.zeros(hidden), torch.randn(hidden, generator=g) * 0.05)
    return spec


def pfeiffer(base: BaseModel, name: str, i: int, kind: Kind) -> TaskSpec:
    """AdapterHub seq_bn: original_ln_before, residual_before_ln, original_ln_after, relu, output adapter only."""
    g = _generator(name)
    spec = TaskSpec(name, source="bench:pfeiffer")
    r = ADAPTER_BOTTLENECK
    for site, hidden in kind.sites.sublayer.items():
        if site.endswith("attention.output"):
            continue
        spec.site(site).adapter = Adapter(
            down_w=torch.randn(r, hidden, generator=g) / hidden**0.5,
            down_b=torch.randn(r, generator=g) * 0.02,
            up_w=torch.randn(hidden, r, generator=g) * 0.02,
            up_b=torch.randn(hidden, generator=g) * 0.02,
            scaling=1.0,
            activation="relu",
            original_ln_before=True,
            residual_before_ln=True,
            original_ln_after=True,
        )
    return spec


def ia3(base: BaseModel, name: str, i: int, kind: Kind) -> TaskSpec:
    """peft's IA3 defaults for BERT: targets key, value, output.dense; feedforward (input-scaled) output.dense."""
    g = _generator(name)
    spec = TaskSpec(name, source="bench:ia3")
    for site, (out_f, in_f) in kind.sites.linear.items():
        if site.endswith(("attention.self.key", "attention.self.value")):
            spec.site(site).ia3 = IA3(output=1 + 0.1 * torch.randn(out_f, generator=g))
        elif site.endswith("output.dense"):
            spec.site(site).ia3 = IA3(input=1 + 0.1 * torch.randn(in_f, generator=g))
    return spec


def sparse(base: BaseModel, name: str, i: int, kind: Kind) -> TaskSpec:
    assert kind.patterns is not None and kind.sparse in ("diff", "mask")
    g = _generator(name)
    spec = TaskSpec(name, source=f"bench:{kind.name}")
    for site, index in kind.patterns.get(i % SPARSE_PATTERNS).items():
        if kind.sparse == "diff":
            values = torch.randn(index.shape[1], generator=g) * 0.02
        else:
            values = -base.state_dict[f"{site}.weight"][index[0], index[1]]
        spec.site(site).sparse = SparseDelta(kind.sparse, index, values, kind.sites.linear[site])
    return spec


def head(base: BaseModel, name: str, labels: int) -> Head:
    g = _generator(f"{name}:head")
    hidden = base.config.hidden_size
    return Head(
        weight=torch.randn(labels, hidden, generator=g) * 0.2,
        bias=torch.randn(labels, generator=g) * 0.1,
        labels=tuple(f"LABEL_{k}" for k in range(labels)),
    )


@dataclass
class Kind:
    """A family of tasks: `task(i)` makes task i. `parts` (mixes) are the kinds the tasks cycle through."""

    name: str
    make: Callable[[BaseModel, str, int, Kind], TaskSpec] | None
    base: BaseModel
    lora_rank: int | None = None  # peft's mixed batch serves LoRA kinds only
    sparse: str | None = None  # "diff" / "mask"
    patterns: SparsePatterns | None = None
    parts: tuple[Kind, ...] = ()
    # tasks carry a classification head (2-4 labels): always in mixes; for a single kind where asked (a served
    # classifier answers with its logits and label, a task without head with its whole embedding)
    heads: bool = False
    sites: SiteShapes = field(init=False)

    def __post_init__(self) -> None:
        self.sites = self.base.sites  # computed from a meta-device model: once, not per task

    @property
    def has_heads(self) -> bool:
        """Whether its tasks carry a classification head (answers: logits and a label, else the embedding)."""
        return self.heads or bool(self.parts)

    def task_name(self, i: int) -> str:
        return f"{self.name}-{i}"

    def part(self, i: int) -> Kind:
        """The kind task i is made of (itself, or a mix's i-th part in turn)."""
        return self.parts[i % len(self.parts)] if self.parts else self

    def task(self, i: int) -> TaskSpec:
        name = self.task_name(i)
        part = self.part(i)
        assert part.make is not None
        spec = part.make(self.base, name, i // len(self.parts) if self.parts else i, part)
        if self.has_heads:
            spec.head = head(self.base, name, 2 + i % 3)
        return spec

    @property
    def cycle(self) -> int:
        """How many tasks cover every part: a program compiled with fewer does not serve all of them."""
        return max(1, len(self.parts))


SINGLE = ("lora_r8", "lora_r16", "bitfit", "pfeiffer", "ia3", "diff", "mask")
MIXES = {"mix": SINGLE, "mix_dense": tuple(k for k in SINGLE if k not in ("diff", "mask"))}
KINDS = (*SINGLE, *MIXES)
DENSITY = {"diff": 0.01, "mask": 0.05}


def make_kinds(base: BaseModel, names: tuple[str, ...] = KINDS) -> dict[str, Kind]:
    """The named kinds on `base`, sparse patterns shared between a kind and the mixes that use it."""
    unknown = [n for n in names if n not in KINDS]
    if unknown:
        raise ValueError(f"unknown kind(s) {unknown}; choose from {', '.join(KINDS)}")
    sites = base.sites
    single: dict[str, Kind] = {
        "lora_r8": Kind("lora_r8", lora(8), base, lora_rank=8),
        "lora_r16": Kind("lora_r16", lora(16), base, lora_rank=16),
        "bitfit": Kind("bitfit", bitfit, base),
        "pfeiffer": Kind("pfeiffer", pfeiffer, base),
        "ia3": Kind("ia3", ia3, base),
    }
    for seed, (kind, density) in enumerate(DENSITY.items(), start=1):
        single[kind] = Kind(kind, sparse, base, sparse=kind, patterns=SparsePatterns(sites, density, seed))
    out = {n: single[n] for n in names if n in single}
    for mix, parts in MIXES.items():
        if mix in names:
            out[mix] = Kind(mix, None, base, parts=tuple(single[p] for p in parts))
    return out


def kinds_arg(p: argparse.ArgumentParser, text: str) -> tuple[str, ...]:
    """A --kinds value: comma-separated names of KINDS, or "all"; an unknown name ends the parse naming it."""
    if text.strip() == "all":
        return KINDS
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    if unknown := [k for k in kinds if k not in KINDS]:
        p.error(f"unknown kind(s) {unknown}; choose from {', '.join(KINDS)}")
    return kinds
