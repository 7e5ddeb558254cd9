"""RELIABILITY 1, 3, 4: bad requests get one clear error naming the field and value; text policy is documented."""

from __future__ import annotations

import pytest
import torch

import pets_compiler
from pets_compiler.errors import InputError, UnknownTaskError

MAX_POS = {"minilm": 512, "small": 64}


def bad(runtime: pets_compiler.Runtime, request: object, match: str, error: type[Exception] = InputError) -> None:
    with pytest.raises(error, match=match):
        runtime.run([{"task": "plain", "input_ids": [101, 102]}, request])


def test_unknown_task_lists_the_loaded_ones(runtime: pets_compiler.Runtime) -> None:
    bad(
        runtime,
        {"task": "nope", "input_ids": [1]},
        r"unknown task 'nope'; loaded tasks: bitfit, lora_kd",
        UnknownTaskError,
    )


@pytest.mark.parametrize(
    ("request_", "match"),
    [
        ({"task": "plain", "input_ids": [101, -1, 102]}, r"request 1: input_ids\[1\] = -1 is outside the vocabulary"),
        ({"task": "plain", "input_ids": [101, 10**9]}, r"input_ids\[1\] = 1000000000 is outside the vocabulary"),
        ({"task": "plain", "input_ids": [101, 2.5]}, r"input_ids\[1\] = 2.5 is not an integer"),
        ({"task": "plain", "input_ids": [101, True]}, r"input_ids\[1\] = True is not an integer"),
        ({"task": "plain", "input_ids": [[101, 102], [101]]}, r"must be a flat list of integers"),
        ({"task": "plain", "input_ids": "101 102"}, r"must be a flat list of integers"),
        ({"task": "plain", "input_ids": []}, r"'input_ids' is empty"),
        ({"task": "plain", "input_ids": [1, 2], "attention_mask": [1]}, r"attention_mask length 1 does not match .* 2"),
        ({"task": "plain", "input_ids": [1, 2], "attention_mask": [0, 1]}, r"ones followed by zeros"),
        ({"task": "plain", "input_ids": [1, 2], "attention_mask": [1, 2]}, r"only 0 and 1"),
        ({"task": "plain"}, r"exactly one of 'text' or 'input_ids'"),
        ({"task": "plain", "text": "a", "input_ids": [1]}, r"exactly one of 'text' or 'input_ids'"),
        ({"task": "plain", "text": 5}, r"field 'text' must be a string, got int"),
        ({"task": 3, "input_ids": [1]}, r"field 'task' must be a string"),
        (["plain", [1]], r"request 1: must be a JSON object, got list"),
    ],
)
def test_bad_fields_are_named(runtime: pets_compiler.Runtime, request_: object, match: str) -> None:
    bad(runtime, request_, match)


def test_too_long_input_ids_are_rejected(runtime: pets_compiler.Runtime) -> None:
    n = runtime.base.config.max_position_embeddings
    bad(runtime, {"task": "plain", "input_ids": [5] * (n + 1)}, rf"{n + 1} tokens, more than the model's {n} positions")
    assert len(runtime.run([{"task": "plain", "input_ids": [5] * n}])) == 1  # exactly the table's length runs


def test_trailing_padding_in_a_mask_is_dropped(runtime: pets_compiler.Runtime) -> None:
    plain = runtime.run([{"task": "lora_qv", "input_ids": [101, 7, 8, 102]}])[0]
    padded = runtime.run(
        [{"task": "lora_qv", "input_ids": [101, 7, 8, 102, 0, 0], "attention_mask": [1, 1, 1, 1, 0, 0]}]
    )
    assert padded[0]["logits"] == plain["logits"]


def test_nothing_runs_when_one_request_is_bad(runtime: pets_compiler.Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(runtime, "forward", lambda *a: calls.append(a))
    with pytest.raises(InputError):
        runtime.run([{"task": "plain", "input_ids": [1]}] * 40 + [{"task": "plain", "input_ids": []}])
    assert calls == []


def test_forward_checks_shapes(runtime: pets_compiler.Runtime) -> None:
    ids = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(InputError, match=r"input_ids \(2, 3\) and attention_mask \(2, 4\)"):
        runtime.forward(ids, torch.ones(2, 4, dtype=torch.long), ["plain", "plain"])
    with pytest.raises(InputError, match=r"must be int64, got torch\.float32 and torch\.int64"):
        runtime.forward(ids.float(), torch.ones_like(ids), ["plain", "plain"])
    with pytest.raises(InputError, match="1 task names for a batch of 2 rows"):
        runtime.forward(ids, torch.ones_like(ids), ["plain"])


def test_text_policy_empty_and_overlong(runtime: pets_compiler.Runtime) -> None:
    if runtime.base.tokenizer_dir is None:
        with pytest.raises(InputError, match="no tokenizer: send input_ids"):
            runtime.run([{"task": "plain", "text": "hello"}])
        return
    # Empty text is [CLS] [SEP]; text past the checkpoint's max_seq_length (256 for MiniLM) is truncated to it.
    empty, long_text = runtime.prepare([{"task": "plain", "text": ""}, {"task": "plain", "text": "word " * 2000}])
    assert empty.ids == [101, 102]
    assert len(long_text.ids) == runtime.tokenizer.max_length == 256
    answers = runtime.run([{"task": "plain", "text": ""}, {"task": "bitfit", "text": "word " * 2000}])
    assert len(answers[0]["embedding"]) == runtime.base.config.hidden_size
    assert answers[1]["label"] in runtime.task("bitfit").head.labels  # type: ignore[union-attr]
