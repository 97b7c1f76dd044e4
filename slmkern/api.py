"""Model-level API: swap a model's nn.Linear layers for slmkern modules."""
from __future__ import annotations

import dataclasses
from typing import Callable

from torch import nn

from slmkern.config import Int8Config
from slmkern.nn import Int8Linear

FilterFn = Callable[[nn.Module, str], bool]


@dataclasses.dataclass
class SwapReport:
    """What quantize_ did: every swapped layer, and every Linear left alone with the reason."""

    swapped: list[tuple[str, str]] = dataclasses.field(default_factory=list)   # (fqn, new module repr)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)   # (fqn, reason)

    def __str__(self) -> str:
        lines = [f"swapped {len(self.swapped)} layer(s), skipped {len(self.skipped)}"]
        lines += [f"  swapped {fqn}: {desc}" for fqn, desc in self.swapped]
        lines += [f"  skipped {fqn}: {why}" for fqn, why in self.skipped]
        return "\n".join(lines)


def _set_submodule(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize_(model: nn.Module, config: Int8Config, filter_fn: FilterFn | None = None) -> SwapReport:
    """Replace nn.Linear layers of `model` in place; returns a SwapReport.

    filter_fn(module, fqn) -> bool picks layers (default: every nn.Linear whose
    name does not end with one of config.skip_names).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, Int8Config):
        raise TypeError(f"config: expected Int8Config, got {type(config).__name__}")
    report = SwapReport()
    targets = [(fqn, m) for fqn, m in model.named_modules() if type(m) is nn.Linear]
    if not targets:
        raise ValueError("model: has no torch.nn.Linear layers to quantize")
    for fqn, mod in targets:
        if filter_fn is not None and not filter_fn(mod, fqn):
            report.skipped.append((fqn, "filter_fn returned False"))
            continue
        if filter_fn is None and any(fqn == s or fqn.endswith("." + s) for s in config.skip_names):
            report.skipped.append((fqn, f"name matches config.skip_names {config.skip_names}"))
            continue
        if not mod.weight.is_floating_point():
            report.skipped.append((fqn, f"weight dtype {mod.weight.dtype} is not floating point"))
            continue
        new = Int8Linear.from_linear(mod, activations=config.activations)
        _set_submodule(model, fqn, new)
        report.swapped.append((fqn, new.extra_repr()))
    return report
