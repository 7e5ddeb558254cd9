"""The artifact directory: manifest.json, program.pt2 (graph + shared weights), tokenizer/, tasks/<name>/.

No pickle anywhere: the program is torch.export's archive (JSON graph, raw weight bytes), tasks are safetensors.
The manifest is written last, so a crash mid-save leaves the previous manifest (and its tasks) readable.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import BertConfig

from pets_compiler.errors import ArtifactError, PetsError
from pets_compiler.frontend.base import TOKENIZER_FILES, BaseModel, Pooling
from pets_compiler.frontend.names import check_task_name
from pets_compiler.frontend.native import read_task, write_task
from pets_compiler.passes.context import SitePlan
from pets_compiler.runtime.runtime import ProgramInfo, Runtime
from pets_compiler.runtime.tables import TableSpec
from pets_compiler.serving.coordinated import CostModel

FORMAT = "pets-artifact"
VERSION = 2  # 2: a task table may fold a second scale in (TableSpec.fold_in): older builds would misread it
# 2: pets::gelu_delta, 3: pets::row_delta, 4: layer_norm x_bias / residual, adapter h_bias, linear_delta out_scale
OP_LIBRARY_VERSION = 4
MANIFEST = "manifest.json"
PROGRAM = "program.pt2"
COST_MODEL = "cost_model.json"  # the coordinated batch policy's, where the runtime has one
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory} is not a pets artifact: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} is corrupt: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise ArtifactError(f"{path}: artifact format version {manifest.get('version')!r}; this build reads {VERSION}")
    if manifest.get("op_library_version") != OP_LIBRARY_VERSION:
        raise ArtifactError(
            f"{path}: built for op library version {manifest.get('op_library_version')!r}, "
            f"this build has {OP_LIBRARY_VERSION}: recompile the artifact"
        )
    return manifest


def save_artifact(runtime: Runtime, directory: Path) -> None:
    """Write or update an artifact dir; only the program, tasks and manifest that changed are written."""
    old: dict[str, Any] | None = None
    if directory.exists():
        if not directory.is_dir():
            raise ArtifactError(f"{directory} exists and is not a directory")
        if (directory / MANIFEST).is_file():
            old = read_manifest(directory)
        elif any(directory.iterdir()):
            raise ArtifactError(f"{directory} is not empty and not a pets artifact; refusing to write into it")
    directory.mkdir(parents=True, exist_ok=True)
    info = runtime.info
    program = directory / PROGRAM
    if old is None or not program.is_file() or old.get("program_sha256") != runtime.program_sha256:
        tmp = directory / ("tmp-" + PROGRAM)
        torch.export.save(runtime.portable_program, str(tmp))
        os.replace(tmp, program)
        runtime.program_sha256 = _sha256(program)
    if runtime.base.tokenizer_dir is not None and runtime.base.tokenizer_dir != directory / "tokenizer":
        (directory / "tokenizer").mkdir(exist_ok=True)
        for name in TOKENIZER_FILES:
            if (runtime.base.tokenizer_dir / name).is_file():
                shutil.copyfile(runtime.base.tokenizer_dir / name, directory / "tokenizer" / name)
    tasks: dict[str, Any] = {}
    old_tasks = old.get("tasks", {}) if old else {}
    for name in runtime.task_names():
        spec, slot = runtime.task(name), runtime.slot(name)
        entry = {"slot": slot, "kinds": spec.kinds(), "source": spec.source}
        if spec.head is not None:
            entry["num_labels"] = spec.head.num_labels
        if old_tasks.get(name) != entry or not (directory / "tasks" / name / "task.json").is_file():
            write_task(spec, directory / "tasks" / name, info.fingerprint)
        tasks[name] = entry
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "op_library_version": OP_LIBRARY_VERSION,
        "torch_version": torch.__version__,
        "dtype": DTYPE_NAMES[info.dtype],
        "program": PROGRAM,
        "program_sha256": runtime.program_sha256,
        "base": {
            "config": info.config,
            "fingerprint": info.fingerprint,
            "pooling": info.pooling.to_json(),
            "max_length": info.max_length,
        },
        "plan": info.plan.to_json(),
        "tables": [t.to_json() for t in info.tables],
        "tasks": tasks,
    }
    if runtime.cost_model is not None:
        _write_json(directory / COST_MODEL, runtime.cost_model.to_json())
        manifest["cost_model"] = COST_MODEL
    _write_json(directory / MANIFEST, manifest)
    for stale in set(old_tasks) - set(tasks):
        shutil.rmtree(directory / "tasks" / check_task_name(stale), ignore_errors=True)


def load(directory: str | Path) -> Runtime:
    """Load an artifact; a missing, corrupt or mismatched one is refused with ArtifactError."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    try:
        return _load(directory, manifest)
    except ArtifactError:
        raise
    except (PetsError, KeyError, TypeError, ValueError, RuntimeError, OSError) as e:
        raise ArtifactError(f"{directory}: cannot load artifact: {e}") from e


def _load(directory: Path, manifest: dict[str, Any]) -> Runtime:
    program_path = directory / PROGRAM
    if not program_path.is_file():
        raise ArtifactError(f"{directory}: {PROGRAM} is missing")
    digest = _sha256(program_path)
    if digest != manifest.get("program_sha256"):
        raise ArtifactError(f"{program_path} is corrupt or was replaced: its sha256 does not match the manifest")
    program = torch.export.load(str(program_path))
    meta = manifest["base"]
    config = BertConfig.from_dict(meta["config"])
    state = {k: v.detach() for k, v in program.named_parameters()}  # the base's parameters, not its buffers
    tokenizer = directory / "tokenizer"
    base = BaseModel(
        path=directory,
        config=config,
        state_dict=state,
        pooling=Pooling.from_json(meta["pooling"]),
        tokenizer_dir=tokenizer if tokenizer.is_dir() else None,
        max_length=int(meta["max_length"]),
        fingerprint=meta["fingerprint"],
    )
    dtype = {v: k for k, v in DTYPE_NAMES.items()}[manifest["dtype"]]
    info = ProgramInfo(
        dtype=dtype,
        config=meta["config"],
        fingerprint=meta["fingerprint"],
        pooling=base.pooling,
        max_length=base.max_length,
        plan=SitePlan.from_json(manifest["plan"]),
        tables=tuple(TableSpec.from_json(t) for t in manifest["tables"]),
    )
    runtime = Runtime(program, info, base)
    runtime.program_sha256 = digest
    if "cost_model" in manifest:
        runtime.cost_model = CostModel.load(directory / COST_MODEL)
    for name, entry in manifest["tasks"].items():
        check_task_name(name)
        spec = read_task(directory / "tasks" / name, name, base)
        runtime.add_task(name, spec, slot=int(entry["slot"]))
    return runtime
