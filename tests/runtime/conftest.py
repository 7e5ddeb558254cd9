from __future__ import annotations

from pathlib import Path

import pytest

from builders import make_bitfit, make_peft_ia3, make_peft_lora, make_sparse_finetune

ADAPTERHUB_SMALL = Path(__file__).parents[1] / "fixtures" / "adapterhub" / "small"


@pytest.fixture(scope="session")
def all_kinds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One task of every PET kind on the small AdapterHub fixture base (hidden 72, 3 layers, 64 positions)."""
    root, base = tmp_path_factory.mktemp("all_kinds"), ADAPTERHUB_SMALL / "base"
    return {
        "lora": make_peft_lora(base, root / "lora", r=4, alpha=8, targets=["query", "value"], num_labels=3),
        "ia3": make_peft_ia3(base, root / "ia3", targets=["key", "output.dense"], feedforward=["output.dense"]),
        "pfeiffer": ADAPTERHUB_SMALL / "pfeiffer",
        "houlsby": ADAPTERHUB_SMALL / "houlsby",
        "bitfit": make_bitfit(base, root / "bitfit", num_labels=2),
        "diff": make_sparse_finetune(base, root / "diff", density=0.01, mask=False),
        "mask": make_sparse_finetune(base, root / "mask", density=0.05, mask=True, num_labels=4),
        "plain": base,
    }
