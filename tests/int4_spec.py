"""Pure-torch spec of the int4 ops (w4a16_linear, w4a8_linear).

Test-side restatement of the int4 ops (the package spec is slmkern/reference.py);
the int4 tests compare against it. Float64 variants (``*_f64``) give
the exact value of each formula for tolerance tests.

Canonical int4 weight (slmkern/formats/int4.py): ``w`` uint8 [N, K/2], two codes
per byte along K, low nibble first; ``scales`` fp32 [N, K/g]; ``zeros`` None
(z = 8), uint8 [N, K/g] (0..15) or fp32 [N, K/g]:
``W[n, k] = (u[n, k] - z[n, k // g]) * s[n, k // g]``.
"""
from __future__ import annotations

import torch

from slmkern.reference import quantize_rows_s8


def unpack_codes(w: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> int64 codes [N, K] (low nibble = even k)."""
    w = w.to(torch.int64)
    return torch.stack((w & 0xF, w >> 4), dim=-1).reshape(w.shape[0], -1)


def _zeros_or_8(scales: torch.Tensor, zeros: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    if zeros is None:
        return torch.full(scales.shape, 8.0, dtype=dtype, device=scales.device)
    return zeros.to(dtype)


def dequantize(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W [N, K] = (u - z) * s in ``dtype`` (fp32: one rounding, u - z is exact)."""
    u = unpack_codes(w).to(dtype)
    g = u.shape[1] if group_size == -1 else group_size
    z = _zeros_or_8(scales, zeros, dtype).repeat_interleave(g, dim=1)
    s = scales.to(dtype).repeat_interleave(g, dim=1)
    return (u - z) * s


def w4a16_linear_f64(x, w, scales, zeros, group_size, bias=None):
    """Exact (float64) value of x @ W.T + bias, shape (..., N)."""
    K = x.shape[-1]
    W = dequantize(w, scales, zeros, group_size, torch.float64)
    y = x.reshape(-1, K).double() @ W.T
    if bias is not None:
        y = y + bias.double()
    return y.reshape(*x.shape[:-1], w.shape[0])


def w4a16_linear(x, w, scales, zeros, group_size, bias=None, w_packed=None):
    """x (..., K) f32/bf16/f16, int4 weight -> (..., N) x.dtype: y = x @ W.T + bias, fp32 accumulation."""
    K = x.shape[-1]
    W = dequantize(w, scales, zeros, group_size, torch.float32)
    y = x.reshape(-1, K).float() @ W.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], w.shape[0])


def _w4a8_terms(x, w, scales, zeros, group_size):
    """(sx (M,), per-group acc (M, N, G) float64, asum (M, 1, G), s (N, G), s*z (N, G)), all exact."""
    K = x.shape[-1]
    g = K if group_size == -1 else group_size
    G = K // g
    q, sx = quantize_rows_s8(x.reshape(-1, K))
    qd = q.double().reshape(-1, G, g)                       # (M, G, g)
    u = unpack_codes(w).double().reshape(-1, G, g)          # (N, G, g)
    acc = torch.einsum("mgk,ngk->mng", qd, u)               # exact: |terms| < 2^53
    asum = qd.sum(-1).unsqueeze(1)                          # (M, 1, G)
    s = scales.double()
    sz = s * _zeros_or_8(scales, zeros, torch.float64)
    return sx, acc, asum, s, sz


def w4a8_linear_f64(x, w, scales, zeros, group_size, bias=None):
    """Float64 value of sx * sum_g (s*acc_g - (s*z)*asum_g) + bias, shape (..., N)."""
    sx, acc, asum, s, sz = _w4a8_terms(x, w, scales, zeros, group_size)
    y = sx.double().unsqueeze(1) * (s * acc - sz * asum).sum(-1)
    if bias is not None:
        y = y + bias.double()
    return y.reshape(*x.shape[:-1], w.shape[0])


def w4a8_linear(x, w, scales, zeros, group_size, bias=None, w_packed=None):
    """x (..., K) f32/bf16/f16, int4 weight -> (..., N) x.dtype.

    Dynamic per-token int8 activations (reference.quantize_rows_s8), int32 group sums,
    y = sx * sum_g (s*acc_g - (s*z)*asum_g) + bias in fp32.
    """
    sx, acc, asum, s, sz = _w4a8_terms(x, w, scales, zeros, group_size)
    terms = s.float() * acc.float() - sz.float() * asum.float()
    y = sx.unsqueeze(1) * terms.sum(-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], w.shape[0])
