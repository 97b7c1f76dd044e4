"""Model-level API: swap a model's nn.Linear layers for slmkern modules."""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Callable, Iterable

from torch import nn

from slmkern.checkpoint import load, save
from slmkern.config import Int4Config, Int8Config, SparseConfig
from slmkern.nn import Int4Linear, Int8Linear
from slmkern.nn.sparse_linear import UNSTRUCTURED_CROSSOVER_SPARSITY, sparse_format_for  # noqa: F401
from slmkern.recipes import CompressReport, Recipe, compress, parse_recipe

FilterFn = Callable[[nn.Module, str], bool]
Config = Int8Config | Int4Config

@dataclasses.dataclass
class SwapReport:
    """What quantize_ did: every swapped layer, and every Linear left alone with the reason."""

    swapped: list[tuple[str, str]] = dataclasses.field(default_factory=list)   # (fqn, new module repr)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)   # (fqn, reason)
    notes: list[str] = dataclasses.field(default_factory=list)                 # e.g. GPTQ fallbacks

    def __str__(self) -> str:
        lines = [f"swapped {len(self.swapped)} layer(s), skipped {len(self.skipped)}"]
        lines += [f"  swapped {fqn}: {desc}" for fqn, desc in self.swapped]
        lines += [f"  skipped {fqn}: {why}" for fqn, why in self.skipped]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _set_submodule(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _check_config(config: Any, name: str = "config") -> None:
    if not isinstance(config, (Int8Config, Int4Config)):
        raise TypeError(f"{name}: expected Int8Config or Int4Config, got {type(config).__name__}")


def _plan(model: nn.Module, config: Config, filter_fn: FilterFn | None,
          overrides: dict[str, Config | None] | None, report: SwapReport) -> list[tuple[str, nn.Linear, Config]]:
    """Which Linear gets which config (or a skip reason)."""
    plan = []
    for fqn, mod, cfg in _select_linears(model, config, filter_fn, overrides, report, "quantize"):
        if isinstance(cfg, Int4Config):
            K = mod.in_features
            g = K if cfg.group_size == -1 else cfg.group_size
            if K % 2 or K % g:
                report.skipped.append((fqn, f"in_features={K} is not a multiple of group_size={g} (int4 needs it)"))
                continue
        plan.append((fqn, mod, cfg))
    return plan


def _select_linears(model: nn.Module, config, filter_fn: FilterFn | None, overrides: dict | None,
                    report: SwapReport, verb: str) -> list[tuple[str, nn.Linear, Any]]:
    """The float nn.Linear layers to convert and each one's config: the first matching
    overrides pattern (None keeps the layer), then filter_fn, else config.skip_names and the
    head/pooler rule (slmkern.algorithms._prune.head_reason); every layer left out goes into
    report.skipped with the reason."""
    from slmkern.algorithms._prune import head_reason
    targets = [(fqn, m) for fqn, m in model.named_modules() if type(m) is nn.Linear]
    if not targets:
        raise ValueError(f"model: has no torch.nn.Linear layers to {verb}")
    chosen = []
    for fqn, mod in targets:
        cfg, matched = config, None
        for pattern, over in (overrides or {}).items():
            if fnmatch.fnmatchcase(fqn, pattern):
                matched, cfg = pattern, over
                break
        if matched is not None and cfg is None:
            report.skipped.append((fqn, f"overrides[{matched!r}] is None"))
            continue
        if filter_fn is not None and not filter_fn(mod, fqn):
            report.skipped.append((fqn, "filter_fn returned False"))
            continue
        if matched is None and filter_fn is None:
            if any(fqn == s or fqn.endswith("." + s) for s in cfg.skip_names):
                report.skipped.append((fqn, f"name matches config.skip_names {cfg.skip_names}"))
                continue
            # the same rule as the pruners and compress(); an explicitly empty skip_names takes every layer
            why = head_reason(model, mod, fqn) if cfg.skip_names else None
            if why:
                report.skipped.append((fqn, why))
                continue
        if not mod.weight.is_floating_point():
            report.skipped.append((fqn, f"weight dtype {mod.weight.dtype} is not floating point"))
            continue
        chosen.append((fqn, mod, cfg))
    return chosen


def quantize_(model: nn.Module, config: Config, filter_fn: FilterFn | None = None, *,
              calibration: Iterable[Any] | None = None,
              overrides: dict[str, Config | None] | None = None, progress: bool = True) -> SwapReport:
    """Replace nn.Linear layers of `model` in place; returns a SwapReport.

    config: Int8Config or Int4Config, applied to every selected Linear.
    filter_fn(module, fqn) -> bool picks layers (default: every nn.Linear whose name
      does not end with one of config.skip_names, heads and poolers excepted: see
      slmkern.algorithms._prune.head_reason, the rule the pruners and compress() follow too;
      skip_names=() takes every Linear, heads and poolers included).
    overrides: {fnmatch pattern on the fqn: config or None}; the first matching pattern
      gives that layer its own config (None keeps it dense).
    calibration: an iterable of model inputs (dicts, tuples or tensors), needed by
      Int4Config(method="gptq"), Int4Config(awq=True) and Int8Config(smooth=...).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected torch.nn.Module, got {type(model).__name__}")
    _check_config(config)
    for pattern, over in (overrides or {}).items():
        if over is not None:
            _check_config(over, f"overrides[{pattern!r}]")
    report = SwapReport()
    plan = _plan(model, config, filter_fn, overrides, report)

    calib = None
    # AWQ / SmoothQuant scales: searched on the calibration data and folded into the previous ops
    # before any layer is quantized (the float function is unchanged)
    prescale = [c for c in dict.fromkeys(cfg for _, _, cfg in plan)
                if (isinstance(c, Int4Config) and c.awq) or (isinstance(c, Int8Config) and c.smooth is not None)]
    shared: dict[str, Any] = {}   # tied layers whose weight a scale folds into: the original shared tensor
    if prescale:
        if calibration is None:
            raise ValueError("calibration: Int4Config(awq=True) / Int8Config(smooth=...) need calibration data "
                             "(an iterable of model inputs)")
        from slmkern.recipes import _untie_for_update, tied_holders
        shared = {fqn: mod.weight for fqn, mod, cfg in plan
                  if cfg in prescale and tied_holders(model, mod.weight, f"{fqn}.weight")}
        # the scales are folded into the layer's own copy, never into the embedding that shares its weight
        _untie_for_update({fqn: mod for fqn, mod, _ in plan if fqn in shared}, shared)
        from slmkern.algorithms.awq import awq_scale_model, smooth_scale_model

        calib = list(calibration)
        for cfg in prescale:
            names = {fqn for fqn, _, c in plan if c == cfg}
            flt = lambda m, fqn, names=names: fqn in names  # noqa: E731
            if isinstance(cfg, Int4Config):
                srep = awq_scale_model(model, calib, cfg.group_size, cfg.symmetric, filter_fn=flt, grid=cfg.awq_grid)
            else:
                srep = smooth_scale_model(model, calib, cfg.smooth, filter_fn=flt)
            report.notes.append(str(srep).splitlines()[0])

    gptq_cfgs = {cfg for _, _, cfg in plan if isinstance(cfg, Int4Config) and cfg.method == "gptq"}
    gptq_weights: dict[str, Any] = {}
    if gptq_cfgs:
        if calibration is None:
            raise ValueError("calibration: Int4Config(method='gptq') needs calibration data "
                             "(an iterable of model inputs)")
        from slmkern.algorithms.gptq import gptq_quantize_model

        calib = list(calibration) if calib is None else calib
        for cfg in gptq_cfgs:  # one layer-by-layer pass per distinct GPTQ config
            names = {fqn for fqn, _, c in plan if c == cfg}
            weights, greport = gptq_quantize_model(
                model, calib, cfg.group_size, cfg.symmetric, filter_fn=lambda m, fqn, names=names: fqn in names,
                act_order=cfg.act_order, percdamp=cfg.percdamp, block_size=cfg.block_size, clip=cfg.clip,
                write_back=False, progress=progress)
            gptq_weights.update(weights)
            report.notes += [line.strip() for line in str(greport).splitlines()[1:] if line.strip()]

    for fqn, mod, cfg in plan:
        if isinstance(cfg, Int8Config):
            new = Int8Linear.from_linear(mod, activations=cfg.activations)
        elif cfg.method == "gptq":
            if fqn not in gptq_weights:
                report.skipped.append((fqn, "GPTQ produced no weight for this layer"))
                continue
            new = Int4Linear.from_int4(mod, gptq_weights[fqn], activations=cfg.activations)
        else:
            new = Int4Linear.from_linear(mod, cfg.group_size, cfg.symmetric, cfg.activations, cfg.method, cfg.clip)
        _set_submodule(model, fqn, new)
        report.swapped.append((fqn, new.extra_repr()))
        _note_untied(model, fqn, shared.get(fqn, mod.weight), report, new)
    return report


def _note_untied(model: nn.Module, fqn: str, weight, report: SwapReport, new: nn.Module | None = None) -> None:
    """A replaced Linear whose weight other modules still hold (a tied lm_head): an int8 head keeps one
    table (the embedding reads it: slmkern.recipes.tie_int8_table); otherwise say the embedding keeps its
    own copy, with the bytes (the same rule and notes as compress())."""
    from slmkern.recipes import tie_int8_table, tied_holders, untied_note
    holders = tied_holders(model, weight)
    if holders:
        report.notes.append(tie_int8_table(model, fqn, new, weight, holders) or untied_note(model, fqn, weight, holders))


def sparsify_(model: nn.Module, config: SparseConfig | None = None, filter_fn: FilterFn | None = None, *,
              overrides: dict[str, SparseConfig | None] | None = None) -> SwapReport:
    """Replace pruned nn.Linear layers of `model` by slmkern.nn.SparseLinear in place.

    Prune first (slmkern.algorithms.magnitude / wanda / sparsegpt write zeros into the weights);
    this keeps those zeros in a sparse format the kernels skip. With format="auto" a layer whose
    sparsity is too low to pay off becomes SparseLinear(format="dense") and the report says why;
    format="unstructured" never packs a layer below :data:`UNSTRUCTURED_CROSSOVER_SPARSITY` (it
    gets auto's choice instead, and the report says why).
    filter_fn / overrides / skip_names / the head-pooler rule select layers as in quantize_.
    """
    import torch

    from slmkern.nn.sparse_linear import SparseLinear, is_24_sparse

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected torch.nn.Module, got {type(model).__name__}")
    config = config or SparseConfig()
    if not isinstance(config, SparseConfig):
        raise TypeError(f"config: expected SparseConfig, got {type(config).__name__}")
    for pattern, over in (overrides or {}).items():
        if over is not None and not isinstance(over, SparseConfig):
            raise TypeError(f"overrides[{pattern!r}]: expected SparseConfig or None, got {type(over).__name__}")
    report = SwapReport()
    for fqn, mod, cfg in _select_linears(model, config, filter_fn, overrides, report, "sparsify"):
        w = mod.weight.detach()
        fmt = cfg.format
        if fmt == "2:4" and not is_24_sparse(w):
            report.skipped.append((fqn, "weight is not 2:4 sparse (prune with pattern '2:4' first)"))
            continue
        if cfg.values == "int4" and not is_24_sparse(w):
            report.skipped.append((fqn, "int4 values need a 2:4 sparse weight"))
            continue
        if cfg.values == "int4":
            K = mod.in_features
            g = K if cfg.group_size == -1 else cfg.group_size
            if K % g:
                report.skipped.append((fqn, f"in_features={K} is not a multiple of group_size={g}"))
                continue
        fmt, why = sparse_format_for(w, fmt, cfg.values)
        vdt = getattr(torch, cfg.value_dtype) if cfg.value_dtype else None
        new = SparseLinear.from_linear(mod, fmt, cfg.values, group_size=cfg.group_size, symmetric=cfg.symmetric,
                                       value_dtype=vdt)
        _set_submodule(model, fqn, new)
        desc = new.extra_repr() + (f" ({'auto: ' if cfg.format == 'auto' else ''}{why})" if why else "")
        report.swapped.append((fqn, desc))
        _note_untied(model, fqn, mod.weight, report)
    return report
