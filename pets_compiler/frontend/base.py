"""Load a base BERT checkpoint directory: config, weights, tokenizer and sentence-transformers pooling."""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import BertConfig, BertModel
from transformers.models.bert.modeling_bert import BertOutput, BertSelfOutput

from pets_compiler.errors import BaseModelError, PetsError
from pets_compiler.frontend.weights_io import find_weights_file, read_json_object, read_weights

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
POOLING_MODES = ("cls", "mean", "max", "mean_sqrt_len", "pooler")
# Keys a checkpoint may carry that are not parameters of BertModel.
_IGNORED_KEYS = ("embeddings.position_ids",)


@dataclass(frozen=True)
class Pooling:
    """How a headless task's embedding is pooled from the last hidden state."""

    mode: str  # one of POOLING_MODES
    normalize: bool

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "normalize": self.normalize}

    @staticmethod
    def from_json(d: dict[str, Any]) -> Pooling:
        if d.get("mode") not in POOLING_MODES:
            raise BaseModelError(f"pooling mode {d.get('mode')!r} is not one of {POOLING_MODES}")
        return Pooling(str(d["mode"]), bool(d.get("normalize", False)))


@dataclass(frozen=True)
class SiteShapes:
    """The task sites of a BertModel config and their shapes: linears (out, in), LayerNorms (hidden),
    embeddings (num, dim), and sublayer ends (hidden) where AdapterHub puts adapters (`...attention.output`,
    `...output`: dense, dropout, residual add, LayerNorm)."""

    linear: dict[str, tuple[int, int]]
    layer_norm: dict[str, int]
    embedding: dict[str, tuple[int, int]]
    sublayer: dict[str, int]


@dataclass
class BaseModel:
    path: Path
    config: BertConfig
    state_dict: dict[str, Tensor]
    pooling: Pooling
    tokenizer_dir: Path | None
    max_length: int
    fingerprint: str

    @functools.cached_property
    def sites(self) -> SiteShapes:
        """The config's task sites, built once per base (from a meta-device model: ~30 ms for bert-base, which
        every task load would otherwise pay; treat the result as read-only)."""
        return site_shapes(self.config)

    def build(self) -> BertModel:
        """A fresh eval-mode HF BertModel holding the base weights."""
        return build_bert(self.config, self.state_dict)


def strip_prefix(state: dict[str, Tensor], prefix: str = "bert.") -> dict[str, Tensor]:
    """Keys of BertForSequenceClassification-style checkpoints without their `bert.` prefix."""
    return {k.removeprefix(prefix): v for k, v in state.items()}


def site_shapes(config: BertConfig) -> SiteShapes:
    with torch.device("meta"):
        model = BertModel(config, add_pooling_layer=True)
    linear: dict[str, tuple[int, int]] = {}
    layer_norm: dict[str, int] = {}
    embedding: dict[str, tuple[int, int]] = {}
    sublayer: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            linear[name] = (module.out_features, module.in_features)
        elif isinstance(module, torch.nn.LayerNorm):
            layer_norm[name] = int(module.normalized_shape[0])
        elif isinstance(module, torch.nn.Embedding):
            embedding[name] = (module.num_embeddings, module.embedding_dim)
        elif isinstance(module, BertSelfOutput | BertOutput):
            sublayer[name] = int(module.LayerNorm.normalized_shape[0])
    return SiteShapes(linear, layer_norm, embedding, sublayer)


def build_bert(config: BertConfig, state: dict[str, Tensor]) -> BertModel:
    config = BertConfig.from_dict(config.to_dict())
    config._attn_implementation = "sdpa"
    model = BertModel(config, add_pooling_layer=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in _IGNORED_KEYS]
    if missing or unexpected:
        raise BaseModelError(f"base weights do not fit BertModel: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()


def read_config(path: Path) -> BertConfig:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise BaseModelError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
    raw = read_json_object(cfg_path, BaseModelError)
    if raw.get("model_type") != "bert":
        kind = raw.get("model_type")
        raise BaseModelError(f"{cfg_path}: model_type {kind!r} is not supported; only BERT (model_type 'bert') is")
    return BertConfig.from_dict(raw)


def fingerprint(config: BertConfig, state: dict[str, Tensor]) -> str:
    """A hash of the architecture and every base weight, so tasks and artifacts can name the base they fit."""
    h = hashlib.sha256()
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    h.update(json.dumps({k: getattr(config, k) for k in keys}, sort_keys=True).encode())
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]


def read_pooling(path: Path, has_pooler: bool) -> Pooling:
    """The sentence-transformers pooling of the checkpoint, else its pooler, else [CLS]."""
    modules_file = path / "modules.json"
    if modules_file.is_file():
        try:
            modules = json.loads(modules_file.read_text())  # a list, unlike the other configs
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BaseModelError(f"{modules_file}: cannot read it as JSON: {e}") from None
        if not isinstance(modules, list):
            raise BaseModelError(f"{modules_file}: expected a list of sentence-transformers modules")
        types = {m.get("type", "").rsplit(".", 1)[-1]: m for m in modules if isinstance(m, dict)}
        if "Pooling" in types:
            cfg = read_json_object(path / types["Pooling"].get("path", "") / "config.json", BaseModelError)
            for key, mode in (
                ("pooling_mode_cls_token", "cls"),
                ("pooling_mode_mean_tokens", "mean"),
                ("pooling_mode_max_tokens", "max"),
                ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len"),
            ):
                if cfg.get(key):
                    return Pooling(mode, "Normalize" in types)
            raise BaseModelError(f"{path}: the sentence-transformers pooling config sets no mode this project supports")
    return Pooling("pooler" if has_pooler else "cls", normalize=False)


def read_max_length(path: Path, config: BertConfig) -> int:
    st = path / "sentence_bert_config.json"
    limit = int(config.max_position_embeddings)
    if st.is_file():
        value = read_json_object(st, BaseModelError).get("max_seq_length")
        if isinstance(value, int) and 0 < value <= limit:
            return value
    return limit


def load_base(path: str | Path) -> BaseModel:
    """Read and validate a base checkpoint directory (BertModel or BertForSequenceClassification weights)."""
    path = Path(path)
    if not path.is_dir():
        raise BaseModelError(f"base checkpoint {path} is not a directory")
    config = read_config(path)
    try:
        raw = read_weights(find_weights_file(path, WEIGHT_FILES))
    except PetsError as e:
        raise BaseModelError(f"base checkpoint {path}: {e}") from None
    state = {k: v for k, v in strip_prefix(raw).items() if not k.startswith("classifier.") and k not in _IGNORED_KEYS}
    build_bert(config, state)  # validates names and shapes
    has_pooler = "pooler.dense.weight" in state
    tokenizer_dir = path if (path / "tokenizer.json").is_file() or (path / "vocab.txt").is_file() else None
    return BaseModel(
        path=path,
        config=config,
        state_dict=state,
        pooling=read_pooling(path, has_pooler),
        tokenizer_dir=tokenizer_dir,
        max_length=read_max_length(path, config),
        fingerprint=fingerprint(config, state),
    )
