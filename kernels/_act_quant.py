"""Dynamic per-row int8 activation quantization for the sparse kernels: exactly
slmkern.reference.quantize_rows_s8. The math lives in w8a8.py; this module names the pieces the
sparse kernels share and adds the one-row helper their GEMVs use."""
from __future__ import annotations

import triton
import triton.language as tl

from .w8a8 import _nan_to_inf_abs, _row_block as row_block, _row_quant_params as row_quant_params
from .w8a8 import quantize_rows_s8 as quantize_rows

__all__ = ["quantize_rows", "row_absmax_params", "row_block", "row_quant_params"]


@triton.jit
def row_absmax_params(x_row, K, X_BLOCK: tl.constexpr):
    """(inv, scale, ok) of one row of K floats at x_row."""
    offs_x = tl.arange(0, X_BLOCK)
    amax_vec = tl.zeros([X_BLOCK], dtype=tl.float32)
    for k0 in range(0, K, X_BLOCK):
        kx = k0 + offs_x
        xf = tl.load(x_row + kx, mask=kx < K, other=0.0).to(tl.float32)
        amax_vec = tl.maximum(amax_vec, _nan_to_inf_abs(xf))
    return row_quant_params(tl.max(amax_vec, axis=0))
