"""Builds the custom-op library `pets_compiler._C`; all other package metadata lives in pyproject.toml.

Build with `pip install --no-build-isolation -e .` (the build needs the installed torch, not a fresh one).
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import torch
from setuptools import Extension, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

CSRC = "pets_compiler/custom_ops/csrc"
ROOT = Path(__file__).resolve().parent


def _sources(pattern: str) -> list[str]:
    """Every file under csrc/ matching pattern, as paths relative to this file (setuptools wants them so)."""
    return sorted(f"{CSRC}/{p}" for p in glob.glob(f"**/{pattern}", root_dir=ROOT / CSRC, recursive=True))


def _library_include_dirs() -> list[str]:
    """Where the toolkit has no cuBLAS headers (a compiler-only CUDA install), those of the CUDA library wheels
    torch depends on (site-packages/nvidia/*/include); none where the toolkit has them."""
    if CUDA_HOME is None or (Path(CUDA_HOME) / "include" / "cublas_v2.h").exists():
        return []
    try:
        import nvidia  # the namespace package of torch's nvidia-* dependencies
    except ImportError:
        return []
    dirs = (d for root in nvidia.__path__ for d in Path(root).glob("*/include"))
    return sorted(str(d) for d in dirs if (d / "cublas_v2.h").exists())


def _extension() -> Extension:
    # A CPU-only torch has CUDA_HOME None even with nvcc on PATH, and CUDAExtension then fails: decide by
    # both, never by torch.cuda.is_available() (a build machine need not have a GPU).
    # PETS_NO_CUDA=1 builds the CPU kernels only, even where CUDA is available.
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and not os.environ.get("PETS_NO_CUDA")
    if not with_cuda:
        return CppExtension(
            "pets_compiler._C",
            _sources("*.cpp"),
            extra_compile_args={"cxx": ["-O3"]},
            py_limited_api=True,
        )
    return CUDAExtension(
        "pets_compiler._C",
        _sources("*.cpp") + _sources("*.cu"),
        define_macros=[("PETS_WITH_CUDA", None)],
        include_dirs=_library_include_dirs(),  # slot_gemm.cu calls cuBLAS
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},  # lineinfo: profilers, sanitizer
        py_limited_api=True,
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
