"""Each task's own model, run alone: the reference every multi-task row must equal (DESIGN.md, "The one rule").

`merged_model` applies a TaskSpec's deltas to a plain HF BertModel (LoRA merged into W, deltas added to
biases and LayerNorms) and adds its head; `peft_model` wraps peft's own PeftModel for a peft adapter dir.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from pets_compiler.frontend.base import BaseModel
from pets_compiler.frontend.taskset import TaskSpec
from pets_compiler.passes.attach_heads import pool_embedding


class OwnModel(torch.nn.Module):
    """forward(input_ids, attention_mask) -> (logits or None, embedding), like one row of `pets run`."""

    def __init__(self, bert: torch.nn.Module, head: torch.nn.Linear | None, base: BaseModel) -> None:
        super().__init__()
        self.bert, self.head, self.pooling = bert, head, base.pooling

    @torch.no_grad()
    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor | None, Tensor]:
        hidden, pooled = self.bert(input_ids=input_ids, attention_mask=attention_mask, return_dict=False)[:2]
        emb = pool_embedding(hidden, pooled, attention_mask, self.pooling.mode, self.pooling.normalize)
        return (None if self.head is None else self.head(pooled)), emb


def merged_model(base: BaseModel, spec: TaskSpec) -> OwnModel:
    """The HF model with the task's PET merged into its weights."""
    bert = base.build()
    params: dict[str, Tensor] = dict(bert.named_parameters())
    with torch.no_grad():
        for site, pet in spec.sites.items():
            if pet.lora is not None:
                w = params[f"{site}.weight"]
                w.add_(pet.lora.scale * (pet.lora.b.double() @ pet.lora.a.double()).to(w.dtype))
            if pet.bias is not None:
                params[f"{site}.bias"].add_(pet.bias)
            if pet.layer_norm is not None:
                params[f"{site}.weight"].add_(pet.layer_norm.weight)
                params[f"{site}.bias"].add_(pet.layer_norm.bias)
    head = None
    if spec.head is not None:
        head = torch.nn.Linear(spec.head.weight.shape[1], spec.head.num_labels)
        with torch.no_grad():
            head.weight.copy_(spec.head.weight)
            head.bias.copy_(spec.head.bias)
    return OwnModel(bert, head, base).eval()


def peft_model(base: BaseModel, adapter_dir: str | Path) -> torch.nn.Module:
    """peft's own model for a LoRA dir: forward(input_ids, attention_mask) -> (logits or None, embedding)."""
    from peft import PeftModel
    from transformers import BertForSequenceClassification

    from pets_compiler.frontend.peft_dir import ADAPTER_FILES
    from pets_compiler.frontend.weights_io import find_weights_file, read_weights

    adapter_dir = Path(adapter_dir)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = read_weights(find_weights_file(adapter_dir, ADAPTER_FILES))
    head_key = next((k for k in tensors if k.endswith("classifier.weight")), None)
    if head_key is None or cfg.get("task_type") != "SEQ_CLS":
        bert = PeftModel.from_pretrained(base.build(), str(adapter_dir)).eval()
        return OwnModel(bert, None, base).eval()
    config = base.config.__class__.from_dict({**base.config.to_dict(), "num_labels": tensors[head_key].shape[0]})
    config._attn_implementation = "sdpa"
    clf = BertForSequenceClassification(config)
    clf.bert.load_state_dict(base.state_dict, strict=False)
    model = PeftModel.from_pretrained(clf.eval(), str(adapter_dir)).eval()
    pooler: torch.nn.Module = clf.bert.pooler  # type: ignore[assignment]  # peft wraps its linear in place

    class _Own(torch.nn.Module):
        @torch.no_grad()
        def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor | None, Tensor]:
            out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
            hidden = out.hidden_states[-1]
            pooled = pooler(hidden)
            emb = pool_embedding(hidden, pooled, attention_mask, base.pooling.mode, base.pooling.normalize)
            return out.logits, emb

    return _Own()
