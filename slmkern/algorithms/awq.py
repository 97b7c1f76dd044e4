"""Activation-aware per-input-channel scaling (AWQ, Lin et al., 2023), folded into the previous op.

A Linear ``y = x W^T`` computes the same function as ``y = (x / s) (W diag(s))^T`` for any
positive per-input-channel ``s``. Scaling up the columns of W that meet large activations
gives them finer quantization steps relative to their importance (the group's step is set by
its largest weight, so the other columns of the group pay a little). ``s = a^alpha`` with
``a`` the RMS of each input channel over the calibration rows, ``alpha`` searched on a grid
per *stage* (the layers reading one tensor: q/k/v, gate/up, down) to minimise the stage's
output error after group-wise int4 quantization,

    err(alpha) = sum_layers tr(D H D^T),  D = W - Q(W diag(s)) diag(s)^-1,  H = X^T X,

which is ``||X W^T - X Q^T||^2`` summed over the stage's layers. ``alpha = 0`` (no scaling)
is on the grid, so on the calibration data the chosen scales never increase that error.

``1/s`` is folded into the op producing the stage's input, so the float model computes the
same function (to fp32 rounding) and the stored format is unchanged (no extra scales at
run time):

* a norm (RMSNorm, LayerNorm) whose output is the stage input: ``weight /= s`` (``bias /= s``);
  checked numerically on a probe input (a norm of another form, e.g. ``x * (1 + w)``, is
  left alone and reported);
* ``up_proj`` in a gated MLP (``down(act(gate(x)) * up(x))``): up_proj's output rows ``/= s``
  for down_proj.

Stages with no foldable producer (o_proj: its input comes out of attention) are left
unscaled and reported. The quantizer that follows (RTN, HQQ or GPTQ) should use the same
group size / symmetry / clipping that the search assumed (:func:`awq_scale_model` arguments).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import torch
from torch import nn

from slmkern._logging import logger
from slmkern.algorithms import _calib, rtn
from slmkern.formats import int4

FilterFn = Callable[[nn.Module, str], bool]
DEFAULT_GRID = 20


@dataclasses.dataclass
class AWQStage:
    """What happened to one stage (layers sharing one input)."""

    layers: list[str]
    producer: str = ""             # module the 1/s was folded into ("" = not scaled)
    alpha: float = 0.0
    err: float = float("nan")      # stage output error at the chosen alpha (sum tr(D H D^T))
    err_unscaled: float = float("nan")  # the same at alpha = 0 (plain quantization)
    note: str = ""


@dataclasses.dataclass
class AWQReport:
    stages: list[AWQStage] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def __str__(self) -> str:
        scaled = [s for s in self.stages if s.producer]
        lines = [f"awq: scaled {len(scaled)} of {len(self.stages)} stage(s) in {self.seconds:.1f} s"]
        for s in self.stages:
            if s.producer:
                gain = s.err / s.err_unscaled if s.err_unscaled > 0 else float("nan")
                lines.append(f"  {','.join(s.layers)} <- {s.producer}: alpha {s.alpha:.2f}, "
                             f"out-err x{gain:.3f}")
            else:
                lines.append(f"  {','.join(s.layers)}: not scaled ({s.note})")
        return "\n".join(lines)


def _quant_deq(w: torch.Tensor, group_size: int, symmetric: bool, clip: str,
               col_weight: torch.Tensor | None = None) -> torch.Tensor:
    return rtn.rtn_quantize(w, group_size, symmetric, clip=clip,
                            col_weight=col_weight if clip == "hmse" else None).dequantize()


def stage_error(weights: list[torch.Tensor], H: torch.Tensor, s: torch.Tensor, group_size: int,
                symmetric: bool, clip: str) -> float:
    """sum_i tr(D_i H D_i^T) with D_i = W_i - Q(W_i diag(s)) / s: output error of scaled quantization."""
    tot = 0.0
    cw = torch.diagonal(H).clamp_min(0) / s.square() if clip == "hmse" else None  # diag of the scaled layer's H
    for w in weights:
        d = w - _quant_deq(w * s, group_size, symmetric, clip, cw) / s
        tot += float((d @ H * d).sum())
    return tot


def search_scales(weights: list[torch.Tensor], H: torch.Tensor, group_size: int = 64,
                  symmetric: bool = False, clip: str = "mse", grid: int = DEFAULT_GRID
                  ) -> tuple[torch.Tensor, float, float, float]:
    """Best per-input-channel scales for layers sharing the input whose Gram matrix is H [K, K].

    Returns (s [K] fp32, alpha, err at alpha, err at alpha = 0). s = rms^alpha normalised to a
    geometric mean of 1 over the live channels (dead channels, rms 0, get s = 1).
    """
    if grid < 1:
        raise ValueError(f"grid: expected >= 1 alphas, got {grid}")
    H = H.detach().float()
    ws = [int4._as_float_weight(w).detach() for w in weights]
    K = H.shape[0]
    if any(w.shape[1] != K for w in ws):
        raise ValueError(f"weights: every layer needs in_features = {K} (H is [{K}, {K}])")
    rms = torch.diagonal(H).clamp_min(0).sqrt()
    live = rms > 0
    if not bool(live.any()):
        one = torch.ones(K)
        e = stage_error(ws, H, one, group_size, symmetric, clip)
        return one, 0.0, e, e
    floor = rms[live].min()
    a = torch.where(live, rms, floor)
    best = None
    base = None
    for alpha in [i / grid for i in range(grid)]:
        s = a.pow(alpha)
        s = s / torch.exp(torch.log(s[live]).mean())
        s = torch.where(live, s, torch.ones_like(s))
        err = stage_error(ws, H, s, group_size, symmetric, clip)
        if base is None:
            base = err
        if best is None or err < best[2]:
            best = (s, alpha, err)
    return best[0], best[1], best[2], base


# ----------------------------------------------------------------------------- folding
def _is_norm(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return (isinstance(w, torch.Tensor) and w.dim() == 1 and not isinstance(m, (nn.Linear, nn.Embedding))
            and len(list(m.children())) == 0)


@torch.no_grad()
def _fold_into_norm(norm: nn.Module, s: torch.Tensor) -> bool:
    """norm.weight /= s (and bias) if that scales the norm's output by 1/s exactly; else leave it."""
    K = norm.weight.shape[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, K, generator=g).to(norm.weight)
    y0 = norm(x).float()
    w0 = norm.weight.detach().clone()
    b = getattr(norm, "bias", None)
    b0 = b.detach().clone() if isinstance(b, torch.Tensor) else None
    norm.weight.div_(s.to(norm.weight))
    if b0 is not None:
        b.div_(s.to(b))
    y1 = norm(x).float()
    if torch.allclose(y1 * s.to(y1), y0, rtol=1e-4, atol=1e-5 * float(y0.abs().max())):
        return True
    norm.weight.copy_(w0)
    if b0 is not None:
        b.copy_(b0)
    return False


@torch.no_grad()
def _apply(producer: nn.Module, members: list[nn.Linear], s: torch.Tensor) -> bool:
    if isinstance(producer, nn.Linear):
        producer.weight.div_(s.to(producer.weight).unsqueeze(1))
        if producer.bias is not None:
            producer.bias.div_(s.to(producer.bias))
    elif not _fold_into_norm(producer, s):
        return False
    for m in members:
        m.weight.mul_(s.to(m.weight).unsqueeze(0))
    return True


def _producers(model: nn.Module, targets: dict[str, nn.Linear], batch: Any, device: torch.device
               ) -> dict[str, str]:
    """{target fqn: fqn of the norm whose output tensor is the target's input} from one forward pass."""
    out_of: dict[tuple, str] = {}
    found: dict[str, str] = {}
    keep: list[torch.Tensor] = []   # hold outputs so their addresses are not reused during the pass
    names = {id(m): n for n, m in model.named_modules()}

    def fwd(mod, args, out):
        if isinstance(out, torch.Tensor):
            out_of[(out.data_ptr(), tuple(out.shape))] = names[id(mod)]
            keep.append(out)

    def pre(fqn):
        def hook(mod, args, kwargs):
            x = _calib._first_tensor(args, kwargs)
            if x is not None and fqn not in found:
                p = out_of.get((x.data_ptr(), tuple(x.shape)))
                if p is not None:
                    found[fqn] = p
        return hook

    hs = [m.register_forward_hook(fwd) for m in model.modules() if _is_norm(m)]
    hs += [m.register_forward_pre_hook(pre(f), with_kwargs=True) for f, m in targets.items()]
    try:
        with torch.no_grad():
            _calib.run_model(model, batch, device)
    finally:
        for h in hs:
            h.remove()
    return found


def _gated_up(fqn: str, targets: dict[str, nn.Linear]) -> str | None:
    """fqn of up_proj for a down_proj of a gated MLP (down(act(gate(x)) * up(x))), else None."""
    if not fqn.endswith("down_proj"):
        return None
    up = fqn[: -len("down_proj")] + "up_proj"
    gate = fqn[: -len("down_proj")] + "gate_proj"
    return up if up in targets and gate in targets else None


def awq_scale_model(model: nn.Module, calibration: Any, group_size: int = 64, symmetric: bool = False,
                    filter_fn: FilterFn | None = None, *, clip: str = "minmax", grid: int = DEFAULT_GRID
                    ) -> AWQReport:
    """Search and fold AWQ scales into ``model`` in place (its float function is unchanged) -> AWQReport.

    Run it before a weight quantizer with the same ``group_size``/``symmetric`` (RTN, HQQ or
    GPTQ). ``clip`` is the quantizer the search scores with: "minmax" (default, a proxy) is
    ~20x cheaper than "mse"/"hmse" (each a grid search of its own per alpha); the clipping
    search then runs once, in the quantizer that follows. Stages are calibrated block by block
    (:func:`slmkern.algorithms._calib.layerwise_hessians`); each stage whose input comes
    from a foldable op (a norm, or up_proj for down_proj) gets scales; others are reported.
    filter_fn(module, fqn) selects the Linears to be quantized afterwards (default: all but
    names ending in ``lm_head``); a stage is scaled only when all its readers are selected.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected torch.nn.Module, got {type(model).__name__}")
    if clip not in rtn.CLIP_METHODS:
        raise ValueError(f"clip: expected one of {rtn.CLIP_METHODS}, got {clip!r}")
    t0 = time.perf_counter()
    batches = _calib.as_batches(calibration)
    device = _calib.model_device(model)
    if filter_fn is None:
        filter_fn = lambda m, fqn: not fqn.endswith("lm_head")  # noqa: E731
    linears = {f: m for f, m in model.named_modules() if type(m) is nn.Linear}
    targets = {}
    for f, m in linears.items():
        if not filter_fn(m, f):
            continue
        try:
            int4.resolve_group_size(m.in_features, group_size)
        except (ValueError, TypeError):
            continue
        targets[f] = m
    if not targets:
        raise ValueError("model: has no torch.nn.Linear layers to scale (after filter_fn)")
    modules = dict(model.named_modules())
    producers = _producers(model, linears, batches[0], device)
    report = AWQReport()
    was_training = model.training
    model.eval()
    stages: list[list[str]] = []
    done: set[str] = set()
    try:
        for fqn, mod, acc in _calib.layerwise_hessians(model, targets, batches, device, stages):
            if fqn in done:
                continue
            stage = stages[-1] if stages and fqn in stages[-1] else [fqn]
            done.update(stage)
            st = AWQStage(layers=list(stage))
            report.stages.append(st)
            if acc is None or acc.n == 0:
                st.note = "never ran on the calibration data"
                continue
            if any(f not in targets for f in stage):
                st.note = "a reader of this input is not quantized (filter_fn / group size)"
                continue
            prod = _gated_up(stage[0], targets) if len(stage) == 1 else None
            if prod is None:
                prod = producers.get(stage[0])
                if prod is None or any(producers.get(f) != prod for f in stage):
                    st.note = "input not produced by a norm or a gated MLP's up_proj"
                    continue
                # the norm must feed only this stage, else other readers would see x / s
                readers = [f for f, p in producers.items() if p == prod]
                if set(readers) != set(stage):
                    st.note = f"{prod} also feeds {sorted(set(readers) - set(stage))}"
                    continue
            members = [linears[f] for f in stage]
            s, alpha, err, base = search_scales([m.weight for m in members], acc.H, group_size, symmetric,
                                                clip, grid)
            st.alpha, st.err, st.err_unscaled = alpha, err, base
            if alpha == 0.0:
                st.note = "alpha 0 was best"
                st.producer = ""
                continue
            if _apply(modules[prod], members, s):
                st.producer = prod
            else:
                st.note = f"{prod}: folding 1/s into it does not scale its output (not weight * x form)"
                logger.info("awq: %s: %s", ",".join(stage), st.note)
    finally:
        model.train(was_training)
    report.seconds = time.perf_counter() - t0
    return report


# ----------------------------------------------------------------------------- SmoothQuant-style, for W8A8
@dataclasses.dataclass
class SmoothReport:
    """Which stages got smoothing scales (folded like AWQ's), and which not and why."""

    scaled: dict[str, list[str]] = dataclasses.field(default_factory=dict)   # producer -> readers
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def __str__(self) -> str:
        n = sum(len(v) for v in self.scaled.values())
        return (f"smooth: scaled the inputs of {n} layer(s) through {len(self.scaled)} producer(s), "
                f"{len(self.skipped)} layer(s) left alone, {self.seconds:.1f} s")


def smooth_scale_model(model: nn.Module, calibration: Any, alpha: float = 0.5,
                       filter_fn: FilterFn | None = None) -> SmoothReport:
    """Move activation outliers into the weights before int8 activation quantization (SmoothQuant).

    ``s_j = max|x_j|^alpha / max_i |W_ij|^(1 - alpha)`` per input channel over the calibration
    rows (one pass of the float model) and over all readers of the input; ``1/s`` is folded
    into the producing norm or gated up_proj exactly as :func:`awq_scale_model` does, so the
    float function is unchanged. Per-token int8 activations then see flatter rows, and the
    per-output-channel int8 weights absorb the spread.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: expected 0 <= alpha <= 1, got {alpha}")
    t0 = time.perf_counter()
    batches = _calib.as_batches(calibration)
    device = _calib.model_device(model)
    if filter_fn is None:
        filter_fn = lambda m, fqn: not fqn.endswith("lm_head")  # noqa: E731
    linears = {f: m for f, m in model.named_modules() if type(m) is nn.Linear}
    targets = {f: m for f, m in linears.items() if filter_fn(m, f)}
    if not targets:
        raise ValueError("model: has no torch.nn.Linear layers to smooth (after filter_fn)")
    amax = {f: torch.zeros(m.in_features, device=m.weight.device) for f, m in targets.items()}

    def hook(fqn):
        def h(mod, args, kwargs):
            x = _calib._first_tensor(args, kwargs)
            if x is not None and x.numel():
                a = x.detach().reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
                torch.maximum(amax[fqn], a, out=amax[fqn])
        return h

    hs = [m.register_forward_pre_hook(hook(f), with_kwargs=True) for f, m in targets.items()]
    try:
        with torch.no_grad():
            for b in batches:
                _calib.run_model(model, b, device)
    finally:
        for h in hs:
            h.remove()
    producers = _producers(model, linears, batches[0], device)
    groups: dict[str, list[str]] = {}
    for f in targets:
        up = _gated_up(f, targets)
        if up is not None:
            groups.setdefault(up, []).append(f)
        elif f in producers:
            groups.setdefault(producers[f], []).append(f)
    report = SmoothReport()
    modules = dict(model.named_modules())
    for prod, readers in groups.items():
        others = [f for f, p in producers.items() if p == prod and f not in readers]
        if others:
            report.skipped += [(f, f"{prod} also feeds {others}") for f in readers]
            continue
        a = torch.stack([amax[f] for f in readers]).amax(0)
        w = torch.stack([linears[f].weight.detach().abs().amax(0).float() for f in readers]).amax(0)
        live = (a > 0) & (w > 0)
        s = torch.where(live, a.clamp_min(1e-5).pow(alpha) / w.clamp_min(1e-5).pow(1 - alpha),
                        torch.ones_like(a))
        if _apply(modules[prod], [linears[f] for f in readers], s):
            report.scaled[prod] = readers
        else:
            report.skipped += [(f, f"{prod}: not a weight * x norm") for f in readers]
    for f in targets:
        if not any(f in r for r in report.scaled.values()) and not any(f == x for x, _ in report.skipped):
            report.skipped.append((f, "input not produced by a norm or a gated MLP's up_proj"))
    report.seconds = time.perf_counter() - t0
    return report
