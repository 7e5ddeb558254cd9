"""The native task format, which artifacts use: `task.json` (kinds, scales, flags, labels) + `task.safetensors`.

Tensors are named `<site>.<field>`; a MaskBERT delta is stored as its positions only (`<site>.mask_index`, int32)
and its values are re-derived from the base weights when the task is read, so it needs the base.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pets_compiler.errors import TaskSourceError
from pets_compiler.frontend.base import BaseModel
from pets_compiler.frontend.taskset import IA3, Adapter, Head, LayerNormDelta, LoRA, SitePET, SparseDelta, TaskSpec
from pets_compiler.frontend.weights_io import read_safetensors, write_safetensors

FORMAT = "pets-task"
VERSION = 1
META_FILE = "task.json"
WEIGHTS_FILE = "task.safetensors"
_ADAPTER_FLAGS = ("original_ln_before", "residual_before_ln", "original_ln_after")


def is_native_dir(path: Path) -> bool:
    return (path / META_FILE).is_file()


def _site_entry(site: str, pet: SitePET, tensors: dict[str, Tensor]) -> dict[str, Any]:
    entry: dict[str, Any] = {}
    if pet.lora is not None:
        tensors[f"{site}.lora_A"], tensors[f"{site}.lora_B"] = pet.lora.a, pet.lora.b
        entry["lora"] = {"rank": pet.lora.rank, "scale": pet.lora.scale}
    if pet.ia3 is not None:
        for side, vector in (("input", pet.ia3.input), ("output", pet.ia3.output)):
            if vector is not None:
                tensors[f"{site}.ia3_{side}"] = vector
        entry["ia3"] = {"input": pet.ia3.input is not None, "output": pet.ia3.output is not None}
    if pet.bias is not None:
        tensors[f"{site}.bias"] = pet.bias
        entry["bias"] = True
    if pet.layer_norm is not None:
        tensors[f"{site}.ln_weight"], tensors[f"{site}.ln_bias"] = pet.layer_norm.weight, pet.layer_norm.bias
        entry["layer_norm"] = True
    if pet.sparse is not None:
        d = pet.sparse
        tensors[f"{site}.{d.kind}_index"] = d.index.to(torch.int32)
        if d.kind == "diff":
            tensors[f"{site}.diff_values"] = d.values
        entry["sparse"] = {"kind": d.kind, "shape": list(d.shape), "nnz": d.nnz}
    if pet.adapter is not None:
        a = pet.adapter
        for part in ("down_w", "down_b", "up_w", "up_b"):
            tensors[f"{site}.adapter_{part}"] = getattr(a, part)
        entry["adapter"] = {
            "scaling": a.scaling,
            "activation": a.activation,
            **{f: getattr(a, f) for f in _ADAPTER_FLAGS},
        }
    return entry


def write_task(spec: TaskSpec, path: Path, base_fingerprint: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    sites = {site: _site_entry(site, pet, tensors) for site, pet in sorted(spec.sites.items())}
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "name": spec.name,
        "base_fingerprint": base_fingerprint,
        "sites": sites,
    }
    if spec.head is not None:
        tensors["head.weight"], tensors["head.bias"] = spec.head.weight, spec.head.bias
        meta["head"] = {"labels": list(spec.head.labels), "use_cls": spec.head.use_cls}
        if spec.head.dense_w is not None and spec.head.dense_b is not None:
            tensors["head.dense_w"], tensors["head.dense_b"] = spec.head.dense_w, spec.head.dense_b
            meta["head"]["dense"] = True
    write_safetensors(tensors, path / WEIGHTS_FILE)
    tmp = path / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, path / META_FILE)


def read_task_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TaskSourceError(f"{path / META_FILE}: cannot read task metadata: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise TaskSourceError(f"{path / META_FILE}: not a {FORMAT} file")
    if meta.get("version") != VERSION:
        raise TaskSourceError(f"{path / META_FILE}: format version {meta.get('version')!r}, this build reads {VERSION}")
    return meta


class _Reader:
    def __init__(self, path: Path, base: BaseModel | None) -> None:
        self.path, self.base = path, base
        self.tensors = read_safetensors(path / WEIGHTS_FILE)

    def fail(self, message: str) -> TaskSourceError:
        return TaskSourceError(f"{self.path / META_FILE}: {message}")

    def take(self, key: str) -> Tensor:
        if key not in self.tensors:
            raise TaskSourceError(f"{self.path / WEIGHTS_FILE}: tensor {key!r} named by {META_FILE} is missing")
        return self.tensors.pop(key)

    def site(self, site: str, entry: Any) -> SitePET:
        if not isinstance(entry, dict):
            raise self.fail(f"site {site!r} must be an object")
        pet = SitePET()
        if "lora" in entry:
            pet.lora = self.lora(site, entry["lora"])
        if "ia3" in entry:
            sides = entry["ia3"] if isinstance(entry["ia3"], dict) else {}
            pet.ia3 = IA3(
                input=self.take(f"{site}.ia3_input") if sides.get("input") else None,
                output=self.take(f"{site}.ia3_output") if sides.get("output") else None,
            )
        if entry.get("bias"):
            pet.bias = self.take(f"{site}.bias")
        if entry.get("layer_norm"):
            pet.layer_norm = LayerNormDelta(weight=self.take(f"{site}.ln_weight"), bias=self.take(f"{site}.ln_bias"))
        if "sparse" in entry:
            pet.sparse = self.sparse(site, entry["sparse"])
        if "adapter" in entry:
            pet.adapter = self.adapter(site, entry["adapter"])
        return pet

    def lora(self, site: str, entry: Any) -> LoRA:
        scale = entry.get("scale") if isinstance(entry, dict) else None
        if not isinstance(scale, int | float):
            raise self.fail(f"site {site!r} LoRA has no numeric scale")
        a, b, rank = self.take(f"{site}.lora_A"), self.take(f"{site}.lora_B"), entry.get("rank")
        if a.dim() != 2 or b.dim() != 2 or (rank is not None and (a.shape[0], b.shape[1]) != (rank, rank)):
            raise TaskSourceError(
                f"{self.path}: site {site!r} LoRA rank mismatch: {META_FILE} says rank {rank!r}, "
                f"lora_A is {tuple(a.shape)}, lora_B is {tuple(b.shape)}"
            )
        return LoRA(a=a, b=b, scale=float(scale))

    def sparse(self, site: str, entry: Any) -> SparseDelta:
        kind = entry.get("kind") if isinstance(entry, dict) else None
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if kind not in ("diff", "mask") or not (isinstance(shape, list) and len(shape) == 2):
            raise self.fail(f"site {site!r} sparse entry needs kind 'diff' or 'mask' and a [rows, cols] shape")
        raw = self.take(f"{site}.{kind}_index")
        if raw.is_floating_point() or raw.is_complex() or raw.dtype == torch.bool:
            raise self.fail(f"site {site!r} {kind}_index must hold integers, got {raw.dtype}")
        index = raw.to(torch.long)
        if index.dim() != 2 or index.shape[0] != 2:
            raise self.fail(f"site {site!r} {kind}_index must be [2, nnz], got {tuple(index.shape)}")
        if kind == "diff":
            values = self.take(f"{site}.diff_values")
        else:  # MaskBERT: minus the base values at the masked-out positions
            if self.base is None or f"{site}.weight" not in self.base.state_dict:
                raise self.fail(f"site {site!r} holds a mask, whose values come from the base weight {site}.weight")
            weight = self.base.state_dict[f"{site}.weight"]
            if tuple(weight.shape) != tuple(shape):
                raise self.fail(
                    f"site {site!r} mask is for a {tuple(shape)} weight, the base has {tuple(weight.shape)}"
                )
            if index.numel() and bool(((index < 0) | (index >= torch.tensor(weight.shape).view(2, 1))).any()):
                raise self.fail(f"site {site!r} mask index has a position outside the {tuple(shape)} weight")
            values = -weight[index[0], index[1]].float()
        return SparseDelta(kind, index, values, (int(shape[0]), int(shape[1])))

    def adapter(self, site: str, entry: Any) -> Adapter:
        if not isinstance(entry, dict) or not all(isinstance(entry.get(f), bool) for f in _ADAPTER_FLAGS):
            raise self.fail(f"site {site!r} adapter needs the boolean flags {', '.join(_ADAPTER_FLAGS)}")
        scaling, activation = entry.get("scaling"), entry.get("activation")
        if not isinstance(scaling, int | float) or not isinstance(activation, str):
            raise self.fail(f"site {site!r} adapter needs a numeric scaling and an activation name")
        return Adapter(
            down_w=self.take(f"{site}.adapter_down_w"),
            down_b=self.take(f"{site}.adapter_down_b"),
            up_w=self.take(f"{site}.adapter_up_w"),
            up_b=self.take(f"{site}.adapter_up_b"),
            scaling=float(scaling),
            activation=activation,
            original_ln_before=entry["original_ln_before"],
            residual_before_ln=entry["residual_before_ln"],
            original_ln_after=entry["original_ln_after"],
        )


def read_task(path: Path, name: str, base: BaseModel | None = None) -> TaskSpec:
    """Read a native task dir; with a base, refuse a task made for another base (and derive mask values)."""
    meta = read_task_meta(path)
    if base is not None and meta.get("base_fingerprint") != base.fingerprint:
        raise TaskSourceError(
            f"{path}: task was made for base {meta.get('base_fingerprint')!r}, this base is {base.fingerprint!r}"
        )
    reader = _Reader(path, base)
    sites = meta.get("sites")
    if not isinstance(sites, dict):
        raise reader.fail("'sites' must be an object")
    spec = TaskSpec(name=name, source=f"native:{path}")
    spec.sites = {site: reader.site(site, entry) for site, entry in sites.items()}
    head = meta.get("head")
    if head is not None:
        labels = head.get("labels") if isinstance(head, dict) else None
        if not isinstance(labels, list):
            raise reader.fail("'head' must carry a 'labels' list")
        dense = bool(head.get("dense"))
        spec.head = Head(
            weight=reader.take("head.weight"),
            bias=reader.take("head.bias"),
            labels=tuple(map(str, labels)),
            dense_w=reader.take("head.dense_w") if dense else None,
            dense_b=reader.take("head.dense_b") if dense else None,
            use_cls=bool(head.get("use_cls", False)),
        )
    if reader.tensors:
        raise TaskSourceError(f"{path / WEIGHTS_FILE}: tensors not named by {META_FILE}: {sorted(reader.tensors)[:3]}")
    return spec
