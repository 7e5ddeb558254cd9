"""The README's Python example runs as written (with real paths and a real batch substituted)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from pets_compiler.runtime.requests import pad

from builders import make_bitfit, make_peft_lora

README = Path(__file__).resolve().parents[1] / "README.md"


def test_python_example(small_base: Path, tmp_path: Path) -> None:
    code = re.search(r"### Python\n```python\n(.*?)```", README.read_text(), re.S)
    assert code is not None
    paths = {
        "path/to/bert": small_base,
        "path/to/peft_lora": make_peft_lora(
            small_base, tmp_path / "lora", r=2, alpha=4, targets=["query"], num_labels=2
        ),
        "path/to/finetune": make_bitfit(small_base, tmp_path / "ft", num_labels=3),
        "path/to/other_adapter": make_peft_lora(
            small_base, tmp_path / "other", r=2, alpha=2, targets=["query"], seed=1
        ),
        "artifact_dir": tmp_path / "art",
    }
    source = code.group(1)
    for placeholder, path in paths.items():
        assert f'"{placeholder}"' in source
        source = source.replace(f'"{placeholder}"', repr(str(path)))
    input_ids, attention_mask = pad([[101, 7, 8, 102], [101, 9, 102]])
    scope: dict[str, object] = {"input_ids": input_ids, "attention_mask": attention_mask}
    # The small random base has no tokenizer: the same requests as token ids.
    for text, ids in (
        ('"text": "great movie"', '"input_ids": [101, 5, 102]'),
        ('"text": "stocks fell"', '"input_ids": [9]'),
    ):
        assert text in source
        source = source.replace(text, ids)
    exec(compile(source, "README.md", "exec"), scope)
    runtime = scope["runtime"]
    assert runtime.task_names() == ["new", "sentiment"]  # type: ignore[attr-defined]
    assert isinstance(scope["logits"], torch.Tensor) and len(scope["answers"]) == 2  # type: ignore[arg-type]


@pytest.mark.parametrize("command", ["make demo", "make test"])
def test_readme_starts_with_the_two_commands(command: str) -> None:
    head = README.read_text().split("## ", 1)[0]
    assert command in head
