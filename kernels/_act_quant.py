"""Dynamic per-row int8 activation quantization for the sparse kernels: exactly
slmkern.reference.quantize_rows_s8. The math lives in w8a8.py; this module names the pieces the
sparse kernels share, adds the one-row helper their GEMVs use and the two output epilogues."""
from __future__ import annotations

import triton
import triton.language as tl

from ._util import cast_out
from .w8a8 import _dequant_epilogue, _nan_to_inf_abs, _row_block as row_block, _row_quant_params as row_quant_params
from .w8a8 import quantize_rows_s8 as quantize_rows

__all__ = ["quantize_rows", "row_absmax_params", "row_block", "row_quant_params", "store_row", "store_tile_nm"]


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


@triton.jit
def store_row(acc_n, row, sx, ws_ptr, b_ptr, y_ptr, stride_ym, offs_n, n_mask,
              INT8_VALUES: tl.constexpr, HAS_BIAS: tl.constexpr):
    """GEMV epilogue: y[row, offs_n] from the per-output sums acc_n (int32 with int8 values, dequantized
    with the row scale sx and the weight scales at ws_ptr as w8a8 does; fp32 otherwise) + bias."""
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    if INT8_VALUES:
        ws = tl.load(ws_ptr + offs_n, mask=n_mask, other=0.0)
        y = _dequant_epilogue(acc_n, sx, ws, bias, HAS_BIAS)
    else:
        y = acc_n
        if HAS_BIAS:
            y = y + bias
    tl.store(y_ptr + row * stride_ym + offs_n, cast_out(y, y_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def store_tile_nm(acc, offs_m, offs_n, m_mask, n_mask, sx_ptr, ws_ptr, b_ptr, y_ptr, stride_ym,
                  INT8_VALUES: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tiled epilogue: acc is y's tile transposed, (BLOCK_N, BLOCK_M); as store_row per element."""
    bias = tl.zeros([BLOCK_N, 1], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    if INT8_VALUES:
        sx = tl.load(sx_ptr + offs_m, mask=m_mask, other=0.0)
        ws = tl.load(ws_ptr + offs_n, mask=n_mask, other=0.0)
        y = _dequant_epilogue(acc, sx[None, :], ws[:, None], bias, HAS_BIAS)
    else:
        y = acc
        if HAS_BIAS:
            y = y + bias
    y_ptrs = y_ptr + offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None]
    tl.store(y_ptrs, cast_out(y, y_ptr.dtype.element_ty), mask=n_mask[:, None] & m_mask[None, :])
