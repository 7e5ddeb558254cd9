"""pets.linear_delta at a bert-base attention site (768 x 768, 8192 tokens: bs64 s128 or --seq S, fp16, 32 slots, row b
on slot b % 32) and
pets.gelu_delta at its FFN (3072 features), for a profiler: `ncu --kernel-name regex:"shrink|expand"
--launch-skip 4 --launch-count 2 python -m scripts.lora_call --rows mix`. `--rows mix`: the slots cycle through
mix_dense's five kinds (LoRA r8, LoRA r16, BitFit's bias, none, IA3's scale: LoRA on 2 rows in 5); `lora`: LoRA r16
tables of rank 8 or 16 on every row, no other term; `gelu`: gelu_delta with bias and scale on every row, then aten's
gelu of the same input. Three calls (enough to skip the first two of each kernel), then the mean GPU time of 20.
A development probe (scripts/op_times.py times every op; bench.profile_runtime the whole program)."""

from __future__ import annotations

import argparse

import torch

import pets_compiler  # noqa: F401


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--rows", choices=("mix", "lora", "gelu"), default="mix")
    p.add_argument("--seq", type=int, default=128)
    args = p.parse_args()
    dev, dt = "cuda", torch.float16
    seq, hidden, inter, slots = args.seq, 768, 3072, 32
    batch = max(1, 8192 // seq)
    g = torch.Generator().manual_seed(0)

    def randn(*shape: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std).to(dev, dt)

    ids = (torch.arange(batch) % slots).to(dev)
    kind = torch.arange(slots) % 5
    lora = torch.ones(slots, dtype=torch.bool) if args.rows == "lora" else kind < 2
    scale = torch.where(lora, 2.0, 0.0).to(dev, dt)
    rank = torch.where(lora, torch.where(kind == 0, 8, 16), 0).to(dev)
    a, b = randn(slots, 16, hidden, std=hidden**-0.5), randn(slots, hidden, 16, std=0.25)
    mix = args.rows == "mix"
    bias = randn(slots, hidden, std=0.1) * (kind == 2).to(dev, dt)[:, None] if mix else None
    out_scale = randn(slots, hidden, std=0.1) * (kind == 4).to(dev, dt)[:, None] if mix else None
    x, y = randn(batch, seq, hidden), randn(batch, seq, hidden)
    ffn, ffn_bias, ffn_scale = randn(batch, seq, inter, std=2.0), randn(slots, inter, std=0.1), randn(slots, inter)

    def call() -> None:
        if args.rows == "gelu":
            torch.ops.pets.gelu_delta(ffn, ids, ffn_bias, ffn_scale * 0.1, "none")
            torch.nn.functional.gelu(ffn)
        else:
            torch.ops.pets.linear_delta(y, x, ids, a, b, scale, rank, bias, out_scale)

    for _ in range(3):
        call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        call()
    end.record()
    torch.cuda.synchronize()
    us = start.elapsed_time(end) / 20 * 1e3
    print(
        f"{torch.cuda.get_device_name()} {args.rows} {batch}x{seq}: {us:.1f} us a call "
        "(every kernel of it, launch gaps included)"
    )


if __name__ == "__main__":
    main()
