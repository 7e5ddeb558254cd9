"""The ordered graph-pass pipeline that turns the captured base into the multi-task program."""

from __future__ import annotations

from collections.abc import Callable

from torch.fx import GraphModule

from pets_compiler.errors import CompileError
from pets_compiler.passes.add_task_ids import add_task_ids
from pets_compiler.passes.attach_adapters import attach_adapters
from pets_compiler.passes.attach_bias_delta import attach_bias_delta
from pets_compiler.passes.attach_heads import attach_heads
from pets_compiler.passes.attach_ia3 import attach_ia3
from pets_compiler.passes.attach_layer_norm_delta import attach_layer_norm_delta
from pets_compiler.passes.attach_lora import attach_lora
from pets_compiler.passes.attach_sparse_delta import attach_sparse_delta
from pets_compiler.passes.attention_mask import attention_mask
from pets_compiler.passes.check_graph import check_graph
from pets_compiler.passes.context import CompileContext, PassResult, SitePlan
from pets_compiler.passes.drop_training_nodes import drop_training_nodes
from pets_compiler.passes.find_sites import find_sites
from pets_compiler.passes.fold_context_scale import fold_context_scale
from pets_compiler.passes.fold_key_terms import fold_key_terms
from pets_compiler.passes.fuse_activation import fuse_activation
from pets_compiler.passes.fuse_norm_inputs import fuse_norm_inputs
from pets_compiler.passes.fuse_row_terms import fuse_row_terms
from pets_compiler.passes.fuse_site_ops import fuse_site_ops

Pass = Callable[[GraphModule, CompileContext], PassResult]

PIPELINE: tuple[Pass, ...] = (
    find_sites,
    drop_training_nodes,
    attention_mask,
    add_task_ids,
    attach_lora,
    attach_bias_delta,
    fuse_site_ops,
    attach_sparse_delta,
    attach_ia3,
    fold_context_scale,
    attach_adapters,
    attach_layer_norm_delta,
    fuse_activation,
    fuse_row_terms,
    fold_key_terms,
    fuse_norm_inputs,
    attach_heads,
    check_graph,
)


def describe() -> str:
    """The pipeline, one pass a line, with its docstring."""
    return "\n".join(f"{i + 1}. {p.__name__}: {' '.join((p.__doc__ or '').split())}" for i, p in enumerate(PIPELINE))


def run_pipeline(gm: GraphModule, ctx: CompileContext) -> list[PassResult]:
    """Run every pass in order; a failure names the pass and the ones that ran before it."""
    results: list[PassResult] = []
    for p in PIPELINE:
        try:
            results.append(p(gm, ctx))
        except Exception as e:
            before = ", ".join(r.name for r in results) or "none"
            raise CompileError(f"pass {p.__name__} failed (after: {before}): {e}") from e
    return results


__all__ = ["PIPELINE", "CompileContext", "PassResult", "SitePlan", "describe", "run_pipeline"]
