"""Capture the base BertModel with torch.export (dynamic batch and sequence) into an FX GraphModule."""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import BertModel

from pets_compiler.frontend.base import BaseModel, build_bert


class _TupleBert(torch.nn.Module):
    """BertModel returning plain tensors (last hidden state, pooler output), parameters under HF names."""

    def __init__(self, bert: BertModel) -> None:
        super().__init__()
        # Register bert's children directly so parameter names stay `encoder.layer.0...`, not `bert.encoder...`.
        for name, child in bert.named_children():
            self.add_module(name, child)
        self._forward = bert.forward

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        out = self._forward(input_ids=input_ids, attention_mask=attention_mask, return_dict=False)
        return out[0], out[1]


def capture(base: BaseModel, dtype: torch.dtype = torch.float32) -> torch.fx.GraphModule:
    """Export the base and return the unlifted graph: weights are get_attr nodes named by HF parameter names."""
    bert = build_bert(base.config, base.state_dict)
    model = _TupleBert(bert).to(dtype).eval()
    ids = torch.zeros(2, 8, dtype=torch.long)
    mask = torch.ones(2, 8, dtype=torch.long)
    batch = torch.export.Dim("batch")
    seq = torch.export.Dim("seq", max=int(base.config.max_position_embeddings))
    with torch.no_grad():
        ep = torch.export.export(
            model,
            (ids, mask),
            dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}),
            strict=False,
        )
    unlifted = ep.module()
    # A plain GraphModule with positional placeholders and no input-spec hook: passes add inputs, and the
    # program is exported again afterwards.
    unlifted.graph._codegen = torch.fx.graph.CodeGen()
    return torch.fx.GraphModule(unlifted, unlifted.graph)
