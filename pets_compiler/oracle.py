"""Each task's own model, run alone: the reference every multi-task row must equal (DESIGN.md, "The one rule").

`merged_model` applies a TaskSpec's deltas to a plain HF BertModel (LoRA merged into W, deltas added to
biases and LayerNorms) and adds its head; `peft_model` wraps peft's own PeftModel for a peft adapter dir.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.models.bert.modeling_bert import BertOutput, BertSelfOutput

from pets_compiler.frontend.base import BaseModel
from pets_compiler.frontend.taskset import Adapter, Head, TaskSpec
from pets_compiler.passes.attach_heads import pool_embedding


class OwnModel(torch.nn.Module):
    """forward(input_ids, attention_mask) -> (logits or None, embedding), like one row of `pets run`."""

    def __init__(self, bert: torch.nn.Module, head: Head | None, base: BaseModel) -> None:
        super().__init__()
        self.bert, self.head, self.pooling = bert, head, base.pooling

    @torch.no_grad()
    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor | None, Tensor]:
        hidden, pooled = self.bert(input_ids=input_ids, attention_mask=attention_mask, return_dict=False)[:2]
        emb = pool_embedding(hidden, pooled, attention_mask, self.pooling.mode, self.pooling.normalize)
        if self.head is None:
            return None, emb
        c = hidden[:, 0] if self.head.use_cls else pooled
        if self.head.dense_w is not None:
            c = torch.tanh(F.linear(c, self.head.dense_w, self.head.dense_b))
        return F.linear(c, self.head.weight, self.head.bias), emb


ACTIVATIONS = {
    "identity": lambda x: x,
    "linear": lambda x: x,
    "relu": F.relu,
    "swish": F.silu,
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "leakyrelu": F.leaky_relu,
    "leaky_relu": F.leaky_relu,
}


def _with_adapter(sublayer: BertSelfOutput | BertOutput, adapter: Adapter) -> None:
    """Make an HF BertSelfOutput / BertOutput run an AdapterHub bottleneck adapter (taskset.Adapter's math)."""
    act = ACTIVATIONS[adapter.activation]

    def forward(hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
        h = sublayer.dropout(sublayer.dense(hidden_states))
        norm = sublayer.LayerNorm
        a_in = norm(h + input_tensor) if adapter.original_ln_before else h
        res = h if adapter.residual_before_ln else a_in
        z = F.linear(act(F.linear(a_in, adapter.down_w, adapter.down_b)), adapter.up_w, adapter.up_b)
        z = z * adapter.scaling + res
        return norm(z + input_tensor) if adapter.original_ln_after else z

    sublayer.forward = forward  # type: ignore[method-assign]


def merged_model(base: BaseModel, spec: TaskSpec) -> OwnModel:
    """The HF model with the task's PET merged into its weights (and adapter modules inserted).

    At a linear: W' = (W * l_in + D + scale * B A) * l_out[:, None], b' = (b + db) * l_out; embeddings: E + D;
    LayerNorms: w + dw, b + db (taskset.py gives the semantics this reproduces).
    """
    bert = base.build()
    params: dict[str, Tensor] = dict(bert.named_parameters())
    modules = dict(bert.named_modules())
    with torch.no_grad():
        for site, pet in spec.sites.items():
            if pet.layer_norm is not None:
                params[f"{site}.weight"].add_(pet.layer_norm.weight)
                params[f"{site}.bias"].add_(pet.layer_norm.bias)
            if pet.adapter is not None:
                module = modules[site]
                assert isinstance(module, BertSelfOutput | BertOutput)
                _with_adapter(module, pet.adapter)
            if site not in base.sites.linear and site not in base.sites.embedding:
                continue
            w = params[f"{site}.weight"]
            merged = w.double()
            if pet.ia3 is not None and pet.ia3.input is not None:
                merged = merged * pet.ia3.input.double()[None, :]
            if pet.sparse is not None:
                merged = merged + pet.sparse.dense().double()
            if pet.lora is not None:
                merged = merged + pet.lora.scale * (pet.lora.b.double() @ pet.lora.a.double())
            if pet.bias is not None:
                params[f"{site}.bias"].add_(pet.bias)
            if pet.ia3 is not None and pet.ia3.output is not None:
                merged = merged * pet.ia3.output.double()[:, None]
                params[f"{site}.bias"].mul_(pet.ia3.output)
            w.copy_(merged.to(w.dtype))
    return OwnModel(bert, spec.head, base).eval()


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
