"""Import an AdapterHub bottleneck adapter dir (as `adapters`' `save_adapter` writes it), with its head.

Files: `adapter_config.json` + `adapter.safetensors` or `pytorch_adapter.bin` (keys
`[bert.]encoder.layer.N.{attention.output,output}.adapters.<name>.adapter_{down.0,up}.{weight,bias}`), and, when
saved with its head, `head_config.json` + `model_head.safetensors` or `pytorch_model_head.bin`
(`heads.<name>.<i>.{weight,bias}`). The semantics (tests/fixtures/adapterhub/SEMANTICS.md) are those of
`taskset.Adapter`; configs outside them are refused, naming the option.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pets_compiler.errors import TaskSourceError
from pets_compiler.frontend.base import BaseModel
from pets_compiler.frontend.taskset import Adapter, Head, TaskSpec
from pets_compiler.frontend.weights_io import find_weights_file, read_json_object, read_weights

ADAPTER_FILES = ("adapter.safetensors", "pytorch_adapter.bin")
HEAD_FILES = ("model_head.safetensors", "pytorch_model_head.bin")
# Presets that hand-written files may name instead of spelling out the config.
_PRESETS = {
    "pfeiffer": {"original_ln_before": True, "mh_adapter": False, "non_linearity": "relu", "reduction_factor": 16},
    "houlsby": {"original_ln_before": False, "mh_adapter": True, "non_linearity": "swish", "reduction_factor": 16},
}
_PRESETS["seq_bn"], _PRESETS["double_seq_bn"] = _PRESETS["pfeiffer"], _PRESETS["houlsby"]
# Options whose non-default value is outside the adapters this project compiles (option -> allowed values).
_REFUSED = {
    "use_gating": (False, None),
    "is_parallel": (False, None),
    "phm_layer": (False, None),
    "inv_adapter": (None,),
    "ln_before": (False, None),
    "ln_after": (False, None),
    "cross_adapter": (False, None),
}
_KEY = re.compile(
    r"(?:bert\.)?(encoder\.layer\.\d+\.(?:attention\.output|output))\.adapters\.([^.]+)\.(adapter_down\.0|adapter_up)\.(weight|bias)"
)


def is_adapterhub_dir(path: Path) -> bool:
    return (path / "adapter_config.json").is_file() and any((path / f).is_file() for f in ADAPTER_FILES)


def _config(path: Path, base: BaseModel) -> tuple[dict[str, Any], str]:
    """The bottleneck config (presets resolved) and the adapter's name, after the refusals."""
    meta = read_json_object(path / "adapter_config.json")
    cfg = meta.get("config")
    if isinstance(cfg, str):
        if cfg not in _PRESETS:
            raise TaskSourceError(f"{path}: adapter config preset {cfg!r} is not one of {sorted(_PRESETS)}")
        cfg = dict(_PRESETS[cfg])
    if not isinstance(cfg, dict):
        raise TaskSourceError(f"{path}/adapter_config.json: 'config' must be an object or a preset name")
    if "architecture" in cfg:
        raise TaskSourceError(f"{path}: adapter architecture {cfg['architecture']!r} is not a bottleneck adapter")
    for option, allowed in _REFUSED.items():
        if cfg.get(option) not in allowed:
            raise TaskSourceError(f"{path}: AdapterHub option {option}={cfg[option]!r} is not supported")
    if not isinstance(cfg.get("residual_before_ln", True), bool):
        raise TaskSourceError(f"{path}: residual_before_ln={cfg['residual_before_ln']!r} is not supported")
    if not isinstance(cfg.get("scaling", 1.0), float | int) or isinstance(cfg.get("scaling"), bool):
        raise TaskSourceError(f"{path}: AdapterHub option scaling={cfg['scaling']!r} is not supported (only a number)")
    for key in ("hidden_size", "model_type"):
        want = base.config.hidden_size if key == "hidden_size" else "bert"
        if key in meta and meta[key] != want:
            raise TaskSourceError(f"{path}: adapter {key} is {meta[key]!r}, the base has {want!r}")
    activation = str(cfg.get("non_linearity", "relu")).lower()
    if activation == "gelu" and "version" not in meta:  # adapter-transformers' legacy name for the tanh gelu
        activation = "gelu_new"
    cfg = {**cfg, "non_linearity": activation}
    return cfg, str(meta.get("name", ""))


def load_adapterhub(path: Path, name: str, base: BaseModel) -> TaskSpec:
    cfg, adapter_name = _config(path, base)
    tensors = read_weights(find_weights_file(path, ADAPTER_FILES))
    parts: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.fullmatch(key)
        if match is None:
            raise TaskSourceError(f"{path}: tensor {key!r} is not a bottleneck adapter weight this project reads")
        sublayer, owner, layer, param = match.groups()
        if adapter_name and owner != adapter_name:
            raise TaskSourceError(
                f"{path}: tensor {key!r} belongs to adapter {owner!r}, the config names {adapter_name!r}"
            )
        parts.setdefault(sublayer, {})[f"{layer}.{param}"] = tensor
    spec = TaskSpec(name=name, source=f"adapterhub:{path}")
    for sublayer, p in sorted(parts.items()):
        if sublayer not in base.sites.sublayer:
            raise TaskSourceError(f"{path}: {sublayer} is not a sublayer of the base model")
        missing = {"adapter_down.0.weight", "adapter_down.0.bias", "adapter_up.weight", "adapter_up.bias"} - set(p)
        if missing:
            raise TaskSourceError(f"{path}: adapter at {sublayer} lacks {sorted(missing)}")
        spec.site(sublayer).adapter = Adapter(
            down_w=p["adapter_down.0.weight"],
            down_b=p["adapter_down.0.bias"],
            up_w=p["adapter_up.weight"],
            up_b=p["adapter_up.bias"],
            scaling=float(cfg.get("scaling", 1.0)),
            activation=cfg["non_linearity"],
            original_ln_before=bool(cfg.get("original_ln_before", False)),
            residual_before_ln=bool(cfg.get("residual_before_ln", True)),
            original_ln_after=bool(cfg.get("original_ln_after", True)),
        )
    if (path / "head_config.json").is_file():
        spec.head = _head(path, base)
    return spec


def _head(path: Path, base: BaseModel) -> Head:
    """A classification head: [dropout, Linear(H, H), act] * (layers - 1) then [dropout, Linear(H, labels)]."""
    meta = read_json_object(path / "head_config.json")
    cfg = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    assert isinstance(cfg, dict)
    if cfg.get("head_type") != "classification":
        raise TaskSourceError(f"{path}: head_type {cfg.get('head_type')!r} is not supported (only 'classification')")
    layers = cfg.get("layers", 2)
    activation = str(cfg.get("activation_function") or "").lower()
    if layers not in (1, 2) or (layers == 2 and activation != "tanh"):
        raise TaskSourceError(
            f"{path}: heads with layers={layers!r} and activation_function={activation!r} are not supported "
            "(1 layer, or 2 with tanh)"
        )
    tensors = {k.split(".", 2)[-1]: v for k, v in read_weights(find_weights_file(path, HEAD_FILES)).items()}
    last = "4" if layers == 2 else "1"
    weight = tensors.get(f"{last}.weight")
    hidden = base.config.hidden_size
    if weight is None or weight.dim() != 2 or weight.shape[1] != hidden:
        raise TaskSourceError(f"{path}: head weight {last}.weight does not fit hidden size {hidden}")
    bias = tensors.get(f"{last}.bias", torch.zeros(weight.shape[0]))
    label2id = cfg.get("label2id") or {}
    names = {int(i): str(label) for label, i in label2id.items()} if isinstance(label2id, dict) else {}
    labels = tuple(names.get(i, f"LABEL_{i}") for i in range(weight.shape[0]))
    head = Head(weight=weight, bias=bias, labels=labels, use_cls=not cfg.get("use_pooler", False))
    if layers == 2:
        if "1.weight" not in tensors or "1.bias" not in tensors:
            raise TaskSourceError(f"{path}: a 2-layer head needs 1.weight and 1.bias")
        head = Head(weight, bias, labels, dense_w=tensors["1.weight"], dense_b=tensors["1.bias"], use_cls=head.use_cls)
    return head
