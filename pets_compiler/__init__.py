"""pets-compiler: serve many parameter-efficient fine-tuned BERT tasks from one shared backbone.

Importing the package loads the `torch.ops.pets` library and its fake kernels, so exported programs that use them
can be loaded and re-traced.
"""

from __future__ import annotations

from pets_compiler import custom_ops as _custom_ops  # noqa: F401  (registers torch.ops.pets.*)
from pets_compiler.compiler import compile
from pets_compiler.errors import PetsError
from pets_compiler.runtime.artifact import load
from pets_compiler.runtime.runtime import Runtime
from pets_compiler.serving import Engine

__all__ = ["Engine", "PetsError", "Runtime", "compile", "load"]
__version__ = "0.1.0"
