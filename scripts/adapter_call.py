"""pets.adapter at a bert-base layer output (hidden 768, bottleneck 64, fp16) as the mix_dense program runs it: 8192
tokens, row b on slot b % --slots, an adapter on 1 slot in 5 (Pfeiffer `seq_bn`; the others: the LayerNorm alone),
for each shape in --shapes (default 64x128 and 128x64, the two of bench.throughput). At 128 tasks the throughput run
of session 12 (b5eea04, H200) spent 173 us a forward in adapter_out_kernel at 128x64 against 122 at 64x128, with
about the same busy tokens: this gives each kernel's GPU time per call (torch.profiler over 20 calls) of both shapes
in one process, and with ncu (`ncu --kernel-name regex:adapter_out --launch-skip 2 --launch-count 1`) the kernel of
the first shape. A development probe (scripts/op_times.py times every op; bench.profile_runtime the whole program).
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import pets_compiler  # noqa: F401
from pets_compiler.custom_ops.reference import ADAPTER_ACTIVATIONS


def inputs(
    batch: int,
    seq: int,
    slots: int,
    device: str,
    dtype: torch.dtype,
    every: int = 5,
    uniform: bool = False,
    h_bias: bool = False,
) -> tuple[object, ...]:
    """pets.adapter's arguments: h, residual, ids (row b on slot b % slots, or `uniform`: drawn uniformly as
    bench.throughput draws them), the LayerNorm's rows and per-slot deltas, eps, the adapter tables (bottleneck 64,
    adapters on slots 3, 3 + every, ...: 1 in 5 by default, as mix_dense's Pfeiffer part), their config and, with
    `h_bias`, the bias delta fuse_norm_inputs hands it (mix_dense's BitFit tasks)."""
    g = torch.Generator().manual_seed(0)
    hidden, bottleneck = 768, 64

    def randn(*shape: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std).to(device, dtype)

    ids = (torch.randint(0, slots, (batch,), generator=g) if uniform else torch.arange(batch) % slots).to(device)
    enabled = (torch.arange(slots) % every == 3 % every).long()
    relu = enabled * ADAPTER_ACTIVATIONS["relu"]
    config = torch.stack([enabled, enabled, enabled, enabled, relu, enabled * bottleneck], 1)
    return (
        randn(batch, seq, hidden),
        randn(batch, seq, hidden),
        ids,
        randn(hidden, std=0.1) + 1,
        randn(hidden, std=0.1),
        randn(slots, hidden, std=0.01),
        randn(slots, hidden, std=0.01),
        1e-12,
        randn(slots, bottleneck, hidden, std=hidden**-0.5),
        randn(slots, bottleneck, std=0.1),
        randn(slots, hidden, bottleneck, std=0.1),
        randn(slots, hidden, std=0.1),
        torch.ones(slots).to(device, dtype),
        config.to(device),
        randn(slots, hidden, std=0.01) if h_bias else None,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--shapes", default="64x128,128x64", help="comma-separated BATCHxSEQ")
    p.add_argument("--slots", type=int, default=128, help="tasks loaded (row b on slot b %% slots)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--every", type=int, default=5, help="an adapter on 1 slot in EVERY")
    p.add_argument("--uniform", action="store_true", help="rows draw their slot uniformly (seeded)")
    p.add_argument("--h-bias", action="store_true", help="with h_bias (the kBias kernels)")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for shape in args.shapes.split(","):
        batch, seq = (int(v) for v in shape.split("x"))
        dtype = torch.float16 if device == "cuda" else torch.float32
        call = inputs(batch, seq, args.slots, device, dtype, args.every, args.uniform, args.h_bias)
        ids, config = call[2], call[13]
        busy = int(config[ids, 0].ne(0).sum()) * seq  # type: ignore[index]
        for _ in range(3):
            torch.ops.pets.adapter(*call)
        if device == "cuda":
            torch.cuda.synchronize()
        activities = [ProfilerActivity.CUDA] if device == "cuda" else [ProfilerActivity.CPU]
        with profile(activities=activities) as prof:
            for _ in range(args.iters):
                torch.ops.pets.adapter(*call)
            if device == "cuda":
                torch.cuda.synchronize()
        attr = "device_time_total" if device == "cuda" else "self_cpu_time_total"
        rows = [(e.key, getattr(e, attr) / args.iters) for e in prof.key_averages() if getattr(e, attr) > 0]
        rows.sort(key=lambda r: -r[1])
        total = sum(t for _, t in rows) if device == "cuda" else max(t for _, t in rows)
        print(f"{batch}x{seq}, {args.slots} slots, {busy} tokens with an adapter ({device}): {total:.1f} us a call")
        for name, t in rows[:8]:
            print(f"    {t:8.1f} us  {name[:100]}")


if __name__ == "__main__":
    main()
