"""Reading and writing weights files without ever running pickle code.

Safetensors files are validated (header length, JSON, dtypes, shapes, offsets) before the safetensors
library sees them, and every floating tensor is checked for NaN/Inf. Pickle checkpoints (``.bin``, ``.pt``,
``.pth``) are only ever read with ``torch.load(..., weights_only=True)``.
Every error names the file and what is wrong.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from pets_compiler.errors import CheckpointFormatError, PetsError, TaskSourceError, UnsafeCheckpointError

__all__ = [
    "MAX_HEADER_BYTES",
    "SAFETENSORS_ITEMSIZE",
    "find_weights_file",
    "read_safetensors",
    "read_torch_pickle",
    "read_weights",
    "write_safetensors",
]

#: Same limit as the safetensors library itself.
MAX_HEADER_BYTES = 100_000_000

#: Bytes per element of every safetensors dtype string this module accepts.
SAFETENSORS_ITEMSIZE: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2": 1,
    "F8_E5M2FNUZ": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
    "C64": 8,
}

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


def _require_file(path: Path) -> None:
    if not path.exists():
        raise TaskSourceError(f"weights file {path} does not exist")
    if not path.is_file():
        raise CheckpointFormatError(f"weights file {path} is not a regular file")


def _no_duplicate_keys(path: Path) -> Any:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise CheckpointFormatError(f"{path}: safetensors header has the key {key!r} twice")
            out[key] = value
        return out

    return hook


def _validate_safetensors_header(path: Path) -> None:
    size = path.stat().st_size
    if size < 8:
        raise CheckpointFormatError(f"{path}: file is {size} bytes, shorter than the 8-byte safetensors header length")
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n == 0:
            raise CheckpointFormatError(f"{path}: safetensors header length is 0")
        if n > MAX_HEADER_BYTES:
            raise CheckpointFormatError(
                f"{path}: safetensors header length {n} exceeds the limit of {MAX_HEADER_BYTES} bytes"
            )
        if 8 + n > size:
            raise CheckpointFormatError(
                f"{path}: safetensors header length {n} runs past the end of the file ({size} bytes); "
                "the file is truncated or not a safetensors file"
            )
        raw = f.read(n)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointFormatError(f"{path}: safetensors header is not valid UTF-8: {e}") from None
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicate_keys(path))
    except json.JSONDecodeError as e:
        raise CheckpointFormatError(f"{path}: safetensors header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointFormatError(f"{path}: safetensors header is JSON {type(header).__name__}, expected an object")

    data_size = size - 8 - n
    ranges: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in entry.items()
            ):
                raise CheckpointFormatError(f"{path}: __metadata__ must be an object of string -> string")
            continue
        where = f"{path}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise CheckpointFormatError(f"{where}: header entry is {type(entry).__name__}, expected an object")
        dtype = entry.get("dtype")
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_ITEMSIZE:
            raise CheckpointFormatError(
                f"{where}: unknown dtype {dtype!r} (known: {', '.join(sorted(SAFETENSORS_ITEMSIZE))})"
            )
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(
            type(d) is int and d >= 0
            for d in shape  # bool is not a dimension
        ):
            raise CheckpointFormatError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        offsets = entry.get("data_offsets")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets):
            raise CheckpointFormatError(f"{where}: data_offsets {offsets!r} is not a list [begin, end]")
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            raise CheckpointFormatError(
                f"{where}: data_offsets [{begin}, {end}] lie outside the data section of {data_size} bytes"
                " (file truncated or offsets corrupt)"
            )
        expected = math.prod(shape) * SAFETENSORS_ITEMSIZE[dtype]
        if end - begin != expected:
            raise CheckpointFormatError(
                f"{where}: data_offsets [{begin}, {end}] span {end - begin} bytes but shape {shape} of "
                f"{dtype} needs {expected} bytes"
            )
        if end > begin:
            ranges.append((begin, end, name))

    ranges.sort()
    for (b0, e0, n0), (b1, e1, n1) in itertools.pairwise(ranges):
        if b1 < e0:
            raise CheckpointFormatError(
                f"{path}: byte ranges of tensors {n0!r} [{b0}, {e0}] and {n1!r} [{b1}, {e1}] overlap"
            )


def _check_finite(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    for name, t in tensors.items():
        if not (t.is_floating_point() or t.is_complex()):
            continue
        x = t.float() if t.element_size() == 1 else t  # float8: isfinite is not implemented everywhere
        nan = int(torch.isnan(x).sum())
        inf = int(torch.isinf(x).sum())
        if nan or inf:
            raise CheckpointFormatError(
                f"{path}: tensor {name!r} has {nan + inf} non-finite values ({nan} NaN, {inf} Inf) out of {t.numel()}"
            )


def read_safetensors(path: Path, *, check_finite: bool = True) -> dict[str, torch.Tensor]:
    """Validate then load a safetensors file onto the CPU."""
    path = Path(path)
    _require_file(path)
    _validate_safetensors_header(path)
    try:
        tensors = safetensors.torch.load_file(str(path), device="cpu")
    except Exception as e:
        raise CheckpointFormatError(f"{path}: safetensors could not read the file: {e}") from e
    if check_finite:
        _check_finite(path, tensors)
    return tensors


def read_torch_pickle(path: Path) -> dict[str, torch.Tensor]:
    """Load a ``.bin``/``.pt`` state dict with ``weights_only=True``; never runs pickle code."""
    path = Path(path)
    _require_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UnsafeCheckpointError(
            f"{path}: cannot be read with torch.load(weights_only=True) ({type(e).__name__}: {e}); "
            "only safetensors or weights-only pickles are accepted"
        ) from e
    if not isinstance(obj, Mapping):
        raise CheckpointFormatError(f"{path}: holds a {type(obj).__name__}, expected a flat dict of name -> tensor")
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointFormatError(
                f"{path}: entry {key!r} is {type(key).__name__} -> {type(value).__name__}, "
                "expected a flat dict of str -> tensor"
            )
        out[key] = value
    _check_finite(path, out)
    return out


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Read a weights file, choosing the reader by suffix."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return read_safetensors(path)
    if suffix in _PICKLE_SUFFIXES:
        return read_torch_pickle(path)
    raise CheckpointFormatError(
        f"{path}: unknown weights file suffix {path.suffix!r} (expected .safetensors, .bin, .pt or .pth)"
    )


def find_weights_file(directory: Path, candidates: Sequence[str]) -> Path:
    """The first candidate file name that exists in ``directory``."""
    directory = Path(directory)
    for name in candidates:
        p = directory / name
        if p.is_file():
            return p
    raise TaskSourceError(f"no weights file in {directory}: looked for {', '.join(candidates) or '(none)'}")


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write atomically: temp file in the same directory, fsync, os.replace."""
    path = Path(path)
    seen: set[int] = set()
    prepared: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        t = t.detach()
        ptr = t.untyped_storage().data_ptr() if t.numel() else 0
        shared = bool(ptr) and ptr in seen
        t = t.clone(memory_format=torch.contiguous_format) if shared else t.contiguous()
        if ptr:
            seen.add(ptr)
        prepared[name] = t
    data = safetensors.torch.save(prepared, metadata=metadata)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def read_json_object(path: Path, error: type[PetsError] = TaskSourceError) -> dict[str, Any]:
    """A JSON file holding an object (config, manifest, metadata), or `error` naming the file and the problem."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: cannot read it as JSON: {e}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: holds a JSON {type(data).__name__}, not a JSON object (expected an object)")
    return data
