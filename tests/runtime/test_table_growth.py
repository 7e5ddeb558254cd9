"""Amortised table growth: the slot count and the sparse pools grow to GROWTH x their size, so that loading k tasks
reallocates them O(log k) times and other adds write in place; every task still equals its own model, exports see
only live entries, and a growth that cannot get its memory falls back to the exact size or changes nothing."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor

import pets_compiler
from pets_compiler.frontend.base import load_base
from pets_compiler.frontend.sources import load_task_source
from pets_compiler.oracle import merged_model
from pets_compiler.runtime.requests import pad
from pets_compiler.runtime.tables import SLOTS, TableSpec, TaskTables, pool_dim

from builders import make_peft_lora, make_sparse_finetune, mixed_rows, own_output, rel_err


@pytest.fixture(scope="module")
def sources(small_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("growth")
    return {
        "diff": make_sparse_finetune(small_base, root / "diff", density=0.01, mask=False),
        "diff_head": make_sparse_finetune(
            small_base, root / "diff_head", density=0.01, mask=False, num_labels=3, seed=1
        ),
        "mask": make_sparse_finetune(small_base, root / "mask", density=0.05, mask=True, seed=2),
        "mask_head": make_sparse_finetune(
            small_base, root / "mask_head", density=0.05, mask=True, num_labels=2, seed=3
        ),
        "lora": make_peft_lora(small_base, root / "lora", r=2, alpha=4, targets=["query", "value"], num_labels=2),
    }


def pool_sites(runtime: pets_compiler.Runtime) -> list[str]:
    return [t.site for t in runtime.tables.specs if t.kind == "sparse" and t.field == "col"]


def test_adding_k_sparse_tasks_reallocates_log_k_times(small_base: Path, sources: dict[str, Path]) -> None:
    k = 24
    runtime = pets_compiler.compile(small_base, {"t0": sources["diff"]})
    tables = runtime.tables
    sites = pool_sites(runtime)
    assert sites
    pools: dict[str, Tensor] = {s: tables.tensors[f"{s}.sparse_col"] for s in sites}
    reallocations = dict.fromkeys(sites, 0)
    replaced_any = 0
    for i in range(1, k + 1):
        before, generation = tables.inputs(), tables.generation
        runtime.add_task(f"t{i}", sources["diff"])  # k tasks of one size: the pools need (i + 1) x its entries
        replaced = any(new is not old for new, old in zip(tables.inputs(), before, strict=True))
        assert (tables.generation != generation) == replaced  # bumped exactly when a tensor was replaced
        replaced_any += replaced
        for s in sites:
            col = tables.tensors[f"{s}.sparse_col"]
            reallocations[s] += col is not pools[s]
            pools[s] = col
    # Each growth at least doubles a pool that starts with one task's entries and ends with k + 1 tasks' entries.
    bound = math.ceil(math.log2(k + 1))
    assert all(1 <= n <= bound for n in reallocations.values()), reallocations
    assert 1 <= replaced_any <= bound  # tasks of one size: the task slots grow at the adds the pools grow
    for s in sites:
        live, allocated = tables._live_entries(s), tables.sizes[pool_dim(s)]
        assert live == tables._pool_used[s] and live <= allocated < 2 * live  # the room is less than what is used
    assert k + 2 <= tables.sizes[SLOTS] < 2 * (k + 2)  # slot 0 and k + 1 tasks
    assert tables.pool_bytes()["live"] <= tables.pool_bytes()["allocated"] < 2 * tables.pool_bytes()["live"]


def own_models(small_base: Path, sources: dict[str, Path], names: dict[str, str]) -> dict[str, torch.nn.Module]:
    base = load_base(small_base)
    return {name: merged_model(base, load_task_source(name, sources[src], base)) for name, src in names.items()}


def check_parity(runtime: pets_compiler.Runtime, own: dict[str, torch.nn.Module], seed: int) -> None:
    """A mixed batch with two rows of every loaded task: each row equals its task's own (merged) model."""
    tasks = runtime.task_names()
    rows, _ = mixed_rows(1000, tasks, 2 * len(tasks), seed=seed)
    names = tasks + tasks[::-1]
    ids, mask = pad(rows)
    logits, embedding = runtime.forward(ids, mask, names)
    for i, name in enumerate(names):
        want_logits, want_emb = own_output(own[name], rows[i])
        if want_logits is None:
            assert rel_err(embedding[i], want_emb) < 1e-5, name
        else:
            assert rel_err(logits[i, : want_logits.shape[0]], want_logits) < 1e-5, name


@pytest.mark.parametrize("compact", [False, True])
def test_tasks_equal_their_own_models_after_adds_and_removes(
    small_base: Path, sources: dict[str, Path], compact: bool
) -> None:
    names = {f"{src}{i}": src for i in range(3) for src in ("diff", "diff_head", "mask", "mask_head")}
    own = own_models(small_base, sources, names)
    runtime = pets_compiler.compile(small_base, {"diff0": sources["diff"]}, sites="all")
    if compact:
        runtime.tables.compact_threshold = 0  # compact on every removal: entries move within the grown pools
    for name in list(names)[1:8]:
        runtime.add_task(name, sources[names[name]])
    check_parity(runtime, own, seed=0)
    for name in ("diff_head0", "mask1", "diff0"):  # holes at the front and in the middle of the pools
        runtime.remove_task(name)
    check_parity(runtime, own, seed=1)
    for name in [*list(names)[8:], "diff0", "mask1"]:  # freed slots reused, entries appended in the room
        runtime.add_task(name, sources[names[name]])
    check_parity(runtime, own, seed=2)
    tables = runtime.tables
    for site in pool_sites(runtime):
        used, live = tables._pool_used[site], tables._live_entries(site)
        assert (used == live) if compact else (used > live)  # compacted, or holes left below the threshold
        assert used <= tables.sizes[pool_dim(site)] == tables.tensors[f"{site}.sparse_val"].shape[0]


def test_for_slots_keeps_only_the_live_entries_of_those_slots(small_base: Path, sources: dict[str, Path]) -> None:
    runtime = pets_compiler.compile(small_base, {"a": sources["diff"], "b": sources["mask"]})
    runtime.add_task("c", sources["diff_head"])
    runtime.add_task("d", sources["mask_head"])
    runtime.remove_task("b")  # a hole in every pool (below the compaction threshold), and room past the used end
    tables = runtime.tables
    sites = pool_sites(runtime)
    assert any(tables._pool_used[s] > tables._live_entries(s) for s in sites)
    names = runtime.task_names()
    slots = [runtime.slot(n) for n in names]
    exported = dict(zip([t.key for t in tables.specs], tables.for_slots(slots), strict=True))
    for s in sites:
        row_ptr, col = exported[f"{s}.sparse_row_ptr"], exported[f"{s}.sparse_col"]
        assert row_ptr.shape[0] == len(slots) and int(row_ptr[0, 0]) == 0
        assert col.shape[0] == exported[f"{s}.sparse_val"].shape[0] == int(row_ptr[-1, -1]) == tables._live_entries(s)
    assert sum(exported[f"{s}.sparse_col"].shape[0] for s in sites) * (8 + 4) == tables.pool_bytes()["live"]
    # The program on the compacted tables (task i = slots[i]) computes what the runtime does.
    rows, row_names = mixed_rows(1000, names, 10, seed=3)
    ids, mask = pad(rows)
    want = runtime.forward(ids, mask, row_names)
    task_ids = torch.tensor([names.index(n) for n in row_names])
    with torch.inference_mode():
        got = runtime.program.module()(ids, mask, task_ids, *exported.values())
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


def refuse_pools_past(monkeypatch: pytest.MonkeyPatch, site: str, limit: int) -> None:
    """Make allocating `site`'s pool with more than `limit` entries fail as the device would."""
    zeros = TaskTables._zeros

    def limited(self: TaskTables, t: TableSpec, sizes: dict[str, int]) -> Tensor:
        if t.site == site and t.kind == "sparse" and sizes[pool_dim(site)] > limit and t.field != "row_ptr":
            raise torch.OutOfMemoryError(f"test: no room for {sizes[pool_dim(site)]} entries")
        return zeros(self, t, sizes)

    monkeypatch.setattr(TaskTables, "_zeros", limited)


def test_growth_at_the_memory_limit_falls_back_to_the_exact_size(
    small_base: Path, sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = pets_compiler.compile(small_base, {"mask": sources["mask"]}, sites="all")
    site = "encoder.layer.0.attention.self.query"
    used = runtime.tables._pool_used[site]
    spec = load_task_source("diff", sources["diff"], load_base(small_base))
    extra = spec.sites[site].sparse
    assert extra is not None and 0 < extra.nnz < used  # GROWTH x would ask for more than the exact size
    refuse_pools_past(monkeypatch, site, used + extra.nnz)
    runtime.add_task("diff", spec)
    assert runtime.tables.sizes[pool_dim(site)] == used + extra.nnz
    check_parity(runtime, own_models(small_base, sources, {"mask": "mask", "diff": "diff"}), seed=4)


def test_growth_that_gets_no_memory_changes_nothing(
    small_base: Path, sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = pets_compiler.compile(small_base, {"lora": sources["lora"], "mask": sources["mask"]}, sites="all")
    tables = runtime.tables
    site = "encoder.layer.1.output.dense"
    rows, names = mixed_rows(1000, ["lora", "mask"], 6, seed=5)
    ids, mask = pad(rows)
    before = runtime.forward(ids, mask, names)
    sizes, inputs = dict(tables.sizes), tables.inputs()
    refuse_pools_past(monkeypatch, site, tables.sizes[pool_dim(site)])
    with pytest.raises(torch.OutOfMemoryError):
        runtime.add_task("diff", sources["diff"])
    assert runtime.task_names() == ["lora", "mask"]
    assert tables.sizes[pool_dim(site)] == sizes[pool_dim(site)]  # this pool as it was: its col and val agree
    assert tables.tensors[f"{site}.sparse_col"] is inputs[[t.key for t in tables.specs].index(f"{site}.sparse_col")]
    after = runtime.forward(ids, mask, names)
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))
