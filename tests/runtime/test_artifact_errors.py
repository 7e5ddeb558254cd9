"""RELIABILITY 17: a missing, corrupt or mismatched artifact is refused with ArtifactError; saving never clobbers."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

import pets_compiler
from pets_compiler.errors import ArtifactError

from builders import make_bitfit


@pytest.fixture(scope="module")
def artifact(small_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("artifact")
    runtime = pets_compiler.compile(small_base, {"bf": make_bitfit(small_base, root / "bf", num_labels=2)})
    runtime.save(root / "art")
    return root / "art"


def edit_manifest(key: str, value: object) -> Callable[[Path], None]:
    def edit(art: Path) -> None:
        manifest = json.loads((art / "manifest.json").read_text())
        manifest[key] = value
        (art / "manifest.json").write_text(json.dumps(manifest))

    return edit


def truncate(name: str) -> Callable[[Path], None]:
    def edit(art: Path) -> None:
        path = art / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    return edit


def flip_byte(name: str) -> Callable[[Path], None]:
    def edit(art: Path) -> None:
        data = bytearray((art / name).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (art / name).write_bytes(bytes(data))

    return edit


CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str]] = {
    "no manifest": (lambda a: (a / "manifest.json").unlink(), "manifest.json is missing"),
    "manifest not JSON": (lambda a: (a / "manifest.json").write_text("{not json"), "is corrupt"),
    "manifest not ours": (lambda a: (a / "manifest.json").write_text("[1, 2]"), "not a pets-artifact manifest"),
    "format version": (edit_manifest("version", 99), "format version 99"),
    "op library version": (edit_manifest("op_library_version", 0), "op library version 0"),
    "program missing": (lambda a: (a / "program.pt2").unlink(), "program.pt2 is missing"),
    "program truncated": (truncate("program.pt2"), "sha256 does not match"),
    "program byte flipped": (flip_byte("program.pt2"), "sha256 does not match"),
    "task dir missing": (lambda a: shutil.rmtree(a / "tasks" / "bf"), "task.json"),
    "task weights truncated": (truncate("tasks/bf/task.safetensors"), "task.safetensors"),
    "task for another base": (
        lambda a: (a / "tasks/bf/task.json").write_text(
            json.dumps({**json.loads((a / "tasks/bf/task.json").read_text()), "base_fingerprint": "0" * 32})
        ),
        "made for base '00000000",
    ),
    "unsafe task name in manifest": (
        lambda a: edit_manifest("tasks", {"../evil": {"slot": 1}})(a),
        "invalid task name '../evil'",
    ),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_artifact_is_refused(case: str, artifact: Path, tmp_path: Path) -> None:
    art = tmp_path / "art"
    shutil.copytree(artifact, art)
    corrupt, message = CORRUPTIONS[case]
    corrupt(art)
    with pytest.raises(ArtifactError, match=message):
        pets_compiler.load(art)


def test_the_uncorrupted_copy_loads(artifact: Path, tmp_path: Path) -> None:
    shutil.copytree(artifact, tmp_path / "art")
    assert pets_compiler.load(tmp_path / "art").task_names() == ["bf"]


def test_save_refuses_a_foreign_directory(artifact: Path, tmp_path: Path) -> None:
    runtime = pets_compiler.load(artifact)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="not empty and not a pets artifact"):
        runtime.save(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
