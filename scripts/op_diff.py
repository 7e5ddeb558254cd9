"""Where does a device's run of the program part from a reference run? Both runs execute the compiled program node
by node on the same inputs (a mixed batch of one kind's tasks, each row's task uniform); every node's output is
compared (max |a - b| / max |b|), and the nodes past a threshold are printed in graph order: the first is where
the two part. A development probe for a failing correctness check (e.g. the mix_dense 128x64 logits on the H200).

Usage (from the repository root): python3 -m scripts.op_diff [--model bert-base] [--kind mix_dense] [--tasks 32]
    [--shape 128x64] [--device cuda --dtype float16] [--ref-device cpu --ref-dtype float32] [--threshold 2e-2]
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch.fx import GraphModule, Node

import pets_compiler
from bench.kinds import make_kinds
from bench.models import MODELS, VOCAB, make_base


def runtime_for(base: Any, specs: dict[str, Any], device: str, dtype: str) -> pets_compiler.Runtime:
    rt = pets_compiler.compile(base, specs, dtype=dtype)
    return rt.to(device, cuda_graphs=False) if device != "cpu" else rt


def node_outputs(rt: pets_compiler.Runtime, ids: torch.Tensor, names: list[str]) -> dict[str, Any]:
    """Every call_function node's output (moved to the CPU as fp32), by node name."""
    gm = rt._module
    assert isinstance(gm, GraphModule)
    args = [ids.to(rt.device), torch.ones_like(ids).to(rt.device)]
    args.append(torch.tensor([rt.slot(n) for n in names], device=rt.device))
    args += list(rt.tables.inputs())
    seen: dict[str, Any] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n: Node) -> Any:
            out = super().run_node(n)
            if n.op == "call_function" and isinstance(out, torch.Tensor) and out.is_floating_point():
                seen[n.name] = out.detach().float().cpu()
            return out

    with torch.inference_mode():
        Recorder(gm).run(*args)
    return seen


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--model", default="bert-base", choices=sorted(MODELS))
    p.add_argument("--kind", default="mix_dense")
    p.add_argument("--tasks", type=int, default=32)
    p.add_argument("--shape", default="128x64")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--ref-device", default="cpu")
    p.add_argument("--ref-dtype", default="float32")
    p.add_argument("--threshold", type=float, default=2e-2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    rows, seq = (int(v) for v in a.shape.split("x"))
    base = make_base(MODELS[a.model], a.seed)
    kind = make_kinds(base, (a.kind,))[a.kind]
    specs = {kind.task_name(i): kind.task(i) for i in range(a.tasks)}
    g = torch.Generator().manual_seed(a.seed)
    ids = torch.randint(1000, VOCAB, (rows, seq), generator=g)
    names = [list(specs)[int(i)] for i in torch.randint(0, len(specs), (rows,), generator=g)]
    got = node_outputs(runtime_for(base, specs, a.device, a.dtype), ids, names)
    want = node_outputs(runtime_for(base, specs, a.ref_device, a.ref_dtype), ids, names)
    print(f"{len(got)} nodes compared: {a.device} {a.dtype} against {a.ref_device} {a.ref_dtype}, {a.kind}, {a.shape}")
    worst: list[tuple[str, float, int | None]] = []
    for name, g_out in got.items():
        w_out = want.get(name)
        if w_out is None or w_out.shape != g_out.shape:
            print(f"  {name}: no matching reference output")
            continue
        diff = (g_out - w_out).abs()
        err = float(diff.max() / w_out.abs().max().clamp(min=1e-30))
        row = int(diff.flatten(1).amax(1).argmax()) if diff.dim() > 1 else None
        if err > a.threshold:
            worst.append((name, err, row))
    for name, err, row in worst[:25]:
        task = names[row] if row is not None and row < len(names) else "-"
        print(f"  {name:40s} rel err {err:.4f}  worst row {row} ({task})")
    print(f"{len(worst)} nodes past {a.threshold}" + ("" if worst else ": none parts"))


if __name__ == "__main__":
    main()
