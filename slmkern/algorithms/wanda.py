"""Wanda (Sun et al., 2023): prune by |W_ij| * ||X_j||_2, no weight update.

The score of weight (i, j) is its magnitude times the L2 norm of input feature j over
all calibration rows (tokens). Unstructured sparsity compares scores within each
output row (the paper's per-output comparison group: every row ends up with the same
sparsity); "N:M" keeps the N highest scores of every group of M consecutive inputs.

One calibration pass over the *dense* model captures the input norms of every target
Linear at once (hooks on all of them), then every layer is pruned. Layers that never
run on the calibration data are pruned by magnitude (noted in the report).
"""
from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from slmkern._logging import logger
from slmkern.algorithms import _calib, _prune
from slmkern.algorithms._prune import FilterFn, PruneReport


def wanda_scores(weight, col_norms):
    """|W| * ||X_j||_2 broadcast over rows: weight [N, K], col_norms [K] -> fp32 [N, K]."""
    return weight.detach().abs().float() * col_norms.to(weight.device).float().unsqueeze(0)


def wanda_prune_(model: nn.Module, calibration: Any, pattern: Any, filter_fn: FilterFn | None = None,
                 n_samples: int | None = None, progress: bool = False) -> PruneReport:
    """Prune every selected nn.Linear of ``model`` in place with Wanda scores -> PruneReport.

    calibration: an iterable of model inputs (dicts -> ``model(**b)``, tuples, or tensors
    of token ids), like :func:`slmkern.algorithms.gptq.gptq_quantize_model`.
    n_samples: use only the first n_samples calibration batches (default: all).
    """
    p = _prune.parse_pattern(pattern)
    report = PruneReport(method="wanda", pattern=str(p))
    targets = _prune.select_targets(model, p, filter_fn, report)
    batches = _calib.as_batches(calibration)
    if n_samples is not None:
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples: expected a positive int or None, got {n_samples!r}")
        batches = batches[:n_samples]
    if not targets:
        return report
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    collector = _calib.InputNormCollector(targets)
    try:
        norms = collector.collect(model, batches, _calib.model_device(model))
    finally:
        model.train(was_training)
    secs = (time.perf_counter() - t0) / len(targets)
    bar = _prune.progress_bar(progress, len(targets), "wanda")
    for fqn, mod in targets.items():
        rows = collector.rows[fqn]
        fallback = ""
        if rows == 0:
            fallback = "no calibration input captured; magnitude"
            logger.warning("wanda: %s: never ran on the calibration data; pruned by magnitude", fqn)
            scores = mod.weight.detach().abs().float()
        elif not bool(torch.isfinite(norms[fqn]).all()):
            fallback = "non-finite calibration activations; magnitude"
            logger.warning("wanda: %s: non-finite input norms; pruned by magnitude", fqn)
            scores = mod.weight.detach().abs().float()
        else:
            scores = wanda_scores(mod.weight, norms[fqn])
        keep = _prune.mask_from_pattern(scores, p, per_row=True)
        _prune.apply_mask_(mod, keep)
        _prune.record(report, fqn, mod, p, fallback=fallback, nsamples=rows, seconds=secs)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return report
