"""Pure-torch implementation of every slmkern op: the definition of "correct".

Every kernel (C++ on CPU, Triton on CUDA) is tested against these functions on
fresh random data. They run on any device and are the fallback for devices
without a dedicated kernel. Integer parts are exact; float epilogues use the
same fp32 operation order as the kernels (no fused multiply-add), so integer
paths match bit for bit.
"""
from __future__ import annotations

import torch

# Rows whose absmax is below this quantize to all-zero with scale 0, which
# keeps 127 / absmax finite. Mirrors kActZeroThreshold in csrc/include/slmkern/common.h.
ACT_ZERO_THRESHOLD = 2.0 ** -100


def quantize_rows_s8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) float -> (q int8 (M, K), scale fp32 (M,)): dynamic per-row symmetric int8.

    amax = max|x|; scale = amax / 127; q = clamp(round_half_even(x * (127 / amax)), -127, 127).
    A row with a NaN or inf gets q = 0 and scale = NaN, so its outputs are NaN.
    A row with amax < 2^-100 (e.g. all zeros) gets q = 0 and scale = 0.
    """
    xf = x.float()
    amax = xf.abs().amax(dim=-1)
    finite = torch.isfinite(amax)
    ok = finite & (amax >= ACT_ZERO_THRESHOLD)
    safe = torch.where(ok, amax, torch.ones_like(amax))
    inv = torch.full_like(amax, 127.0) / safe
    q = torch.round(xf * inv.unsqueeze(-1)).clamp_(-127, 127)
    q = torch.where(ok.unsqueeze(-1), q, torch.zeros_like(q)).to(torch.int8)
    scale = torch.where(ok, safe / 127.0, torch.where(finite, torch.zeros_like(amax),
                                                      torch.full_like(amax, float("nan"))))
    return q, scale


def _int_matmul_exact(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (M, K) int8 @ b (N, K).T int8 -> int32 (M, N), exact (float64 holds every partial sum)."""
    return (a.double() @ b.double().T).to(torch.int32)


def _epilogue(acc_f32: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = acc_f32 * scale
    if bias is not None:
        y = y + bias.float()
    return y


def w8a8_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None = None, w_packed: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) f32/bf16/f16, w (N, K) int8, w_scale (N,) f32 -> (..., N) in x.dtype.

    Dynamic per-token int8 activations, int32 accumulation, per-channel dequant:
    y = float(qx @ w.T) * (sx * w_scale) + bias. w_packed (a CPU layout) is ignored.
    """
    K, N = x.shape[-1], w.shape[0]
    x2 = x.reshape(-1, K)
    q, sx = quantize_rows_s8(x2)
    acc = _int_matmul_exact(q, w).float()
    y = _epilogue(acc, sx.unsqueeze(1) * w_scale.float().unsqueeze(0), bias)
    return y.to(x.dtype).reshape(*x.shape[:-1], N)


def w8a16_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                 bias: torch.Tensor | None = None, w_packed: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) f32/bf16/f16, w (N, K) int8, w_scale (N,) f32 -> (..., N) in x.dtype.

    Weight-only int8: y = (x @ float(w).T) * w_scale + bias, accumulated in fp32.
    """
    K, N = x.shape[-1], w.shape[0]
    x2 = x.reshape(-1, K).float()
    acc = x2 @ w.float().T
    y = _epilogue(acc, w_scale.float().unsqueeze(0), bias)
    return y.to(x.dtype).reshape(*x.shape[:-1], N)
