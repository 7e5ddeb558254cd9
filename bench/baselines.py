"""What the pets runtime is measured against, in the same process: the backbone alone (HF eager, HF replayed from a
CUDA graph, and the pets pipeline's own program without task ops, served as pets serves), peft's mixed-batch LoRA
(`adapter_names=` per row), and SeqS (each task's own merged model run on its rows, one task after another)."""

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
    with torch.inference_mode(), torch.cuda.graph(graph):
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


@dataclass
class SeqS:
    """Each task present in the batch runs its own merged model on its rows, in turn (batch split by task).

    Models are kept for up to SEQS_MAX_MODELS tasks; the rows of a task beyond those run on a kept model instead
    (same shapes, same work), and the timing is then marked an estimate."""

    base: BaseModel
    device: str
    dtype: torch.dtype
    models: dict[str, OwnModel] = field(default_factory=dict)

    def model_for(self, name: str, spec: Callable[[str], TaskSpec]) -> tuple[OwnModel, bool]:
        """(the model that runs `name`'s rows, whether it is the task's own)."""
        if name in self.models:
            return self.models[name], True
        if len(self.models) < SEQS_MAX_MODELS:
            self.models[name] = own_model(self.base, spec(name), self.device, self.dtype)
            return self.models[name], True
        kept = list(self.models.values())
        return kept[zlib.crc32(name.encode()) % len(kept)], False

    def plan(
        self, ids: Tensor, mask: Tensor, names: list[str], spec: Callable[[str], TaskSpec]
    ) -> tuple[Callable[[], object], dict[str, Any]]:
        """The timed callable for this batch and what it is: distinct models used, sub-batches on a reused model."""
        order = list(dict.fromkeys(names))
        groups = []
        reused = 0
        for name in order:
            model, own = self.model_for(name, spec)
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=ids.device)
            groups.append((model, rows))
            reused += not own

        def run() -> object:
            with torch.inference_mode():
                return [model(ids.index_select(0, rows), mask.index_select(0, rows)) for model, rows in groups]

        info: dict[str, Any] = {
            "sub_batches": len(groups),
            "distinct_models": len({id(m) for m, _ in groups}),
            "reused_model_sub_batches": reused,
            "estimated": reused > 0,
        }
        if reused:
            info["note"] = (
                f"{len(order)} tasks in the batch, models kept for {SEQS_MAX_MODELS} at most: {reused} sub-batches ran "
                "on another task's merged model (same shapes and work), so this SeqS time is an estimate"
            )
        return run, info
