"""slmkern: int8/int4/sparse kernels and drop-in torch modules for small language models."""
from __future__ import annotations

from slmkern._version import __version__
from slmkern import ops  # noqa: F401  (defines torch.ops.slmkern.*)
from slmkern import _backends  # noqa: F401  (registers kernels)
from slmkern.api import (CompressReport, Recipe, SwapReport, compress, load, parse_recipe, quantize_, save,
                         sparsify_)
from slmkern.config import Int4Config, Int8Config, SparseConfig
from slmkern.interop.gguf import load_gguf
from slmkern._info import info
from slmkern.generate import GenerateResult, generate

__all__ = ["CompressReport", "GenerateResult", "Int4Config", "Int8Config", "Recipe", "SparseConfig", "SwapReport",
           "compress", "generate", "info", "load", "load_gguf", "parse_recipe", "quantize_", "save", "sparsify_",
           "__version__"]
