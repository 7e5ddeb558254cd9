"""How the attention mask's form changes SDPA's time on this GPU (issue 4: the runtime's attention ran at 30 us a
layer against the HF backbone's 17 us at bs64 s128, the backbone dropping an all-ones mask). A development probe.

    python -m scripts.sdpa_mask
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.timing import timed


def us(fn: Callable[[], object]) -> float:
    """Microseconds a call, 20 calls back to back: the GPU's time only where a call's host time (launch, mask
    conversion) is shorter; on the H200 these were host-bound, so read them as upper bounds."""
    return timed(lambda: [fn() for _ in range(20)], "cuda", warmup=3, iters=10).median_s / 20 * 1e6


def main() -> None:
    b, h, s, d = 64, 12, 128, 64
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.float16) for _ in range(3))
    keep = torch.ones(b, s, dtype=torch.bool, device="cuda")
    keep[::2, 100:] = False  # half the rows padded
    masks = {
        "none": None,
        "bool [B,1,S,S]": (keep[:, None, None, :] & torch.ones(1, 1, s, 1, dtype=torch.bool, device="cuda")).expand(
            b, 1, s, s
        ),
        "bool [B,1,S,S] contiguous": keep[:, None, None, :].expand(b, 1, s, s).contiguous(),
        "bool [B,1,1,S]": keep[:, None, None, :],
        "additive fp16 [B,1,1,S]": torch.zeros(b, 1, 1, s, device="cuda", dtype=torch.float16).masked_fill(
            ~keep[:, None, None, :], float("-inf")
        ),
    }
    print(torch.cuda.get_device_name(), torch.__version__, f"q/k/v [{b}, {h}, {s}, {d}] fp16")
    backends = {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}
    for name, mask in masks.items():
        for label, backend in backends.items():
            try:
                if backend is None:
                    t = us(lambda mask=mask: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
                else:
                    with sdpa_kernel(backend):
                        t = us(lambda mask=mask: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
                print(f"{name:<28} {label:<10} {t:7.1f} us")
            except RuntimeError as e:
                print(f"{name:<28} {label:<10} unavailable: {str(e).splitlines()[0][:80]}")


if __name__ == "__main__":
    main()
