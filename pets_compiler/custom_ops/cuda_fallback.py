"""CUDA kernels for the pets ops that the compiled library does not provide yet: the plain-torch references.

The references are made of standard batched torch ops (gathers by task slot, bmm, masks), so they run on the GPU
as they are: correct, one dispatch per op, but not the fused single-launch kernels issue 4 asks for (and
sparse_delta densifies each row's delta). An op whose compiled library has a CUDA kernel keeps it.
"""

from __future__ import annotations

import torch

from pets_compiler.custom_ops import reference

_OPS = {
    "lora_delta": reference.lora_delta_ref,
    "bias_delta": reference.bias_delta_ref,
    "linear_delta": reference.linear_delta_ref,
    "layer_norm": reference.layer_norm_ref,
    "segmented_linear": reference.segmented_linear_ref,
    "scale": reference.scale_ref,
    "sparse_delta": reference.sparse_delta_ref,
    "embedding_delta": reference.embedding_delta_ref,
    "adapter": reference.adapter_ref,
}

# Registrations live as long as this Library object.
_lib = torch.library.Library("pets", "FRAGMENT")


def _register() -> list[str]:
    registered = []
    for name, ref in _OPS.items():
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"pets::{name}", "CUDA"):
            _lib.impl(name, ref, "CUDA")
            registered.append(name)
    return registered


FALLBACK_OPS = _register()
