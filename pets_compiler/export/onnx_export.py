"""`pets export-onnx`: a Runtime's program and task tables -> one ONNX model that plain onnxruntime runs.

The model takes `input_ids`, `attention_mask` (int64 [batch, seq], both dynamic) and `task_ids` (int64 [batch]:
each row's task id, a dense index 0..n-1 over the task names in sorted order, not a runtime slot) and returns
`logits` [batch, max labels] and `embedding` [batch, hidden], as `Runtime.forward` does. The task tables are
compacted to the loaded tasks (row i of every per-slot table is task i's slot) and become initializers; the pets
ops are lowered by the translation table of lowering.py. Metadata: `pets.tasks` (name -> id, num_labels, labels)
and `pets.model` (what `pets run --backend onnxruntime` needs to check and tokenize requests).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import onnx_ir as ir
import onnxscript.optimizer
import torch
from torch import Tensor
from torch.export import Dim, ExportedProgram

from pets_compiler.errors import ExportError
from pets_compiler.export.lowering import expand_attention_masks, lower_pets_ops
from pets_compiler.frontend.base import TOKENIZER_FILES
from pets_compiler.runtime.runtime import Runtime
from pets_compiler.runtime.tables import TableSpec

OPSETS = range(18, 24)  # the exporter's opsets that onnxruntime runs this model at (checked by the tests)
DEFAULT_OPSET = 20
INPUTS = ("input_ids", "attention_mask", "task_ids")
OUTPUTS = ("logits", "embedding")
TASKS_KEY = "pets.tasks"
MODEL_KEY = "pets.model"


def check_opset(opset: int) -> None:
    if opset not in OPSETS:
        raise ExportError(f"opset {opset} is not supported; use {OPSETS.start} to {OPSETS.stop - 1}")


class _Program(torch.nn.Module):
    """The lowered program with the task tables as buffers: (input_ids, attention_mask, task_ids) -> outputs."""

    def __init__(self, program: torch.nn.Module, tables: list[Tensor]) -> None:
        super().__init__()
        self.program = program
        self.names = [f"table_{i}" for i in range(len(tables))]
        for name, t in zip(self.names, tables, strict=True):
            self.register_buffer(name, t)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, task_ids: Tensor) -> tuple[Tensor, Tensor]:
        tables = [getattr(self, name) for name in self.names]
        logits, embedding = self.program(input_ids, attention_mask, task_ids, *tables)
        return logits, embedding


def _check_sparse_rows(spec: TableSpec, row_ptr: Tensor, cols: int) -> None:
    """An embedding delta lowers to a gather of at most `cols` entries per row of D_t: refuse a table with more
    (repeated positions; a coalesced delta never has them)."""
    longest = int((row_ptr[:, 1:] - row_ptr[:, :-1]).max()) if row_ptr.numel() else 0
    if longest > cols:
        raise ExportError(
            f"sparse delta at {spec.site}: a row holds {longest} entries, more than its {cols} columns "
            "(repeated positions); the ONNX lowering needs each position at most once"
        )


def export_tables(runtime: Runtime, slots: list[int]) -> list[Tensor]:
    """The runtime's tables in program order as if only `slots` were loaded (TaskTables.for_slots: row i = slots[i],
    each sparse pool holding only those slots' entries); sparse pools get one zero entry past their end, so that no
    pool is empty."""
    out = []
    for spec, t in zip(runtime.tables.specs, runtime.tables.for_slots(slots), strict=True):
        if spec.kind == "sparse" and spec.field == "row_ptr":
            _check_sparse_rows(spec, t, int(runtime.base.state_dict[f"{spec.site}.weight"].shape[1]))
        if spec.kind == "sparse" and spec.field in ("col", "val"):
            t = torch.cat([t, t.new_zeros(1)])
        out.append(t)
    return out


def tasks_metadata(runtime: Runtime) -> dict[str, dict[str, Any]]:
    """name -> {id, num_labels (null: no head, the row's answer is its embedding), labels}."""
    meta = {}
    for i, name in enumerate(runtime.task_names()):
        head = runtime.task(name).head
        labels = None if head is None else list(head.labels)
        meta[name] = {"id": i, "num_labels": None if head is None else head.num_labels, "labels": labels}
    return meta


def model_metadata(runtime: Runtime) -> dict[str, Any]:
    config = runtime.base.config
    tokenizer: dict[str, str] = {}
    directory = runtime.base.tokenizer_dir
    if directory is not None:
        tokenizer = {n: (directory / n).read_text() for n in TOKENIZER_FILES if (directory / n).is_file()}
    return {
        "vocab_size": int(config.vocab_size),
        "max_position_embeddings": int(config.max_position_embeddings),
        "pad_token_id": int(getattr(config, "pad_token_id", None) or 0),
        "max_length": runtime.info.max_length,
        "hidden_size": int(config.hidden_size),
        "tokenizer": tokenizer,
    }


def lowered_program(runtime: Runtime) -> ExportedProgram:
    """The runtime's program with its pets ops lowered and its tables (compacted to the loaded tasks) baked in,
    exported again with dynamic batch and sequence: what `to_onnx` translates, at any opset."""
    if runtime.info.dtype != torch.float32:
        raise ExportError(f"the ONNX export takes float32 artifacts; this one is {runtime.info.dtype}")
    names = runtime.task_names()
    if not names:
        raise ExportError("the artifact has no tasks; add one (pets tasks ARTIFACT_DIR add NAME=PATH) first")
    program = runtime.portable_program.module()
    lower_pets_ops(program)
    expand_attention_masks(program)
    module = _Program(program, export_tables(runtime, [runtime.slot(n) for n in names]))
    batch, seq = Dim("batch"), Dim("seq", max=int(runtime.base.config.max_position_embeddings))
    example = (
        torch.full((3, 5), 101, dtype=torch.long),
        torch.ones(3, 5, dtype=torch.long),
        torch.arange(3, dtype=torch.long) % len(names),
    )
    shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}, "task_ids": {0: batch}}
    with torch.no_grad():
        return torch.export.export(module, example, dynamic_shapes=shapes, strict=False)


def _name_outputs(model: ir.Model) -> None:
    """Name the graph outputs OUTPUTS; inner values that had those names (an `embedding` lookup) are renamed."""
    outputs = list(model.graph.outputs)
    for node in model.graph:
        for value in node.outputs:
            if value.name in OUTPUTS and value not in outputs:
                value.name = f"{value.name}_inner"
    for value, name in zip(outputs, OUTPUTS, strict=True):
        value.name = name


def _tidy(model: ir.Model) -> None:
    """Fold constants (the shape arithmetic of the task tables), drop dead nodes and the exporter's per-node stack
    traces (most of the file otherwise), and name the outputs."""
    onnxscript.optimizer.fold_constants(model)
    onnxscript.optimizer.remove_unused_nodes(model)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        node.metadata_props.clear()
    _name_outputs(model)


def to_onnx(
    program: ExportedProgram,
    runtime: Runtime,
    path: str | Path,
    opset: int = DEFAULT_OPSET,
    external_data: bool | None = None,
) -> Path:
    """Translate a lowered program (lowered_program) to ONNX at `opset` and write it with the runtime's metadata
    at `path`. external_data: the weights in a file beside it (`<name>.data`); None: only past 2 GB (what a
    single ONNX file can hold)."""
    check_opset(opset)
    # The onnxscript optimizer's rewrite rules take minutes on this graph (their matching is quadratic in its
    # size); onnxruntime fuses when it loads the model, and _tidy folds the constants.
    onnx_program = torch.onnx.export(
        program, opset_version=opset, dynamo=True, input_names=list(INPUTS), optimize=False, verbose=False
    )
    if onnx_program is None:
        raise ExportError("torch.onnx.export returned no program")
    _tidy(onnx_program.model)
    props = onnx_program.model.metadata_props
    props[TASKS_KEY] = json.dumps(tasks_metadata(runtime))
    props[MODEL_KEY] = json.dumps(model_metadata(runtime))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        onnx_program.save(Path(tmp) / path.name, external_data=external_data)
        for f in Path(tmp).iterdir():
            f.replace(path.parent / f.name)
    return path


def export_onnx(runtime: Runtime, path: str | Path, opset: int = DEFAULT_OPSET) -> Path:
    """Write the runtime's program with its tasks as one ONNX model at `path`."""
    check_opset(opset)  # before the work below
    return to_onnx(lowered_program(runtime), runtime, path, opset)
