"""The `torch.ops.pets` op library: segmented multi-task ops, one call for all tasks of a batch.

Importing this package loads the compiled kernels (`pets_compiler._C`, built ahead of time by setup.py) and
registers the fake kernels; both are needed to run, export, load (`torch.export.load`) or re-trace a program
that uses the ops. The ops, their schemas and semantics:

- `pets::lora_delta(y, x, task_ids, lora_a, lora_b, scale, rank)`: y + scale[t] * (x @ A[t, :r].T) @ B[t, :, :r].T
  with r = rank[t] (tables are padded to the largest rank; a slot's own rank keeps its result independent of it)
- `pets::bias_delta(y, task_ids, bias)`: y + bias[t]
- `pets::linear_delta(y, x, task_ids, lora_a?, lora_b?, lora_scale?, lora_rank?, bias?, out_scale?)`: the terms
  of one site, fused: (y + the LoRA term + bias[t]) * (1 + out_scale[t]) (IA3's output scale, stored as l - 1)
- `pets::layer_norm(x, task_ids, weight, bias, weight_delta, bias_delta, eps, x_bias?, residual?)`: LayerNorm with
  per-task affine deltas, of (x + x_bias[t]) + residual where given (the bias delta of the linear before it and the
  sublayer's residual add, in its one pass; each sum rounded to x's dtype as the unfused ops round it)
- `pets::segmented_linear(x, task_ids, weight, bias)`: x @ weight[t].T + bias[t] (per-task heads)
- `pets::scale(y, task_ids, delta)`: y * (1 + delta[t]) (IA3; a scale l is stored as l - 1, so a zero slot is the
  identity, bitwise)
- `pets::gelu_delta(y, task_ids, bias?, scale?, approximate)`: gelu(y + bias[t]) * (1 + scale[t]) (a BERT FFN's
  activation with BitFit's bias delta before it and IA3's input scale after it, in one pass; either may be None)
- `pets::row_delta(y, task_ids, bias?, scale?, residual?)`: (y + bias[t]) * (1 + scale[t]) + residual (a linear
  site's BitFit bias delta and IA3 output scale, and the residual add after it, in one pass; bias or scale at least)
- `pets::sparse_delta(y, x, task_ids, row_ptr, col, val)`: y + x @ D_t.T, D_t [out, in] the CSR matrix
  (row_ptr[t], col, val) of slot t, all slots' nonzeros in one pool (diff-pruning, MaskBERT)
- `pets::embedding_delta(y, ids, task_ids, row_ptr, col, val)`: y + D_t[ids], D_t [V, H] in the same pooled CSR
  form (sparse deltas of embedding tables)
- `pets::adapter(h, residual, task_ids, ln_weight, ln_bias, ln_weight_delta, ln_bias_delta, eps, down_w, down_b,
  up_w, up_b, scaling, config, h_bias?)`: a sublayer end LN_t(h + residual) with slot t's bottleneck adapter placed
  as AdapterHub does; config [T, 6] per ADAPTER_CONFIG_COLUMNS, activation codes per ADAPTER_ACTIVATIONS; with
  h_bias (the dense's bias delta), h + h_bias[t] (rounded to h's dtype) stands for h wherever the op reads it

with t = task_ids[row]; the `*_ref` functions are their plain-torch references (`reference.py`).
"""

from __future__ import annotations

import importlib

import torch  # noqa: F401  (loads libtorch/libc10, which the extension links against)

try:
    importlib.import_module("pets_compiler._C")
except ImportError as e:
    raise ImportError(
        f"the pets op library pets_compiler._C could not be loaded ({e}). It is compiled ahead of time: "
        "run `pip install --no-build-isolation -e .` (or `make install`) in the project root, and again "
        "after changing pets_compiler/custom_ops/csrc or upgrading torch."
    ) from e

from pets_compiler.custom_ops import fake as fake  # registers the fake kernels
from pets_compiler.custom_ops.reference import (
    ADAPTER_ACTIVATIONS,
    ADAPTER_CONFIG_COLUMNS,
    adapter_ref,
    bias_delta_ref,
    embedding_delta_ref,
    gelu_delta_ref,
    layer_norm_ref,
    linear_delta_ref,
    lora_delta_ref,
    row_delta_ref,
    scale_ref,
    segmented_linear_ref,
    sparse_delta_ref,
)

__all__ = [
    "ADAPTER_ACTIVATIONS",
    "ADAPTER_CONFIG_COLUMNS",
    "adapter_ref",
    "bias_delta_ref",
    "embedding_delta_ref",
    "gelu_delta_ref",
    "layer_norm_ref",
    "linear_delta_ref",
    "lora_delta_ref",
    "row_delta_ref",
    "scale_ref",
    "segmented_linear_ref",
    "sparse_delta_ref",
]
