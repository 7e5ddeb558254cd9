"""The CUDA registrations of the dense task ops (csrc/gather, ATen gathers + batched matmuls) against their torch
references, over task mixes, per-slot ranks with non-zero padding, odd sizes and dtypes."""

from __future__ import annotations

import pytest
import torch

import pets_compiler.custom_ops as custom_ops
from pets_compiler.custom_ops import (
    bias_delta_ref,
    layer_norm_ref,
    linear_delta_ref,
    lora_delta_ref,
    scale_ref,
    segmented_linear_ref,
)

pytestmark = pytest.mark.gpu
ops = torch.ops.pets
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
GATHER_OPS = ("lora_delta", "linear_delta", "bias_delta", "scale", "segmented_linear", "layer_norm")


def test_dense_ops_have_compiled_cuda_kernels() -> None:
    assert not set(GATHER_OPS) & set(custom_ops.cuda_fallback.FALLBACK_OPS)


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("mix", ["one", "uniform", "zipf"])
def test_gather_ops_match_references(dtype: torch.dtype, mix: str) -> None:
    g = torch.Generator().manual_seed(0)
    slots, batch, tokens, in_f, out_f, rank, labels = 9, 7, 5, 72, 200, 7, 3
    if mix == "one":
        ids = torch.full((batch,), 4)
    elif mix == "zipf":
        ids = torch.multinomial(1 / torch.arange(1, slots + 1.0) ** 1.5, batch, replacement=True, generator=g)
    else:
        ids = torch.randint(0, slots, (batch,), generator=g)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g) * 0.3

    x, y = rand(batch, tokens, in_f), rand(batch, tokens, out_f)
    a, b, s = rand(slots, rank, in_f), rand(slots, out_f, rank), rand(slots) + 1
    r = torch.randint(0, rank + 1, (slots,), generator=g)  # padding beyond r[t] is not zero: it must be ignored
    bias, delta = rand(slots, out_f), rand(slots, out_f)
    hw, hb = rand(slots, labels, out_f), rand(slots, labels)
    cases = {
        "lora_delta": (lora_delta_ref, (y, x, ids, a, b, s, r)),
        "linear_delta": (linear_delta_ref, (y, x, ids, a, b, s, r, bias)),
        "bias_delta": (bias_delta_ref, (y, ids, bias)),
        "scale": (scale_ref, (y, ids, delta)),
        "segmented_linear": (segmented_linear_ref, (y, ids, hw, hb)),
        "layer_norm": (layer_norm_ref, (y * 3 + 1, ids, rand(out_f), rand(out_f), bias, delta, 1e-12)),
    }
    for name, (ref, args) in cases.items():
        tensors = [t for t in args if isinstance(t, torch.Tensor)]
        rest = [a for a in args if not isinstance(a, torch.Tensor)]  # eps
        want = ref(*[t.double() if t.is_floating_point() else t for t in tensors], *rest)
        cuda = [t.to("cuda", dtype) if t.is_floating_point() else t.cuda() for t in tensors]
        got = getattr(ops, name)(*cuda, *rest)
        assert got.is_cuda and got.dtype == dtype
        torch.testing.assert_close(got.double().cpu(), want, rtol=TOL[dtype], atol=TOL[dtype], msg=name)
