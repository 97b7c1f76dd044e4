"""Sensitivity-driven mixed precision: which layers to keep in int8 inside an int4 model, within a byte budget.

1. :func:`int8_sensitivity` measures, for each candidate *unit* (a set of Linears, e.g. one
   block's attention q/k/v/o or its MLP gate/up/down), how much the loss of an int4 model
   falls when that unit alone is put back at int8 (per-channel, symmetric): the mean token
   negative log-likelihood on held-out text, with the unit at int4 vs at int8, every other
   layer staying int4. That is a measured perplexity impact, ``exp(gain)`` being the
   perplexity ratio. Use text that is neither the evaluation text nor (ideally) the
   calibration rows.
2. :func:`choose_int8_units` picks units greedily by gain per extra byte and never exceeds the
   byte budget (a unit that does not fit is skipped, smaller ones after it may still fit).

Byte accounting (:func:`int4_bytes`, :func:`int8_bytes`) follows slmkern's canonical formats
by default (int4: packed codes K/2 bytes per row, fp32 scales and uint8 zero points per group;
int8: one byte per weight plus an fp32 scale per output row); ``scale_bytes=2, zero_bits=4``
gives the packed-equivalent count (fp16 scales, 4-bit zero points, as the compressed-tensors
export or GGUF store them).
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import nn


def int4_bytes(N: int, K: int, group_size: int, symmetric: bool = False, *, scale_bytes: float = 4,
               zero_bits: float = 8) -> float:
    """Bytes of one [N, K] int4 weight: codes, group scales and (asymmetric) zero points."""
    g = K if group_size == -1 else group_size
    groups = N * (K // g)
    return N * K / 2 + groups * scale_bytes + (0 if symmetric else groups * zero_bits / 8)


def int8_bytes(N: int, K: int, *, scale_bytes: float = 4) -> float:
    """Bytes of one [N, K] int8 weight with per-output-channel scales."""
    return N * K + N * scale_bytes


def bits_per_weight(layers: dict[str, tuple[int, int]], int8_layers: Iterable[str], group_size: int,
                    symmetric: bool = False, *, scale_bytes: float = 4, zero_bits: float = 8,
                    int4_group: Callable[[str, int], int] | None = None) -> float:
    """Average bits per weight over ``layers`` ({fqn: (N, K)}): int8 for ``int8_layers``, int4 otherwise.

    int4_group(fqn, K) -> group size overrides ``group_size`` per layer (mixed group sizes).
    """
    int8_layers = set(int8_layers)
    tot_bytes = 0.0
    tot_w = 0
    for fqn, (N, K) in layers.items():
        tot_w += N * K
        if fqn in int8_layers:
            tot_bytes += int8_bytes(N, K, scale_bytes=scale_bytes)
        else:
            g = int4_group(fqn, K) if int4_group is not None else group_size
            tot_bytes += int4_bytes(N, K, g, symmetric, scale_bytes=scale_bytes, zero_bits=zero_bits)
    return 8 * tot_bytes / tot_w


def choose_int8_units(gains: dict[str, float], extra_bytes: dict[str, float], budget_bytes: float
                      ) -> list[str]:
    """Units to put in int8: greedy by gain / extra byte, total extra bytes <= budget_bytes.

    Units with no positive gain are never chosen. Returns the chosen names, best first.
    """
    if budget_bytes < 0:
        raise ValueError(f"budget_bytes: expected >= 0, got {budget_bytes}")
    missing = set(gains) - set(extra_bytes)
    if missing:
        raise ValueError(f"extra_bytes: no size for {sorted(missing)}")
    order = sorted((u for u in gains if gains[u] > 0 and extra_bytes[u] > 0),
                   key=lambda u: gains[u] / extra_bytes[u], reverse=True)
    chosen, used = [], 0.0
    for u in order:
        if used + extra_bytes[u] <= budget_bytes:
            chosen.append(u)
            used += extra_bytes[u]
    return chosen


def fake_int8(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel symmetric int8 round trip (the values an Int8Linear computes with)."""
    wf = w.detach().float()
    s = wf.abs().amax(dim=1, keepdim=True) / 127.0
    s = torch.where(s > 0, s, torch.ones_like(s))
    return (torch.clamp(torch.round(wf / s), -127, 127) * s).to(w.dtype)


@torch.no_grad()
def mean_nll(model: nn.Module, windows: list[torch.Tensor]) -> float:
    """Mean next-token NLL of a causal LM over token windows (each [T] or [1, T], scored alone)."""
    nll, n = 0.0, 0
    for ids in windows:
        ids = ids.reshape(1, -1)
        logits = model(input_ids=ids).logits.float()
        logp = torch.log_softmax(logits[0, :-1], dim=-1)
        nll -= float(logp.gather(1, ids[0, 1:].unsqueeze(1)).sum())
        n += ids.shape[1] - 1
    return nll / n


@torch.no_grad()
def int8_sensitivity(model: nn.Module, float_weights: dict[str, torch.Tensor], units: dict[str, list[str]],
                     windows: list[torch.Tensor], loss: Callable[[nn.Module, list], float] = mean_nll,
                     progress: bool = False) -> tuple[dict[str, float], float]:
    """({unit: loss(int4 model) - loss(unit at int8)}, loss(int4 model)).

    ``model`` holds the int4 (dequantized) weights in its Linears; ``float_weights`` the
    float weights of every Linear named in ``units`` (int8 is made from them). Each unit is
    swapped in, measured and swapped back; the model is left as it was given.
    """
    mods = dict(model.named_modules())
    for u, fqns in units.items():
        for f in fqns:
            if f not in float_weights or not isinstance(mods.get(f), nn.Linear):
                raise ValueError(f"units[{u!r}]: {f!r} is not a Linear with a float weight given")
    base = loss(model, windows)
    gains = {}
    it = units.items()
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(list(it), desc="int8 sensitivity", unit="unit")
    for u, fqns in it:
        saved = {f: mods[f].weight.detach().clone() for f in fqns}
        try:
            for f in fqns:
                mods[f].weight.copy_(fake_int8(float_weights[f]))
            gains[u] = base - loss(model, windows)
        finally:
            for f, w in saved.items():
                mods[f].weight.copy_(w)
    if not math.isfinite(base):
        raise ValueError("model: its int4 loss is not finite")
    return gains, base
