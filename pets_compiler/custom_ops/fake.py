"""Fake (meta) kernels of the `torch.ops.pets` ops, for torch.export, torch.compile and FakeTensor tracing.

They only give the output's shape, dtype and (contiguous) layout, exactly as the real kernels allocate it.
They check nothing: a check relating a table's slot count T to the batch size or to task id values would put
a guard on the dynamic batch dim (or be data-dependent), and the real kernels check everything at run time.
"""

from __future__ import annotations

import torch
from torch import Tensor

# The registrations live as long as this Library: re-executing the module (importlib.reload) drops the old
# Library and with it the old fakes, so registering again does not fail.
_lib = torch.library.Library("pets", "FRAGMENT")


@torch.library.register_fake("pets::lora_delta", lib=_lib)
def _lora_delta_fake(
    y: Tensor, x: Tensor, task_ids: Tensor, lora_a: Tensor, lora_b: Tensor, scale: Tensor, rank: Tensor
) -> Tensor:
    return torch.empty_like(y, memory_format=torch.contiguous_format)


@torch.library.register_fake("pets::bias_delta", lib=_lib)
def _bias_delta_fake(y: Tensor, task_ids: Tensor, bias: Tensor) -> Tensor:
    return torch.empty_like(y, memory_format=torch.contiguous_format)


@torch.library.register_fake("pets::linear_delta", lib=_lib)
def _linear_delta_fake(
    y: Tensor,
    x: Tensor,
    task_ids: Tensor,
    lora_a: Tensor | None,
    lora_b: Tensor | None,
    lora_scale: Tensor | None,
    lora_rank: Tensor | None,
    bias: Tensor | None,
    out_scale: Tensor | None = None,
) -> Tensor:
    return torch.empty_like(y, memory_format=torch.contiguous_format)


@torch.library.register_fake("pets::layer_norm", lib=_lib)
def _layer_norm_fake(
    x: Tensor,
    task_ids: Tensor,
    weight: Tensor,
    bias: Tensor,
    weight_delta: Tensor,
    bias_delta: Tensor,
    eps: float,
    x_bias: Tensor | None = None,
    residual: Tensor | None = None,
) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("pets::segmented_linear", lib=_lib)
def _segmented_linear_fake(x: Tensor, task_ids: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[1]))


@torch.library.register_fake("pets::scale", lib=_lib)
def _scale_fake(y: Tensor, task_ids: Tensor, delta: Tensor) -> Tensor:
    return torch.empty_like(y, memory_format=torch.contiguous_format)


@torch.library.register_fake("pets::gelu_delta", lib=_lib)
def _gelu_delta_fake(
    y: Tensor, task_ids: Tensor, bias: Tensor | None, scale: Tensor | None, approximate: str
) -> Tensor:
    return torch.empty_like(y, memory_format=torch.contiguous_format)


@torch.library.register_fake("pets::row_delta", lib=_lib)
def _row_delta_fake(
    y: Tensor, task_ids: Tensor, bias: Tensor | None, scale: Tensor | None, residual: Tensor | None
) -> Tensor:
    return torch.empty_like(y, memory_format=torch.contiguous_format)


@torch.library.register_fake("pets::sparse_delta", lib=_lib)
def _sparse_delta_fake(y: Tensor, x: Tensor, task_ids: Tensor, row_ptr: Tensor, col: Tensor, val: Tensor) -> Tensor:
    return torch.empty_like(y, memory_format=torch.contiguous_format)


@torch.library.register_fake("pets::embedding_delta", lib=_lib)
def _embedding_delta_fake(
    y: Tensor, ids: Tensor, task_ids: Tensor, row_ptr: Tensor, col: Tensor, val: Tensor
) -> Tensor:
    return torch.empty_like(y, memory_format=torch.contiguous_format)


@torch.library.register_fake("pets::adapter", lib=_lib)
def _adapter_fake(
    h: Tensor,
    residual: Tensor,
    task_ids: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    ln_weight_delta: Tensor,
    ln_bias_delta: Tensor,
    eps: float,
    down_w: Tensor,
    down_b: Tensor,
    up_w: Tensor,
    up_b: Tensor,
    scaling: Tensor,
    config: Tensor,
    h_bias: Tensor | None = None,
) -> Tensor:
    return torch.empty_like(h, memory_format=torch.contiguous_format)
