"""The native task format, which artifacts use: `task.json` (kinds, scales, labels) + `task.safetensors`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import Tensor

from pets_compiler.errors import TaskSourceError
from pets_compiler.frontend.taskset import Head, LayerNormDelta, LoRA, SitePET, TaskSpec
from pets_compiler.frontend.weights_io import read_safetensors, write_safetensors

FORMAT = "pets-task"
VERSION = 1
META_FILE = "task.json"
WEIGHTS_FILE = "task.safetensors"


def is_native_dir(path: Path) -> bool:
    return (path / META_FILE).is_file()


def write_task(spec: TaskSpec, path: Path, base_fingerprint: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    sites: dict[str, dict[str, Any]] = {}
    for site, pet in sorted(spec.sites.items()):
        entry: dict[str, Any] = {}
        if pet.lora is not None:
            tensors[f"{site}.lora_A"], tensors[f"{site}.lora_B"] = pet.lora.a, pet.lora.b
            entry["lora"] = {"rank": pet.lora.rank, "scale": pet.lora.scale}
        if pet.bias is not None:
            tensors[f"{site}.bias"] = pet.bias
            entry["bias"] = True
        if pet.layer_norm is not None:
            tensors[f"{site}.ln_weight"], tensors[f"{site}.ln_bias"] = (
                pet.layer_norm.weight,
                pet.layer_norm.bias,
            )
            entry["layer_norm"] = True
        sites[site] = entry
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "name": spec.name,
        "base_fingerprint": base_fingerprint,
        "sites": sites,
    }
    if spec.head is not None:
        tensors["head.weight"], tensors["head.bias"] = spec.head.weight, spec.head.bias
        meta["head"] = {"labels": list(spec.head.labels)}
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


def read_task(path: Path, name: str, base_fingerprint: str | None = None) -> TaskSpec:
    """Read a native task dir; with a fingerprint, refuse a task made for another base."""
    meta = read_task_meta(path)
    if base_fingerprint is not None and meta.get("base_fingerprint") != base_fingerprint:
        raise TaskSourceError(
            f"{path}: task was made for base {meta.get('base_fingerprint')!r}, this base is {base_fingerprint!r}"
        )
    tensors = read_safetensors(path / WEIGHTS_FILE)

    def take(key: str) -> Tensor:
        if key not in tensors:
            raise TaskSourceError(f"{path / WEIGHTS_FILE}: tensor {key!r} named by {META_FILE} is missing")
        return tensors.pop(key)

    spec = TaskSpec(name=name, source=f"native:{path}")
    sites = meta.get("sites")
    if not isinstance(sites, dict):
        raise TaskSourceError(f"{path / META_FILE}: 'sites' must be an object")
    for site, entry in sites.items():
        if not isinstance(entry, dict):
            raise TaskSourceError(f"{path / META_FILE}: site {site!r} must be an object")
        pet = SitePET()
        if "lora" in entry:
            scale = entry["lora"].get("scale") if isinstance(entry["lora"], dict) else None
            if not isinstance(scale, int | float):
                raise TaskSourceError(f"{path / META_FILE}: site {site!r} LoRA has no numeric scale")
            a, b, rank = take(f"{site}.lora_A"), take(f"{site}.lora_B"), entry["lora"].get("rank")
            if a.dim() != 2 or b.dim() != 2 or (rank is not None and (a.shape[0], b.shape[1]) != (rank, rank)):
                raise TaskSourceError(
                    f"{path}: site {site!r} LoRA rank mismatch: {META_FILE} says rank {rank!r}, "
                    f"lora_A is {tuple(a.shape)}, lora_B is {tuple(b.shape)}"
                )
            pet.lora = LoRA(a=a, b=b, scale=float(scale))
        if entry.get("bias"):
            pet.bias = take(f"{site}.bias")
        if entry.get("layer_norm"):
            pet.layer_norm = LayerNormDelta(weight=take(f"{site}.ln_weight"), bias=take(f"{site}.ln_bias"))
        spec.sites[site] = pet
    head = meta.get("head")
    if head is not None:
        labels = head.get("labels") if isinstance(head, dict) else None
        if not isinstance(labels, list):
            raise TaskSourceError(f"{path / META_FILE}: 'head' must carry a 'labels' list")
        spec.head = Head(weight=take("head.weight"), bias=take("head.bias"), labels=tuple(map(str, labels)))
    if tensors:
        raise TaskSourceError(f"{path / WEIGHTS_FILE}: tensors not named by {META_FILE}: {sorted(tensors)[:3]}")
    return spec
