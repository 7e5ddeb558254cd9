"""The profile's per-op kernel breakdown: kernel names shortened, times summed over an op and the ops it called."""

from __future__ import annotations

from dataclasses import dataclass, field

from bench.floors import kernel_name, kernel_times


@dataclass
class K:
    name: str
    duration: float


@dataclass
class E:
    kernels: list[K] = field(default_factory=list)
    cpu_children: list[E] = field(default_factory=list)


def test_kernel_name() -> None:
    assert kernel_name("void pets::cuda::split_lora::expand_kernel<c10::Half>(const c10::Half*, long)") == (
        "expand_kernel"
    )
    assert kernel_name("void (anonymous namespace)::slot_pointers_kernel<float>(const float*)") == (
        "slot_pointers_kernel"
    )
    assert kernel_name("void f<a<b>, c>(x<y>)") == "f"
    cublas = "sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize64x64x64_execute_kernel__5x_cublas"
    assert kernel_name(cublas) == cublas


def test_kernel_times_sum_over_children() -> None:
    inner = E([K("void ns::gemm<half>(int)", 3.0)])
    op = E([K("void ns::expand_kernel<half>(int)", 2.0), K("void ns::expand_kernel<half>(int)", 1.5)], [inner])
    assert kernel_times(op) == {"expand_kernel": 3.5, "gemm": 3.0}
    assert kernel_times(E()) == {}
