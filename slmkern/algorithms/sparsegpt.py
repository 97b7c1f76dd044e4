"""SparseGPT (Frantar & Alistarh, 2023): one-shot pruning with OBS weight updates, optionally fused with quantization.

For a layer y = x W^T with calibration inputs X, SparseGPT walks the columns of W in
blocks: it picks the mask of a block from the saliency ``w^2 / [H^-1]_jj^2`` (H = 2/n X^T X,
through the upper Cholesky factor of H^-1), zeroes the pruned weights of each column
and spreads the resulting error over the not-yet-processed columns, exactly as GPTQ
does with rounding error (the same Hessian machinery: :mod:`slmkern.algorithms._calib`).

* unstructured s: each block of columns prunes its share of the layer's
  ``floor(s * N*K + 0.5)`` weights (block quotas telescope, so the total is exact),
  the lowest saliencies over the block's rows and columns, as in the paper.
* "N:M": at every M-th column the M-N lowest saliencies of the next M columns of each
  row are pruned, using the already-updated weights.
* ``quantize`` (None, Int4Config, Int8Config, or any spec with bits/group_size/symmetric):
  every kept weight is rounded onto the quantization grid in the same sweep (the
  paper's joint sparsification + quantization), so the error of both is compensated
  together. int4 group parameters are fitted when a group's first column is reached
  (from its updated, already-masked weights; groups never straddle a block), int8
  per-channel scales from the original rows. The codes come back in
  ``report.quantized[fqn]`` (:class:`slmkern.formats.int4.Int4Weight` or
  :class:`slmkern.algorithms._prune.Int8Weight`); the Linear's weight is set to their
  exact dequantized values (pruned weights are exact zeros: their code is the zero point).
* damping: ``percdamp * mean(diag H)``, retried at 10x with a WARNING when Cholesky fails;
  if it never succeeds, or the layer got no calibration input, or intermediate values
  turn non-finite, the layer is processed with H = I (magnitude pruning, plain RTN
  if quantizing), also logged and noted in the report. Nothing returns NaN.

:func:`sparsegpt_prune_` runs it over a model layer stage by stage: later layers
calibrate on the already pruned (and quantized) model's activations.
"""
from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn

from slmkern._logging import logger
from slmkern.algorithms import _calib, _prune
from slmkern.algorithms._prune import FilterFn, Int8Weight, Pattern, PruneReport, QuantSpec
from slmkern.algorithms.gptq import _params as _int4_params
from slmkern.algorithms.gptq import _rel_output_err
from slmkern.formats import int4


def _block_size(blocksize: int, p: Pattern, g: int | None) -> int:
    """Blocks hold whole N:M groups and whole quantization groups: a multiple of lcm(M, g) near blocksize."""
    L = math.lcm(p.m if p.is_nm else 1, g or 1)
    return L * max(1, -(-blocksize // L))


def sparsegpt_prune(w: torch.Tensor, H: torch.Tensor | None, pattern: Any, blocksize: int = 128,
                    percdamp: float = 0.01, quantize: Any = None, name: str = "weight"
                    ) -> tuple[torch.Tensor, Any, dict]:
    """w [N, K] float, H [K, K] (2/n X^T X, or None: no data) -> (pruned W fp32, quantized | None, info).

    info: rel_err, magnitude_rel_err, damp, retries, fallback (see :class:`_prune.LayerPrune`).
    quantized: Int4Weight / Int8Weight whose dequantization is the returned W, or None.
    """
    t0 = time.perf_counter()
    p = _prune.parse_pattern(pattern)
    spec = _prune.quant_spec(quantize)
    W0 = int4._as_float_weight(w, "w")
    N, K = W0.shape
    if p.is_nm and K % p.m:
        raise ValueError(f"w: K={K} is not a multiple of M={p.m} for pattern '{p}'")
    if blocksize < 1:
        raise ValueError(f"blocksize: expected >= 1, got {blocksize}")
    if percdamp < 0:
        raise ValueError(f"percdamp: expected >= 0, got {percdamp}")
    g = None
    if spec is not None and spec.bits == 4:
        g = int4.resolve_group_size(K, spec.group_size, "quantize.group_size")
    if H is not None and (not isinstance(H, torch.Tensor) or not H.is_floating_point()
                          or tuple(H.shape) != (K, K)):
        raise ValueError(f"H: expected a float [K, K] = [{K}, {K}] Hessian, got "
                         f"{getattr(H, 'dtype', type(H))} {tuple(getattr(H, 'shape', ()))}")
    info = {"rel_err": float("nan"), "magnitude_rel_err": float("nan"), "damp": 0.0, "retries": 0,
            "fallback": ""}

    U = None
    if H is None:
        info["fallback"] = "no calibration input; H = I (magnitude" + (" + RTN)" if spec else ")")
    else:
        H0 = H.detach().to(device=W0.device, dtype=torch.float32)
        Hw = H0.clone()
        dead = torch.diagonal(Hw) == 0
        Hw[dead, dead] = 1.0   # inputs always zero: any value is free; rank by magnitude there
        U, info["damp"], info["retries"] = _calib.inverse_hessian_factor(Hw, percdamp, name, tag="sparsegpt")
        if U is None:
            why = ("the Hessian has NaN/inf" if not bool(torch.isfinite(Hw).all())
                   else f"Cholesky failed up to damp={_calib.MAX_DAMP} x mean(diag H)")
            info["fallback"] = why + "; H = I"
            logger.warning("sparsegpt: %s: %s; pruning by magnitude%s", name, why, " + RTN" if spec else "")
    out = None
    if U is not None:
        out = _sweep(W0, U, p, spec, g, blocksize)
        if out is None:
            info["fallback"] = "non-finite intermediate weights; H = I"
            logger.warning("sparsegpt: %s: non-finite intermediate weights; pruning by magnitude%s",
                           name, " + RTN" if spec else "")
    if out is None:
        out = _sweep(W0, torch.eye(K, dtype=torch.float32, device=W0.device), p, spec, g, blocksize)
    Wp, q = out
    if H is not None:
        Hf = torch.nan_to_num(H.detach().to(device=W0.device, dtype=torch.float32))
        info["rel_err"] = _rel_output_err(W0, Wp, Hf)
        keep = _prune.mask_from_pattern(W0.abs(), p)
        info["magnitude_rel_err"] = _rel_output_err(W0, W0 * keep, Hf)
    info["seconds"] = time.perf_counter() - t0
    return Wp, q, info


def _sweep(W0: torch.Tensor, U: torch.Tensor, p: Pattern, spec: QuantSpec | None, g: int | None,
           blocksize: int) -> tuple[torch.Tensor, Any] | None:
    """The OBS column sweep with upper Cholesky factor U of H^-1; None if values turn non-finite.

    Works on W^T (column k of W is the contiguous row k), so every per-column step
    reads and updates contiguous memory and the rank-1 update is one BLAS ``ger``.
    """
    N, K = W0.shape
    per_channel4 = spec is not None and spec.bits == 4 and g == K
    bs = _block_size(blocksize, p, g if (spec is not None and spec.bits == 4 and not per_channel4) else None)
    Wt = W0.T.contiguous()                       # [K, N]
    Qt = torch.zeros_like(Wt)
    codes = scales = zeros = zf = None           # transposed too: [K, N] codes, [G, N] params
    if spec is not None and spec.bits == 8:
        codes = torch.zeros(K, N, dtype=torch.int8, device=Wt.device)
        amax = W0.abs().amax(dim=1)
        scales = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    elif spec is not None:
        codes = torch.zeros(K, N, dtype=torch.uint8, device=Wt.device)
        if per_channel4:   # one group: parameters from the original rows
            s_, z_ = _int4_params(W0, K, spec.symmetric, spec.clip)
            scales, zeros = s_.T.contiguous(), None if z_ is None else z_.T.contiguous()
        else:
            scales = torch.ones(K // g, N, dtype=torch.float32, device=Wt.device)
            zeros = None if spec.symmetric else torch.zeros(K // g, N, dtype=torch.uint8, device=Wt.device)
        zf = torch.full_like(scales, float(int4.SYMMETRIC_ZERO)) if zeros is None else zeros.float()

    for i1 in range(0, K, bs):
        i2 = min(i1 + bs, K)
        cnt = i2 - i1
        W1 = Wt[i1:i2].clone()                   # [cnt, N]
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = U[i1:i2, i1:i2]
        d = torch.diagonal(Hinv1).contiguous()
        if p.is_nm:
            prune1 = torch.zeros(cnt, N, dtype=torch.bool, device=Wt.device)
        else:   # this block's share of the layer's exact total, lowest saliency over rows and columns
            k = _prune.n_pruned(p.sparsity, N * i2) - _prune.n_pruned(p.sparsity, N * i1)
            sal = W1.square() / d.square().unsqueeze(1)
            prune1 = _prune._lowest_k_mask(sal.T.reshape(1, -1), k).reshape(N, cnt).T.contiguous()
        for i in range(cnt):
            col = i1 + i
            if p.is_nm and i % p.m == 0:
                sal = W1[i:i + p.m].square() / d[i:i + p.m].square().unsqueeze(1)
                prune1[i:i + p.m] = _prune._lowest_k_mask(sal.T, p.m - p.n).T
            wcol = W1[i]
            pr = prune1[i]
            q = wcol.masked_fill(pr, 0.0)
            if spec is not None and spec.bits == 8:
                c = torch.clamp(torch.round(q / scales), -127, 127)
                codes[col] = c.to(torch.int8)
                q = c * scales
            elif spec is not None:
                gi = col // g
                if not per_channel4 and col % g == 0:
                    src = (W1[i:i + g] * ~prune1[i:i + g]).T   # known-pruned weights count as 0
                    if not bool(torch.isfinite(src).all()):
                        return None
                    s_g, z_g = _int4_params(src, g, spec.symmetric, spec.clip)
                    scales[gi] = s_g[:, 0]
                    if zeros is not None:
                        zeros[gi] = z_g[:, 0]
                        zf[gi] = z_g[:, 0].float()
                sc, z = scales[gi], zf[gi]
                c = torch.clamp(torch.round(q / int4._safe_scale(sc)) + z, 0, int4.QMAX)
                c = torch.where(pr, z, c)                       # pruned: exactly the zero point
                codes[col] = c.to(torch.uint8)
                q = (c - z) * sc
            Q1[i] = q
            err = (wcol - q) / d[i]
            W1[i:].addr_(Hinv1[i, i:], err, alpha=-1.0)
            Err1[i] = err
        if not bool(torch.isfinite(Err1).all()):
            return None
        Qt[i1:i2] = Q1
        if i2 < K:
            Wt[i2:].addmm_(U[i1:i2, i2:].T, Err1, alpha=-1.0)
    if spec is None:
        return Qt.T.contiguous(), None
    if spec.bits == 8:
        qw = Int8Weight(codes.T.contiguous(), scales.contiguous())
    else:
        qw = int4.Int4Weight(int4.pack(codes.T.contiguous()), scales.T.contiguous(),
                             None if zeros is None else zeros.T.contiguous())
    return qw.dequantize(), qw


def sparsegpt_prune_(model: nn.Module, calibration: Any, pattern: Any, filter_fn: FilterFn | None = None,
                     blocksize: int = 128, percdamp: float = 0.01, quantize: Any = None, *,
                     progress: bool = True) -> PruneReport:
    """Prune (and optionally quantize) every selected nn.Linear of ``model`` in place -> PruneReport.

    calibration: an iterable of model inputs (dicts -> ``model(**b)``, tuples, or tensors
    of token ids); read into a list once. Layers are processed one *stage* at a time
    (consecutive layers reading the same tensor, e.g. q/k/v), each stage's Hessians
    coming from the model whose earlier layers are already pruned. In a stack of
    blocks (transformer layers) the block inputs are cached and only the current block
    is replayed per stage (:func:`_calib.blockwise_hessians`); otherwise the whole
    model is re-run up to the stage. Memory: one stage's K x K Hessians (plus the
    cached block inputs) at a time. filter_fn(module, fqn) -> bool picks the layers (default: every
    Linear except heads, poolers and embedding modules). With ``quantize``, layers whose
    in_features does not fit the int4 group size are skipped (reason in the report).
    """
    p = _prune.parse_pattern(pattern)
    spec = _prune.quant_spec(quantize)
    if blocksize < 1:
        raise ValueError(f"blocksize: expected >= 1, got {blocksize}")
    if percdamp < 0:
        raise ValueError(f"percdamp: expected >= 0, got {percdamp}")
    method = "sparsegpt"
    if spec is not None:
        method += f"+int{spec.bits}" + (f" g{spec.group_size}{' sym' if spec.symmetric else ''}"
                                        if spec.bits == 4 else "")
    report = PruneReport(method=method, pattern=str(p))
    targets = _prune.select_targets(model, p, filter_fn, report)
    if spec is not None and spec.bits == 4:
        for fqn in list(targets):
            try:
                int4.resolve_group_size(targets[fqn].in_features, spec.group_size, "quantize.group_size")
            except (ValueError, TypeError) as e:
                report.skipped.append((fqn, f"in_features={targets[fqn].in_features}: {e}"))
                del targets[fqn]
    batches = _calib.as_batches(calibration)
    if not targets:
        return report
    device = _calib.model_device(model)
    was_training = model.training
    model.eval()
    bar = _prune.progress_bar(progress, len(targets), "sparsegpt")

    def do(fqn: str, mod: nn.Linear, H: torch.Tensor | None, rows: int) -> None:
        Wp, q, info = sparsegpt_prune(mod.weight, H, p, blocksize, percdamp, spec, name=fqn)
        with torch.no_grad():
            mod.weight.copy_(Wp.to(dtype=mod.weight.dtype, device=mod.weight.device))
        if q is not None:
            report.quantized[fqn] = q
        _prune.record(report, fqn, mod, p, nsamples=rows, **info)
        if bar is not None:
            bar.update(1)

    try:
        for fqn, mod, acc in _calib.layerwise_hessians(model, targets, batches, device):
            if acc is None or acc.n == 0:
                logger.warning("sparsegpt: %s: no input captured during calibration; H = I", fqn)
                do(fqn, mod, None, 0)
            else:
                do(fqn, mod, acc.H, acc.n)
            del acc
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    report.layers = {fqn: report.layers[fqn] for fqn in targets if fqn in report.layers}  # model order
    return report
