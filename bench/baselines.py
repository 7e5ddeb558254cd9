"""What the pets runtime is measured against, in the same process: the backbone alone (HF eager, HF replayed from a
CUDA graph, and the pets pipeline's own program without task ops, served as pets serves), peft's mixed-batch LoRA
(`adapter_names=` per row), SeqS (each task's own merged model run on its rows, one task after another) and ParS
(the same models run concurrently on CUDA streams, PetS's other baseline)."""

from __future__ import annotations

import inspect
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, cast

import torch
from torch import Tensor
from transformers import BertModel

import pets_compiler
from bench.pets_exec import configure
from pets_compiler.frontend.base import BaseModel
from pets_compiler.frontend.taskset import IA3, Adapter, Head, LayerNormDelta, LoRA, SitePET, SparseDelta, TaskSpec
from pets_compiler.oracle import OwnModel, merged_model

# bert-base in fp16 is ~220 MB: SeqS keeps at most this many distinct models on the device.
SEQS_MAX_MODELS = 32


def backbone_model(base: BaseModel, device: str, dtype: torch.dtype) -> BertModel:
    """The HF BertModel (sdpa attention, as BaseModel.build makes it) holding the base weights, on the device."""
    return cast(BertModel, torch.nn.Module.to(base.build().requires_grad_(False), device, dtype))


def backbone_eager(model: BertModel, ids: Tensor, mask: Tensor) -> Callable[[], object]:
    """The HF model as users call it, attention mask included (HF checks it on the host and drops it if all ones)."""

    def run() -> object:
        with torch.inference_mode():
            return model(input_ids=ids, attention_mask=mask)

    return run


def plain_runtime(base: BaseModel, device: str, dtype: torch.dtype, pets_exec: str) -> pets_compiler.Runtime:
    """The backbone through the pets pipeline itself: compiled for one task with no PET (so the program has no task
    op at all), served like the pets runtime (CUDA graphs by default on CUDA). The backbone as fast as the serving
    stack makes it: the pets runtime's real denominator, since both share export, SDPA and graph capture."""
    runtime = pets_compiler.compile(base, {PLAIN_TASK: TaskSpec(PLAIN_TASK, source="bench")}, dtype=dtype)
    runtime = runtime.to(device)
    configure(runtime, pets_exec)
    return runtime


PLAIN_TASK = "plain"


@dataclass
class GraphedBackbone:
    """The HF model captured in one CUDA graph for one input shape; `run` replays it."""

    graph: torch.cuda.CUDAGraph
    static_ids: Tensor
    output: Tensor  # the pooler output the capture wrote

    def run(self) -> None:
        self.graph.replay()


def backbone_graph(model: BertModel, ids: Tensor, warmup: int = 3) -> GraphedBackbone:
    """Capture the forward on `ids` with attention_mask=None: the same computation as an all-ones mask (which HF
    drops after a host-side check, and a host check cannot run inside a capture)."""
    static_ids = ids.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.inference_mode():
        for _ in range(warmup):
            model(input_ids=static_ids)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    # captured on the warm-up's stream, as the runtime's graphs are (graphs.CudaCapture). The replay takes ~9.4 ms
    # against ~4.6-6.3 eager at bert-base bs64 s128 on the H200, on either stream (cause not found; the throughput
    # denominator is the fastest backbone path, so a slow graph never sets it)
    with torch.inference_mode(), torch.cuda.graph(graph, stream=stream):
        output = model(input_ids=static_ids).pooler_output
    return GraphedBackbone(graph, static_ids, output)


# ---- peft mixed batch -----------------------------------------------------------------------------------------
@dataclass
class PeftMixed:
    """One peft model holding one LoRA adapter per task (weights copied from the task), grown as tasks are added."""

    model: Any  # a BertModel, then the peft.PeftModel around it
    rank: int
    device: str
    dtype: torch.dtype
    names: list[str] = field(default_factory=list)
    lora_layers: list[Any] = field(default_factory=list)
    how: str = "get_peft_model, then LoraLayer.update_layer per target for each further adapter"

    @staticmethod
    def build(base: BaseModel, rank: int, device: str, dtype: torch.dtype) -> PeftMixed:
        return PeftMixed(backbone_model(base, device, dtype), rank, device, dtype)

    def add(self, name: str, spec: TaskSpec) -> None:
        from peft import LoraConfig, get_peft_model

        # scale = lora_alpha / r: the tasks' LoRA scale, so peft computes what the runtime does
        scale = next(p.lora.scale for p in spec.sites.values() if p.lora is not None)
        alpha = scale * self.rank
        if alpha != int(alpha):
            raise ValueError(f"task {name}: LoRA scale {scale} x rank {self.rank} is not an integer lora_alpha")
        config = LoraConfig(
            r=self.rank,
            lora_alpha=int(alpha),
            target_modules=["query", "value"],
            init_lora_weights=False,
            inference_mode=True,
        )
        if not self.names:
            from peft.tuners.lora import LoraLayer

            self.model = get_peft_model(self.model, config, adapter_name=name)
            self.lora_layers = [m for m in self.model.modules() if isinstance(m, LoraLayer)]
        else:
            self._add_adapter(name, config)
        bert = self.model.base_model.model
        with torch.no_grad():
            for site, pet in spec.sites.items():
                if pet.lora is None:
                    continue
                module = bert.get_submodule(site)
                module.lora_A[name].weight.copy_(pet.lora.a)
                module.lora_B[name].weight.copy_(pet.lora.b)
        self.names.append(name)

    def _add_adapter(self, name: str, config: Any) -> None:
        """What PeftModel.add_adapter does for a LoRA config on a model whose targets are LoRA layers already, without
        its walk over every module of the model per adapter (which makes 1024 adapters take ~20 minutes): each LoRA
        layer makes the new adapter itself. Older peft without update_layer(..., config) uses add_adapter."""
        if "config" not in inspect.signature(type(self.lora_layers[0]).update_layer).parameters:
            self.how = "get_peft_model, then PeftModel.add_adapter for each further adapter"
            self.model.add_adapter(name, config)
            return
        for layer in self.lora_layers:
            # update_layer ends with set_adapter and a move to the base layer's device, each a walk over every
            # adapter of the layer: quadratic in the adapters (1024 took ~45 s on a tiny CPU model). Both are done
            # once for all adapters in ready() instead.
            layer.set_adapter = _skip  # type: ignore[method-assign]
            layer._move_adapter_to_device_of_base_layer = _skip  # type: ignore[method-assign]
            try:
                layer.update_layer(name, config.r, config.lora_alpha, config)
            finally:
                del layer.set_adapter, layer._move_adapter_to_device_of_base_layer  # the class's methods again
        self.model.peft_config[name] = config

    def ready(self) -> None:
        """After adding: the active adapter set as peft's add would leave it, every adapter on the device in the
        serving dtype (peft keeps new adapters in fp32), eval mode."""
        for layer in self.lora_layers:
            layer.set_adapter(layer.active_adapters, inference_mode=True)
        self.model.to(self.device, self.dtype).eval()

    def run(self, ids: Tensor, mask: Tensor, names: list[str]) -> Callable[[], object]:
        def call() -> object:
            with torch.inference_mode():
                return self.model(input_ids=ids, attention_mask=mask, adapter_names=names)

        return call

    def pooled(self, ids: Tensor, mask: Tensor, names: list[str]) -> Tensor:
        out = cast(Any, self.run(ids, mask, names)())
        return cast(Tensor, out.pooler_output)


# ---- own models: the check's oracle and SeqS ----------------------------------------------------------------------
def _skip(*args: object, **kwargs: object) -> None:
    """Stands in for a peft bookkeeping method during a bulk add (see PeftMixed._add_adapter)."""


def _on(value: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """A PET dataclass (or tensor) with every tensor on `device`, floating ones in `dtype`."""
    if isinstance(value, Tensor):
        return value.to(device, dtype if value.is_floating_point() else value.dtype)
    if isinstance(value, LoRA | IA3 | LayerNormDelta | SparseDelta | Adapter | Head | SitePET):
        return replace(value, **{k: _on(v, device, dtype) for k, v in vars(value).items()})
    return value


def own_model(base: BaseModel, spec: TaskSpec, device: str, dtype: torch.dtype) -> OwnModel:
    """The task's own model (oracle.merged_model), built directly on `device` (building bert-base on the CPU and
    merging there takes seconds per task), in `dtype`: deltas merged in fp32, then the model cast.

    Adapters and the head are not modules of the merged model (a replaced forward and a plain attribute hold
    them), so Module.to does not cast them: they are made in `dtype` to begin with."""
    target = torch.device(device)

    def pet_on(p: SitePET) -> SitePET:
        merged = _on(replace(p, adapter=None), target, torch.float32)
        return replace(merged, adapter=_on(p.adapter, target, dtype))

    sites = {s: pet_on(p) for s, p in spec.sites.items()}
    with torch.device(target):
        model = merged_model(base, TaskSpec(spec.name, sites, _on(spec.head, target, dtype)))
    return model.to(target, dtype)


Group = tuple[OwnModel, Tensor]  # a task's model and the batch rows it runs on
Outputs = list[tuple[Tensor | None, Tensor]]  # (logits or None, embedding) of each group, in group order


@dataclass
class SeqS:
    """Each task present in the batch runs its own merged model on its rows, in turn (batch split by task).

    Models are kept for up to `max_models` tasks; the rows of a task beyond those run on a kept model instead (same
    shapes, same work), and the timing is then marked an estimate. A model's parameters that equal the base's
    (those its task leaves unchanged, bit for bit in the serving dtype) are one shared copy: memory only, every
    model still reads all its weights in its forward (weight_bytes() gives both counts).

    An all-ones attention mask is passed as None (checked once per plan): HF drops such a mask itself, but only
    after a host-side check that waits for the device, once per model forward."""

    base: BaseModel
    device: str
    dtype: torch.dtype
    max_models: int = SEQS_MAX_MODELS
    models: dict[str, OwnModel] = field(default_factory=dict)
    shared: dict[str, torch.nn.Parameter] = field(default_factory=dict, repr=False)  # base weights, serving dtype
    device_base: BaseModel | None = field(default=None, repr=False)  # the base with its weights on the device

    def build(self, spec: TaskSpec) -> OwnModel:
        """The task's own model (own_model), its unchanged parameters replaced by the shared copies."""
        if self.device_base is None:
            # own_model loads the base weights into every model it builds: from the device, not over PCIe
            state = {k: v.to(self.device) for k, v in self.base.state_dict.items()}
            self.device_base = replace(self.base, state_dict=state)
            self.shared = {
                k: torch.nn.Parameter(v.to(self.dtype), requires_grad=False)
                for k, v in state.items()
                if v.is_floating_point()
            }
        model = own_model(self.device_base, spec, self.device, self.dtype)
        for name, p in list(model.named_parameters()):
            same = self.shared.get(name.removeprefix("bert."))
            if same is not None and same.shape == p.shape and same.dtype == p.dtype and torch.equal(same, p):
                owner, leaf = name.rsplit(".", 1)
                setattr(model.get_submodule(owner), leaf, same)
        return model

    def model_for(self, name: str, spec: Callable[[str], TaskSpec]) -> tuple[OwnModel, bool]:
        """(the model that runs `name`'s rows, whether it is the task's own)."""
        if name in self.models:
            return self.models[name], True
        if len(self.models) < self.max_models:
            self.models[name] = self.build(spec(name))
            return self.models[name], True
        kept = list(self.models.values())
        return kept[zlib.crc32(name.encode()) % len(kept)], False

    def groups(self, names: list[str], spec: Callable[[str], TaskSpec]) -> tuple[list[Group], dict[str, Any]]:
        """One group per task of the batch, in order of first row: its model and its rows; and what they are."""
        order = list(dict.fromkeys(names))
        groups: list[Group] = []
        reused = 0
        for name in order:
            model, own = self.model_for(name, spec)
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=self.device)
            groups.append((model, rows))
            reused += not own
        info: dict[str, Any] = {
            "sub_batches": len(groups),
            "distinct_models": len({id(m) for m, _ in groups}),
            "reused_model_sub_batches": reused,
            "estimated": reused > 0,
        }
        if reused:
            info["note"] = (
                f"{len(order)} tasks in the batch, models kept for {self.max_models} at most: {reused} sub-batches "
                "ran on another task's merged model (same shapes and work), so this time is an estimate"
            )
        return groups, info

    def mask_arg(self, mask: Tensor) -> Tensor | None:
        """The mask the models get: None for an all-ones mask, where pooling does not read it either."""
        return None if self.base.pooling.mode in ("pooler", "cls") and bool(mask.all()) else mask

    def plan(
        self, ids: Tensor, mask: Tensor, names: list[str], spec: Callable[[str], TaskSpec]
    ) -> tuple[Callable[[], Outputs], dict[str, Any]]:
        """The timed callable for this batch and what it is: distinct models used, sub-batches on a reused model."""
        groups, info = self.groups(names, spec)
        return in_turn(groups, ids, self.mask_arg(mask)), info

    def weight_bytes(self) -> dict[str, int]:
        """Parameter bytes of the kept models: each distinct tensor once, and as if no model shared any."""
        distinct: dict[int, int] = {}
        unshared = 0
        for model in self.models.values():
            for p in model.parameters():
                nbytes = p.numel() * p.element_size()
                distinct[p.data_ptr()] = nbytes
                unshared += nbytes
        return {"models": len(self.models), "distinct": sum(distinct.values()), "unshared": unshared}


def _run_group(group: Group, ids: Tensor, mask: Tensor | None) -> tuple[Tensor | None, Tensor]:
    model, rows = group
    return cast(
        tuple[Tensor | None, Tensor],
        model(ids.index_select(0, rows), None if mask is None else mask.index_select(0, rows)),
    )


def in_turn(groups: list[Group], ids: Tensor, mask: Tensor | None) -> Callable[[], Outputs]:
    """SeqS's callable: each group's model on its rows, one after another, on the current stream."""

    def run() -> Outputs:
        with torch.inference_mode():
            return [_run_group(g, ids, mask) for g in groups]

    return run


def on_streams(
    groups: list[Group], ids: Tensor, mask: Tensor | None, streams: int, device: str
) -> tuple[Callable[[], Outputs], dict[str, Any]]:
    """PetS's ParS: SeqS's groups (each task's own merged model on its rows) run concurrently, the batch's t-th group
    on CUDA stream t % streams, every model launched before the streams are joined into the current one (a timing
    with CUDA events on it spans the whole batch). The callable and how it runs; on the CPU, in turn."""
    if device != "cuda":
        return in_turn(groups, ids, mask), {"streams": 0, "how": "in turn (no streams on the CPU)"}
    pool = [torch.cuda.Stream() for _ in range(min(streams, len(groups)))]

    def run() -> Outputs:
        main = torch.cuda.current_stream()
        for stream in pool:  # the inputs were written on the current stream
            stream.wait_stream(main)
        outs: Outputs = []
        with torch.inference_mode():
            for t, group in enumerate(groups):
                with torch.cuda.stream(pool[t % len(pool)]):
                    outs.append(_run_group(group, ids, mask))
        for stream in pool:
            main.wait_stream(stream)
        return outs

    return run, {"streams": len(pool), "how": "task t of the batch on stream t % streams, then joined"}


def assemble(outs: Outputs, groups: list[Group], batch: int) -> tuple[Tensor, Tensor]:
    """Per-row outputs in batch order from SeqS's or ParS's per-group outputs: (logits zero-padded to the widest
    head, [batch, 0] without heads; embeddings)."""
    widest = max((logits.shape[-1] for logits, _ in outs if logits is not None), default=0)
    first = outs[0][1]
    embedding = first.new_zeros(batch, first.shape[-1])
    logits_out = first.new_zeros(batch, widest)
    for (logits, emb), (_, rows) in zip(outs, groups, strict=True):
        embedding[rows] = emb
        if logits is not None:
            logits_out[rows, : logits.shape[-1]] = logits
    return logits_out, embedding
