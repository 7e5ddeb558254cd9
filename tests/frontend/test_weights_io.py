"""Weights files: corrupt safetensors and unsafe pickles are refused with clear errors.

RELIABILITY.md rows 11, 13 and 14.
"""

from __future__ import annotations

import json
import pickle
import struct
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from pets_compiler.errors import CheckpointFormatError, TaskSourceError, UnsafeCheckpointError
from pets_compiler.frontend.weights_io import (
    find_weights_file,
    read_safetensors,
    read_torch_pickle,
    read_weights,
    write_safetensors,
)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "encoder.weight": torch.randn(4, 3, generator=g),
        "encoder.bias": torch.randn(4, generator=g).to(torch.float16),
        "ids": torch.arange(5, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "bf": torch.randn(2, 2, generator=g).to(torch.bfloat16),
        "empty": torch.zeros(0, 3),
    }


def _write_raw(path: Path, header: Any, data: bytes, *, header_len: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


def _f32_header(**entries: Any) -> dict[str, Any]:
    return {name: {"dtype": "F32", "shape": s, "data_offsets": o} for name, (s, o) in entries.items()}


# --- safetensors: good files --------------------------------------------------------------------------------


def test_round_trip_is_bitwise(tmp_path: Path) -> None:
    src = _tensors()
    src["encoder.weight"][0, 0] = -0.0
    path = tmp_path / "model.safetensors"
    write_safetensors(src, path, metadata={"format": "pt"})
    out = read_safetensors(path)
    assert set(out) == set(src)
    for name, t in src.items():
        assert out[name].dtype == t.dtype and out[name].shape == t.shape
        assert out[name].view(torch.uint8).tolist() == t.contiguous().view(torch.uint8).tolist(), name
    assert read_weights(path).keys() == src.keys()
    assert not [p for p in tmp_path.iterdir() if p.name != "model.safetensors"], "temp file left behind"


def test_write_handles_shared_and_non_contiguous(tmp_path: Path) -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    src = {"a": base, "tied": base, "t": base.t(), "row": base[1]}
    path = tmp_path / "shared.safetensors"
    write_safetensors(src, path)
    out = read_safetensors(path)
    for name, t in src.items():
        assert torch.equal(out[name], t), name


def test_write_replaces_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    write_safetensors({"x": torch.ones(2)}, path)
    write_safetensors({"y": torch.zeros(3)}, path)
    assert list(read_safetensors(path)) == ["y"]


# --- safetensors: corrupt files -----------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.safetensors"
    with pytest.raises(TaskSourceError, match="does not exist") as ei:
        read_safetensors(path)
    assert str(path) in str(ei.value)


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    d = tmp_path / "dir.safetensors"
    d.mkdir()
    with pytest.raises(CheckpointFormatError, match="not a regular file"):
        read_safetensors(d)


@pytest.mark.parametrize("content", [b"", b"\x01\x02\x03"])
def test_shorter_than_8_bytes(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointFormatError, match="shorter than the 8-byte") as ei:
        read_safetensors(path)
    assert str(path) in str(ei.value)


def test_truncated_data(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    write_safetensors({"w": torch.randn(16, 16)}, path)
    raw = path.read_bytes()
    path.write_bytes(raw[:-100])
    with pytest.raises(CheckpointFormatError, match=r"tensor 'w'.*outside the data section") as ei:
        read_safetensors(path)
    assert str(path) in str(ei.value)


def test_truncated_inside_header(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    write_safetensors({"w": torch.randn(4)}, path)
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(CheckpointFormatError, match="runs past the end of the file"):
        read_safetensors(path)


def test_header_length_past_end(tmp_path: Path) -> None:
    path = _write_raw(tmp_path / "x.safetensors", {}, b"", header_len=1000)
    with pytest.raises(CheckpointFormatError, match="header length 1000 runs past the end"):
        read_safetensors(path)


def test_zero_header_length(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 0) + b"{}")
    with pytest.raises(CheckpointFormatError, match="header length is 0"):
        read_safetensors(path)


def test_huge_header_length(tmp_path: Path) -> None:
    path = _write_raw(tmp_path / "x.safetensors", {}, b"", header_len=2**40)
    with pytest.raises(CheckpointFormatError, match=f"header length {2**40} exceeds the limit"):
        read_safetensors(path)


def test_header_not_json(tmp_path: Path) -> None:
    path = _write_raw(tmp_path / "x.safetensors", b"this is {not json", b"")
    with pytest.raises(CheckpointFormatError, match="not valid JSON") as ei:
        read_safetensors(path)
    assert str(path) in str(ei.value)


def test_header_not_utf8(tmp_path: Path) -> None:
    path = _write_raw(tmp_path / "x.safetensors", b"\xff\xfe{}", b"")
    with pytest.raises(CheckpointFormatError, match="not valid UTF-8"):
        read_safetensors(path)


@pytest.mark.parametrize("header", [[1, 2, 3], "str", 7, None])
def test_header_json_but_not_dict(tmp_path: Path, header: Any) -> None:
    path = _write_raw(tmp_path / "x.safetensors", header, b"")
    with pytest.raises(CheckpointFormatError, match="expected an object"):
        read_safetensors(path)


def test_bad_dtype(tmp_path: Path) -> None:
    header = {"w": {"dtype": "F128", "shape": [2], "data_offsets": [0, 32]}}
    path = _write_raw(tmp_path / "x.safetensors", header, bytes(32))
    with pytest.raises(CheckpointFormatError, match=r"tensor 'w': unknown dtype 'F128'"):
        read_safetensors(path)


@pytest.mark.parametrize("shape", [[-1, 2], [2.0], "2", [True]])
def test_bad_shape(tmp_path: Path, shape: Any) -> None:
    header = {"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 8]}}
    path = _write_raw(tmp_path / "x.safetensors", header, bytes(8))
    with pytest.raises(CheckpointFormatError, match=r"tensor 'w': shape .* non-negative integers"):
        read_safetensors(path)


def test_missing_offsets(tmp_path: Path) -> None:
    header = {"w": {"dtype": "F32", "shape": [2]}}
    path = _write_raw(tmp_path / "x.safetensors", header, bytes(8))
    with pytest.raises(CheckpointFormatError, match=r"tensor 'w': data_offsets None"):
        read_safetensors(path)


def test_bad_metadata(tmp_path: Path) -> None:
    header = {"__metadata__": {"a": 1}, **_f32_header(w=([2], [0, 8]))}
    path = _write_raw(tmp_path / "x.safetensors", header, bytes(8))
    with pytest.raises(CheckpointFormatError, match="__metadata__"):
        read_safetensors(path)


def test_shape_offset_size_mismatch(tmp_path: Path) -> None:
    path = _write_raw(tmp_path / "x.safetensors", _f32_header(w=([3, 3], [0, 16])), bytes(16))
    with pytest.raises(CheckpointFormatError, match=r"tensor 'w'.*span 16 bytes.*needs 36 bytes"):
        read_safetensors(path)


def test_overlapping_offsets(tmp_path: Path) -> None:
    header = _f32_header(a=([4], [0, 16]), b=([4], [8, 24]))
    path = _write_raw(tmp_path / "x.safetensors", header, bytes(24))
    with pytest.raises(CheckpointFormatError, match=r"'a' \[0, 16\] and 'b' \[8, 24\] overlap") as ei:
        read_safetensors(path)
    assert str(path) in str(ei.value)


def test_offsets_past_end(tmp_path: Path) -> None:
    path = _write_raw(tmp_path / "x.safetensors", _f32_header(w=([4], [8, 24])), bytes(16))
    with pytest.raises(CheckpointFormatError, match=r"tensor 'w': data_offsets \[8, 24\] lie outside"):
        read_safetensors(path)


def test_negative_offsets(tmp_path: Path) -> None:
    path = _write_raw(tmp_path / "x.safetensors", _f32_header(w=([2], [-8, 0])), bytes(8))
    with pytest.raises(CheckpointFormatError, match="lie outside"):
        read_safetensors(path)


def test_duplicate_header_key(tmp_path: Path) -> None:
    entry = b'{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
    raw = b'{"w":' + entry + b',"w":' + entry + b"}"
    path = _write_raw(tmp_path / "x.safetensors", raw, bytes(4))
    with pytest.raises(CheckpointFormatError, match="key 'w' twice"):
        read_safetensors(path)


def test_library_error_is_wrapped(tmp_path: Path) -> None:
    # Passes our checks (a gap between the tensors) but the library refuses non-contiguous data.
    header = _f32_header(a=([1], [0, 4]), b=([1], [8, 12]))
    path = _write_raw(tmp_path / "x.safetensors", header, bytes(12))
    with pytest.raises(CheckpointFormatError, match="safetensors could not read the file") as ei:
        read_safetensors(path)
    assert str(path) in str(ei.value)


# --- non-finite values --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "fragment"),
    [(float("nan"), r"1 NaN, 0 Inf"), (float("inf"), r"0 NaN, 1 Inf"), (float("-inf"), r"0 NaN, 1 Inf")],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_non_finite_refused(tmp_path: Path, bad: float, fragment: str, dtype: torch.dtype) -> None:
    w = torch.zeros(3, 3, dtype=dtype)
    w[1, 2] = bad
    path = tmp_path / "x.safetensors"
    write_safetensors({"ok": torch.ones(2), "layer.3.weight": w}, path)
    with pytest.raises(CheckpointFormatError, match=r"tensor 'layer\.3\.weight' has 1 non-finite") as ei:
        read_safetensors(path)
    assert fragment in str(ei.value) and str(path) in str(ei.value)


def test_non_finite_count(tmp_path: Path) -> None:
    w = torch.tensor([float("nan"), float("nan"), float("inf"), 1.0])
    path = tmp_path / "x.safetensors"
    write_safetensors({"w": w}, path)
    with pytest.raises(CheckpointFormatError, match=r"'w' has 3 non-finite values \(2 NaN, 1 Inf\)"):
        read_safetensors(path)


def test_check_finite_false_lets_nan_through(tmp_path: Path) -> None:
    w = torch.tensor([float("nan"), float("inf"), 2.0])
    path = tmp_path / "x.safetensors"
    write_safetensors({"w": w}, path)
    out = read_safetensors(path, check_finite=False)
    assert torch.isnan(out["w"][0]) and torch.isinf(out["w"][1]) and out["w"][2] == 2.0


# --- pickle checkpoints -------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth"])
def test_weights_only_pickle_round_trip(tmp_path: Path, suffix: str) -> None:
    src = _tensors()
    path = tmp_path / f"pytorch_model{suffix}"
    torch.save(src, path)
    out = read_weights(path)
    assert set(out) == set(src)
    for name, t in src.items():
        assert torch.equal(out[name], t), name


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("how", ["zipfile", "legacy_torch", "plain_pickle"])
def test_malicious_pickle_refused_and_never_runs(tmp_path: Path, how: str) -> None:
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "pytorch_model.bin"
    payload = {"w": torch.ones(2), "evil": _Evil(marker)}
    if how == "zipfile":
        torch.save(payload, path, _use_new_zipfile_serialization=True)
    elif how == "legacy_torch":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        with path.open("wb") as f:
            pickle.dump(_Evil(marker), f)
    assert not marker.exists()
    with (
        warnings.catch_warnings(),
        pytest.raises(UnsafeCheckpointError, match="only safetensors or weights-only pickles") as ei,
    ):
        warnings.simplefilter("ignore", UserWarning)  # "Detected pickle protocol 4" for the plain pickle
        read_weights(path)
    assert str(path) in str(ei.value)
    assert not marker.exists(), "the pickle's __reduce__ ran"


def test_garbage_bin_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(b"not a pickle at all")
    with pytest.raises(UnsafeCheckpointError, match="weights_only=True"):
        read_torch_pickle(path)


@pytest.mark.parametrize(
    ("obj", "fragment"),
    [
        ([torch.ones(2)], "holds a list"),
        (torch.ones(2), "holds a Tensor"),
        ({"state_dict": {"w": torch.ones(2)}}, "entry 'state_dict'"),
        ({1: torch.ones(2)}, "entry 1"),
    ],
)
def test_pickle_not_flat_dict_refused(tmp_path: Path, obj: Any, fragment: str) -> None:
    path = tmp_path / "model.bin"
    torch.save(obj, path)
    with pytest.raises(CheckpointFormatError, match="flat dict") as ei:
        read_torch_pickle(path)
    assert fragment in str(ei.value) and str(path) in str(ei.value)


def test_pickle_non_finite_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    torch.save({"cls.bias": torch.tensor([1.0, float("nan")])}, path)
    with pytest.raises(CheckpointFormatError, match=r"tensor 'cls\.bias' has 1 non-finite"):
        read_torch_pickle(path)


def test_pickle_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TaskSourceError, match="does not exist"):
        read_weights(tmp_path / "model.bin")


# --- dispatch and lookup ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["model.npz", "model.ckpt", "model"])
def test_unknown_suffix_refused(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"whatever")
    with pytest.raises(CheckpointFormatError, match="unknown weights file suffix") as ei:
        read_weights(path)
    assert str(path) in str(ei.value)


def test_find_weights_file(tmp_path: Path) -> None:
    names = ["adapter_model.safetensors", "adapter_model.bin"]
    (tmp_path / "adapter_model.bin").write_bytes(b"x")
    assert find_weights_file(tmp_path, names) == tmp_path / "adapter_model.bin"
    (tmp_path / "adapter_model.safetensors").write_bytes(b"x")
    assert find_weights_file(tmp_path, names) == tmp_path / "adapter_model.safetensors"


def test_find_weights_file_none_found(tmp_path: Path) -> None:
    (tmp_path / "adapter_model.safetensors").mkdir()  # a directory is not a weights file
    with pytest.raises(TaskSourceError, match=r"looked for adapter_model\.safetensors, adapter_model\.bin") as ei:
        find_weights_file(tmp_path, ["adapter_model.safetensors", "adapter_model.bin"])
    assert str(tmp_path) in str(ei.value)
