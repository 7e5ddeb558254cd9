"""Capture the base BertModel with torch.export (dynamic batch and sequence) into an FX GraphModule: the padded
program (one request per row) or the packed one (several requests per row, see _PackedBert)."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any

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


class _PackedBert(torch.nn.Module):
    """BertModel over packed rows: `segments` [rows, K, seq] (0/1) says which tokens of a row form its k-th
    request (contiguous, each starting a fresh sequence); a row holds at most K requests. Positions restart at
    each request and attention stays within it (a token in no request attends to itself alone, so it stays
    finite). Returns the last hidden state, the pooler output and the [CLS] hidden state of every (row, k),
    flattened to [rows * K, hidden]; a (row, k) holding no request gets row's first token (its outputs are
    dropped)."""

    def __init__(self, bert: BertModel) -> None:
        super().__init__()
        for name, child in bert.named_children():
            self.add_module(name, child)
        bert.pooler = None  # the encoder only: the pooler runs here, on each request's [CLS]
        self._forward = bert.forward

    def forward(self, input_ids: Tensor, segments: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        member = segments.to(torch.long)
        positions = ((member.cumsum(-1) - 1) * member).sum(1)  # [rows, seq]: 0 at each request's first token
        number = torch.arange(1, member.shape[1] + 1, device=member.device).view(1, -1, 1)
        request = (member * number).sum(1)  # [rows, seq]: 1 + the token's request, 0 outside every request
        together = (request.unsqueeze(2) == request.unsqueeze(1)) & (request > 0).unsqueeze(1)
        alone = torch.eye(input_ids.shape[1], dtype=torch.bool, device=input_ids.device)
        mask = (together | alone).unsqueeze(1)  # [rows, 1, seq, seq]
        hidden = self._forward(input_ids=input_ids, attention_mask=mask, position_ids=positions, return_dict=False)[0]
        starts = member.argmax(-1)  # [rows, K]: each request's first token
        cls = hidden.gather(1, starts.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])).flatten(0, 1)
        pooler = self.get_submodule("pooler")
        return hidden, pooler(cls.unsqueeze(1)), cls


def example_mask(packed: bool, batch: Any, seq: Any) -> tuple[Tensor, dict[int, Any]]:
    """The example attention mask [2, 8] (packed: segments [2, 3, 8], two requests in each row and an empty
    third) that programs are exported with, and its dynamic dims."""
    if not packed:
        return torch.ones(2, 8, dtype=torch.long), {0: batch, 1: seq}
    segments = torch.zeros(2, 3, 8, dtype=torch.long)
    segments[:, 0, :3], segments[:, 1, 3:6] = 1, 1
    return segments, {0: batch, 1: torch.export.Dim("requests"), 2: seq}


# Captured bases kept per process (torch.export of a bert-base takes ~7 s of a ~13 s compile on a 2-core CPU):
# compiling other task sets on the same base, or its packed program, starts from a copy of the graph. The weights
# are shared with the copies (no pass or runtime writes a base weight in place: they add task tables).
CAPTURE_CACHE = 2
_captured: OrderedDict[tuple[str, str, str, bool], torch.fx.GraphModule] = OrderedDict()
_captured_lock = threading.Lock()


def capture(base: BaseModel, dtype: torch.dtype = torch.float32, *, packed: bool = False) -> torch.fx.GraphModule:
    """Export the base and return the unlifted graph: weights are get_attr nodes named by HF parameter names.
    Inputs: (input_ids, attention_mask), or (input_ids, segments) when `packed`. Each call returns a graph of its
    own (passes rewrite it), from the last CAPTURE_CACHE bases captured in this process where it can."""
    config = hashlib.sha256(base.config.to_json_string(use_diff=False).encode()).hexdigest()
    key = (base.fingerprint, config, str(dtype), packed)
    with _captured_lock:
        captured = _captured.get(key)
        if captured is not None:
            _captured.move_to_end(key)
    if captured is None:
        captured = _export(base, dtype, packed)
        with _captured_lock:
            _captured[key] = captured
            while len(_captured) > CAPTURE_CACHE:
                _captured.popitem(last=False)
    return _copy(captured)


def _copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A GraphModule with its own graph (nodes and their meta copied) over the same weights."""
    graph = torch.fx.Graph()
    graph._codegen = torch.fx.graph.CodeGen()
    graph.output(graph.graph_copy(gm.graph, {}))
    return torch.fx.GraphModule(gm, graph)


def _export(base: BaseModel, dtype: torch.dtype, packed: bool) -> torch.fx.GraphModule:
    bert = build_bert(base.config, base.state_dict)
    model = (_PackedBert(bert) if packed else _TupleBert(bert)).to(dtype).eval()
    ids = torch.zeros(2, 8, dtype=torch.long)
    batch = torch.export.Dim("batch")
    seq = torch.export.Dim("seq", max=int(base.config.max_position_embeddings))
    mask, mask_dims = example_mask(packed, batch, seq)
    with torch.no_grad():
        ep = torch.export.export(model, (ids, mask), dynamic_shapes=({0: batch, 1: seq}, mask_dims), strict=False)
    unlifted = ep.module()
    # A plain GraphModule with positional placeholders and no input-spec hook: passes add inputs, and the
    # program is exported again afterwards.
    unlifted.graph._codegen = torch.fx.graph.CodeGen()
    return torch.fx.GraphModule(unlifted, unlifted.graph)
