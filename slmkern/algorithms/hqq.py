"""HQQ-style data-free int4 quantization: half-quadratic refinement of scales and zero points.

Half-Quadratic Quantization (Badri & Shaji, 2023) models the quantization error as
sparse: with the codes Q fixed, it splits the error W - deq(Q) into a sparse part
W_e (the proximal step of an l_p norm, p < 1, which keeps large errors -- clipped
outliers -- and zeroes small ones) and fits the affine dequantization to the rest,
W - W_e, by least squares. It then re-rounds Q and repeats, with the penalty
weight beta growing each iteration.

Differences from the original, so that the output is the canonical slmkern int4
format (integer zero points in 0..15, fp32 scales):

* both the scale and the zero point are refit (HQQ refits only a float zero), and
  the zero point is rounded to an integer before the scale is refit given it;
* the shrinkage acts on errors measured in quantization steps (error / scale), so
  ``beta`` does not depend on the magnitude of the weights;
* every iterate is scored by its true squared reconstruction error and each group
  keeps its best one (the l_p objective drives the search; the MSE picks the
  result), so the result is never worse than its initialisation in MSE.
"""
from __future__ import annotations

import torch

from slmkern.formats import int4
from slmkern.algorithms import rtn

INITS = ("minmax", "mse")


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Proximal step of the l_p (p < 1) penalty: sign(x) * relu(|x| - |x|^(p-1) / beta)."""
    ax = x.abs()
    thr = ax.clamp_min(1e-12).pow(p - 1.0) / beta
    return torch.sign(x) * torch.relu(ax - thr)


def _sq_err_and_codes(wg: torch.Tensor, s: torch.Tensor, z: torch.Tensor):
    q = torch.clamp(torch.round(wg / s) + z, 0, int4.QMAX)
    err = (wg - (q - z) * s).square().sum(dim=-1, keepdim=True)
    return err, q


def hqq_params(w: torch.Tensor, group_size: int = 128, symmetric: bool = False, iters: int = 20,
               p: float = 0.7, beta: float = 3.0, kappa: float = 1.05, init: str = "mse"
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """w [N, K] float -> (scales f32 [N, K/g], zeros uint8 [N, K/g] | None), refined by HQQ."""
    if init not in INITS:
        raise ValueError(f"init: expected one of {INITS}, got {init!r}")
    if not 0.0 < p < 1.0:
        raise ValueError(f"p: expected 0 < p < 1 (a sparsity-promoting l_p norm), got {p}")
    if iters < 0:
        raise ValueError(f"iters: expected >= 0, got {iters}")
    if beta <= 0 or kappa < 1.0:
        raise ValueError(f"beta, kappa: expected beta > 0 and kappa >= 1, got {beta}, {kappa}")
    wf = int4._as_float_weight(w)
    N, K = wf.shape
    g = int4.resolve_group_size(K, group_size)
    if init == "minmax":
        s0, z0 = int4.minmax_params(wf, g, symmetric)
    else:
        s0, z0 = rtn.mse_clip_params(wf, g, symmetric)
    wg = wf.reshape(-1, g)
    s = s0.reshape(-1, 1).clone()
    z = int4.zero_tensor(s0, z0).reshape(-1, 1)
    best_s, best_z = s.clone(), z.clone()
    best_err = None
    for _ in range(iters + 1):
        err, q = _sq_err_and_codes(wg, s, z)
        if best_err is None:
            best_err = err
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, s, best_s)
            best_z = torch.where(better, z, best_z)
        # sparse error (in steps -> weight units); the fit targets the rest
        e = shrink_lp((wg - (q - z) * s) / s, beta, p) * s
        t = wg - e
        if symmetric:
            d = q - int4.SYMMETRIC_ZERO
            num, den = (t * d).sum(-1, keepdim=True), d.square().sum(-1, keepdim=True)
            ok = (den > 0) & (num > 0)
            s = torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), s)
        else:
            qm, tm = q.mean(-1, keepdim=True), t.mean(-1, keepdim=True)
            var = (q - qm).square().sum(-1, keepdim=True)
            cov = ((q - qm) * (t - tm)).sum(-1, keepdim=True)
            ok = (var > 0) & (cov > 0)
            a = torch.where(ok, cov / torch.where(ok, var, torch.ones_like(var)), s)
            b = tm - a * qm
            z_new = torch.where(ok, torch.clamp(torch.round(-b / a), 0, int4.QMAX), z)
            d = q - z_new
            num, den = (t * d).sum(-1, keepdim=True), d.square().sum(-1, keepdim=True)
            ok2 = (den > 0) & (num > 0)
            s = torch.where(ok2, num / torch.where(ok2, den, torch.ones_like(den)), a)
            z = z_new
        s = torch.where(torch.isfinite(s) & (s > 0), s, best_s)
        beta *= kappa
    scales = best_s.reshape(N, K // g).contiguous()
    zeros = None if symmetric else best_z.reshape(N, K // g).to(torch.uint8).contiguous()
    return scales, zeros


def hqq_quantize(w: torch.Tensor, group_size: int = 128, symmetric: bool = False, iters: int = 20,
                 p: float = 0.7, beta: float = 3.0, kappa: float = 1.05, init: str = "mse"
                 ) -> int4.Int4Weight:
    """w [N, K] float -> Int4Weight(packed uint8 [N, K/2], scales f32 [N, K/g], zeros uint8 | None).

    Data-free; ``iters`` half-quadratic iterations from the ``init`` RTN solution
    ("mse": clipping search, "minmax": full range). p is the l_p exponent of the
    error model, beta its initial weight (in quantization steps), kappa its growth.
    """
    scales, zeros = hqq_params(w, group_size, symmetric, iters=iters, p=p, beta=beta,
                               kappa=kappa, init=init)
    codes = int4.quantize_codes(w, scales, zeros, group_size)
    return int4.Int4Weight(int4.pack(codes), scales, zeros)
