"""Shared pruning plumbing: sparsity patterns, masks, target selection, the report.

A *pattern* is either

* a float ``s`` in [0, 1): unstructured sparsity, the fraction of weights set to zero, or
* a string ``"N:M"`` (e.g. ``"2:4"``): semi-structured, at most N non-zeros in every
  group of M consecutive weights along K (the input dimension) of each output row;
  K must be a multiple of M (other layers are skipped, with the reason in the report).

Pruners (:mod:`.magnitude`, :mod:`.wanda`, :mod:`.sparsegpt`) write the zeros into the
dense ``nn.Linear.weight`` in place and return a :class:`PruneReport`; sparse storage
formats are built from those dense weights later, by whoever consumes them.

Masks are boolean *keep* masks (True = weight kept). Counts are exact: for unstructured
sparsity s over n scores, exactly ``floor(s * n + 0.5)`` are pruned (per row when
``per_row=True``), the lowest scores first, ties broken by position (deterministic).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

FilterFn = Callable[[nn.Module, str], bool]

# The one rule for heads and poolers (:func:`head_reason`), used by every pruner, quantize_,
# sparsify_ and compress(): output and classifier heads (by their own name), anything inside a
# head/pooler module or an embedding module (a name component starting with "embed"), and
# Linears tied to the input embeddings stay dense unless the caller selects them explicitly
# (filter_fn, overrides, or a recipe's targets). A small model's head carries most of its
# output error, a pooler feeds only that head (or nothing, in a sentence-embedding model).
DEFAULT_SKIP_NAMES = ("lm_head", "embed_out", "classifier", "score", "qa_outputs")
DEFAULT_SKIP_PARENTS = ("lm_head", "classifier", "cls", "pooler")
_EMBED_PREFIX = "embed"


# ----------------------------------------------------------------------------- patterns
@dataclasses.dataclass(frozen=True)
class Pattern:
    """A parsed sparsity pattern: unstructured (``sparsity``) or N:M (``n`` kept of every ``m``)."""

    sparsity: float | None = None
    n: int | None = None
    m: int | None = None

    @property
    def is_nm(self) -> bool:
        return self.m is not None

    @property
    def target_sparsity(self) -> float:
        return 1.0 - self.n / self.m if self.is_nm else float(self.sparsity)

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.sparsity:g}"


def parse_pattern(pattern: Any, name: str = "pattern") -> Pattern:
    """float sparsity in [0, 1) or "N:M" string (0 < N < M) -> Pattern; anything else raises."""
    if isinstance(pattern, Pattern):
        return pattern
    if isinstance(pattern, bool):
        raise TypeError(f"{name}: expected a float sparsity in [0, 1) or an 'N:M' string, got a bool")
    if isinstance(pattern, (int, float)):
        s = float(pattern)
        if not math.isfinite(s) or not 0.0 <= s < 1.0:
            raise ValueError(f"{name}: unstructured sparsity must lie in [0, 1), got {pattern!r}")
        return Pattern(sparsity=s)
    if isinstance(pattern, str):
        parts = pattern.strip().split(":")
        if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
            n, m = int(parts[0]), int(parts[1])
            if 0 < n < m:
                return Pattern(n=n, m=m)
            raise ValueError(f"{name}: 'N:M' needs 0 < N < M (N weights kept in every group of M), "
                             f"got {pattern!r}")
        raise ValueError(f"{name}: expected an 'N:M' string like '2:4', got {pattern!r}")
    raise TypeError(f"{name}: expected a float sparsity in [0, 1) or an 'N:M' string, "
                    f"got {type(pattern).__name__}")


def n_pruned(sparsity: float, n: int) -> int:
    """How many of n elements unstructured sparsity s prunes: floor(s*n + 0.5)."""
    return min(n, int(math.floor(sparsity * n + 0.5)))


def _lowest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask (same shape as scores [R, C]) of the k lowest entries of each row (ties: first)."""
    prune = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k > 0:
        idx = torch.argsort(scores, dim=-1, stable=True)[..., :k]
        prune.scatter_(-1, idx, True)
    return prune


def mask_from_pattern(weight_scores: torch.Tensor, pattern: Any, per_row: bool = False) -> torch.Tensor:
    """scores [N, K] (higher = more important) -> bool keep-mask [N, K] for ``pattern``.

    Unstructured s: prunes the ``floor(s*n + 0.5)`` lowest scores over the whole tensor
    (n = N*K), or in every row (n = K) when ``per_row``. "N:M": keeps the N highest
    scores of every group of M consecutive columns (K % M must be 0). Ties go to the
    lower index (pruned first), so the mask is deterministic. NaN scores are rejected.
    """
    p = parse_pattern(pattern)
    if not isinstance(weight_scores, torch.Tensor) or weight_scores.dim() != 2:
        raise ValueError(f"weight_scores: expected a 2-D tensor [N, K], got "
                         f"{tuple(getattr(weight_scores, 'shape', ()))}")
    s = weight_scores.detach().float()
    if bool(torch.isnan(s).any()):
        raise ValueError("weight_scores: contains NaN")
    N, K = s.shape
    if p.is_nm:
        if K % p.m:
            raise ValueError(f"weight_scores: K={K} is not a multiple of M={p.m} for pattern '{p}'")
        prune = _lowest_k_mask(s.reshape(N, K // p.m, p.m), p.m - p.n)
        return ~prune.reshape(N, K)
    if per_row:
        return ~_lowest_k_mask(s, n_pruned(p.sparsity, K))
    return ~_lowest_k_mask(s.reshape(1, -1), n_pruned(p.sparsity, N * K)).reshape(N, K)


def verify_pattern(weight: torch.Tensor, pattern: Any) -> bool:
    """True iff ``weight`` [N, K] satisfies ``pattern``.

    "N:M": every group of M consecutive k in every row has at most N non-zeros (False
    if K % M != 0). Unstructured s: at least ``floor(s*N*K + 0.5) - N`` zeros, i.e.
    the requested count within one element per row (so masks chosen per row or per
    tensor both pass).
    """
    p = parse_pattern(pattern)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D tensor [N, K], got {tuple(getattr(weight, 'shape', ()))}")
    N, K = weight.shape
    nz = weight.detach() != 0
    if p.is_nm:
        if K % p.m:
            return False
        return bool((nz.reshape(N, K // p.m, p.m).sum(-1) <= p.n).all())
    zeros = int((~nz).sum())
    return zeros >= n_pruned(p.sparsity, N * K) - N


def sparsity_of(weight: torch.Tensor) -> float:
    return float((weight.detach() == 0).sum()) / max(1, weight.numel())


def apply_mask_(linear: nn.Linear, keep: torch.Tensor) -> None:
    """Write exact zeros into linear.weight where ``keep`` is False (in place, no autograd)."""
    with torch.no_grad():
        linear.weight.data.masked_fill_(~keep.to(linear.weight.device), 0)


# ----------------------------------------------------------------------------- fused quantization
@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """Quantization fused into SparseGPT: ``bits`` 4 (group-wise, canonical int4) or 8 (per-channel symmetric).

    group_size: int4 only, 32/64/128 or -1 (per-channel). clip: int4 group parameters,
    "minmax" or "mse" (see :mod:`slmkern.algorithms.rtn`).
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    clip: str = "minmax"

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"quantize.bits: expected 4 or 8, got {self.bits!r}")
        if self.bits == 8 and (not self.symmetric or self.group_size != -1):
            raise ValueError("quantize: int8 is per-channel symmetric only (group_size=-1, symmetric=True)")
        if self.clip not in ("minmax", "mse"):
            raise ValueError(f"quantize.clip: expected 'minmax' or 'mse', got {self.clip!r}")


def quant_spec(quantize: Any) -> QuantSpec | None:
    """None | QuantSpec | Int4Config | Int8Config | dict / object with bits, group_size, symmetric -> QuantSpec."""
    if quantize is None or isinstance(quantize, QuantSpec):
        return quantize
    from slmkern.config import Int4Config, Int8Config
    if isinstance(quantize, Int8Config):
        return QuantSpec(bits=8, group_size=-1, symmetric=True)
    if isinstance(quantize, Int4Config):
        return QuantSpec(bits=4, group_size=quantize.group_size, symmetric=quantize.symmetric, clip=quantize.clip)
    d = dict(quantize) if isinstance(quantize, dict) else {
        k: getattr(quantize, k) for k in ("bits", "group_size", "symmetric", "clip") if hasattr(quantize, k)}
    if "bits" not in d:
        raise TypeError(f"quantize: expected None, Int4Config, Int8Config, QuantSpec or a spec with "
                        f"'bits', got {type(quantize).__name__}")
    bits = int(d["bits"])
    if bits == 8:
        return QuantSpec(bits=8, group_size=-1, symmetric=True)
    return QuantSpec(bits=bits, group_size=int(d.get("group_size", 128)), symmetric=bool(d.get("symmetric", False)),
                     clip=str(d.get("clip", "minmax")))


class Int8Weight(NamedTuple):
    """Canonical int8 weight (see :mod:`slmkern.formats.int8`): int8 [N, K] in [-127, 127], fp32 scale [N]."""

    weight: torch.Tensor
    scale: torch.Tensor

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.weight.float() * self.scale.unsqueeze(1)).to(dtype)


# ----------------------------------------------------------------------------- report
@dataclasses.dataclass
class LayerPrune:
    """What happened to one Linear."""

    shape: tuple[int, int]
    sparsity: float                  # achieved fraction of exact zeros in the weight
    pattern: str                     # requested pattern, e.g. "0.5" or "2:4"
    rel_err: float = float("nan")    # ||X (W - Wp)^T||^2 / ||X W^T||^2 on calibration data (SparseGPT)
    magnitude_rel_err: float = float("nan")  # the same for magnitude pruning at the same pattern
    damp: float = 0.0                # percdamp finally used (SparseGPT)
    retries: int = 0                 # Cholesky retries at higher damping
    fallback: str = ""               # non-empty: why a simpler method was used for this layer
    nsamples: int = 0                # calibration rows (tokens) seen
    seconds: float = 0.0


@dataclasses.dataclass
class PruneReport:
    """Per-layer results ({fqn: LayerPrune}), every Linear left alone with the reason, fused quant weights."""

    method: str
    pattern: str
    layers: dict[str, LayerPrune] = dataclasses.field(default_factory=dict)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    quantized: dict[str, Any] = dataclasses.field(default_factory=dict)   # fqn -> Int4Weight | Int8Weight

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over all pruned layers' weights together."""
        tot = sum(li.shape[0] * li.shape[1] for li in self.layers.values())
        z = sum(li.sparsity * li.shape[0] * li.shape[1] for li in self.layers.values())
        return z / tot if tot else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "pattern": self.pattern, "sparsity": self.sparsity,
                "layers": {k: dataclasses.asdict(v) for k, v in self.layers.items()},
                "skipped": [list(s) for s in self.skipped], "quantized": sorted(self.quantized)}

    def __str__(self) -> str:
        lines = [f"{self.method}: pruned {len(self.layers)} layer(s) to pattern {self.pattern} "
                 f"(overall sparsity {self.sparsity:.4f}), skipped {len(self.skipped)}"]
        for fqn, li in self.layers.items():
            extra = ""
            if li.rel_err == li.rel_err:
                extra += f" rel_err {li.rel_err:.3e} (magnitude {li.magnitude_rel_err:.3e})"
            if li.retries:
                extra += f" retries={li.retries} damp={li.damp:g}"
            if li.fallback:
                extra += f" FALLBACK: {li.fallback}"
            lines.append(f"  {fqn} {list(li.shape)}: sparsity {li.sparsity:.4f}{extra}")
        lines += [f"  skipped {fqn}: {why}" for fqn, why in self.skipped]
        return "\n".join(lines)


# ----------------------------------------------------------------------------- targets
def _tied_to_input_embedding(model: nn.Module, mod: nn.Linear) -> bool:
    get = getattr(model, "get_input_embeddings", None)
    if get is None:
        return False
    try:
        emb = get()
    except (NotImplementedError, AttributeError):
        return False
    # the registered parameter, not getattr: slmkern.nn.Int8Embedding's weight property dequantizes its table
    w = emb._parameters.get("weight") if isinstance(emb, nn.Module) else None
    return w is not None and w is mod.weight


def head_reason(model: nn.Module, mod: nn.Linear, fqn: str) -> str | None:
    """Why this Linear is a head, a pooler or part of an embedding, which every model-level
    entry point (prune, quantize_, sparsify_, compress) leaves dense unless it is selected
    explicitly; None for a body layer."""
    parts = fqn.split(".")
    if parts[-1] in DEFAULT_SKIP_NAMES:
        return f"output/classifier head (name ends with {parts[-1]!r}; kept dense unless selected explicitly)"
    for p in parts[:-1]:
        if p in DEFAULT_SKIP_PARENTS or p.startswith(_EMBED_PREFIX):
            return f"inside a head/pooler/embedding module ({p!r}; kept dense unless selected explicitly)"
    if _tied_to_input_embedding(model, mod):
        return "weight tied to the input embeddings (kept dense unless selected explicitly)"
    return None


default_skip_reason = head_reason   # the pruners' name for it


def select_targets(model: nn.Module, pattern: Pattern, filter_fn: FilterFn | None,
                   report: PruneReport) -> dict[str, nn.Linear]:
    """Every prunable nn.Linear -> {fqn: module}; the others go to report.skipped with a reason."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected torch.nn.Module, got {type(model).__name__}")
    targets: dict[str, nn.Linear] = {}
    seen = 0
    for fqn, m in model.named_modules():
        if type(m) is not nn.Linear:
            continue
        seen += 1
        if filter_fn is not None:
            if not filter_fn(m, fqn):
                report.skipped.append((fqn, "filter_fn returned False"))
                continue
        else:
            why = head_reason(model, m, fqn)
            if why:
                report.skipped.append((fqn, why))
                continue
        if not m.weight.is_floating_point():
            report.skipped.append((fqn, f"weight dtype {m.weight.dtype} is not floating point"))
        elif pattern.is_nm and m.in_features % pattern.m:
            report.skipped.append((fqn, f"in_features={m.in_features} is not a multiple of M={pattern.m} "
                                        f"(pattern {pattern})"))
        else:
            targets[fqn] = m
    if seen == 0:
        raise ValueError("model: has no torch.nn.Linear layers to prune")
    return targets


def record(report: PruneReport, fqn: str, mod: nn.Linear, pattern: Pattern, **extra: Any) -> LayerPrune:
    li = LayerPrune(shape=tuple(mod.weight.shape), sparsity=sparsity_of(mod.weight), pattern=str(pattern), **extra)
    report.layers[fqn] = li
    return li


def progress_bar(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="layer")
