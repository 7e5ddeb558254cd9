"""The new task sources: AdapterHub adapter dirs (with heads), peft IA3, sparse fine-tunes (diff-pruning and MaskBERT)
and the native format for each of them.

Good sources must give exactly the TaskSpec their files describe; bad ones (RELIABILITY.md rows 11, 13, 14) are
refused with a typed error naming the offending thing, and a live runtime compiled with sites="all" keeps its task
set and a mixed batch's outputs bitwise unchanged when one of them is added. AdapterHub cases use the fixtures made
with the `adapters` library (tests/fixtures/adapterhub); everything else uses that same base.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor

import pets_compiler
from pets_compiler.errors import CheckpointFormatError, TaskSourceError, UnknownTaskError, UnsafeCheckpointError
from pets_compiler.frontend.base import BaseModel, load_base
from pets_compiler.frontend.native import read_task, write_task
from pets_compiler.frontend.sources import load_task_source
from pets_compiler.frontend.taskset import Adapter, TaskSpec
from pets_compiler.runtime.requests import pad
from pets_compiler.runtime.runtime import Runtime

from builders import make_peft_ia3, make_sparse_finetune
from source_edits import copy_source as _copy
from source_edits import edit_json as _edit_json
from source_edits import edit_tensors as _edit_tensors
from source_edits import unchanged

AH = Path(__file__).resolve().parents[1] / "fixtures" / "adapterhub" / "small"
AH_BASE = AH / "base"  # hidden 72, 3 layers, intermediate 200: the base the AdapterHub fixtures were made for
LAYERS, HIDDEN, INTER = 3, 72, 200
OUTPUTS = {f"encoder.layer.{i}.output" for i in range(LAYERS)}
ATT_OUTPUTS = {f"encoder.layer.{i}.attention.output" for i in range(LAYERS)}
EMBEDDINGS = {f"embeddings.{e}_embeddings" for e in ("word", "position", "token_type")}
INTER1 = "encoder.layer.1.intermediate.dense"  # a [200, 72] weight: out of range columns can hide below 200
PEFT = "base_model.model."  # key prefix of a headless peft adapter
PF = "encoder.layer.{}.output.adapters.pfeiffer."  # key prefix of the pfeiffer fixture's adapters
FLAGS = ("original_ln_before", "residual_before_ln", "original_ln_after")


# --- sources and the live runtime, built once per module ----------------------------------------------------


@dataclass(frozen=True)
class Sources:
    base: BaseModel
    ia3: Path  # peft IA3 on key, value and "output.dense" (feedforward "output.dense"), headless
    diff: Path  # diff-pruning fine-tune: 1% of every weight matrix and the output.dense biases, headless
    mask: Path  # MaskBERT fine-tune: 5% of every weight matrix zeroed, 2 labels
    native_diff: Path
    native_mask: Path
    native_houlsby: Path


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Sources:
    root = tmp_path_factory.mktemp("new_sources")
    base = load_base(AH_BASE)
    ia3 = make_peft_ia3(AH_BASE, root / "ia3", targets=["key", "value", "output.dense"], feedforward=["output.dense"])
    diff = make_sparse_finetune(AH_BASE, root / "diff", density=0.01, mask=False, seed=0)
    mask = make_sparse_finetune(AH_BASE, root / "mask", density=0.05, mask=True, num_labels=2, seed=0)
    natives = {}
    for name, src in (("native_diff", diff), ("native_mask", mask), ("native_houlsby", AH / "houlsby")):
        write_task(load_task_source(name, src, base), root / name, base.fingerprint)
        natives[name] = root / name
    return Sources(base, ia3, diff, mask, **natives)


@pytest.fixture(scope="module")
def rt_all(sources: Sources) -> Runtime:
    """Every site served; holds the base as a task, two adapters (one with a two-layer head), IA3 and a mask."""
    tasks = {
        "plain": AH_BASE,
        "pfeiffer": AH / "pfeiffer",
        "houlsby": AH / "houlsby",
        "ia3": sources.ia3,
        "mask": sources.mask,
    }
    return pets_compiler.compile(sources.base, tasks, sites="all")


@pytest.fixture
def live(rt_all: Runtime) -> Iterator[Runtime]:
    """The shared runtime; afterwards any task a (failing) test left in it is removed, so failures stay local."""
    names = set(rt_all.task_names())
    yield rt_all
    for name in set(rt_all.task_names()) - names:
        rt_all.remove_task(name)


# --- helpers ------------------------------------------------------------------------------------------------


def _bits(t: Tensor) -> Tensor:
    return t.detach().contiguous().view(torch.uint8)


def _same(a: Tensor | None, b: Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _assert_adapter_is(a: Adapter | None, saved: dict[str, Tensor], prefix: str) -> None:
    """The adapter holds exactly the saved `adapter_down.0` / `adapter_up` tensors under `prefix`."""
    assert a is not None, prefix
    assert _same(a.down_w, saved[prefix + "adapter_down.0.weight"]), prefix
    assert _same(a.down_b, saved[prefix + "adapter_down.0.bias"]), prefix
    assert _same(a.up_w, saved[prefix + "adapter_up.weight"]), prefix
    assert _same(a.up_b, saved[prefix + "adapter_up.bias"]), prefix
    assert bool(a.up_w.any()), "the fixtures' adapter_up is random; zeros mean it was not read"


def _assert_specs_equal(got: TaskSpec, want: TaskSpec) -> None:
    """Same sites, kinds, flags, scales and bitwise-equal tensors (new kinds and heads included)."""
    assert set(got.sites) == set(want.sites)
    for site, pet in want.sites.items():
        other = got.sites[site]
        assert other.kinds() == pet.kinds(), site
        assert _same(other.bias, pet.bias), site
        if pet.ia3 is not None:
            assert other.ia3 is not None
            assert _same(other.ia3.input, pet.ia3.input) and _same(other.ia3.output, pet.ia3.output), site
        if pet.sparse is not None:
            d, e = other.sparse, pet.sparse
            assert d is not None and (d.kind, d.shape) == (e.kind, e.shape), site
            assert _same(d.index, e.index) and _same(d.values, e.values), site
        if pet.adapter is not None:
            a, b = other.adapter, pet.adapter
            assert a is not None, site
            for part in ("down_w", "down_b", "up_w", "up_b"):
                assert _same(getattr(a, part), getattr(b, part)), (site, part)
            for attr in ("scaling", "activation", *FLAGS):
                assert getattr(a, attr) == getattr(b, attr), (site, attr)
    assert (got.head is None) == (want.head is None)
    if want.head is not None:
        h, w = got.head, want.head
        assert h is not None and (h.labels, h.use_cls) == (w.labels, w.use_cls)
        assert _same(h.weight, w.weight) and _same(h.bias, w.bias)
        assert _same(h.dense_w, w.dense_w) and _same(h.dense_b, w.dense_b)


# --- 1. good sources: AdapterHub ----------------------------------------------------------------------------


def test_adapterhub_pfeiffer(sources: Sources) -> None:
    spec = load_task_source("pf", AH / "pfeiffer", sources.base)
    saved = load_file(AH / "pfeiffer" / "adapter.safetensors")
    assert spec.source == f"adapterhub:{AH / 'pfeiffer'}"
    assert spec.kinds() == ["adapter"] and spec.head is None
    assert set(spec.sites) == OUTPUTS  # seq_bn: output sublayers only
    for i in range(LAYERS):
        a = spec.sites[f"encoder.layer.{i}.output"].adapter
        _assert_adapter_is(a, saved, PF.format(i))
        assert a is not None and a.bottleneck == HIDDEN // 8 == 9
        assert (a.original_ln_before, a.residual_before_ln, a.original_ln_after) == (True, True, True)
        assert (a.activation, a.scaling) == ("relu", 1.0)


def test_adapterhub_houlsby_with_head(sources: Sources) -> None:
    spec = load_task_source("hb", AH / "houlsby", sources.base)
    saved = load_file(AH / "houlsby" / "adapter.safetensors")  # saved from BertAdapterModel: keys carry `bert.`
    head_saved = load_file(AH / "houlsby" / "model_head.safetensors")
    assert spec.kinds() == ["adapter", "head"]
    assert set(spec.sites) == OUTPUTS | ATT_OUTPUTS  # double_seq_bn: both sublayers of every layer
    for site, pet in spec.sites.items():
        a = pet.adapter
        _assert_adapter_is(a, saved, f"bert.{site}.adapters.houlsby.")
        assert a is not None and a.bottleneck == HIDDEN // 6 == 12
        assert (a.original_ln_before, a.residual_before_ln, a.original_ln_after) == (False, True, True)
        assert (a.activation, a.scaling) == ("swish", 1.0)
    head = spec.head
    assert head is not None and head.num_labels == 3 and head.labels == ("LABEL_0", "LABEL_1", "LABEL_2")
    assert head.use_cls, "use_pooler=False: AdapterHub heads read the [CLS] hidden state, not BERT's pooler"
    assert head.dense_w is not None and tuple(head.dense_w.shape) == (HIDDEN, HIDDEN)
    assert _same(head.dense_w, head_saved["heads.houlsby.1.weight"])
    assert _same(head.dense_b, head_saved["heads.houlsby.1.bias"])
    assert _same(head.weight, head_saved["heads.houlsby.4.weight"])
    assert _same(head.bias, head_saved["heads.houlsby.4.bias"])


def test_adapterhub_bin_equals_safetensors(sources: Sources) -> None:
    assert not (AH / "houlsby_bin" / "adapter.safetensors").exists()
    assert (AH / "houlsby_bin" / "pytorch_adapter.bin").is_file()
    from_bin = load_task_source("hb", AH / "houlsby_bin", sources.base)
    from_st = load_task_source("hb", AH / "houlsby", sources.base)
    assert from_st.sites and from_st.head is not None and from_st.head.dense_w is not None
    _assert_specs_equal(from_bin, from_st)


def test_adapterhub_per_layer_bottlenecks(sources: Sources) -> None:
    src = AH / "pfeiffer_gelu"
    rf = json.loads((src / "adapter_config.json").read_text())["config"]["reduction_factor"]
    want = {f"encoder.layer.{i}.output": HIDDEN // rf.get(str(i), rf["default"]) for i in range(LAYERS)}
    assert list(want.values()) == [18, 36, 18]  # the fixture's {"default": 4, "1": 2}
    spec = load_task_source("gelu", src, sources.base)
    saved = torch.load(src / "pytorch_adapter.bin", weights_only=True)
    got = {site: pet.adapter.bottleneck for site, pet in spec.sites.items() if pet.adapter is not None}
    assert got == want
    for i in range(LAYERS):
        a = spec.sites[f"encoder.layer.{i}.output"].adapter
        _assert_adapter_is(a, saved, f"encoder.layer.{i}.output.adapters.pfeiffer_gelu.")
        assert a is not None and a.activation == "gelu", "a versioned file's gelu is the exact gelu"
        assert (a.original_ln_before, a.residual_before_ln, a.original_ln_after) == (True, True, True)


def test_adapterhub_legacy_gelu_is_tanh_gelu(sources: Sources, tmp_path: Path) -> None:
    d = _copy(AH / "pfeiffer_gelu", tmp_path)
    _edit_json(d / "adapter_config.json", lambda m: m.pop("version"))  # adapter-transformers wrote no version
    spec = load_task_source("legacy", d, sources.base)
    assert {p.adapter.activation for p in spec.sites.values() if p.adapter is not None} == {"gelu_new"}


# --- 1. good sources: peft IA3 and fine-tunes ---------------------------------------------------------------


def test_peft_ia3(sources: Sources) -> None:
    base = sources.base
    spec = load_task_source("ia3", sources.ia3, base)
    saved = load_file(sources.ia3 / "adapter_model.safetensors")
    # peft matches target and feedforward names as suffixes: "output.dense" is attention.output.dense too
    feedforward = {f"encoder.layer.{i}.{m}" for i in range(LAYERS) for m in ("attention.output.dense", "output.dense")}
    scaled_out = {f"encoder.layer.{i}.attention.self.{m}" for i in range(LAYERS) for m in ("key", "value")}
    assert spec.kinds() == ["ia3"] and spec.head is None
    assert set(spec.sites) == feedforward | scaled_out
    for site, pet in spec.sites.items():
        vector = saved[f"{PEFT}{site}.ia3_l"]
        out_f, in_f = base.sites.linear[site]
        assert pet.kinds() == ["ia3"] and pet.ia3 is not None, site
        assert not bool((vector == 1).all()), "the fixture's scales are random; ones mean nothing was trained"
        if site in feedforward:
            assert tuple(vector.shape) == (1, in_f) and pet.ia3.output is None, site
            assert _same(pet.ia3.input, vector.reshape(in_f)), site
        else:
            assert tuple(vector.shape) == (out_f, 1) and pet.ia3.input is None, site
            assert _same(pet.ia3.output, vector.reshape(out_f)), site
    first_ffn = spec.sites["encoder.layer.0.output.dense"].ia3
    assert first_ffn is not None and first_ffn.input is not None and tuple(first_ffn.input.shape) == (INTER,)


def _weights(path: Path) -> dict[str, Tensor]:
    return {k.removeprefix("bert."): v for k, v in load_file(path / "model.safetensors").items()}


def test_finetune_diff(sources: Sources) -> None:
    base = sources.base
    spec = load_task_source("diff", sources.diff, base)
    tuned = _weights(sources.diff)
    weight_sites = set(base.sites.linear) | set(base.sites.embedding)
    assert spec.source == f"finetune:{sources.diff}" and spec.head is None
    assert spec.kinds() == ["bias", "diff"]
    assert {s for s, p in spec.sites.items() if p.sparse is not None} == weight_sites
    assert weight_sites >= EMBEDDINGS
    for site in weight_sites:
        delta, ref, new = spec.sites[site].sparse, base.state_dict[f"{site}.weight"], tuned[f"{site}.weight"]
        changed = new != ref
        assert delta is not None and delta.kind == "diff" and delta.shape == tuple(ref.shape), site
        assert 0 < delta.nnz == int(changed.sum()), site
        assert delta.density <= 0.015, (site, delta.density)
        assert torch.equal(delta.index, changed.nonzero().t()), site  # exactly the changed positions, row-major
        assert _same(delta.values, new[changed] - ref[changed]), site
        torch.testing.assert_close(ref + delta.dense(), new, rtol=0, atol=1e-6)
    biases = {f"encoder.layer.{i}.{m}" for i in range(LAYERS) for m in ("attention.output.dense", "output.dense")}
    assert {s for s, p in spec.sites.items() if p.bias is not None} == biases
    for site in biases:
        want = tuned[f"{site}.bias"] - base.state_dict[f"{site}.bias"]
        assert _same(spec.sites[site].bias, want) and bool(want.any()), site


def test_finetune_mask(sources: Sources) -> None:
    base = sources.base
    spec = load_task_source("mask", sources.mask, base)
    tuned = _weights(sources.mask)
    weight_sites = set(base.sites.linear) | set(base.sites.embedding)
    assert spec.kinds() == ["mask", "head"]
    assert set(spec.sites) == weight_sites and weight_sites >= EMBEDDINGS
    for site in weight_sites:
        delta, ref, new = spec.sites[site].sparse, base.state_dict[f"{site}.weight"], tuned[f"{site}.weight"]
        assert delta is not None and delta.kind == "mask", site
        rows, cols = delta.index
        assert torch.equal(delta.index, (new != ref).nonzero().t()), site
        assert not bool(new[rows, cols].any()), "a mask position is one the fine-tune zeroed"
        assert _same(delta.values, -ref[rows, cols]) and bool(delta.values.any()), site
        assert torch.equal(ref + delta.dense(), new), site  # W + D = W * M exactly
        assert 0.02 < delta.density < 0.1, (site, delta.density)
    assert spec.head is not None and spec.head.labels == ("LABEL_0", "LABEL_1")
    assert _same(spec.head.weight, tuned["classifier.weight"]) and _same(spec.head.bias, tuned["classifier.bias"])


def test_finetune_max_density(sources: Sources) -> None:
    """The threshold is per weight matrix: the densest one decides, and the refusal names it with its density."""
    base = sources.base
    tuned = _weights(sources.mask)
    density = {
        f"{site}.weight": float((tuned[f"{site}.weight"] != base.state_dict[f"{site}.weight"]).float().mean())
        for site in [*base.sites.linear, *base.sites.embedding]
    }
    assert all(d > 0.02 for d in density.values())
    with pytest.raises(TaskSourceError) as ei:
        load_task_source("mask", sources.mask, base, max_density=0.02)
    message = str(ei.value)
    assert "more than the 2%" in message and "not a PET task" in message and str(sources.mask) in message
    assert any(f"{name} changed in {d:.1%} of its entries" in message for name, d in density.items()), message
    # just below the densest weight: only that one is refused
    densest, top = max(density.items(), key=lambda kv: kv[1])
    with pytest.raises(TaskSourceError) as ei:
        load_task_source("mask", sources.mask, base, max_density=top - 1e-4)
    assert f"{densest} changed in {top:.1%}" in str(ei.value)
    assert load_task_source("mask", sources.mask, base, max_density=top).kinds() == ["mask", "head"]
    assert load_task_source("mask", sources.mask, base).kinds() == ["mask", "head"]  # the default 10%


# --- 1. native round trip for every new kind ----------------------------------------------------------------

ROUND_TRIP = ["pfeiffer", "houlsby", "pfeiffer_gelu", "ia3", "diff", "mask"]


def _source(sources: Sources, which: str) -> Path:
    return {"ia3": sources.ia3, "diff": sources.diff, "mask": sources.mask}.get(which, AH / which)


@pytest.mark.parametrize("which", ROUND_TRIP)
def test_native_round_trip_is_bitwise(sources: Sources, tmp_path: Path, which: str) -> None:
    base = sources.base
    spec = load_task_source("orig", _source(sources, which), base)
    assert spec.sites, "the source must carry PET for the round trip to mean anything"
    write_task(spec, tmp_path / "native", base.fingerprint)
    back = load_task_source("back", tmp_path / "native", base)
    assert back.name == "back" and back.source == f"native:{tmp_path / 'native'}"
    assert back.kinds() == spec.kinds()
    _assert_specs_equal(back, spec)
    meta = json.loads((tmp_path / "native" / "task.json").read_text())
    stored = load_file(tmp_path / "native" / "task.safetensors")
    for site, pet in spec.sites.items():
        entry = meta["sites"][site]
        if pet.adapter is not None:
            want = {"scaling": pet.adapter.scaling, "activation": pet.adapter.activation}
            assert entry["adapter"] == {**want, **{f: getattr(pet.adapter, f) for f in FLAGS}}
        if pet.ia3 is not None:
            assert entry["ia3"] == {"input": pet.ia3.input is not None, "output": pet.ia3.output is not None}
        if pet.sparse is not None:
            assert entry["sparse"] == {"kind": pet.sparse.kind, "shape": list(pet.sparse.shape), "nnz": pet.sparse.nnz}
    if which == "mask":  # positions only: the values are the base's
        sparse_keys = {k for k in stored if not k.startswith("head.")}
        assert sparse_keys == {f"{site}.mask_index" for site in spec.sites}
        assert all(stored[k].dtype == torch.int32 for k in sparse_keys)


def test_native_mask_values_come_from_the_base(sources: Sources) -> None:
    base = sources.base
    site = INTER1
    # the same fingerprint with other weights: a mask's values are read off whatever base it is loaded against
    other = {**base.state_dict, f"{site}.weight": base.state_dict[f"{site}.weight"] * 2}
    spec = read_task(sources.native_mask, "m", dataclasses.replace(base, state_dict=other))
    mask = spec.sites[site].sparse
    assert mask is not None and mask.kind == "mask"
    rows, cols = mask.index
    assert torch.equal(mask.values, -other[f"{site}.weight"][rows, cols])
    original = read_task(sources.native_mask, "m", base).sites[site].sparse
    assert original is not None and torch.equal(mask.values, 2 * original.values)
    # without a base there is nothing to read the values from
    with pytest.raises(TaskSourceError) as ei:
        read_task(sources.native_mask, "m")
    assert "holds a mask" in str(ei.value) and "values come from the base weight" in str(ei.value)
    assert read_task(sources.native_diff, "d").sites, "control: a diff task needs no base"


# --- 2. bad sources: one table of cases, checked on load_task_source and on a live runtime ------------------


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


# AdapterHub adapter dirs

AH_CONFIG = "adapter_config.json"
AH_WEIGHTS = "adapter.safetensors"


@case("adapterhub-use-gating")
def _ah_gating(s: Sources, tmp: Path) -> Bad:
    return Bad(AH / "unsupported_gating", ("use_gating=True", "not supported", str(AH / "unsupported_gating")))


@case("adapterhub-is-parallel")
def _ah_parallel(s: Sources, tmp: Path) -> Bad:
    return Bad(AH / "unsupported_parallel", ("is_parallel=True", "not supported"))


def _ah_option(case_id: str, fragment: str, **changes: Any) -> None:
    @case(case_id)
    def make(s: Sources, tmp: Path) -> Bad:
        d = _copy(AH / "pfeiffer", tmp)
        _edit_json(d / AH_CONFIG, lambda m: m["config"].update(changes))
        return Bad(d, (fragment, str(d)))


_ah_option("adapterhub-ln-before", "ln_before=True", ln_before=True)
_ah_option("adapterhub-residual-post-add", "residual_before_ln='post_add'", residual_before_ln="post_add")
_ah_option("adapterhub-scaling-learned", "scaling='learned'", scaling="learned")
_ah_option("adapterhub-architecture-lora", "architecture 'lora'", architecture="lora")
_ah_option("adapterhub-phm-layer", "phm_layer=True", phm_layer=True)


@case("adapterhub-config-not-json")
def _ah_not_json(s: Sources, tmp: Path) -> Bad:
    d = _copy(AH / "pfeiffer", tmp)
    (d / AH_CONFIG).write_text('{"config": {"mh_adapter": false,')
    return Bad(d, (str(d / AH_CONFIG), "cannot read"))


def _other_hidden(t: dict[str, Tensor]) -> None:
    """Every adapter tensor as it would be for hidden size 96 (bottleneck 9 kept)."""
    for key, value in t.items():
        t[key] = torch.randn([96 if n == HIDDEN else n for n in value.shape])


@case("adapterhub-weights-of-another-hidden-size")
def _ah_other_weights(s: Sources, tmp: Path) -> Bad:
    d = _copy(AH / "pfeiffer", tmp)
    _edit_tensors(d / AH_WEIGHTS, _other_hidden)
    return Bad(d, ("encoder.layer.0.output adapter down weight has shape (9, 96), expected (9, 72)",))


@case("adapterhub-adapter-of-another-model")
def _ah_other_model(s: Sources, tmp: Path) -> Bad:
    d = _copy(AH / "pfeiffer", tmp)
    _edit_tensors(d / AH_WEIGHTS, _other_hidden)
    _edit_json(d / AH_CONFIG, lambda m: m.update(hidden_size=96))
    return Bad(d, ("adapter hidden_size is 96", "the base has 72"))


@case("adapterhub-layer-not-in-base")
def _ah_layer9(s: Sources, tmp: Path) -> Bad:
    d = _copy(AH / "pfeiffer", tmp)
    old, new = PF.format(0), PF.format(9)

    def edit(t: dict[str, Tensor]) -> None:
        t.update({new + k.removeprefix(old): v.clone() for k, v in t.items() if k.startswith(old)})

    _edit_tensors(d / AH_WEIGHTS, edit)
    return Bad(d, ("encoder.layer.9.output", "not a sublayer of the base model"))


@case("adapterhub-missing-up-bias")
def _ah_missing_bias(s: Sources, tmp: Path) -> Bad:
    d = _copy(AH / "pfeiffer", tmp)
    _edit_tensors(d / AH_WEIGHTS, lambda t: t.pop(PF.format(1) + "adapter_up.bias"))
    return Bad(d, ("encoder.layer.1.output", "lacks ['adapter_up.bias']"))


@case("adapterhub-other-adapter-name")
def _ah_other_name(s: Sources, tmp: Path) -> Bad:
    d = _copy(AH / "pfeiffer", tmp)
    _edit_json(d / AH_CONFIG, lambda m: m.update(name="sentiment"))
    return Bad(d, ("belongs to adapter 'pfeiffer'", "the config names 'sentiment'"))


@case("adapterhub-nan", CheckpointFormatError)
def _ah_nan(s: Sources, tmp: Path) -> Bad:
    d = _copy(AH / "pfeiffer", tmp)
    key = PF.format(2) + "adapter_up.weight"

    def edit(t: dict[str, Tensor]) -> None:
        t[key].view(-1)[5] = float("nan")

    _edit_tensors(d / AH_WEIGHTS, edit)
    return Bad(d, (repr(key), "(1 NaN, 0 Inf)", str(d / AH_WEIGHTS)))


@case("adapterhub-truncated", CheckpointFormatError)
def _ah_truncated(s: Sources, tmp: Path) -> Bad:
    d = _copy(AH / "pfeiffer", tmp)
    data = (d / AH_WEIGHTS).read_bytes()
    (d / AH_WEIGHTS).write_bytes(data[: len(data) // 2])
    return Bad(d, ("truncated", str(d / AH_WEIGHTS)))


def _ah_head(case_id: str, fragments: tuple[str, ...], **changes: Any) -> None:
    @case(case_id)
    def make(s: Sources, tmp: Path) -> Bad:
        d = _copy(AH / "houlsby", tmp)
        _edit_json(d / "head_config.json", lambda m: m["config"].update(changes))
        return Bad(d, (*fragments, str(d)))


_ah_head("adapterhub-head-tagging", ("head_type 'tagging'", "only 'classification'"), head_type="tagging")
_ah_head("adapterhub-head-multiple-choice", ("head_type 'multiple_choice'",), head_type="multiple_choice")


@case("adapterhub-head-3-layers")
def _ah_head_3_layers(s: Sources, tmp: Path) -> Bad:
    d = _copy(AH / "houlsby", tmp)
    _edit_json(d / "head_config.json", lambda m: m["config"].update(layers=3))
    extra = {"heads.houlsby.7.weight": torch.randn(3, HIDDEN), "heads.houlsby.7.bias": torch.zeros(3)}
    _edit_tensors(d / "model_head.safetensors", lambda t: t.update(extra))  # a 3-layer head's Linears: 1, 4, 7
    return Bad(d, ("layers=3", "not supported", str(d)))


@case("adapterhub-head-of-another-hidden-size")
def _ah_head_hidden(s: Sources, tmp: Path) -> Bad:
    d = _copy(AH / "houlsby", tmp)
    _edit_tensors(d / "model_head.safetensors", lambda t: t.update({"heads.houlsby.4.weight": torch.randn(3, 96)}))
    return Bad(d, ("head weight 4.weight", "does not fit hidden size 72"))


# peft IA3


def _ia3_reshape(case_id: str, site: str, shape: tuple[int, ...], fragments: tuple[str, ...]) -> None:
    @case(case_id)
    def make(s: Sources, tmp: Path) -> Bad:
        d = _copy(s.ia3, tmp)
        key = f"{PEFT}{site}.ia3_l"
        _edit_tensors(d / "adapter_model.safetensors", lambda t: t.update({key: t[key].reshape(shape).clone()}))
        return Bad(d, (f"{site} ia3_l has shape {shape}", *fragments))


_ia3_reshape("ia3-feedforward-transposed", "encoder.layer.0.output.dense", (200, 1), ("(1, 200) for a feedforward",))
_ia3_reshape("ia3-one-dimensional", "encoder.layer.2.attention.self.key", (72,), ("(72, 1) otherwise",))


@case("ia3-of-another-hidden-size")
def _ia3_other(s: Sources, tmp: Path) -> Bad:
    d = _copy(s.ia3, tmp)
    key = f"{PEFT}encoder.layer.1.attention.self.value.ia3_l"
    _edit_tensors(d / "adapter_model.safetensors", lambda t: t.update({key: torch.ones(96, 1)}))
    return Bad(d, ("encoder.layer.1.attention.self.value ia3_l has shape (96, 1)", "(out 72, in 72)"))


# sparse fine-tunes


@case("finetune-30-percent")
def _ft_dense(s: Sources, tmp: Path) -> Bad:
    d = _copy(s.diff, tmp)
    key = f"{INTER1}.weight"

    def edit(t: dict[str, Tensor]) -> None:
        t[key] = s.base.state_dict[key].clone()
        t[key][:60] += 0.01  # 60 of 200 rows

    _edit_tensors(d / "model.safetensors", edit)
    return Bad(d, (f"{key} changed in 30.0% of its entries", "not a PET task"))


@case("finetune-embedding-50-percent")
def _ft_embedding(s: Sources, tmp: Path) -> Bad:
    d = _copy(s.mask, tmp)
    key = "embeddings.position_embeddings.weight"

    def edit(t: dict[str, Tensor]) -> None:
        t[f"bert.{key}"] = s.base.state_dict[key].clone()
        t[f"bert.{key}"][:32] = 0.0  # 32 of 64 positions masked out

    _edit_tensors(d / "model.safetensors", edit)
    return Bad(d, (f"{key} changed in 50.0% of its entries", "not a PET task"))


# native task dirs

NATIVE_WEIGHTS = "task.safetensors"


def _native_index(case_id: str, kind: str, edit: Callable[[Tensor], None], fragments: tuple[str, ...]) -> None:
    """A native diff or mask task whose `INTER1` index is edited in place."""

    @case(case_id)
    def make(s: Sources, tmp: Path) -> Bad:
        d = _copy(s.native_diff if kind == "diff" else s.native_mask, tmp)
        _edit_tensors(d / NATIVE_WEIGHTS, lambda t: edit(t[f"{INTER1}.{kind}_index"]))
        return Bad(d, fragments)


def _last_col(value: int) -> Callable[[Tensor], None]:
    def edit(index: Tensor) -> None:
        index[1, -1] = value

    return edit


def _last_row(value: int) -> Callable[[Tensor], None]:
    def edit(index: Tensor) -> None:
        index[0, -1] = value

    return edit


def _swap_first(index: Tensor) -> None:
    index[:, [0, 1]] = index[:, [1, 0]].clone()


OUTSIDE = f"index at {INTER1} has a position outside the (200, 72) weight"
_native_index("native-diff-column-outside", "diff", _last_col(72), (f"diff {OUTSIDE}",))
_native_index("native-diff-row-outside", "diff", _last_row(200), (f"diff {OUTSIDE}",))
_native_index("native-diff-negative", "diff", _last_col(-1), (f"diff {OUTSIDE}",))
_native_index("native-mask-column-outside", "mask", _last_col(100), (INTER1, "outside", "(200, 72)"))
_native_index("native-mask-row-outside", "mask", _last_row(250), (INTER1, "outside", "(200, 72)"))
_native_index("native-mask-negative", "mask", _last_row(-1), (INTER1, "outside", "(200, 72)"))
_native_index("native-diff-unsorted", "diff", _swap_first, (f"diff index at {INTER1} is not sorted row-major",))
_native_index("native-mask-unsorted", "mask", _swap_first, (f"mask index at {INTER1} is not sorted row-major",))


@case("native-bad-sparse-kind")
def _native_kind(s: Sources, tmp: Path) -> Bad:
    d = _copy(s.native_diff, tmp)
    _edit_json(d / "task.json", lambda m: m["sites"][INTER1]["sparse"].update(kind="dense"))
    return Bad(d, (f"site '{INTER1}' sparse entry needs kind 'diff' or 'mask'",))


@case("native-diff-values-length")
def _native_values(s: Sources, tmp: Path) -> Bad:
    d = _copy(s.native_diff, tmp)
    key = f"{INTER1}.diff_values"
    _edit_tensors(d / NATIVE_WEIGHTS, lambda t: t.update({key: t[key][:-1].clone()}))
    return Bad(d, (f"{INTER1} diff values has shape",))


@case("native-mask-without-base-weight")
def _native_mask_site(s: Sources, tmp: Path) -> Bad:
    """A mask at a site the base has no weight for: there is nothing to read its values from."""
    d = _copy(s.native_mask, tmp)
    new = "encoder.layer.9.intermediate.dense"
    _edit_json(d / "task.json", lambda m: m["sites"].update({new: m["sites"].pop(INTER1)}))
    _edit_tensors(d / NATIVE_WEIGHTS, lambda t: t.update({f"{new}.mask_index": t.pop(f"{INTER1}.mask_index")}))
    return Bad(d, (f"site '{new}' holds a mask", f"base weight {new}.weight"))


@case("native-adapter-flag-missing")
def _native_flag(s: Sources, tmp: Path) -> Bad:
    d = _copy(s.native_houlsby, tmp)
    _edit_json(d / "task.json", lambda m: m["sites"]["encoder.layer.0.output"]["adapter"].pop("residual_before_ln"))
    return Bad(d, ("site 'encoder.layer.0.output' adapter needs the boolean flags",))


@case("native-adapter-bottleneck-mismatch")
def _native_bottleneck(s: Sources, tmp: Path) -> Bad:
    d = _copy(s.native_houlsby, tmp)
    key = "encoder.layer.2.attention.output.adapter_up_w"
    _edit_tensors(d / NATIVE_WEIGHTS, lambda t: t.update({key: torch.randn(72, 11)}))
    return Bad(d, ("encoder.layer.2.attention.output adapter up weight has shape (72, 11), expected (72, 12)",))


CASE_IDS = sorted(CASES)


def _check(err: BaseException, bad: Bad) -> None:
    assert isinstance(err, TaskSourceError)
    for fragment in bad.fragments:
        assert fragment in str(err), f"{fragment!r} not in {str(err)!r}"


def test_case_table_covers_every_new_source() -> None:
    for prefix, least in (("adapterhub-", 15), ("ia3-", 3), ("finetune-", 2), ("native-", 10)):
        assert len([c for c in CASES if c.startswith(prefix)]) >= least, prefix


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


@pytest.mark.parametrize("which", ["pfeiffer_gelu", "houlsby_bin", "diff", "native_mask", "native_houlsby"])
def test_good_new_source_loads_into_live_runtime(live: Runtime, sources: Sources, which: str) -> None:
    """Control: the live runtime does take the good sources the bad ones were made from, and they change the
    output (so the refusals above are not a blanket refusal, and the outputs compared can change)."""
    path = {"diff": sources.diff, "native_mask": sources.native_mask, "native_houlsby": sources.native_houlsby}
    live.add_task("good", path.get(which, AH / which))
    try:
        ids, mask = pad([[101, 7, 8, 9, 10, 102]] * 2)
        _, embedding = live.forward(ids, mask, ["good", "plain"])
        assert bool(torch.isfinite(embedding).all())
        assert not torch.equal(embedding[0], embedding[1])
    finally:
        live.remove_task("good")
    assert live.task_names() == ["houlsby", "ia3", "mask", "pfeiffer", "plain"]


# --- 3. pickle checkpoints in an AdapterHub dir -------------------------------------------------------------


class _Evil:
    """Unpickling this creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def _evil_copy(tmp: Path, which: str) -> tuple[Path, Path, Path]:
    """A copy of houlsby_bin whose adapter or head pickle also holds a payload; (dir, pickle file, marker)."""
    d = _copy(AH / "houlsby_bin", tmp)
    target = d / ("pytorch_adapter.bin" if which == "adapter" else "pytorch_model_head.bin")
    marker = tmp / f"pwned_{which}.txt"
    torch.save({**torch.load(target, weights_only=True), "evil": _Evil(marker)}, target)
    return d, target, marker


@pytest.mark.parametrize("via", ["load_task_source", "add_task"])
@pytest.mark.parametrize("which", ["adapter", "head"])
def test_malicious_pickle_never_runs(live: Runtime, sources: Sources, tmp_path: Path, which: str, via: str) -> None:
    d, target, marker = _evil_copy(tmp_path, which)
    assert not marker.exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if via == "load_task_source":
            with pytest.raises(UnsafeCheckpointError) as ei:
                load_task_source("evil", d, sources.base)
        else:
            with unchanged(live), pytest.raises(UnsafeCheckpointError) as ei:
                live.add_task("evil", d)
    assert str(target) in str(ei.value) and "weights_only=True" in str(ei.value)
    assert not marker.exists(), "the pickle's __reduce__ ran"


def test_malicious_pickle_payload_is_live(tmp_path: Path) -> None:
    """Control: an unsafe torch.load of the same file does run the payload, so the test above can fail."""
    _, target, marker = _evil_copy(tmp_path, "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.load(target, weights_only=False)
    loaded["evil"].close()
    assert marker.exists()
