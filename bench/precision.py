"""The dtypes the benchmarks run in, and the tolerance each is checked to (DESIGN.md)."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Precision:
    """For a benchmark's config dataclass with a `dtype` field (a key of DTYPES)."""

    dtype: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def tolerance(self) -> float:
        """DESIGN.md: fp32 on the CPU within 1e-5 relative, fp16 / bf16 on a GPU within 1e-2."""
        return 1e-5 if self.dtype == "float32" else 1e-2
