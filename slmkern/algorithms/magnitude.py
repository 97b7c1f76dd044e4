"""Magnitude pruning: zero the weights of smallest |w| (data-free baseline).

* ``scope="layer"``: each Linear separately; unstructured sparsity s prunes exactly
  ``floor(s * N*K + 0.5)`` weights of the layer, "N:M" the M-N smallest of every group
  of M consecutive k in each row.
* ``scope="global"`` (unstructured only): one threshold over every selected Linear
  together, pruning exactly ``floor(s * total + 0.5)`` weights; layers end up with
  different sparsities.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slmkern.algorithms import _prune
from slmkern.algorithms._prune import FilterFn, PruneReport


def magnitude_prune_(model: nn.Module, pattern: Any, scope: str = "layer",
                     filter_fn: FilterFn | None = None) -> PruneReport:
    """Prune every selected nn.Linear of ``model`` in place by |w| -> PruneReport.

    pattern: float sparsity in [0, 1) or "N:M". filter_fn(module, fqn) -> bool picks the
    layers (default: every Linear except heads, poolers and embedding modules).
    """
    p = _prune.parse_pattern(pattern)
    if scope not in ("layer", "global"):
        raise ValueError(f"scope: expected 'layer' or 'global', got {scope!r}")
    if scope == "global" and p.is_nm:
        raise ValueError(f"scope: 'global' applies to unstructured sparsity only, got pattern '{p}'")
    report = PruneReport(method=f"magnitude[{scope}]", pattern=str(p))
    targets = _prune.select_targets(model, p, filter_fn, report)
    if scope == "layer":
        for fqn, mod in targets.items():
            keep = _prune.mask_from_pattern(mod.weight.detach().abs(), p)
            _prune.apply_mask_(mod, keep)
            _prune.record(report, fqn, mod, p)
        return report
    if not targets:
        return report
    # global: the k smallest |w| over all layers; ties at the threshold go to earlier layers/indices
    flat = torch.cat([m.weight.detach().abs().float().reshape(-1).cpu() for m in targets.values()])
    k = _prune.n_pruned(p.sparsity, flat.numel())
    if k > 0:
        thresh = torch.kthvalue(flat, k).values
        n_equal_to_prune = k - int((flat < thresh).sum())
        del flat
        for fqn, mod in targets.items():
            a = mod.weight.detach().abs().float()
            keep = a > thresh
            eq = (a == thresh).reshape(-1)
            if n_equal_to_prune > 0 and bool(eq.any()):
                pos = torch.nonzero(eq).reshape(-1)
                spare = pos[n_equal_to_prune:]           # beyond the quota: kept
                n_equal_to_prune -= min(n_equal_to_prune, pos.numel())
                keep.reshape(-1)[spare] = True
            elif bool(eq.any()):
                keep.reshape(-1)[eq] = True
            _prune.apply_mask_(mod, keep)
    for fqn, mod in targets.items():
        _prune.record(report, fqn, mod, p)
    return report
