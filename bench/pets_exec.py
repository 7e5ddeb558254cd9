"""How the bench runs the pets runtime: the one place that builds the timed callable and picks the execution path.

The runtime may offer faster paths (CUDA graphs, torch.compile) through `Runtime.accelerate(...)` and say which one
it uses in `Runtime.executor`; both are looked up with getattr, so the bench runs on a runtime with or without them
and records which path it timed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor

import pets_compiler

# --pets-exec: "default" leaves the runtime as `Runtime.to` set it up; the others ask `accelerate` for a path.
EXEC_MODES: dict[str, dict[str, Any] | None] = {
    "default": None,
    "eager": {"cuda_graphs": False},
    "graphs": {"cuda_graphs": True},
    "compile": {"cuda_graphs": False, "compile": True},
    "compile+graphs": {"cuda_graphs": True, "compile": True},
}


def configure(runtime: pets_compiler.Runtime, mode: str) -> None:
    """Put the runtime on the execution path `mode` names (EXEC_MODES)."""
    if mode not in EXEC_MODES:
        raise ValueError(f"unknown pets execution mode {mode!r}; choose from {', '.join(EXEC_MODES)}")
    options = EXEC_MODES[mode]
    if options is None:
        return
    accelerate = getattr(runtime, "accelerate", None)
    if not callable(accelerate):
        raise RuntimeError(f"--pets-exec {mode} needs Runtime.accelerate, which this runtime does not have")
    accelerate(**options)


def pets_forward(
    runtime: pets_compiler.Runtime, ids: Tensor, mask: Tensor, names: list[str]
) -> Callable[[], tuple[Tensor, Tensor]]:
    """The callable the bench checks and times: one mixed batch through the runtime's public forward. A mask that
    keeps every token goes as None, as a server passes a batch without padding (the runtime then runs its program
    without attention mask; the backbone's graph is captured without a mask too): read once here, not per call."""
    given = None if bool(mask.all()) else mask

    def forward() -> tuple[Tensor, Tensor]:
        return runtime.forward(ids, given, names)

    return forward


def describe(runtime: pets_compiler.Runtime, mode: str) -> dict[str, Any]:
    """Which path served: the executor's class, and for CUDA graphs whether they were given up (and why)."""
    executor = getattr(runtime, "executor", None)
    out: dict[str, Any] = {"mode": mode, "executor": type(executor).__name__ if executor is not None else "forward"}
    for attr in ("disabled", "stats"):
        value = getattr(executor, attr, None)
        if value is not None:
            out[attr] = dict(vars(value)) if hasattr(value, "__dict__") else str(value)
    return out


@contextmanager
def eager(runtime: pets_compiler.Runtime, mode: str) -> Iterator[str]:
    """Run op by op inside the block, so that a profiler sees each pets op (a graph replay hides which op launched
    which kernel; the kernels are the same), then go back to `mode`'s path. Yields how the ops ran."""
    executor = getattr(runtime, "executor", None)
    accelerate = getattr(runtime, "accelerate", None)
    if executor is None or type(executor).__name__ == "Eager" or not callable(accelerate):
        yield "as timed (op by op)"
        return
    try:
        accelerate(cuda_graphs=False)
    except (TypeError, ValueError) as e:  # an accelerate API other than this one: profile the timed path
        yield f"as timed ({type(executor).__name__}; switching to eager failed: {e})"
        return
    try:
        yield f"op by op (timed: {type(executor).__name__}, the same kernels)"
    finally:
        accelerate(**(EXEC_MODES[mode] or {}))
