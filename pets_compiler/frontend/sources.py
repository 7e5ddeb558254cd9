"""Read any task source a user has (native dir, peft LoRA dir, full fine-tune) into a validated TaskSpec."""

from __future__ import annotations

from pathlib import Path

from pets_compiler.errors import TaskSourceError
from pets_compiler.frontend.adapterhub import is_adapterhub_dir, load_adapterhub
from pets_compiler.frontend.base import BaseModel
from pets_compiler.frontend.finetune import DEFAULT_MAX_DENSITY, is_finetune_dir, load_finetune
from pets_compiler.frontend.names import check_task_name
from pets_compiler.frontend.native import is_native_dir, read_task
from pets_compiler.frontend.peft_dir import is_peft_dir, load_peft_dir
from pets_compiler.frontend.taskset import TaskSpec
from pets_compiler.frontend.validate import validate_task


def load_task_source(
    name: str, source: str | Path | TaskSpec, base: BaseModel, max_density: float = DEFAULT_MAX_DENSITY
) -> TaskSpec:
    """Detect the source format of `source` (a path, or a TaskSpec taken as is), import it and validate it
    against `base`; the task is called `name` whatever the source calls it. A fine-tune may change at most
    `max_density` of a weight matrix (diff-pruning / MaskBERT); more is refused as not a PET task."""
    check_task_name(name)
    if isinstance(source, TaskSpec):
        spec = TaskSpec(name, dict(source.sites), source.head, source.source)
        return validate_task(spec, base).prune()
    path = Path(source)
    if not path.exists():
        raise TaskSourceError(f"task {name!r}: source {path} does not exist")
    if not path.is_dir():
        raise TaskSourceError(f"task {name!r}: source {path} is not a directory")
    if is_native_dir(path):
        spec = read_task(path, name, base)
    elif is_adapterhub_dir(path):
        spec = load_adapterhub(path, name, base)
    elif is_peft_dir(path):
        spec = load_peft_dir(path, name, base)
    elif is_finetune_dir(path):
        spec = load_finetune(path, name, base, max_density)
    else:
        raise TaskSourceError(
            f"task {name!r}: {path} is not a task source: expected task.json (native), adapter_config.json with "
            "adapter_model.* (peft) or adapter.safetensors / pytorch_adapter.bin (AdapterHub), or config.json with "
            "model.safetensors (a fine-tuned checkpoint)"
        )
    return validate_task(spec, base).prune()
