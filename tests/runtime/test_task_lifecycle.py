"""add_task / remove_task without recompiling: other tasks bitwise unchanged; artifact save -> load bitwise equal."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import pets_compiler
from pets_compiler.errors import DuplicateTaskError, UnknownTaskError
from pets_compiler.frontend.base import load_base
from pets_compiler.oracle import peft_model
from pets_compiler.runtime.requests import pad

from builders import make_bitfit, make_peft_ia3, make_peft_lora, make_sparse_finetune, mixed_rows, own_output, rel_err


@pytest.fixture(scope="module")
def sources(small_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lifecycle")
    return {
        "a": make_peft_lora(small_base, root / "a", r=2, alpha=4, targets=["query", "value"], num_labels=3),
        "b": make_bitfit(small_base, root / "b", num_labels=2, seed=1),
        "c": make_peft_lora(small_base, root / "c", r=3, alpha=6, targets=["key"], seed=2),
        # Added later: rank 8 > every rank the tables hold, so the LoRA tables grow.
        "big": make_peft_lora(small_base, root / "big", r=8, alpha=8, targets=["query", "dense"], num_labels=4, seed=3),
    }


@pytest.fixture()
def runtime(small_base: Path, sources: dict[str, Path]) -> pets_compiler.Runtime:
    return pets_compiler.compile(small_base, {k: v for k, v in sources.items() if k != "big"}, sites="all")


def outputs(runtime: pets_compiler.Runtime, names: list[str], rows: list[list[int]]) -> tuple[torch.Tensor, ...]:
    ids, mask = pad(rows)
    return runtime.forward(ids, mask, names)


def assert_bitwise(before: tuple[torch.Tensor, ...], after: tuple[torch.Tensor, ...]) -> None:
    """Same logits (the columns both have: a task with more labels widens them) and the same embeddings."""
    (logits0, emb0), (logits1, emb1) = before, after
    width = min(logits0.shape[1], logits1.shape[1])
    assert torch.equal(logits0[:, :width], logits1[:, :width])
    assert not logits0[:, width:].any() and not logits1[:, width:].any()
    assert torch.equal(emb0, emb1)


def test_add_and_remove_leave_other_tasks_bitwise_unchanged(
    runtime: pets_compiler.Runtime, sources: dict[str, Path], small_base: Path
) -> None:
    rows, names = mixed_rows(1000, ["a", "b", "c"], 10, seed=0)
    before = outputs(runtime, names, rows)
    program = runtime.program
    runtime.add_task("big", sources["big"])
    assert runtime.program is program  # no retrace, no recompile
    assert_bitwise(before, outputs(runtime, names, rows))
    # The new task serves right away and equals its own (peft) model, in a batch mixed with the others.
    rows2, names2 = mixed_rows(1000, ["a", "b", "c", "big"], 10, seed=1)
    assert "big" in names2
    logits, _ = outputs(runtime, names2, rows2)
    own = peft_model(load_base(small_base), sources["big"])
    for i, name in enumerate(names2):
        if name == "big":
            want, _ = own_output(own, rows2[i])
            assert want is not None and rel_err(logits[i, :4], want) < 1e-5
    runtime.remove_task("big")
    assert_bitwise(before, outputs(runtime, names, rows))
    with pytest.raises(UnknownTaskError, match="unknown task 'big'; loaded tasks: a, b, c"):
        outputs(runtime, ["big"], rows[:1])


def test_removed_slot_is_reused_and_zeroed(runtime: pets_compiler.Runtime, sources: dict[str, Path]) -> None:
    slot = runtime.slot("c")
    runtime.remove_task("c")
    for table in runtime.tables.tensors.values():
        if slot < table.shape[0]:
            assert not table[slot].any()
    runtime.add_task("c2", sources["c"])
    assert runtime.slot("c2") == slot


def test_duplicate_add_and_unknown_remove_change_nothing(
    runtime: pets_compiler.Runtime, sources: dict[str, Path]
) -> None:
    rows, names = mixed_rows(1000, ["a", "b", "c"], 6, seed=2)
    before = outputs(runtime, names, rows)
    with pytest.raises(DuplicateTaskError, match="'a' is already loaded"):
        runtime.add_task("a", sources["big"])
    with pytest.raises(UnknownTaskError, match="unknown task 'zzz'"):
        runtime.remove_task("zzz")
    assert runtime.task_names() == ["a", "b", "c"]
    assert_bitwise(before, outputs(runtime, names, rows))


def test_save_load_is_bitwise_equal(runtime: pets_compiler.Runtime, tmp_path: Path) -> None:
    runtime.save(tmp_path / "art")
    loaded = pets_compiler.load(tmp_path / "art")
    assert loaded.task_names() == runtime.task_names()
    assert all(loaded.slot(n) == runtime.slot(n) for n in runtime.task_names())
    rows, names = mixed_rows(1000, ["a", "b", "c"], 9, seed=3)
    assert_bitwise(outputs(runtime, names, rows), outputs(loaded, names, rows))


def test_save_updates_an_artifact_in_place(
    runtime: pets_compiler.Runtime, sources: dict[str, Path], tmp_path: Path
) -> None:
    art = tmp_path / "art"
    runtime.save(art)
    program_mtime = (art / "program.pt2").stat().st_mtime_ns
    loaded = pets_compiler.load(art)
    loaded.remove_task("c")
    loaded.add_task("big", sources["big"])
    loaded.save(art)
    assert (art / "program.pt2").stat().st_mtime_ns == program_mtime  # the program is not rewritten
    assert not (art / "tasks" / "c").exists() and (art / "tasks" / "big" / "task.json").is_file()
    again = pets_compiler.load(art)
    assert again.task_names() == ["a", "b", "big"]
    rows, names = mixed_rows(1000, ["a", "b", "big"], 8, seed=4)
    assert_bitwise(outputs(loaded, names, rows), outputs(again, names, rows))


def test_add_remove_every_kind_keeps_others_bitwise(tmp_path: Path) -> None:
    """Adapters (bottleneck tables grow), sparse pools (appended, then compacted on removal), IA3."""
    fixtures = Path(__file__).parents[1] / "fixtures" / "adapterhub" / "small"
    base = fixtures / "base"
    runtime = pets_compiler.compile(
        base,
        {
            "pfeiffer": fixtures / "pfeiffer",
            "diff": make_sparse_finetune(base, tmp_path / "diff", density=0.01, mask=False),
        },
        sites="all",
    )
    runtime.tables.compact_threshold = 0  # compact on every removal, to exercise it
    rows, names = mixed_rows(1000, ["pfeiffer", "diff"], 8, seed=7)
    before = outputs(runtime, names, rows)
    runtime.add_task("houlsby", fixtures / "houlsby")  # bottleneck 12 > 9
    runtime.add_task("mask", make_sparse_finetune(base, tmp_path / "mask", density=0.05, mask=True, seed=1))
    runtime.add_task("ia3", make_peft_ia3(base, tmp_path / "ia3", targets=["value", "output.dense"], feedforward=[]))
    assert_bitwise(before, outputs(runtime, names, rows))
    rows2, names2 = mixed_rows(1000, ["pfeiffer", "mask", "ia3"], 10, seed=8)
    before2 = outputs(runtime, names2, rows2)
    runtime.remove_task("houlsby")
    runtime.remove_task("diff")  # its pool entries sit before the mask task's: compaction moves those
    query = "encoder.layer.0.attention.self.query"
    assert runtime.tables._pool_used[query] == runtime.tables._live_entries(query) > 0  # compacted
    runtime.add_task("diff", make_sparse_finetune(base, tmp_path / "diff2", density=0.01, mask=False))
    assert_bitwise(before2, outputs(runtime, names2, rows2))
