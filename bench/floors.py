"""How far each pets op is from its floor: the device's measured memory bandwidth and matrix peak, the time of
every `pets::*` op in a few forwards (torch.profiler), and the bytes and flops each call must at least move and do.

An op's floor is max(bytes / bandwidth, flops / peak), with bytes = the activations it reads and writes plus the
table rows of the tasks present in the batch (each task's rows once), flops = its multiply-adds x 2. Sparse ops
count the average nonzeros per sparse task of the pool (the pool holds every loaded sparse task's entries).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from bench.timing import timed


@dataclass(frozen=True)
class DeviceFloors:
    bandwidth_bytes_per_s: float  # a large device-to-device copy: 2 x bytes / time
    peak_flops: float  # a large square matmul in the serving dtype
    how: str

    def floor_s(self, nbytes: float, flops: float) -> float:
        return max(nbytes / self.bandwidth_bytes_per_s, flops / self.peak_flops)

    def to_json(self) -> dict[str, object]:
        return {
            "bandwidth_GBps": self.bandwidth_bytes_per_s / 1e9,
            "peak_TFLOPs": self.peak_flops / 1e12,
            "how": self.how,
        }


def _copy_s(nbytes: int, device: str) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return timed(lambda: dst.copy_(src), device, warmup=3, iters=20).median_s


def _matmul_s(n: int, device: str, dtype: torch.dtype) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b, out = torch.randn_like(a), torch.empty_like(a)
    return timed(lambda: torch.matmul(a, b, out=out), device, warmup=3, iters=20).median_s


def measure_device(device: str, dtype: torch.dtype) -> DeviceFloors:
    """Bandwidth from copying a 1 GiB buffer, peak from an 8192^3 matmul in `dtype`. On the CPU (the smoke run):
    64 MiB and a 512^3 fp32 matmul (half precision is emulated there, seconds per matmul)."""
    nbytes, n = (1 << 30, 8192) if device == "cuda" else (64 << 20, 512)
    dtype = dtype if device == "cuda" else torch.float32
    how = f"copy of {nbytes >> 20} MiB (2 x bytes / median time); {n}^3 {str(dtype).removeprefix('torch.')} matmul"
    return DeviceFloors(2 * nbytes / _copy_s(nbytes, device), 2 * n**3 / _matmul_s(n, device, dtype), how)


@dataclass(frozen=True)
class BatchStats:
    """What an op's floor depends on beyond its shapes: the tasks present and, for sparse pools, how many of the
    loaded tasks have sparse deltas."""

    rows: int
    distinct_tasks: int
    sparse_rows: int  # rows whose task has a sparse delta
    sparse_distinct: int
    sparse_loaded: int
    act_bytes: int  # element size of activations and float tables
    index_bytes: int  # element size of sparse column indices (and row pointers)


Shapes = list[list[int]]


def _tokens(shape: list[int]) -> int:
    return math.prod(shape[:-1])


def _lora(s: Shapes, b: BatchStats, a: int, bias: int | None) -> tuple[float, float]:
    e, u = b.act_bytes, b.distinct_tasks
    m, out_f, in_f = _tokens(s[0]), s[0][-1], s[1][-1]
    nbytes, flops = e * (2 * m * out_f + m * in_f), 0.0
    if s[a]:
        r = s[a][1]
        nbytes += e * u * r * (in_f + out_f)
        flops += 2 * m * r * (in_f + out_f)
    if bias is not None and s[bias]:
        nbytes += e * u * out_f
        flops += m * out_f
    return nbytes, flops


def _elementwise(s: Shapes, b: BatchStats) -> tuple[float, float]:
    """y * (1 + delta[t]) or y + bias[t]: y read and written, a row of F per task present."""
    m, f = _tokens(s[0]), s[0][-1]
    return b.act_bytes * (2 * m * f + b.distinct_tasks * f), m * f


def _gelu_delta(s: Shapes, b: BatchStats) -> tuple[float, float]:
    """gelu(y + bias[t]) * (1 + scale[t]): y read and written, a row of F per task present of each table given."""
    m, f = _tokens(s[0]), s[0][-1]
    tables = sum(1 for shape in s[2:4] if shape)
    return b.act_bytes * (2 * m * f + tables * b.distinct_tasks * f), (1 + tables) * m * f


def _row_delta(s: Shapes, b: BatchStats) -> tuple[float, float]:
    """(y + bias[t]) * (1 + scale[t]) + residual: y read and written, the residual read where given, a row of F per
    task present of each table given."""
    m, f = _tokens(s[0]), s[0][-1]
    tables, residual = sum(1 for shape in s[2:4] if shape), int(bool(s[4]))
    nbytes = b.act_bytes * ((2 + residual) * m * f + tables * b.distinct_tasks * f)
    return nbytes, (tables + residual) * m * f


def _layer_norm(s: Shapes, b: BatchStats) -> tuple[float, float]:
    m, h = _tokens(s[0]), s[0][-1]
    return b.act_bytes * (2 * m * h + 2 * h + 2 * b.distinct_tasks * h), 7 * m * h


def _segmented_linear(s: Shapes, b: BatchStats) -> tuple[float, float]:
    m, in_f, labels = _tokens(s[0]), s[0][-1], s[2][1]
    return b.act_bytes * (m * in_f + m * labels + b.distinct_tasks * labels * (in_f + 1)), 2 * m * labels * in_f


def _sparse(s: Shapes, b: BatchStats) -> tuple[float, float]:
    e = b.act_bytes
    m, out_f, in_f, pool = _tokens(s[0]), s[0][-1], s[1][-1], s[4][0]
    per_task = pool / max(1, b.sparse_loaded)
    nbytes = e * (2 * m * out_f + m * in_f) + b.sparse_distinct * per_task * (b.index_bytes + e)
    nbytes += b.distinct_tasks * (out_f + 1) * b.index_bytes
    return nbytes, 2 * (m / max(1, b.rows)) * b.sparse_rows * per_task


def _adapter(s: Shapes, b: BatchStats) -> tuple[float, float]:
    m, h, r = _tokens(s[0]), s[0][-1], s[8][1]
    nbytes = b.act_bytes * (3 * m * h + 2 * h + b.distinct_tasks * (2 * r * h + r + 5 * h))
    return nbytes, 4 * m * r * h + 14 * m * h


# Op -> (bytes, flops) of one call from its input shapes (the schemas in custom_ops/__init__.py).
FLOORS: dict[str, Callable[[Shapes, BatchStats], tuple[float, float]]] = {
    "lora_delta": lambda s, b: _lora(s, b, 3, None),
    "linear_delta": lambda s, b: _lora(s, b, 3, 7),
    "bias_delta": _elementwise,
    "scale": _elementwise,
    "gelu_delta": _gelu_delta,
    "row_delta": _row_delta,
    "layer_norm": _layer_norm,
    "segmented_linear": _segmented_linear,
    "sparse_delta": _sparse,
    "adapter": _adapter,
}


def _pets_op(event: object) -> str | None:
    name = str(getattr(event, "name", ""))
    return name.removeprefix("pets::") if name.startswith("pets::") else None


def _outermost(event: object) -> bool:
    """Not called from inside another pets op (a fused op that calls another counts once, as the outer one)."""
    parent = getattr(event, "cpu_parent", None)
    while parent is not None:
        if _pets_op(parent) is not None:
            return False
        parent = getattr(parent, "cpu_parent", None)
    return True


def kernel_name(full: str) -> str:
    """A kernel's function name without namespaces, template arguments and parameters:
    'void pets::cuda::split_lora::expand_kernel<c10::Half>(const c10::Half*, ...)' -> 'expand_kernel'."""
    depth, kept = 0, []
    for ch in full.replace("(anonymous namespace)", "anonymous").split("(", 1)[0]:
        depth += ch == "<"
        if depth == 0:
            kept.append(ch)
        depth -= ch == ">" and depth > 0
    words = "".join(kept).split()
    return words[-1].rsplit("::", 1)[-1] if words else full


def kernel_times(event: object) -> dict[str, float]:
    """Device time (us) of each kernel an op launched, itself or through the ops it called, by kernel name."""
    times: dict[str, float] = {}
    stack = [event]
    while stack:
        e = stack.pop()
        for k in getattr(e, "kernels", None) or []:
            name = kernel_name(str(k.name))
            times[name] = times.get(name, 0.0) + float(k.duration)
        stack.extend(getattr(e, "cpu_children", None) or [])
    return times


def profile_ops(
    forward: Callable[[], object], device: str, stats: BatchStats, floors: DeviceFloors, forwards: int = 3
) -> dict[str, object]:
    """Per pets op, per forward: calls, time (kernel time of everything it launched on a GPU; its CPU time on the
    CPU), bytes, flops, floor and time / floor; plus the forward's total time and the ops' share of it."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    forward()  # the path may have changed (CUDA graphs -> op by op): its first call is not profiled
    if device == "cuda":
        torch.cuda.synchronize()
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(forwards):
            forward()
        if device == "cuda":
            torch.cuda.synchronize()
    events = list(prof.events())

    def spent(e: object) -> float:
        return float(getattr(e, "device_time_total" if device == "cuda" else "cpu_time_total", 0.0))

    ops: dict[str, dict[str, Any]] = {}
    for e in events:
        op = _pets_op(e)
        if op is None or not _outermost(e):
            continue
        row = ops.setdefault(op, {"calls": 0, "time_us": 0.0, "bytes": 0.0, "flops": 0.0, "floor_us": 0.0})
        row["calls"] += 1
        row["time_us"] += spent(e)
        if device == "cuda":  # which kernels the op's time went to (e.g. LoRA: pointers, cuBLAS GEMM, expand)
            kernels = row.setdefault("kernels_us", {})
            for name, us in kernel_times(e).items():
                kernels[name] = kernels.get(name, 0.0) + us
        try:
            nbytes, flops = FLOORS[op]([list(x) for x in getattr(e, "input_shapes", [])], stats)
        except (KeyError, IndexError, TypeError) as err:
            row["floor_error"] = f"no floor for {op} with shapes {getattr(e, 'input_shapes', None)}: {err!r}"
            continue
        row["bytes"] += nbytes
        row["flops"] += flops
        row["floor_us"] += floors.floor_s(nbytes, flops) * 1e6
    for row in ops.values():
        for key in ("calls", "time_us", "bytes", "flops", "floor_us"):
            row[key] /= forwards
        row["time_over_floor"] = row["time_us"] / row["floor_us"] if row["floor_us"] > 0 else None
        if "kernels_us" in row:
            row["kernels_us"] = {k: v / forwards for k, v in sorted(row["kernels_us"].items(), key=lambda kv: -kv[1])}
    if device == "cuda":  # the kernels (and copies) themselves: CPU ops only count the kernels they launched
        total = sum(float(e.device_time_total) for e in events if e.device_type == DeviceType.CUDA) / forwards
    else:
        total = sum(spent(e) for e in events if getattr(e, "cpu_parent", None) is None) / forwards
    pets_total = sum(r["time_us"] for r in ops.values())
    return {
        "forwards_profiled": forwards,
        "time": "kernel time (us per forward)" if device == "cuda" else "CPU time (us per forward)",
        "total_us": total,
        "pets_ops_us": pets_total,
        "pets_ops_share": pets_total / total if total else None,
        "ops": ops,
    }


def backbone_floor(config: object, batch: int, seq: int, floors: DeviceFloors, act_bytes: int) -> dict[str, float]:
    """The whole BERT forward's floor: linears and attention matmuls (flops), weights read once (bytes)."""
    h, inter, layers = (int(getattr(config, k)) for k in ("hidden_size", "intermediate_size", "num_hidden_layers"))
    tokens = batch * seq
    linear_params = layers * (4 * h * h + 2 * h * inter)
    flops = 2 * tokens * linear_params + layers * 4 * batch * seq * seq * h + 2 * batch * h * h  # + pooler on [CLS]
    nbytes = act_bytes * (linear_params + h * h)
    return {"flops": flops, "weight_bytes": nbytes, "floor_s": floors.floor_s(nbytes, flops)}
