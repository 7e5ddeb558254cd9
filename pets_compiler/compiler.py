"""compile(): base checkpoint + task sources -> a multi-task Runtime (capture, passes, export, task tables)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path

import torch
from torch.export import Dim, ExportedProgram
from tqdm import tqdm

from pets_compiler.capture import capture, example_mask
from pets_compiler.frontend.base import BaseModel, load_base
from pets_compiler.frontend.finetune import DEFAULT_MAX_DENSITY
from pets_compiler.frontend.sources import load_task_source
from pets_compiler.frontend.taskset import TaskSpec
from pets_compiler.passes import CompileContext, PassResult, SitePlan, run_pipeline
from pets_compiler.runtime.runtime import ProgramInfo, Runtime
from pets_compiler.runtime.tables import SLOTS, TableSpec, table_kinds

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SITE_MODES = ("used", "all")


def plan_sites(base: BaseModel, tasks: Sequence[TaskSpec], sites: str) -> SitePlan:
    """`used`: the sites and kinds the given tasks touch; `all`: every kind at every site it applies to, so that
    any later task can be added without recompiling (at the cost of a task op everywhere)."""
    shapes = base.sites
    linear, norms, embeddings, sublayers = (
        tuple(shapes.linear),
        tuple(shapes.layer_norm),
        tuple(shapes.embedding),
        tuple(shapes.sublayer),
    )
    if sites == "all":
        return SitePlan(linear, linear, norms, linear, linear, linear + embeddings, sublayers, ("head",))
    if sites != "used":
        raise ValueError(f"sites must be one of {SITE_MODES}, got {sites!r}")
    order = [*linear, *norms, *embeddings, *sublayers]

    def used(kind: str) -> tuple[str, ...]:
        wanted = {s for t in tasks for s, p in t.sites.items() if kind in table_kinds(p)}
        return tuple(s for s in order if s in wanted)

    dense_heads = any(t.head is not None and t.head.dense_w is not None for t in tasks)
    plan = {f.name: used(f.name) for f in fields(SitePlan) if f.name != "head_dense"}
    return SitePlan(**plan, head_dense=("head",) if dense_heads else ())


def _example(spec: TableSpec, sizes: dict[str, int], dtype: torch.dtype) -> torch.Tensor:
    shape = tuple(sizes[d] if isinstance(d, str) else d for d in spec.dims)
    return torch.zeros(shape, dtype=torch.long if spec.integer else dtype)


def export_program(
    gm: torch.fx.GraphModule, ctx: CompileContext, dtype: torch.dtype, *, packed: bool = False
) -> ExportedProgram:
    """Export the rewritten graph with dynamic batch, sequence, slots, ranks and labels (and requests per row,
    packed)."""
    batch, seq = Dim("batch"), Dim("seq", max=int(ctx.base.config.max_position_embeddings))
    dims: dict[str, Dim] = {}
    for spec in ctx.tables:
        for d in spec.dims:
            if isinstance(d, str) and d not in dims:
                dims[d] = Dim(d.replace("@", "_").replace(".", "_"), min=0 if d != SLOTS else 1)
    sizes = {name: 3 for name in dims}  # examples of size 2+ so export does not specialize them
    tables = [_example(spec, sizes, dtype) for spec in ctx.tables]
    mask, mask_shape = example_mask(packed, batch, seq)
    args = (torch.zeros(2, 8, dtype=torch.long), mask, torch.zeros(2, dtype=torch.long))
    shapes = [{0: batch, 1: seq}, mask_shape, {0: batch}]
    shapes += [{i: dims[d] for i, d in enumerate(spec.dims) if isinstance(d, str)} for spec in ctx.tables]
    with torch.no_grad():
        return torch.export.export(gm, (*args, *tables), dynamic_shapes=shapes, strict=False)


def build_program(
    base: BaseModel, plan: SitePlan, dtype: torch.dtype, *, packed: bool = False
) -> tuple[ExportedProgram, list[TableSpec], list[PassResult]]:
    """The program for `plan`: padded (one request per row) or packed (capture.py's _PackedBert); both read the
    same task tables in the same order."""
    gm = capture(base, dtype, packed=packed)
    ctx = CompileContext(base=base, plan=plan, pooling=base.pooling)
    results = run_pipeline(gm, ctx)
    for r in results:
        log.info("%s", r)
    return export_program(gm, ctx, dtype, packed=packed), ctx.tables, results


def compile(
    base: str | Path | BaseModel,
    tasks: Mapping[str, str | Path | TaskSpec],
    *,
    dtype: str | torch.dtype = "float32",
    sites: str = "used",
    max_density: float = DEFAULT_MAX_DENSITY,
    progress: bool = False,
) -> Runtime:
    """Compile a base checkpoint and named task sources (paths or TaskSpecs) into a Runtime.

    Every source is read and validated before anything is built; `sites` is "used" (task ops only where these
    tasks need them) or "all" (every kind at every site, so any later task can be added without recompiling);
    `max_density` bounds how much of a weight matrix a fine-tune may change to be served as diff / mask.
    """
    if isinstance(dtype, str) and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    with tqdm(total=4 + len(tasks), desc="pets compile", unit="step", disable=not progress) as steps:
        base_model = base if isinstance(base, BaseModel) else load_base(base)
        steps.update()
        specs = []
        for name, source in tasks.items():
            steps.set_postfix_str(f"task {name}")
            specs.append(load_task_source(name, source, base_model, max_density))
            steps.update()
        plan = plan_sites(base_model, specs, sites)
        steps.set_postfix_str("capture + passes + export")
        program, tables, report = build_program(base_model, plan, torch_dtype)
        steps.update(2)
        info = ProgramInfo.of(base_model, plan, tables, torch_dtype)
        runtime = Runtime(program, info, base_model)
        for spec in specs:
            runtime.add_task(spec.name, spec)
        runtime.report = [str(r) for r in report]
        steps.update()
    return runtime
