"""GPTQ int4 quantization (Frantar et al., 2022): second-order error compensation per Linear.

For a layer y = x W^T with calibration inputs X (rows x), GPTQ minimises
||X W^T - X Q^T||^2 column by column: it rounds column k of W, then spreads the
rounding error over the not-yet-quantized columns through the inverse Hessian
H^-1, H = 2 X^T X. It works on the upper Cholesky factor of H^-1 and applies the
updates lazily in blocks of ``block_size`` columns.

* damping: ``percdamp * mean(diag H)`` is added to the diagonal; if the Cholesky
  factorisation fails (or yields non-finite values) the damping is multiplied by 10
  and retried, with a WARNING from the ``slmkern`` logger each time; if it never
  succeeds the layer falls back to RTN (which is GPTQ with H = I), also logged.
* act-order (``act_order=True``, a.k.a. desc_act): columns are processed by
  decreasing diag(H), with *static groups*: every group's scale/zero point is fixed
  from the original weight before any update, in natural column order, so the
  output is the plain canonical format (no g_idx). Without act-order, a group's
  parameters are computed when its first column is reached, from the updated
  weights (the standard, slightly better, choice).
* columns whose inputs were always zero (diag H == 0) are quantized by RTN and keep
  their weights (they pass no error on).
* output: canonical int4 (:mod:`slmkern.formats.int4`); never NaN (non-finite
  inputs are rejected, non-finite intermediate results fall back to RTN).

:func:`gptq_quantize_model` runs it over a whole model, block by block (layer by layer
inside a block, each layer calibrated on the outputs of the already-quantized layers).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable

import torch
from torch import nn

from slmkern._logging import logger
from slmkern.algorithms import _calib, rtn
from slmkern.formats import int4

MAX_DAMP = 100.0  # give up (RTN fallback) beyond 100x mean(diag H)


@dataclasses.dataclass
class GPTQStats:
    """What happened to one layer."""

    damp: float = 0.0                # percdamp finally used (fraction of mean diag H)
    retries: int = 0                 # Cholesky retries at higher damping
    fallback: str = ""               # non-empty: why RTN was used instead
    rel_err: float = float("nan")    # ||X (W - Wq)^T||^2 / ||X W^T||^2 on the calibration data
    rtn_rel_err: float = float("nan")  # same for min/max RTN, for comparison
    nsamples: int = 0                # calibration rows (tokens) seen
    seconds: float = 0.0


def _params(w: torch.Tensor, g: int, symmetric: bool, clip: str, col_weight: torch.Tensor | None = None):
    if clip == "mse":
        return rtn.mse_clip_params(w, g, symmetric)
    if clip == "hmse":  # weighted by diag(H): each column's share of the output error
        return rtn.mse_clip_params(w, g, symmetric, col_weight=col_weight)
    return int4.minmax_params(w, g, symmetric)


def _inverse_hessian_factor(H: torch.Tensor, percdamp: float, name: str, stats: GPTQStats):
    """Upper Cholesky factor of (H + damp*I)^-1, retrying with 10x damping on failure (None if hopeless)."""
    mean_diag = float(torch.diagonal(H).mean())
    damp = percdamp
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    while True:
        if torch.isfinite(H).all():
            L, info = torch.linalg.cholesky_ex(H + (damp * mean_diag) * eye)
            if int(info) == 0 and bool(torch.isfinite(L).all()):
                U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
                if int(info) == 0 and bool(torch.isfinite(U).all()) and bool((torch.diagonal(U) > 0).all()):
                    stats.damp = damp
                    return U
        else:
            return None
        nxt = damp * 10.0 if damp > 0 else 1e-4
        if nxt > MAX_DAMP:
            return None
        logger.warning("gptq: %s: Cholesky of the damped Hessian failed at damp=%g x mean(diag H); "
                       "retrying at damp=%g", name, damp, nxt)
        stats.retries += 1
        damp = nxt


def _rel_output_err(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> float:
    D = W - Wq
    num = float((D @ H * D).sum())
    den = float((W @ H * W).sum())
    return num / den if den > 0 else float("nan")


def _rtn(W: torch.Tensor, g: int, symmetric: bool, clip: str, col_weight=None) -> int4.Int4Weight:
    if clip == "hmse" and col_weight is None:
        clip = "mse"
    return rtn.rtn_quantize(W, g, symmetric, clip=clip, col_weight=col_weight if clip == "hmse" else None)


def gptq_quantize(w: torch.Tensor, H: torch.Tensor, group_size: int = 128, symmetric: bool = False,
                  act_order: bool = True, percdamp: float = 0.01, block_size: int = 128,
                  clip: str = "mse", name: str = "weight", nsamples: int = 0
                  ) -> tuple[int4.Int4Weight, GPTQStats]:
    """w [N, K] float, H [K, K] (2/n X^T X) -> (Int4Weight, GPTQStats).

    clip: how group parameters are chosen, "minmax", "mse" (clipping search on the weight
    error) or "hmse" (the same search, each column's error weighted by diag(H)).
    Defaults (act-order with static groups, MSE clipping) measured best on
    all-MiniLM-L6-v2 (benchmarks/accuracy_int4_minilm.py); neither costs anything at
    inference, the output format is the same.
    """
    t0 = time.perf_counter()
    W0 = int4._as_float_weight(w, "w")
    N, K = W0.shape
    g = int4.resolve_group_size(K, group_size)
    if clip not in rtn.CLIP_METHODS:
        raise ValueError(f"clip: expected one of {rtn.CLIP_METHODS}, got {clip!r}")
    if not isinstance(H, torch.Tensor) or not H.is_floating_point() or tuple(H.shape) != (K, K):
        raise ValueError(f"H: expected a float [K, K] = [{K}, {K}] Hessian, got "
                         f"{getattr(H, 'dtype', type(H))} {tuple(getattr(H, 'shape', ()))}")
    if percdamp < 0:
        raise ValueError(f"percdamp: expected >= 0, got {percdamp}")
    if block_size < 1:
        raise ValueError(f"block_size: expected >= 1, got {block_size}")
    stats = GPTQStats(nsamples=nsamples)
    H0 = H.detach().to(device=W0.device, dtype=torch.float32)

    def finish(q: int4.Int4Weight) -> tuple[int4.Int4Weight, GPTQStats]:
        Hf = torch.nan_to_num(H0)
        stats.rel_err = _rel_output_err(W0, q.dequantize(), Hf)
        stats.rtn_rel_err = _rel_output_err(W0, int4.quantize(W0, g, symmetric).dequantize(), Hf)
        stats.seconds = time.perf_counter() - t0
        return q, stats

    def fallback(why: str):
        logger.warning("gptq: %s: %s; using RTN for this layer", name, why)
        stats.fallback = why
        dh = torch.nan_to_num(torch.diagonal(H0)).clamp_min(0)
        return finish(_rtn(W0, g, symmetric, clip, dh))

    Hw = H0.clone()
    dead = torch.diagonal(Hw) == 0
    Hw[dead, dead] = 1.0
    if not bool(torch.isfinite(Hw).all()):
        return fallback("the Hessian has NaN/inf (non-finite calibration activations)")
    if act_order:
        perm = torch.argsort(torch.diagonal(Hw), descending=True, stable=True)
        Hw = Hw[perm][:, perm]
    else:
        perm = torch.arange(K, device=W0.device)
    Hinv = _inverse_hessian_factor(Hw, percdamp, name, stats)
    if Hinv is None:
        return fallback(f"Cholesky failed up to damp={MAX_DAMP} x mean(diag H)")

    # group boundaries must coincide with block boundaries or lie inside one block
    if g <= block_size:
        bs = (block_size // g) * g
    elif g % block_size == 0:
        bs = block_size
    else:
        bs = g
    W = W0[:, perm].clone()
    codes = torch.empty(N, K, dtype=torch.uint8, device=W0.device)
    G = K // g
    dH = torch.diagonal(H0).clamp_min(0)
    if act_order:  # static groups from the original weights, natural order
        scales, zeros = _params(W0, g, symmetric, clip, dH)
    else:
        scales = torch.empty(N, G, dtype=torch.float32, device=W0.device)
        zeros = None if symmetric else torch.empty(N, G, dtype=torch.uint8, device=W0.device)
    zf = int4.zero_tensor(scales, zeros) if act_order else None
    col_group = (perm // g).tolist()
    perm_list = perm.tolist()

    try:
        for i1 in range(0, K, bs):
            i2 = min(i1 + bs, K)
            W1 = W[:, i1:i2].clone()
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                col = i1 + i
                gi = col_group[col]
                if not act_order and col % g == 0:
                    src = W[:, col:col + g] if i == 0 else W1[:, i:i + g]
                    s_g, z_g = _params(src, g, symmetric, clip, dH[perm_list[col]:perm_list[col] + g])
                    scales[:, gi] = s_g[:, 0]
                    if zeros is not None:
                        zeros[:, gi] = z_g[:, 0]
                s = scales[:, gi]
                z = zf[:, gi] if act_order else (zeros[:, gi].float() if zeros is not None
                                                 else torch.full_like(s, float(int4.SYMMETRIC_ZERO)))
                wcol = W1[:, i]
                q = torch.clamp(torch.round(wcol / int4._safe_scale(s)) + z, 0, int4.QMAX)
                codes[:, perm_list[col]] = q.to(torch.uint8)
                err = (wcol - (q - z) * s) / Hinv1[i, i]
                W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
                Err1[:, i] = err
            if not bool(torch.isfinite(Err1).all()):  # one check per block, before NaN can spread
                return fallback("non-finite intermediate weights")
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    except ValueError as e:  # non-finite updated weights reached a group-parameter fit
        return fallback(f"non-finite intermediate weights ({e})")
    if not bool(torch.isfinite(scales).all()):
        return fallback("non-finite group scales")
    return finish(int4.Int4Weight(int4.pack(codes), scales.contiguous(),
                                  None if zeros is None else zeros.contiguous()))


# ----------------------------------------------------------------------------- model driver
FilterFn = Callable[[nn.Module, str], bool]


@dataclasses.dataclass
class GPTQReport:
    """Per-layer GPTQ statistics, and every Linear left alone with the reason."""

    layers: dict[str, GPTQStats] = dataclasses.field(default_factory=dict)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    stages: list[list[str]] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"gptq: quantized {len(self.layers)} layer(s) in {len(self.stages)} stage(s), "
                 f"skipped {len(self.skipped)}"]
        for fqn, st in self.layers.items():
            extra = f" FALLBACK: {st.fallback}" if st.fallback else ""
            extra += f" retries={st.retries}" if st.retries else ""
            lines.append(f"  {fqn}: rel_err {st.rel_err:.3e} (rtn {st.rtn_rel_err:.3e}) "
                         f"damp {st.damp:g} rows {st.nsamples}{extra}")
        lines += [f"  skipped {fqn}: {why}" for fqn, why in self.skipped]
        return "\n".join(lines)


def gptq_quantize_model(model: nn.Module, calibration: Any, group_size: int = 128,
                        symmetric: bool = False, filter_fn: FilterFn | None = None, *,
                        act_order: bool = True, percdamp: float = 0.01, block_size: int = 128,
                        clip: str = "mse", write_back: bool = True, progress: bool = True
                        ) -> tuple[dict[str, int4.Int4Weight], GPTQReport]:
    """Quantize every selected nn.Linear of ``model`` with GPTQ -> ({fqn: Int4Weight}, GPTQReport).

    calibration: an iterable of model inputs -- dicts (``model(**batch)``, e.g. tokenizer
    output), tuples (``model(*batch)``) or tensors (``model(batch)``); it is read into a
    list once and replayed. Layers are quantized one after the other in the order they
    run, each from the Hessian of its inputs *in the already-quantized model*: its weights
    are replaced by their dequantized int4 values before later layers calibrate.

    Block by block (:func:`slmkern.algorithms._calib.layerwise_hessians`): in a stack of
    transformer blocks the calibration inputs of block 0 are captured once; each block is
    calibrated on its cached inputs one *stage* at a time (layers reading one tensor, e.g.
    q/k/v, share a replay), its layers are quantized, and the quantized block is run once
    to give the next block its inputs. Model work is O(depth) instead of O(depth^2);
    layers outside the stack (an output head) get one whole-model pass per stage; a model
    that is not a stack of blocks is replayed up to each stage. Memory: the cached block
    inputs (calibration tokens x hidden x 4 bytes) and one stage's K x K Hessians.

    write_back=False restores the original weights at the end (the returned tensors
    are unchanged). filter_fn(module, fqn) -> bool selects layers (default: all).
    Layers whose in_features is not compatible with group_size are skipped, layers that
    never run during calibration are quantized by RTN; the report says which and why.
    progress: a tqdm bar over the layers (its postfix names the layer being quantized).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected torch.nn.Module, got {type(model).__name__}")
    batches = _calib.as_batches(calibration)
    device = _calib.model_device(model)
    report = GPTQReport()
    targets: dict[str, nn.Linear] = {}
    for fqn, m in model.named_modules():
        if type(m) is not nn.Linear:
            continue
        if filter_fn is not None and not filter_fn(m, fqn):
            report.skipped.append((fqn, "filter_fn returned False"))
        elif not m.weight.is_floating_point():
            report.skipped.append((fqn, f"weight dtype {m.weight.dtype} is not floating point"))
        else:
            try:
                int4.resolve_group_size(m.in_features, group_size)
            except (ValueError, TypeError) as e:
                report.skipped.append((fqn, f"in_features={m.in_features}: {e}"))
                continue
            targets[fqn] = m
    if not targets:
        raise ValueError("model: has no torch.nn.Linear layers to quantize (after filter_fn)")

    was_training = model.training
    model.eval()
    originals = {fqn: m.weight.detach().clone() for fqn, m in targets.items()} if not write_back else {}
    out: dict[str, int4.Int4Weight] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(targets), desc="gptq", unit="layer")
    try:
        for fqn, mod, acc in _calib.layerwise_hessians(model, targets, batches, device, report.stages):
            if bar is not None:
                bar.set_postfix_str(fqn, refresh=False)
            if acc is None or acc.n == 0:
                q = rtn.rtn_quantize(mod.weight, group_size, symmetric, clip="mse" if clip == "hmse" else clip)
                if acc is None:
                    st = GPTQStats(fallback="never called during calibration; RTN")
                    logger.log(logging.INFO, "gptq: %s never ran on the calibration data; quantized by RTN", fqn)
                else:  # ran, but with no tensor input we could read
                    st = GPTQStats(fallback="no input rows captured during calibration; RTN")
                    logger.warning("gptq: %s: no input rows captured; quantized by RTN", fqn)
            else:
                q, st = gptq_quantize(mod.weight, acc.H, group_size, symmetric, act_order=act_order,
                                      percdamp=percdamp, block_size=block_size, clip=clip,
                                      name=fqn, nsamples=acc.n)
            del acc
            _store(mod, q)
            out[fqn] = q
            report.layers[fqn] = st
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        for fqn, w in originals.items():
            with torch.no_grad():
                targets[fqn].weight.copy_(w)
        model.train(was_training)
    report.layers = {fqn: report.layers[fqn] for fqn in targets if fqn in report.layers}  # model order
    return out, report


def _store(mod: nn.Linear, q: int4.Int4Weight) -> None:
    with torch.no_grad():
        mod.weight.copy_(q.dequantize(mod.weight.dtype).to(mod.weight.device))
