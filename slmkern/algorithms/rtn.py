"""Round-to-nearest int4 quantization: min/max, or an MSE-optimal clipping search per group.

Both emit the canonical int4 format of :mod:`slmkern.formats.int4`
(``Int4Weight(packed, scales, zeros)``); the dequantized weight is exactly what a
w4a16 kernel computes with.
"""
from __future__ import annotations

import torch

from slmkern.formats import int4

CLIP_METHODS = ("minmax", "mse", "hmse")


def _check_col_weight(col_weight: torch.Tensor | None, K: int) -> torch.Tensor | None:
    if col_weight is None:
        return None
    if not isinstance(col_weight, torch.Tensor) or tuple(col_weight.shape) != (K,):
        raise ValueError(f"col_weight: expected a float tensor [K] = [{K}], got "
                         f"{tuple(getattr(col_weight, 'shape', ()))}")
    cw = col_weight.detach().float()
    if not bool(torch.isfinite(cw).all()) or bool((cw < 0).any()):
        raise ValueError("col_weight: expected finite, non-negative weights")
    return cw


def group_sq_error(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                   group_size: int, col_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-group squared reconstruction error sum_k c_k (w - deq(q(w)))^2 -> fp32 [N, K/g].

    col_weight c [K] (default all ones): per-input-column importance, e.g. diag(X^T X), which
    makes the sum each group's share of the layer's output error when inputs are uncorrelated.
    """
    wf = w.float()
    N, K = wf.shape
    g = int4.resolve_group_size(K, group_size)
    cw = _check_col_weight(col_weight, K)
    codes = int4.quantize_codes(wf, scales, zeros, g)
    z = int4.zero_tensor(scales, zeros).unsqueeze(-1)
    deq = (codes.reshape(N, K // g, g).float() - z) * scales.unsqueeze(-1)
    e = (wf.reshape(N, K // g, g) - deq).square()
    if cw is not None:
        e = e * cw.reshape(1, K // g, g)
    return e.sum(dim=-1)


def mse_clip_params(w: torch.Tensor, group_size: int = 128, symmetric: bool = False,
                    grid: int = 20, min_ratio: float = 0.5, col_weight: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """w [N, K] float -> (scales, zeros | None) minimising each group's squared error.

    Tries ``grid`` shrink ratios r evenly spaced from 1 (plain min/max) down to
    ``min_ratio``, quantizing with the range [r*lo, r*hi], and keeps per group the
    ratio with the smallest squared error (ties keep the larger range), so the result
    is never worse than min/max in MSE. col_weight [K]: weight each column's squared
    error (see :func:`group_sq_error`); the guarantee then holds for the weighted error.
    """
    if grid < 1:
        raise ValueError(f"grid: expected >= 1 shrink ratios, got {grid}")
    if not 0.0 < min_ratio <= 1.0:
        raise ValueError(f"min_ratio: expected 0 < min_ratio <= 1, got {min_ratio}")
    wf = int4._as_float_weight(w)
    N, K = wf.shape
    g = int4.resolve_group_size(K, group_size)
    wg = wf.reshape(N, K // g, g)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    best_s = best_z = best_err = None
    for r in torch.linspace(1.0, min_ratio, grid).tolist():
        s, z = int4.params_from_range(lo * r, hi * r, symmetric)
        err = group_sq_error(wf, s, z, g, col_weight)
        if best_err is None:
            best_s, best_z, best_err = s, z, err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        if z is not None:
            best_z = torch.where(better, z, best_z)
    return best_s.contiguous(), None if best_z is None else best_z.contiguous()


def rtn_quantize(w: torch.Tensor, group_size: int = 128, symmetric: bool = False,
                 clip: str = "minmax", grid: int = 20, min_ratio: float = 0.5,
                 col_weight: torch.Tensor | None = None) -> int4.Int4Weight:
    """w [N, K] float -> Int4Weight(packed uint8 [N, K/2], scales f32 [N, K/g], zeros uint8 | None).

    clip="minmax": each group's full range (every element within scale/2 of its grid
    point). clip="mse": per-group search over shrink ratios (see :func:`mse_clip_params`).
    clip="hmse": the same search weighting each column's error by ``col_weight`` (e.g.
    diag(X^T X) from calibration data; required).
    """
    if clip not in CLIP_METHODS:
        raise ValueError(f"clip: expected one of {CLIP_METHODS}, got {clip!r}")
    if clip == "hmse" and col_weight is None:
        raise ValueError("clip='hmse': needs col_weight (per-input-column importance, e.g. diag(X^T X))")
    if clip == "minmax":
        scales, zeros = int4.minmax_params(w, group_size, symmetric)
    else:
        scales, zeros = mse_clip_params(w, group_size, symmetric, grid=grid, min_ratio=min_ratio,
                                        col_weight=col_weight if clip == "hmse" else None)
    codes = int4.quantize_codes(w, scales, zeros, group_size)
    return int4.Int4Weight(int4.pack(codes), scales, zeros)
