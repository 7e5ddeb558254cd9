"""One pets.sparse_delta call at bert-base's FFN output site (out 768 x in 3072, bs64 s128, fp16, 32 slots, rows'
slots uniform; density 5% = MaskBERT, 1% = diff), for a profiler: `ncu --kernel-name regex:sparse_delta
--launch-skip 2 --launch-count 1 python -m scripts.sparse_call [--density 0.05]`. The time and the FMA rate it
reaches print last. `--batch 256 --seq 32 --busy 0.29` is a Fig. 12 batch of the mix (2 rows in 7 of a diff or mask
task: the others' slot has no entries). A development probe (scripts/op_times.py times every op)."""

from __future__ import annotations

import argparse

import torch

import pets_compiler  # noqa: F401


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--density", type=float, default=0.05)
    p.add_argument("--in-features", type=int, default=3072, help="768: a q, k, v or o projection")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--busy", type=float, default=1.0, help="fraction of rows whose slot has entries")
    args = p.parse_args()
    dev, dt = "cuda", torch.float16
    batch, seq, out, inp, slots = args.batch, args.seq, 768, args.in_features, 32
    g = torch.Generator(device=dev).manual_seed(0)
    per_row = max(1, int(inp * args.density))
    col = torch.randint(0, inp, (slots * out * per_row,), device=dev, generator=g)
    row_ptr = (
        torch.arange(out + 1, device=dev).view(1, -1) + out * torch.arange(slots, device=dev).view(-1, 1)
    ) * per_row
    val = torch.randn(col.numel(), device=dev, dtype=dt, generator=g) * 0.02
    x = torch.randn(batch, seq, inp, device=dev, dtype=dt, generator=g)
    y = torch.randn(batch, seq, out, device=dev, dtype=dt, generator=g)
    ids = torch.randint(1, slots, (batch,), device=dev, generator=g)
    ids[torch.rand(batch, device=dev, generator=g) >= args.busy] = 0
    row_ptr[0] = row_ptr[0, 0]  # slot 0: no entries
    for _ in range(3):
        torch.ops.pets.sparse_delta(y, x, ids, row_ptr, col, val)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        torch.ops.pets.sparse_delta(y, x, ids, row_ptr, col, val)
    end.record()
    torch.cuda.synchronize()
    us = start.elapsed_time(end) / 20 * 1e3
    pairs = int((ids > 0).sum()) * seq * out * per_row  # (token, entry) FMAs
    print(
        f"{torch.cuda.get_device_name()} sparse_delta {args.density:.0%} out {out} x in {inp}, {batch}x{seq}, "
        f"{int((ids > 0).sum())} rows busy: "
        f"{us:.1f} us, {2 * pairs / us / 1e6:.2f} TFLOP/s of FMA work ({pairs / 1e6:.0f}M token-entry pairs)"
    )


if __name__ == "__main__":
    main()
