"""Times each pets CUDA op at bert-base sizes (bs64 s128, fp16, 32 slots, rows' slots uniform) against its
memory floor (bytes it must move / a measured copy bandwidth). GPU time only: the calls are replayed from a CUDA
graph. A development probe; bench/ has the full harness."""

from __future__ import annotations

import torch

import pets_compiler  # noqa: F401

ops = torch.ops.pets
dev, dt = "cuda", torch.float16
B, S, H, FF, T = 64, 128, 768, 3072, 32
g = torch.Generator(device=dev).manual_seed(0)


def rn(*shape: int, std: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, device=dev, dtype=dt, generator=g) * std


def ms(fn, iters: int = 20, reps: int = 5) -> float:
    """GPU milliseconds per call: `iters` calls captured in one CUDA graph, replayed `reps` times (no host time)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (iters * reps)


big = torch.empty(1 << 28, dtype=torch.uint8, device=dev)
bw = 2 * big.numel() / (ms(lambda: big.clone(), 4) / 1e3)  # read + write bytes per second
print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
ids = torch.randint(0, T, (B,), device=dev, generator=g)
x, y, xi = rn(B, S, H), rn(B, S, H), rn(B, S, FF)
act = B * S * H * 2


def pool(rows: int, cols: int, density: float) -> tuple[torch.Tensor, ...]:
    nnz_row = max(1, int(cols * density))
    col = torch.randint(0, cols, (T * rows * nnz_row,), device=dev, generator=g)
    row_ptr = torch.arange(T * (rows + 1), device=dev).view(T, rows + 1) - torch.arange(T, device=dev).view(T, 1)
    return row_ptr * nnz_row, col, rn(col.numel(), std=0.02)


cases = {}
for r in (8, 16, 64):
    a, b = rn(T, r, H, std=H**-0.5), rn(T, H, r, std=0.1)
    s, rk = torch.ones(T, device=dev, dtype=dt), torch.full((T,), r, device=dev)
    cases[f"lora_delta r{r}"] = (lambda a=a, b=b, s=s, rk=rk: ops.lora_delta(y, x, ids, a, b, s, rk), 3 * act)
bias = rn(T, H)
cases["linear_delta bias"] = (lambda: ops.linear_delta(y, x, ids, None, None, None, None, bias), 2 * act)
cases["bias_delta"] = (lambda: ops.bias_delta(y, ids, bias), 2 * act)
ia3 = rn(T, H, std=0.1)
cases["scale"] = (lambda: ops.scale(y, ids, ia3), 2 * act)
bias_ff, ia3_ff = rn(T, FF), rn(T, FF, std=0.1)
cases["gelu_delta 3072"] = (lambda: ops.gelu_delta(xi, ids, bias_ff, ia3_ff, "none"), 8 * act)
cases["aten gelu 3072"] = (lambda: torch.nn.functional.gelu(xi), 8 * act)
cases["row_delta bias+scale"] = (lambda: ops.row_delta(y, ids, bias, ia3, None), 2 * act)
cases["row_delta bias+residual"] = (lambda: ops.row_delta(y, ids, bias, None, x), 3 * act)
cases["row_delta bias+scale+residual"] = (lambda: ops.row_delta(y, ids, bias, ia3, x), 3 * act)
cases["aten add"] = (lambda: y + x, 3 * act)
w, bb = rn(H) + 1, rn(H)
wd, bd = rn(T, H, std=0.1), rn(T, H, std=0.1)
cases["layer_norm"] = (lambda: ops.layer_norm(x, ids, w, bb, wd, bd, 1e-12), 2 * act)
cases["aten layer_norm"] = (lambda: torch.nn.functional.layer_norm(x, (H,), w, bb), 2 * act)
# A sublayer's BitFit bias delta and residual add before its LayerNorm: fused (fuse_norm_inputs) and as two ops.
cases["layer_norm x_bias+residual"] = (lambda: ops.layer_norm(x, ids, w, bb, wd, bd, 1e-12, bias, y), 3 * act)
cases["row_delta+layer_norm"] = (
    lambda: ops.layer_norm(ops.row_delta(x, ids, bias, None, y), ids, w, bb, wd, bd, 1e-12),
    5 * act,
)
for d in (0.01, 0.05):
    rp, c, v = pool(H, H, d)
    cases[f"sparse_delta {d:.0%} 768x768"] = (lambda rp=rp, c=c, v=v: ops.sparse_delta(y, x, ids, rp, c, v), 3 * act)
    rp, c, v = pool(H, FF, d)
    cases[f"sparse_delta {d:.0%} 768x3072"] = (lambda rp=rp, c=c, v=v: ops.sparse_delta(y, xi, ids, rp, c, v), 6 * act)
cfg = torch.tensor([[1, 1, 1, 1, 1, 64]] * T, device=dev)
ad = (rn(T, 64, H, std=H**-0.5), rn(T, 64), rn(T, H, 64, std=0.1), rn(T, H), torch.ones(T, device=dev, dtype=dt), cfg)
zero = torch.zeros(T, H, device=dev, dtype=dt)
cases["adapter 64"] = (lambda: ops.adapter(x, y, ids, w, bb, zero, zero, 1e-12, *ad), 3 * act)
cases["adapter 64 h_bias"] = (lambda: ops.adapter(x, y, ids, w, bb, zero, zero, 1e-12, *ad, bias), 3 * act)
cases["bias_delta+adapter 64"] = (
    lambda: ops.adapter(ops.bias_delta(x, ids, bias), y, ids, w, bb, zero, zero, 1e-12, *ad),
    5 * act,
)
cases["aten add+layer_norm"] = (lambda: torch.nn.functional.layer_norm(x + y, (H,), w, bb), 4 * act)
pooled = x[:, 0]
hw, hb = rn(T, 3, H), rn(T, 3)
cases["segmented_linear"] = (lambda: ops.segmented_linear(pooled, ids, hw, hb), B * H * 2)
wq = rn(H, H, std=H**-0.5)
cases["aten linear 768x768"] = (lambda: torch.nn.functional.linear(x, wq), 2 * act)
for name, (fn, nbytes) in cases.items():
    t = ms(fn)
    print(f"{name:28s} {t * 1e3:8.1f} us   floor {nbytes / bw * 1e6:7.1f} us   x{t / 1e3 / (nbytes / bw):5.1f}")

# Where the LoRA split spends its time: each kernel's GPU time per call (the pointer kernel, cuBLAS's batched GEMM,
# the expand), from the profiler over `iters` eager calls.
from torch.profiler import ProfilerActivity, profile  # noqa: E402

for name in ("lora_delta r8", "lora_delta r16", "adapter 64", "sparse_delta 1% 768x768"):
    fn, iters = cases[name][0], 20
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / iters) for e in prof.key_averages() if e.device_time_total > 0]
    print(f"{name}: " + "; ".join(f"{k[:70]} {t:.1f} us" for k, t in sorted(rows, key=lambda r: -r[1])[:6]))
