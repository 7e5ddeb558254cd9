"""The program without attention mask (runtime/unmasked.py): what batches without padding run. It drops only the
masks (weights shared), its rows equal each task's own model, the runtime takes it exactly for batches whose every
token is real, and a control: on a batch with padding it gives other answers, so the equality checks can fail."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

import pets_compiler
from pets_compiler.passes.attention_mask import SDPA, mask_of
from pets_compiler.runtime.graphs import Eager
from pets_compiler.runtime.requests import pad
from pets_compiler.runtime.unmasked import without_attention_mask

from builders import assert_rows_match_own, mixed_rows, rel_err

TOL = 1e-5  # as test_parity


def attention_masks(module: torch.fx.GraphModule) -> list[object]:
    return [mask_of(n) for n in module.graph.nodes if n.target is SDPA]


def test_only_the_attention_masks_go_and_the_weights_are_shared(runtime: pets_compiler.Runtime) -> None:
    module = runtime.program.module()
    unmasked = without_attention_mask(module)
    assert unmasked is not None
    masks = attention_masks(module)
    assert masks and all(m is not None for m in masks)  # one per layer, the shared additive mask
    assert attention_masks(unmasked) == [None] * len(masks)
    assert len(unmasked.graph.nodes) < len(module.graph.nodes)  # the mask's nodes are gone
    ptrs = {p.data_ptr() for p in module.parameters()} | {b.data_ptr() for b in module.buffers()}
    assert ptrs == {p.data_ptr() for p in unmasked.parameters()} | {b.data_ptr() for b in unmasked.buffers()}
    assert without_attention_mask(unmasked) is None  # nothing left to drop


@contextmanager
def counting_unpadded(runtime: pets_compiler.Runtime) -> Iterator[list[int]]:
    """Counts the calls of the eager executor's unmasked program (restored after)."""
    executor = runtime.executor
    assert isinstance(executor, Eager) and executor.unpadded is not None
    fn, calls = executor.unpadded, [0]

    def counted(*args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls[0] += 1
        return fn(*args)

    executor.unpadded = counted
    try:
        yield calls
    finally:
        executor.unpadded = fn


def test_rows_without_padding_equal_their_own_models(runtime: pets_compiler.Runtime, own_models: dict) -> None:
    """Rows of one length, mask None or all ones: the unmasked program serves them, every row as its own model."""
    vocab = runtime.base.config.vocab_size
    _, names = mixed_rows(vocab, sorted(own_models), 8, seed=21)
    g = torch.Generator().manual_seed(21)
    rows = [[101, *torch.randint(5, vocab, (14,), generator=g).tolist(), 102] for _ in names]
    ids, mask = pad(rows)
    assert bool(mask.all()) and len(set(names)) > 2
    with counting_unpadded(runtime) as calls:
        outputs = [runtime.forward(ids, None, names), runtime.forward(ids, mask, names)]
        assert calls[0] == 2
    for out in outputs:
        assert_rows_match_own(runtime, own_models, rows, names, out, TOL)


def test_a_batch_with_padding_keeps_its_mask(runtime: pets_compiler.Runtime) -> None:
    """Control: with padding the runtime runs the masked program; the unmasked one would change the short rows'
    answers (their pad tokens attended to), so it is not interchangeable and the checks above could fail."""
    rows, names = mixed_rows(1000, runtime.task_names(), 6, seed=22)
    ids, mask = pad(rows)
    assert not bool(mask.all())
    with counting_unpadded(runtime) as calls:
        masked = runtime.forward(ids, mask, names)
        assert calls[0] == 0
    executor = runtime.executor
    assert isinstance(executor, Eager) and executor.unpadded is not None
    slots = torch.tensor([runtime.slot(n) for n in names])
    with torch.inference_mode():
        wrong = executor.unpadded(ids, mask, slots, *runtime.tables.inputs())
    short = mask.sum(1) < mask.shape[1]
    assert rel_err(wrong[1][short], masked[1][short]) > 1e-3
    longest = ~short
    assert rel_err(wrong[1][longest], masked[1][longest]) < 1e-6  # rows without padding agree


class NoTruthValue:
    """A program whose truth value raises, as torch.compile's wrapper of a GraphModule does (it calls len())."""

    def __init__(self, fn: object) -> None:
        self.fn, self.calls = fn, 0

    def __len__(self) -> int:
        raise TypeError("GraphModule does not support len()")

    def __call__(self, *args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        assert callable(self.fn)
        return self.fn(*args)


def test_executors_never_ask_a_programs_truth_value(runtime: pets_compiler.Runtime) -> None:
    executor = runtime.executor
    assert isinstance(executor, Eager) and executor.unpadded is not None
    unpadded = NoTruthValue(executor.unpadded)
    eager = Eager(executor.fn, runtime.tables, runtime.device, unpadded)
    ids = torch.randint(5, 1000, (2, 8))
    with torch.inference_mode():
        eager(ids, None, torch.zeros(2, dtype=torch.long))
    assert unpadded.calls == 1
