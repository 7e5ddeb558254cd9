"""Task sources: every format loads into the right TaskSpec; every bad source is refused with a typed error.

RELIABILITY.md rows 2 (task names), 11 (bad task sources), 13 (corrupt weights inside a task dir), 14 (pickle
checkpoints) and 15 (duplicate add, unknown remove), checked on `load_task_source` and on a live Runtime, whose task
set and outputs must not change when a load fails.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

import pets_compiler
from pets_compiler.errors import (
    CheckpointFormatError,
    DuplicateTaskError,
    SiteNotServedError,
    TaskNameError,
    TaskSourceError,
    UnknownTaskError,
    UnsafeCheckpointError,
)
from pets_compiler.frontend.base import BaseModel, load_base
from pets_compiler.frontend.native import write_task
from pets_compiler.frontend.sources import load_task_source
from pets_compiler.frontend.taskset import TaskSpec
from pets_compiler.runtime.requests import pad
from pets_compiler.runtime.runtime import Runtime

from builders import make_bitfit, make_peft_lora, make_small_base
from source_edits import batch_outputs, unchanged
from source_edits import copy_source as _copy
from source_edits import edit_json as _edit_json
from source_edits import edit_tensors as _edit_tensors

LAYERS = 3  # the small base (builders.SMALL_CONFIG): 3 layers, hidden 72, intermediate 200
Q0 = "encoder.layer.0.attention.self.query"
PEFT = "base_model.model.bert."  # key prefix of a SEQ_CLS peft adapter
QV_SITES = {f"encoder.layer.{i}.attention.self.{m}" for i in range(LAYERS) for m in ("query", "value")}
# (meta file, weights file) of each source format
FORMATS = {
    "peft": ("adapter_config.json", "adapter_model.safetensors"),
    "finetune": ("config.json", "model.safetensors"),
    "native": ("task.json", "task.safetensors"),
}


# --- sources and runtimes, built once per module ------------------------------------------------------------


@dataclass(frozen=True)
class Sources:
    base: BaseModel
    peft: Path  # SEQ_CLS LoRA r=4 alpha=8 on query/value, 3 labels
    peft_all: Path  # SEQ_CLS LoRA r=2 alpha=6 on query/dense with bias="all", 2 labels
    finetune: Path  # BitFit fine-tune, 2 labels
    native: Path  # native dir of the peft_all task (LoRA, bias, LayerNorm and head)
    other_peft: Path  # LoRA made on a base of another size (hidden 96)
    other_base: Path  # that base (hidden 96, 4 heads), a full checkpoint of another model

    def of(self, fmt: str) -> Path:
        return {"peft": self.peft, "finetune": self.finetune, "native": self.native}[fmt]


@pytest.fixture(scope="module")
def sources(small_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Sources:
    root = tmp_path_factory.mktemp("task_sources")
    base = load_base(small_base)
    peft = make_peft_lora(small_base, root / "peft", r=4, alpha=8, targets=["query", "value"], num_labels=3)
    peft_all = make_peft_lora(
        small_base, root / "peft_all", r=2, alpha=6, targets=["query", "dense"], num_labels=2, bias="all", seed=1
    )
    finetune = make_bitfit(small_base, root / "finetune", num_labels=2, seed=2)
    write_task(load_task_source("full", peft_all, base), root / "native", base.fingerprint)
    other = make_small_base(root / "other_base", hidden_size=96, num_attention_heads=4)  # another model's size
    other_peft = make_peft_lora(other, root / "other_peft", r=2, alpha=4, targets=["query"], seed=3)
    return Sources(base, peft, peft_all, finetune, root / "native", other_peft, other)


@pytest.fixture(scope="module")
def rt_all(small_base: Path, sources: Sources) -> Runtime:
    """Compiled with every site served, holding a LoRA task (3 labels) and a BitFit task (2 labels)."""
    return pets_compiler.compile(small_base, {"lora3": sources.peft, "bitfit2": sources.finetune}, sites="all")


@pytest.fixture(scope="module")
def rt_used(small_base: Path, sources: Sources) -> Runtime:
    """Compiled with sites="used" for a BitFit task and a no-PET task (so it serves no LoRA site)."""
    return pets_compiler.compile(small_base, {"A-b_c.2": sources.finetune, "task..1": small_base}, sites="used")


def _restore(rt: Runtime) -> Iterator[Runtime]:
    """Yield the shared runtime; afterwards remove any task a (failing) test left in it, so failures stay local."""
    names = set(rt.task_names())
    yield rt
    for name in set(rt.task_names()) - names:
        rt.remove_task(name)


@pytest.fixture
def live(rt_all: Runtime) -> Iterator[Runtime]:
    yield from _restore(rt_all)


@pytest.fixture
def live_used(rt_used: Runtime) -> Iterator[Runtime]:
    yield from _restore(rt_used)


# --- helpers to edit copies of good sources -----------------------------------------------------------------


def _set_first(key: str, value: float) -> Callable[[dict[str, Tensor]], None]:
    def edit(tensors: dict[str, Tensor]) -> None:
        tensors[key].view(-1)[0] = value

    return edit


def _bits(t: Tensor) -> Tensor:
    return t.detach().contiguous().view(torch.uint8)


def _same(a: Tensor, b: Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _assert_specs_equal(got: TaskSpec, want: TaskSpec) -> None:
    assert set(got.sites) == set(want.sites)
    for site, pet in want.sites.items():
        other = got.sites[site]
        assert other.kinds() == pet.kinds(), site
        if pet.lora is not None:
            assert other.lora is not None and other.lora.scale == pet.lora.scale, site
            assert _same(other.lora.a, pet.lora.a) and _same(other.lora.b, pet.lora.b), site
        if pet.bias is not None:
            assert other.bias is not None and _same(other.bias, pet.bias), site
        if pet.layer_norm is not None:
            assert other.layer_norm is not None, site
            assert _same(other.layer_norm.weight, pet.layer_norm.weight), site
            assert _same(other.layer_norm.bias, pet.layer_norm.bias), site
    assert (got.head is None) == (want.head is None)
    if want.head is not None:
        assert got.head is not None and got.head.labels == want.head.labels
        assert _same(got.head.weight, want.head.weight) and _same(got.head.bias, want.head.bias)


# --- 1. good sources ----------------------------------------------------------------------------------------


def test_peft_lora_headless(small_base: Path, sources: Sources, tmp_path: Path) -> None:
    src = make_peft_lora(small_base, tmp_path / "headless", r=4, alpha=8, targets=["query", "value"])
    spec = load_task_source("headless", src, sources.base)
    saved = load_file(src / "adapter_model.safetensors")
    assert spec.name == "headless" and spec.head is None
    assert set(spec.sites) == QV_SITES
    for site, pet in spec.sites.items():
        assert pet.kinds() == ["lora"] and pet.lora is not None
        assert pet.lora.rank == 4 and pet.lora.scale == 8 / 4
        assert _same(pet.lora.a, saved[f"base_model.model.{site}.lora_A.weight"])
        assert _same(pet.lora.b, saved[f"base_model.model.{site}.lora_B.weight"])
        assert bool(pet.lora.b.any()), "lora_B is random in the fixture; zeros mean it was not read"


def test_peft_lora_seq_cls_with_head(sources: Sources) -> None:
    spec = load_task_source("lora3", sources.peft, sources.base)
    saved = load_file(sources.peft / "adapter_model.safetensors")
    assert spec.kinds() == ["lora", "head"]
    assert set(spec.sites) == QV_SITES
    assert {(p.lora.rank, p.lora.scale) for p in spec.sites.values() if p.lora is not None} == {(4, 2.0)}
    for site, pet in spec.sites.items():
        assert pet.lora is not None and _same(pet.lora.a, saved[f"{PEFT}{site}.lora_A.weight"])
    assert spec.head is not None and spec.head.num_labels == 3
    assert spec.head.labels == ("LABEL_0", "LABEL_1", "LABEL_2")
    assert _same(spec.head.weight, saved["base_model.model.classifier.weight"])
    assert _same(spec.head.bias, saved["base_model.model.classifier.bias"])


@pytest.mark.parametrize("num_labels", [None, 2], ids=["headless", "seq_cls"])
def test_peft_rank_and_alpha_patterns(
    small_base: Path, sources: Sources, tmp_path: Path, num_labels: int | None
) -> None:
    # peft matches pattern keys against the module path inside the model it wrapped: `bert.encoder...` for SEQ_CLS.
    prefix = "" if num_labels is None else "bert."
    src = make_peft_lora(
        small_base,
        tmp_path / "patterns",
        r=4,
        alpha=8,
        targets=["query", "value"],
        num_labels=num_labels,
        rank_pattern={"value": 2, f"{prefix}encoder.layer.1.attention.self.query": 6},
        alpha_pattern={f"{prefix}encoder.layer.2.attention.self.value": 5, "query": 3},
    )
    spec = load_task_source("patterns", src, sources.base)
    want = {
        "encoder.layer.0.attention.self.query": (4, 3 / 4),
        "encoder.layer.1.attention.self.query": (6, 3 / 6),
        "encoder.layer.2.attention.self.query": (4, 3 / 4),
        "encoder.layer.0.attention.self.value": (2, 8 / 2),
        "encoder.layer.1.attention.self.value": (2, 8 / 2),
        "encoder.layer.2.attention.self.value": (2, 5 / 2),
    }
    got = {s: (p.lora.rank, p.lora.scale) for s, p in spec.sites.items() if p.lora is not None}
    assert got == want


def test_peft_rslora_scale(small_base: Path, sources: Sources, tmp_path: Path) -> None:
    src = make_peft_lora(small_base, tmp_path / "rslora", r=4, alpha=6, targets=["key"], rslora=True)
    spec = load_task_source("rslora", src, sources.base)
    keys = {f"encoder.layer.{i}.attention.self.key" for i in range(LAYERS)}
    assert set(spec.sites) == keys
    for pet in spec.sites.values():
        assert pet.lora is not None and pet.lora.rank == 4
        assert pet.lora.scale == 6 / math.sqrt(4) and pet.lora.scale != 6 / 4


def test_peft_bias_all_gives_bias_and_layer_norm_deltas(sources: Sources) -> None:
    base = sources.base
    spec = load_task_source("bias_all", sources.peft_all, base)
    saved = load_file(sources.peft_all / "adapter_model.safetensors")
    assert spec.kinds() == ["lora", "bias", "layer_norm", "head"]
    lora_sites = {s for s in base.sites.linear if s.endswith(("query", "dense"))}  # pooler.dense included
    assert {s for s, p in spec.sites.items() if p.lora is not None} == lora_sites
    assert all(p.lora.scale == 6 / 2 for p in spec.sites.values() if p.lora is not None)
    # every bias was trainable: a LoRA-wrapped linear's bias is saved as `<site>.base_layer.bias`
    assert {s for s, p in spec.sites.items() if p.bias is not None} == set(base.sites.linear)
    for site in base.sites.linear:
        pet = spec.sites[site]
        key = f"{PEFT}{site}.base_layer.bias" if site in lora_sites else f"{PEFT}{site}.bias"
        assert pet.bias is not None and _same(pet.bias, saved[key] - base.state_dict[f"{site}.bias"]), site
        assert bool(pet.bias.any()), site
    assert {s for s, p in spec.sites.items() if p.layer_norm is not None} == set(base.sites.layer_norm)
    for site in base.sites.layer_norm:
        ln = spec.sites[site].layer_norm
        assert ln is not None and not bool(ln.weight.any()), "peft trains no LayerNorm weight"
        assert _same(ln.bias, saved[f"{PEFT}{site}.bias"] - base.state_dict[f"{site}.bias"]), site
    # the head is the trained copy, not peft's saved `original_module`
    assert spec.head is not None and spec.head.num_labels == 2
    assert _same(spec.head.bias, saved["base_model.model.classifier.bias"])
    assert not torch.equal(spec.head.bias, saved["base_model.model.classifier.original_module.bias"])


def test_peft_bias_lora_only(small_base: Path, sources: Sources, tmp_path: Path) -> None:
    base = sources.base
    src = make_peft_lora(small_base, tmp_path / "lora_only", r=2, alpha=4, targets=["query", "value"], bias="lora_only")
    spec = load_task_source("lora_only", src, base)
    saved = load_file(src / "adapter_model.safetensors")
    assert spec.kinds() == ["lora", "bias"] and spec.head is None
    assert set(spec.sites) == QV_SITES
    for site, pet in spec.sites.items():
        assert pet.kinds() == ["lora", "bias"] and pet.bias is not None
        want = saved[f"base_model.model.{site}.base_layer.bias"] - base.state_dict[f"{site}.bias"]
        assert _same(pet.bias, want) and bool(pet.bias.any()), site


@pytest.mark.parametrize("num_labels", [None, 2], ids=["headless", "with_head"])
def test_bitfit_finetune(small_base: Path, sources: Sources, tmp_path: Path, num_labels: int | None) -> None:
    base = sources.base
    src = sources.finetune if num_labels else make_bitfit(small_base, tmp_path / "bitfit", num_labels=None, seed=4)
    spec = load_task_source("bitfit", src, base)
    saved = {k.removeprefix("bert."): v for k, v in load_file(src / "model.safetensors").items()}
    assert spec.source == f"finetune:{src}"
    assert all(p.lora is None for p in spec.sites.values())
    assert {s for s, p in spec.sites.items() if p.bias is not None} == set(base.sites.linear)
    assert {s for s, p in spec.sites.items() if p.layer_norm is not None} == set(base.sites.layer_norm)
    for site in base.sites.linear:
        delta = spec.sites[site].bias
        assert delta is not None and _same(delta, saved[f"{site}.bias"] - base.state_dict[f"{site}.bias"]), site
    for site in base.sites.layer_norm:
        ln = spec.sites[site].layer_norm
        assert ln is not None
        assert _same(ln.weight, saved[f"{site}.weight"] - base.state_dict[f"{site}.weight"]), site
        assert _same(ln.bias, saved[f"{site}.bias"] - base.state_dict[f"{site}.bias"]), site
    if num_labels is None:
        assert spec.head is None and spec.kinds() == ["bias", "layer_norm"]
    else:
        assert spec.head is not None and spec.head.labels == ("LABEL_0", "LABEL_1")
        assert _same(spec.head.weight, saved["classifier.weight"]) and _same(spec.head.bias, saved["classifier.bias"])


def test_base_dir_is_a_task_without_pet(small_base: Path, sources: Sources) -> None:
    spec = load_task_source("plain", small_base, sources.base)
    assert spec.sites == {}
    assert spec.head is None
    assert spec.kinds() == []


@pytest.mark.parametrize("which", ["peft_all", "finetune"])
def test_native_round_trip_is_bitwise(sources: Sources, tmp_path: Path, which: str) -> None:
    src = sources.peft_all if which == "peft_all" else sources.finetune
    spec = load_task_source("orig", src, sources.base)
    write_task(spec, tmp_path / "native", sources.base.fingerprint)
    back = load_task_source("back", tmp_path / "native", sources.base)
    assert back.name == "back" and back.source == f"native:{tmp_path / 'native'}"
    assert spec.sites, "the source must carry PET for the round trip to mean anything"
    _assert_specs_equal(back, spec)
    meta = json.loads((tmp_path / "native" / "task.json").read_text())
    assert meta["base_fingerprint"] == sources.base.fingerprint
    for site, pet in spec.sites.items():
        if pet.lora is not None:
            assert meta["sites"][site]["lora"] == {"rank": pet.lora.rank, "scale": pet.lora.scale}


# --- 2./3. bad sources: one table of cases, checked on load_task_source and on a live runtime ---------------


@dataclass(frozen=True)
class Bad:
    path: Path
    fragments: tuple[str, ...]


Maker = Callable[[Sources, Path], Bad]
CASES: dict[str, tuple[Maker, type[TaskSourceError]]] = {}


def case(case_id: str, error: type[TaskSourceError] = TaskSourceError) -> Callable[[Maker], Maker]:
    def register(fn: Maker) -> Maker:
        assert case_id not in CASES
        CASES[case_id] = (fn, error)
        return fn

    return register


def _generic(fmt: str) -> None:
    """The faults every source format must refuse."""
    meta, weights = FORMATS[fmt]

    @case(f"{fmt}-missing")
    def missing(s: Sources, tmp: Path) -> Bad:
        return Bad(tmp / "no_such_task", ("does not exist", str(tmp / "no_such_task")))

    @case(f"{fmt}-not-a-directory")
    def not_a_directory(s: Sources, tmp: Path) -> Bad:
        path = _copy(s.of(fmt), tmp) / weights
        return Bad(path, ("is not a directory", str(path)))

    @case(f"{fmt}-no-recognised-files")
    def no_recognised_files(s: Sources, tmp: Path) -> Bad:
        d = _copy(s.of(fmt), tmp)
        (d / meta).unlink()
        return Bad(d, ("is not a task source", str(d)))

    @case(f"{fmt}-meta-not-json")
    def meta_not_json(s: Sources, tmp: Path) -> Bad:
        d = _copy(s.of(fmt), tmp)
        (d / meta).write_text('{"r": 4,')
        return Bad(d, (str(d / meta),))

    @case(f"{fmt}-meta-not-object")
    def meta_not_object(s: Sources, tmp: Path) -> Bad:
        d = _copy(s.of(fmt), tmp)
        (d / meta).write_text("[1, 2, 3]")
        what = {"peft": "not a JSON object", "finetune": "expected an object", "native": "not a pets-task file"}
        return Bad(d, (str(d / meta), what[fmt]))

    @case(f"{fmt}-weights-missing")
    def weights_missing(s: Sources, tmp: Path) -> Bad:
        d = _copy(s.of(fmt), tmp)
        (d / weights).unlink()
        return Bad(d, (str(d), weights))

    @case(f"{fmt}-nan", CheckpointFormatError)
    def nan(s: Sources, tmp: Path) -> Bad:
        d = _copy(s.of(fmt), tmp)
        key = {"peft": f"{PEFT}{Q0}.lora_A.weight", "finetune": f"bert.{Q0}.bias", "native": f"{Q0}.lora_A"}[fmt]
        _edit_tensors(d / weights, _set_first(key, float("nan")))
        return Bad(d, (f"{key!r}", "(1 NaN, 0 Inf)", str(d / weights)))

    @case(f"{fmt}-inf", CheckpointFormatError)
    def inf(s: Sources, tmp: Path) -> Bad:
        d = _copy(s.of(fmt), tmp)
        key = {
            "peft": f"{PEFT}{Q0}.lora_B.weight",
            "finetune": "bert.encoder.layer.0.output.LayerNorm.weight",
            "native": f"{Q0}.lora_B",
        }[fmt]
        _edit_tensors(d / weights, _set_first(key, float("-inf")))
        return Bad(d, (f"{key!r}", "(0 NaN, 1 Inf)"))

    # RELIABILITY 13 inside a task dir
    @case(f"{fmt}-truncated", CheckpointFormatError)
    def truncated(s: Sources, tmp: Path) -> Bad:
        d = _copy(s.of(fmt), tmp)
        data = (d / weights).read_bytes()
        (d / weights).write_bytes(data[: len(data) // 2])
        return Bad(d, ("truncated", str(d / weights)))

    @case(f"{fmt}-header-past-end", CheckpointFormatError)
    def header_past_end(s: Sources, tmp: Path) -> Bad:
        d = _copy(s.of(fmt), tmp)
        (d / weights).write_bytes((d / weights).read_bytes()[:40])
        return Bad(d, ("header length", "runs past the end of the file (40 bytes)", str(d / weights)))


for _fmt in FORMATS:
    _generic(_fmt)


# peft adapter dirs


def _peft_add(d: Path, module: str) -> None:
    """Add a LoRA pair for `module` (a path without the `bert.` prefix) to the adapter's safetensors."""

    def edit(t: dict[str, Tensor]) -> None:
        t[f"{PEFT}{module}.lora_A.weight"] = torch.randn(4, 72)
        t[f"{PEFT}{module}.lora_B.weight"] = torch.randn(72, 4)

    _edit_tensors(d / "adapter_model.safetensors", edit)


@case("peft-rank-mismatch")
def _peft_rank_mismatch(s: Sources, tmp: Path) -> Bad:
    d = _copy(s.peft, tmp)
    _edit_json(d / "adapter_config.json", lambda c: c.update(r=8))
    return Bad(d, (Q0, "rank mismatch", "r=8", "lora_A is (4, 72)"))


@case("peft-hidden-size-of-another-model")
def _peft_other_model(s: Sources, tmp: Path) -> Bad:
    return Bad(s.other_peft, (Q0, "do not fit the base linear", "(2, 96)", "(out 72, in 72)"))


@case("peft-head-of-another-model")
def _peft_other_head(s: Sources, tmp: Path) -> Bad:
    d = _copy(s.peft, tmp)
    _edit_tensors(
        d / "adapter_model.safetensors", lambda t: t.update({"base_model.model.classifier.weight": torch.zeros(3, 384)})
    )
    return Bad(d, ("head 'classifier'", "(3, 384)", "hidden size 72"))


@case("peft-target-layer-not-in-model")
def _peft_layer7(s: Sources, tmp: Path) -> Bad:
    d = _copy(s.peft, tmp)
    _peft_add(d, "encoder.layer.7.attention.self.query")
    return Bad(d, ("'encoder.layer.7.attention.self.query'", "not a linear layer"))


@case("peft-target-headless-layer-not-in-model")
def _peft_layer7_headless(s: Sources, tmp: Path) -> Bad:
    """The exact key of a headless adapter for a 4th+ layer, in a file of its own."""
    d = _copy(s.peft, tmp)
    key = "base_model.model.encoder.layer.7.attention.self.query"
    tensors = {f"{key}.lora_A.weight": torch.randn(4, 72), f"{key}.lora_B.weight": torch.randn(72, 4)}
    save_file(tensors, d / "adapter_model.safetensors")
    return Bad(d, ("'encoder.layer.7.attention.self.query'", "not a linear layer"))


@case("peft-target-layer-norm")
def _peft_layer_norm(s: Sources, tmp: Path) -> Bad:
    d = _copy(s.peft, tmp)
    _peft_add(d, "encoder.layer.0.output.LayerNorm")
    return Bad(d, ("'encoder.layer.0.output.LayerNorm'", "not a linear layer"))


@case("peft-target-embedding")
def _peft_embedding(s: Sources, tmp: Path) -> Bad:
    d = _copy(s.peft, tmp)
    _peft_add(d, "embeddings.word_embeddings")
    return Bad(d, ("'embeddings.word_embeddings'", "not a linear layer"))


@case("peft-only-lora-A")
def _peft_only_a(s: Sources, tmp: Path) -> Bad:
    d = _copy(s.peft, tmp)
    _edit_tensors(d / "adapter_model.safetensors", lambda t: t.pop(f"{PEFT}{Q0}.lora_B.weight"))
    return Bad(d, (Q0, "only one of lora_A / lora_B"))


@case("peft-foreign-key")
def _peft_foreign_key(s: Sources, tmp: Path) -> Bad:
    d = _copy(s.peft, tmp)
    _edit_tensors(d / "adapter_model.safetensors", lambda t: t.update({"encoder.extra": torch.zeros(2)}))
    return Bad(d, ("'encoder.extra'", "does not start with 'base_model.model.'"))


def _peft_option(case_id: str, fragment: str, **changes: Any) -> None:
    @case(case_id)
    def make(s: Sources, tmp: Path) -> Bad:
        d = _copy(s.peft, tmp)
        _edit_json(d / "adapter_config.json", lambda c: c.update(changes))
        return Bad(d, (fragment, str(d)))


_peft_option("peft-type-loha", "peft_type 'LOHA'", peft_type="LOHA")
_peft_option("peft-type-prefix-tuning", "peft_type 'PREFIX_TUNING'", peft_type="PREFIX_TUNING")
_peft_option("peft-use-dora", "use_dora=True", use_dora=True)
_peft_option("peft-fan-in-fan-out", "fan_in_fan_out=True", fan_in_fan_out=True)
_peft_option("peft-lora-bias", "lora_bias=True", lora_bias=True)
_peft_option("peft-zero-r", "r=0", r=0)


# full fine-tunes


@case("finetune-weight-changed")
def _ft_weight_changed(s: Sources, tmp: Path) -> Bad:
    d = _copy(s.finetune, tmp)
    key = "bert.encoder.layer.1.attention.self.key.weight"
    _edit_tensors(d / "model.safetensors", lambda t: t[key][:9].add_(0.01))  # 9 of 72 rows: 12.5%
    return Bad(d, ("encoder.layer.1.attention.self.key.weight changed in 12.5% of its entries", "not a PET task"))


@case("finetune-hidden-size-of-another-model")
def _ft_other_model(s: Sources, tmp: Path) -> Bad:
    return Bad(s.other_base, ("hidden_size is 96", "the base has 72", str(s.other_base)))


@case("finetune-config-of-another-size")
def _ft_other_size(s: Sources, tmp: Path) -> Bad:
    d = _copy(s.finetune, tmp)
    _edit_json(d / "config.json", lambda c: c.update(hidden_size=96))
    return Bad(d, ("hidden_size is 96", "the base has 72"))


@case("finetune-missing-base-parameters")
def _ft_missing(s: Sources, tmp: Path) -> Bad:
    d = _copy(s.finetune, tmp)
    _edit_tensors(d / "model.safetensors", lambda t: t.pop("bert.encoder.layer.2.output.dense.weight"))
    return Bad(d, ("1 base parameters are missing", "encoder.layer.2.output.dense.weight"))


@case("finetune-model-type-not-bert")
def _ft_roberta(s: Sources, tmp: Path) -> Bad:
    d = _copy(s.finetune, tmp)
    _edit_json(d / "config.json", lambda c: c.update(model_type="roberta"))
    return Bad(d, ("model_type 'roberta'", "only 'bert'"))


@case("finetune-bias-shape")
def _ft_bias_shape(s: Sources, tmp: Path) -> Bad:
    d = _copy(s.finetune, tmp)
    _edit_tensors(d / "model.safetensors", lambda t: t.update({f"bert.{Q0}.bias": torch.zeros(71)}))
    return Bad(d, (f"{Q0}.bias has shape (71,)", "the base has (72,)"))


@case("finetune-target-not-in-model")
def _ft_extra(s: Sources, tmp: Path) -> Bad:
    d = _copy(s.finetune, tmp)
    key = "bert.encoder.layer.7.attention.self.query.bias"
    _edit_tensors(d / "model.safetensors", lambda t: t.update({key: torch.zeros(72)}))
    return Bad(d, ("parameters not in a BERT sequence classifier", "encoder.layer.7.attention.self.query.bias"))


# native task dirs


@case("native-wrong-fingerprint")
def _native_fingerprint(s: Sources, tmp: Path) -> Bad:
    d = _copy(s.native, tmp)
    _edit_json(d / "task.json", lambda m: m.update(base_fingerprint="0123456789abcdef"))
    return Bad(d, ("task was made for base '0123456789abcdef'", s.base.fingerprint))


@case("native-format-version")
def _native_version(s: Sources, tmp: Path) -> Bad:
    d = _copy(s.native, tmp)
    _edit_json(d / "task.json", lambda m: m.update(version=2))
    return Bad(d, ("format version 2", "this build reads 1"))


@case("native-tensor-missing")
def _native_missing_tensor(s: Sources, tmp: Path) -> Bad:
    d = _copy(s.native, tmp)
    _edit_tensors(d / "task.safetensors", lambda t: t.pop("head.weight"))
    return Bad(d, ("'head.weight' named by task.json is missing",))


@case("native-only-lora-A")
def _native_only_a(s: Sources, tmp: Path) -> Bad:
    d = _copy(s.native, tmp)
    _edit_tensors(d / "task.safetensors", lambda t: t.pop(f"{Q0}.lora_B"))
    return Bad(d, (f"'{Q0}.lora_B' named by task.json is missing",))


@case("native-extra-tensors")
def _native_extra(s: Sources, tmp: Path) -> Bad:
    d = _copy(s.native, tmp)
    _edit_tensors(d / "task.safetensors", lambda t: t.update({"extra.tensor": torch.zeros(3)}))
    return Bad(d, ("tensors not named by task.json", "'extra.tensor'"))


@case("native-rank-mismatch")
def _native_rank(s: Sources, tmp: Path) -> Bad:
    d = _copy(s.native, tmp)
    _edit_json(d / "task.json", lambda m: m["sites"][Q0]["lora"].update(rank=8))
    return Bad(d, (Q0, "rank mismatch", "rank 8", "lora_A is (2, 72)"))


@case("native-lora-B-rank")
def _native_b_rank(s: Sources, tmp: Path) -> Bad:
    d = _copy(s.native, tmp)
    _edit_tensors(d / "task.safetensors", lambda t: t.update({f"{Q0}.lora_B": torch.zeros(72, 3)}))
    return Bad(d, (Q0, "rank mismatch", "lora_B is (72, 3)"))


@case("native-hidden-size-of-another-model")
def _native_hidden(s: Sources, tmp: Path) -> Bad:
    d = _copy(s.native, tmp)
    _edit_tensors(d / "task.safetensors", lambda t: t.update({f"{Q0}.lora_A": torch.zeros(2, 384)}))
    return Bad(d, (f"{Q0} lora_A has shape (2, 384), expected (2, 72)",))


def _native_move(d: Path, old: str, new: str) -> None:
    _edit_json(d / "task.json", lambda m: m["sites"].update({new: m["sites"].pop(old)}))

    def edit(t: dict[str, Tensor]) -> None:
        for key in [k for k in t if k.startswith(old + ".")]:
            t[new + key[len(old) :]] = t.pop(key)

    _edit_tensors(d / "task.safetensors", edit)


@case("native-target-not-in-model")
def _native_layer7(s: Sources, tmp: Path) -> Bad:
    d = _copy(s.native, tmp)
    _native_move(d, Q0, "encoder.layer.7.attention.self.query")
    return Bad(d, ("'encoder.layer.7.attention.self.query' is not a linear layer",))


@case("native-lora-on-layer-norm")
def _native_layer_norm(s: Sources, tmp: Path) -> Bad:
    d = _copy(s.native, tmp)
    ln = "encoder.layer.0.output.LayerNorm"

    def meta(m: dict[str, Any]) -> None:
        m["sites"][ln]["lora"] = {"rank": 2, "scale": 1.0}

    _edit_json(d / "task.json", meta)
    _edit_tensors(
        d / "task.safetensors",
        lambda t: t.update({f"{ln}.lora_A": torch.zeros(2, 72), f"{ln}.lora_B": torch.zeros(72, 2)}),
    )
    return Bad(d, (f"'{ln}' is not a linear layer",))


CASE_IDS = sorted(CASES)


def _check(err: BaseException, bad: Bad) -> None:
    assert isinstance(err, TaskSourceError)
    for fragment in bad.fragments:
        assert fragment in str(err), f"{fragment!r} not in {str(err)!r}"


def test_case_table_covers_every_format() -> None:
    for fmt in FORMATS:
        assert len([c for c in CASES if c.startswith(fmt + "-")]) >= 12, fmt


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_bad_source_refused(sources: Sources, tmp_path: Path, case_id: str) -> None:
    make, error = CASES[case_id]
    bad = make(sources, tmp_path)
    with pytest.raises(error) as ei:
        load_task_source("bad", bad.path, sources.base)
    _check(ei.value, bad)


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_bad_source_leaves_live_runtime_unchanged(
    live: Runtime, sources: Sources, tmp_path: Path, case_id: str
) -> None:
    make, error = CASES[case_id]
    bad = make(sources, tmp_path)
    with unchanged(live), pytest.raises(error) as ei:
        live.add_task("newcomer", bad.path)
    _check(ei.value, bad)
    with pytest.raises(UnknownTaskError):
        live.task("newcomer")


def test_good_source_after_bad_ones_loads(live: Runtime, sources: Sources, tmp_path: Path) -> None:
    """Control: the live runtime does take a good task (so the refusals above are not a blanket refusal)."""
    live.add_task("late_lora", sources.peft_all)
    try:
        assert "late_lora" in live.task_names()
        ids, mask = pad([[5, 6, 7, 8, 9]] * 3)  # one row, three ways: the new task's PET must change it
        logits, embedding = live.forward(ids, mask, ["late_lora", "lora3", "bitfit2"])
        assert not torch.equal(embedding[0], embedding[1]) and not torch.equal(embedding[0], embedding[2])
        assert not torch.equal(logits[0, :2], logits[1, :2])
    finally:
        live.remove_task("late_lora")
    assert live.task_names() == ["bitfit2", "lora3"]


# --- 4. pickle checkpoints ----------------------------------------------------------------------------------


class _Evil:
    """Unpickling this creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


_PICKLE_FILES = {
    "peft": ("adapter_model.safetensors", "adapter_model.bin"),
    "finetune": ("model.safetensors", "pytorch_model.bin"),
}


@pytest.mark.parametrize("fmt", ["finetune", "peft"])
def test_weights_only_pickle_loads_like_safetensors(sources: Sources, tmp_path: Path, fmt: str) -> None:
    st_name, bin_name = _PICKLE_FILES[fmt]
    d = _copy(sources.of(fmt), tmp_path)
    torch.save(load_file(d / st_name), d / bin_name)  # a plain state dict, as torch.save(model.state_dict()) writes
    (d / st_name).unlink()
    from_bin = load_task_source("t", d, sources.base)
    from_st = load_task_source("t", sources.of(fmt), sources.base)
    assert from_st.sites and from_st.head is not None
    _assert_specs_equal(from_bin, from_st)


@pytest.mark.parametrize("via", ["load_task_source", "add_task"])
@pytest.mark.parametrize("fmt", ["finetune", "peft"])
def test_malicious_pickle_never_runs(live: Runtime, sources: Sources, tmp_path: Path, fmt: str, via: str) -> None:
    st_name, bin_name = _PICKLE_FILES[fmt]
    d = _copy(sources.of(fmt), tmp_path)
    marker = tmp_path / "pwned.txt"
    torch.save({**load_file(d / st_name), "evil": _Evil(marker)}, d / bin_name)
    (d / st_name).unlink()
    assert not marker.exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if via == "load_task_source":
            with pytest.raises(UnsafeCheckpointError) as ei:
                load_task_source("evil", d, sources.base)
        else:
            with unchanged(live), pytest.raises(UnsafeCheckpointError) as ei:
                live.add_task("evil", d)
    assert str(d / bin_name) in str(ei.value) and "weights_only=True" in str(ei.value)
    assert not marker.exists(), "the pickle's __reduce__ ran"


# --- 5. task names ------------------------------------------------------------------------------------------

BAD_NAMES = ["../x", "/etc/passwd", "a/b", "..", ".", "", " ", "a b", "\t", "n" * 200]


@pytest.mark.parametrize("name", BAD_NAMES, ids=[repr(n)[:12] for n in BAD_NAMES])
def test_bad_task_name_refused_before_any_file(live: Runtime, sources: Sources, tmp_path: Path, name: str) -> None:
    # A source that does not exist: a missing-file error would show the name was checked too late.
    missing = tmp_path / "does_not_exist"
    calls: list[Callable[[], object]] = [
        lambda: load_task_source(name, missing, sources.base),
        lambda: live.add_task(name, missing),
        lambda: pets_compiler.compile(sources.base, {name: missing}),
        lambda: load_task_source(name, sources.peft, sources.base),  # a good source does not make it legal
        lambda: live.add_task(name, sources.peft),
    ]
    with unchanged(live):
        for call in calls:
            with pytest.raises(TaskNameError) as ei:
                call()
            assert not isinstance(ei.value, TaskSourceError)
            assert f"invalid task name {name!r}" in str(ei.value)
    assert not missing.exists()


@pytest.mark.parametrize("name", ["task..1", "A-b_c.2"])
def test_legal_task_names(live: Runtime, live_used: Runtime, small_base: Path, sources: Sources, name: str) -> None:
    assert load_task_source(name, small_base, sources.base).name == name
    assert name in live_used.task_names()  # pets_compiler.compile took it
    live.add_task(name, sources.finetune)
    try:
        assert name in live.task_names() and live.task(name).name == name
        logits, embedding = batch_outputs(live, [name, "bitfit2"])
        assert logits.shape[0] == 2 and bool(torch.isfinite(embedding).all())
    finally:
        live.remove_task(name)
    assert name not in live.task_names()


# --- 6. registry errors on a live runtime (RELIABILITY 15) --------------------------------------------------


def test_duplicate_add_refused(live: Runtime, sources: Sources, tmp_path: Path) -> None:
    spec = live.task("lora3")
    for source in (sources.peft, sources.finetune, tmp_path / "does_not_exist", spec):
        with unchanged(live), pytest.raises(DuplicateTaskError) as ei:
            live.add_task("lora3", source)
        assert "'lora3'" in str(ei.value) and "already loaded" in str(ei.value)
    assert live.task("lora3") is spec


def test_remove_unknown_lists_loaded_tasks(live: Runtime) -> None:
    with unchanged(live), pytest.raises(UnknownTaskError) as ei:
        live.remove_task("nope")
    message = str(ei.value)
    assert "unknown task 'nope'" in message and "loaded tasks: bitfit2, lora3" in message


def test_site_not_served(live_used: Runtime, sources: Sources) -> None:
    assert live_used.info.plan.lora == ()  # compiled for a BitFit task: no LoRA site
    with unchanged(live_used), pytest.raises(SiteNotServedError) as ei:
        live_used.add_task("lora_new", sources.peft)
    assert "'lora_new'" in str(ei.value) and f"lora at {Q0}" in str(ei.value)
    # control: a task whose sites are all served is taken
    live_used.add_task("bitfit_again", sources.finetune)
    try:
        assert "bitfit_again" in live_used.task_names()
    finally:
        live_used.remove_task("bitfit_again")
