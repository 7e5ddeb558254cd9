"""The base models the benchmarks serve: BERT configs with random weights (the GPU machine has no checkpoints)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import BertConfig, BertModel

from pets_compiler.frontend.base import BaseModel, fingerprint, read_pooling

BERT_BASE: dict[str, Any] = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
# PetS's other two models (its experiments script): DistilBERT's depth at bert-base's sizes, and bert-large.
DISTILBERT: dict[str, Any] = {**BERT_BASE, "num_hidden_layers": 6}
BERT_LARGE: dict[str, Any] = dict(
    hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096
)
TINY: dict[str, Any] = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
MODELS = {"bert-base": BERT_BASE, "distilbert": DISTILBERT, "bert-large": BERT_LARGE, "tiny": TINY}
# Token ids are drawn from [1000, 30000): every config keeps BERT's vocabulary.
VOCAB, MAX_POSITIONS = 30522, 512


def make_base(model: dict[str, Any], seed: int = 0) -> BaseModel:
    """A BertModel (with pooler) of the given sizes and random weights, as the frontend's BaseModel."""
    torch.manual_seed(seed)
    config = BertConfig(**model, vocab_size=VOCAB, max_position_embeddings=MAX_POSITIONS)
    state = {
        k: v for k, v in BertModel(config).state_dict().items() if not k.endswith(("position_ids", "token_type_ids"))
    }
    # No checkpoint dir: pooling falls back to the pooler output, the embedding every headless task returns.
    pooling = read_pooling(Path("/nonexistent"), has_pooler=True)
    return BaseModel(Path("."), config, state, pooling, None, MAX_POSITIONS, fingerprint(config, state))
