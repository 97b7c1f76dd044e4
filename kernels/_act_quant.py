"""Dynamic per-row int8 activation quantization for the sparse kernels, exactly
slmkern.reference.quantize_rows_s8 (the w8a8.py quantizer's math, reusing its helpers).

Why not w8a8.quantize_rows_s8 / w8a8._row_quant_params directly: they read a module-level
`_NAN = tl.constexpr(nan)`, and triton 3.6 re-checks every captured global at each launch with
`!=`, which is always true for NaN ("Global variable _NAN has changed since we compiled this
kernel"), so every launch after compiling raises there. Here the NaN scale of a non-finite row is
made in the kernel (amax - amax with amax = +inf) and no NaN global is captured.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from slmkern.reference import ACT_ZERO_THRESHOLD

from ._util import INTERPRET, launch
from .w8a8 import _nan_to_inf_abs, _quantize

_INF = tl.constexpr(float("inf"))
_ZERO_THRESHOLD = tl.constexpr(ACT_ZERO_THRESHOLD)  # 2^-100, exact in fp32


@triton.jit
def row_quant_params(amax):
    """amax (fp32, NaN already mapped to +inf) -> (inv, scale, ok) as reference.quantize_rows_s8:
    scale = amax / 127 (0 below 2^-100, NaN for a non-finite row), inv = 127 / amax, IEEE divisions."""
    finite = amax < _INF
    ok = finite & (amax >= _ZERO_THRESHOLD)
    safe = tl.where(ok, amax, 1.0)
    inv = tl.math.div_rn(tl.full(safe.shape, 127.0, tl.float32), safe)
    scale = tl.math.div_rn(safe, tl.full(safe.shape, 127.0, tl.float32))
    scale = tl.where(ok, scale, tl.where(finite, 0.0, amax - amax))  # inf - inf = NaN
    return inv, scale, ok


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
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    x_row = x_ptr + row * stride_xm
    inv, sx, ok = row_absmax_params(x_row, K, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        xf = tl.load(x_row + kk, mask=kk < K, other=0.0).to(tl.float32)
        tl.store(q_ptr + row * K + kk, _quantize(xf, inv, ok).to(tl.int8), mask=kk < K)
    tl.store(s_ptr + row, sx)


def row_block(K: int) -> int:
    """Block of a pass over one row of x: the whole row up to 4096 (64 in the interpreter)."""
    return max(16, min(triton.next_power_of_2(K), 64 if INTERPRET else 4096))


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) float rows (unit inner stride) -> (q int8 (M, K) contiguous, scale fp32 (M,))."""
    M, K = x.shape
    q = torch.empty((M, K), dtype=torch.int8, device=x.device)
    sx = torch.empty((M,), dtype=torch.float32, device=x.device)
    if M > 0:
        block_k = row_block(K)
        launch(_quantize_rows_kernel)[(M,)](x, q, sx, K, x.stride(0), BLOCK_K=block_k,
                                            num_warps=8 if block_k >= 2048 else 4 if block_k >= 512 else 2)
    return q, sx
