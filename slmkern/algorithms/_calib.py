"""Calibration plumbing shared by data-driven algorithms (GPTQ, SparseGPT, Wanda).

* :func:`as_batches` / :func:`run_model`: any iterable of model inputs -- dicts
  (``model(**batch)``, Hugging Face style), tuples/lists (``model(*batch)``) or tensors
  (``model(batch)``) -- moved to the model's device.
* :func:`trace_linears`: one forward pass that records in which order the target
  Linear layers run, how often each runs per forward, and which consecutive layers
  read the very same input tensor (q/k/v, gate/up). Such a *stage* can be calibrated
  from one pass, since no member depends on another's output.
* :class:`HessianCollector`: forward pre-hooks that accumulate ``H = 2/n * sum x x^T``
  for the layers of one stage and stop the forward pass (:class:`StopForward`) once
  every member has seen its input, so the rest of the model is not run.
* :func:`stagewise_hessians`: the layer-by-layer driver on top of those two: yields
  each target layer with its Hessian, one stage at a time, and only runs the next
  stage's pass once the caller has handled (e.g. rewritten) the previous stage.
* :func:`blockwise_hessians` / :func:`layerwise_hessians`: the same, block by block in a
  stack of transformer blocks (every block's own arguments captured in one real pass, each
  block replayed alone, its compressed output feeding the next block); layers outside the stack (an output head)
  stage by stage over the whole model, before or after it. Used by GPTQ and SparseGPT.
* :class:`InputNormCollector`: one pass, hooks on every target layer, accumulating the
  per-input-column sum of squares (Wanda's ``||X_j||_2^2``).
* :func:`inverse_hessian_factor`: upper Cholesky factor of the damped inverse Hessian,
  retrying at 10x damping with a WARNING each time.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from slmkern._logging import logger


class StopForward(Exception):
    """Raised from a hook to abandon a calibration forward pass once its inputs are captured."""


def as_batches(calibration: Any) -> list[Any]:
    """Materialise the calibration inputs (a single tensor or dict counts as one batch)."""
    if isinstance(calibration, torch.Tensor) or hasattr(calibration, "keys"):
        return [calibration]
    if not isinstance(calibration, Iterable):
        raise TypeError(f"calibration: expected an iterable of model inputs (dicts, tuples or tensors), "
                        f"got {type(calibration).__name__}")
    batches = list(calibration)
    if not batches:
        raise ValueError("calibration: is empty; need at least one batch of model inputs")
    return batches


def to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@dataclasses.dataclass
class Call:
    """A recorded call ``module(*args, **kwargs)`` (replayed by :func:`run_model` as is)."""

    args: tuple
    kwargs: dict


def run_model(model: nn.Module, batch: Any, device: torch.device) -> None:
    """One forward pass on one calibration batch; a StopForward from a hook ends it quietly."""
    if isinstance(batch, Call):
        args, kwargs = batch.args, batch.kwargs
    elif isinstance(batch, dict) or (hasattr(batch, "keys") and not isinstance(batch, torch.Tensor)):
        args, kwargs = (), dict(to_device(dict(batch), device))
    elif isinstance(batch, (tuple, list)):
        args, kwargs = tuple(to_device(list(batch), device)), {}
    elif isinstance(batch, torch.Tensor):
        args, kwargs = (batch.to(device),), {}
    else:
        raise TypeError(f"calibration: each batch must be a dict, tuple/list or tensor, got {type(batch).__name__}")
    try:
        model(*args, **kwargs)
    except StopForward:
        pass


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    x = args[0] if args else kwargs.get("input")
    return x if isinstance(x, torch.Tensor) else None


@dataclasses.dataclass
class Trace:
    """Execution facts of the target layers in one forward pass."""

    stages: list[list[str]]          # consecutive layers sharing one input tensor, in run order
    calls: dict[str, int]            # calls per forward pass
    never_called: list[str]          # targets that did not run


def trace_linears(model: nn.Module, targets: dict[str, nn.Module], batch: Any,
                  device: torch.device) -> Trace:
    order: list[str] = []
    calls = {fqn: 0 for fqn in targets}
    stages: list[list[str]] = []
    prev: dict[str, Any] = {"x": None}

    def make_hook(fqn: str):
        def hook(mod, args, kwargs):
            calls[fqn] += 1
            if calls[fqn] > 1:
                return None
            x = _first_tensor(args, kwargs)
            px = prev["x"]
            same = (x is not None and px is not None and
                    (x is px or (x.data_ptr() == px.data_ptr() and x.shape == px.shape
                                 and x.stride() == px.stride() and x.dtype == px.dtype)))
            if same and stages:
                stages[-1].append(fqn)
            else:
                stages.append([fqn])
            prev["x"] = x  # held until the next first call, so its address cannot be reused
            order.append(fqn)
            return None
        return hook

    handles = [m.register_forward_pre_hook(make_hook(fqn), with_kwargs=True) for fqn, m in targets.items()]
    try:
        with torch.no_grad():
            run_model(model, batch, device)
    finally:
        for h in handles:
            h.remove()
        prev["x"] = None
    never = [fqn for fqn in targets if calls[fqn] == 0]
    return Trace(stages=stages, calls=calls, never_called=never)


class HessianAccumulator:
    """Running ``H = 2/n * sum_rows x^T x`` (fp32) over the rows of every input (..., K)."""

    def __init__(self, K: int, device: torch.device):
        self.H = torch.zeros(K, K, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(device=self.H.device, dtype=torch.float32)
        m = x.shape[0]
        if m == 0:
            return
        self.H.mul_(self.n / (self.n + m))
        self.n += m
        x = x * (2.0 / self.n) ** 0.5
        self.H.addmm_(x.T, x)


class HessianCollector:
    """Pre-hooks on one stage's layers: accumulate their Hessians, stop the pass when all are fed."""

    def __init__(self, layers: dict[str, nn.Module], calls: dict[str, int], stop_early: bool = True):
        self.layers = layers
        self.expected = {fqn: calls[fqn] for fqn in layers}
        self.acc = {fqn: HessianAccumulator(m.in_features, m.weight.device) for fqn, m in layers.items()}
        self.stop_early = stop_early
        self._seen: dict[str, int] = {}

    def _hook(self, fqn: str):
        def hook(mod, args, kwargs):
            x = _first_tensor(args, kwargs)
            if x is not None:
                self.acc[fqn].add(x)
            self._seen[fqn] = self._seen.get(fqn, 0) + 1
            if self.stop_early and all(self._seen.get(f, 0) >= n for f, n in self.expected.items()):
                raise StopForward
            return None
        return hook

    def collect(self, model: nn.Module, batches: list[Any], device: torch.device) -> dict[str, HessianAccumulator]:
        handles = [m.register_forward_pre_hook(self._hook(fqn), with_kwargs=True)
                   for fqn, m in self.layers.items()]
        try:
            with torch.no_grad():
                for batch in batches:
                    self._seen = {}
                    run_model(model, batch, device)
        finally:
            for h in handles:
                h.remove()
        return self.acc


def layerwise_hessians(model: nn.Module, targets: dict[str, nn.Module], batches: list[Any],
                       device: torch.device, stages: list[list[str]] | None = None
                       ) -> Iterator[tuple[str, nn.Module, HessianAccumulator | None]]:
    """Every target with its Hessian, layer by layer (None for layers that never ran).

    In a stack of blocks (the nn.ModuleList holding most targets, see :func:`find_block_list`)
    the blocks' layers go through :func:`blockwise_hessians` (each block replayed on cached
    inputs: O(#blocks) model work); targets outside the stack (an output head, a pooler, an
    input projection) are handled by :func:`stagewise_hessians` over the whole model, before
    the stack if they run before it, after it if they run after it. A model without such a
    stack, or whose other targets run *between* blocks, goes through :func:`stagewise_hessians`
    alone. Either way a layer's Hessian comes from the model as the caller left it after
    processing all earlier layers (their compressed outputs feed later layers).

    ``stages``: if a list is given, every stage (layers calibrated from one input, e.g.
    q/k/v) is appended to it, as fqn lists in run order, when it is calibrated.
    """
    found = find_block_list(model, targets)
    if found is not None:
        name = found[0]
        inner = {f: m for f, m in targets.items() if f.startswith(name + ".")}
        outer = {f: m for f, m in targets.items() if f not in inner}
        plan = _split_around_blocks(model, inner, outer, batches, device) if outer else ([], [], [], {})
        if plan is not None:
            pre, post, never, calls = plan
            if pre:   # outer layers that run before the stack: compressed before its inputs are cached
                yield from stagewise_hessians(model, outer, batches, device, Trace(pre, calls, []), stages)
            it = blockwise_hessians(model, inner, batches, device, stages)
            if it is None:
                done = {f for st in pre for f in st}
                rest = {f: m for f, m in targets.items() if f not in done}
                trace = trace_linears(model, rest, batches[0], device)
                yield from stagewise_hessians(model, rest, batches, device, trace, stages)
                for fqn in trace.never_called:
                    yield fqn, rest[fqn], None
                return
            yield from it
            if post:  # e.g. an output head: one whole-model pass per stage
                yield from stagewise_hessians(model, outer, batches, device, Trace(post, calls, []), stages)
            for fqn in never:
                yield fqn, outer[fqn], None
            return
    trace = trace_linears(model, targets, batches[0], device)
    yield from stagewise_hessians(model, targets, batches, device, trace, stages)
    for fqn in trace.never_called:
        yield fqn, targets[fqn], None


def _split_around_blocks(model: nn.Module, inner: dict[str, nn.Module], outer: dict[str, nn.Module],
                         batches: list[Any], device: torch.device
                         ) -> tuple[list[list[str]], list[list[str]], list[str], dict[str, int]] | None:
    """(stages of ``outer`` that run before every ``inner`` layer, stages that run after them all,
    outer layers that never run, calls per forward of each layer), or None when an outer layer
    runs between inner ones (or shares a stage with one)."""
    trace = trace_linears(model, {**inner, **outer}, batches[0], device)
    pos = {}
    for i, st in enumerate(trace.stages):
        for f in st:
            pos[f] = i
    ran_inner = [pos[f] for f in inner if f in pos]
    if not ran_inner:
        return None
    lo, hi = min(ran_inner), max(ran_inner)
    pre, post = [], []
    for i, st in enumerate(trace.stages):
        kinds = {f in inner for f in st}
        if kinds == {True}:
            continue
        if kinds != {False} or lo <= i <= hi:
            return None
        (pre if i < lo else post).append(list(st))
    return pre, post, [f for f in outer if f in trace.never_called], trace.calls


def stagewise_hessians(model: nn.Module, targets: dict[str, nn.Module], batches: list[Any],
                       device: torch.device, trace: Trace, stages: list[list[str]] | None = None
                       ) -> Iterator[tuple[str, nn.Module, HessianAccumulator]]:
    """Yield ``(fqn, module, HessianAccumulator)`` for every layer of ``trace.stages``, in run order.

    A generator: the calibration pass for stage s+1 runs only when the caller asks for
    its first layer, i.e. after it has processed (pruned/quantized in place) every layer
    of stage s, so later layers calibrate on the compressed model's activations. Memory:
    one stage's K x K Hessians at a time. ``trace.never_called`` layers are not yielded.
    ``stages``: a list that each stage's fqns are appended to as it is calibrated.
    """
    for stage in trace.stages:
        layers = {fqn: targets[fqn] for fqn in stage}
        accs = HessianCollector(layers, trace.calls).collect(model, batches, device)
        if stages is not None:
            stages.append(list(stage))
        for fqn, mod in layers.items():
            yield fqn, mod, accs.pop(fqn)


# ----------------------------------------------------------------------------- block-sequential driver
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


def find_block_list(model: nn.Module, targets: dict[str, nn.Module]) -> tuple[str, nn.ModuleList] | None:
    """The nn.ModuleList of repeated blocks (transformer layers) holding the most targets, or None.

    Among lists holding equally many, the innermost. A list qualifies when at least two of
    its blocks hold targets (one block is not a stack worth replaying block by block).
    """
    best, best_n = None, 0
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) < 2 or not name:
            continue
        inside = [f for f in targets if f.startswith(name + ".")]
        blocks = {f[len(name) + 1:].split(".", 1)[0] for f in inside}
        if len(blocks) < 2:
            continue
        if len(inside) > best_n or (len(inside) == best_n and best is not None and len(name) > len(best[0])):
            best, best_n = (name, mod), len(inside)
    return best


def _strip_cache(kwargs: dict) -> dict:
    kw = dict(kwargs)
    for k in _CACHE_KWARGS:
        if k in kw:
            kw[k] = None
    if "use_cache" in kw:
        kw["use_cache"] = False
    return kw


def _capture_block_calls(model: nn.Module, blocks: nn.ModuleList, batches: list[Any], device: torch.device
                         ) -> list[list[Call]] | None:
    """Every block's own call, per calibration batch, as one real forward pass makes it.

    ``calls[b][i]`` is block b's call on batch i with cache arguments dropped. Blocks may
    differ in more than their weights (sliding-window vs full attention masks, per-layer
    RoPE tables, ...), so each block keeps its own arguments; only block 0 keeps its hidden
    state, the later blocks' hidden-state slot is None until the replay fills it with the
    previous (compressed) block's output. The pass stops at the last block's input. None
    when a block does not run exactly once per batch (then the stack cannot be replayed).
    """
    n = len(blocks)
    calls: list[list[Call]] = [[] for _ in range(n)]

    def make_hook(b: int):
        def hook(mod, args, kwargs):
            call = Call(tuple(args), _strip_cache(kwargs))
            calls[b].append(call if b == 0 else _with_hidden(call, None))
            if b == n - 1:
                raise StopForward
            return None
        return hook

    handles = [blk.register_forward_pre_hook(make_hook(b), with_kwargs=True) for b, blk in enumerate(blocks)]
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                run_model(model, batch, device)
                if any(len(c) != i + 1 for c in calls):
                    return None
    finally:
        for h in handles:
            h.remove()
    return calls


def _hidden(call: Call) -> torch.Tensor | None:
    x = call.args[0] if call.args else call.kwargs.get("hidden_states")
    return x if isinstance(x, torch.Tensor) else None


def _with_hidden(call: Call, x: torch.Tensor | None) -> Call:
    """``call`` with its hidden-state argument (first positional, else ``hidden_states=``) replaced by x."""
    if call.args:
        return Call((x,) + tuple(call.args[1:]), call.kwargs)
    return Call((), {**call.kwargs, "hidden_states": x})


def _next_call(call: Call, out: Any, template: Call) -> Call | None:
    """The next block's call: its own captured ``template`` fed with ``out``, the output of the block that
    ran ``call`` (None when that output does not look like the hidden state it was given)."""
    y = out[0] if isinstance(out, (tuple, list)) else getattr(out, "last_hidden_state", out)
    x = _hidden(call)
    if not isinstance(y, torch.Tensor) or x is None or y.shape != x.shape:
        return None
    if not template.args and "hidden_states" not in template.kwargs:
        return None
    return _with_hidden(template, y)


def blockwise_hessians(model: nn.Module, targets: dict[str, nn.Module], batches: list[Any],
                       device: torch.device, stages: list[list[str]] | None = None
                       ) -> Iterator[tuple[str, nn.Module, HessianAccumulator | None]] | None:
    """Like :func:`stagewise_hessians`, but O(#blocks) model work instead of O(#stages * depth).

    When every target lies in one nn.ModuleList of blocks (a transformer's layers), one
    real forward pass per calibration batch captures every block's own arguments (cache
    arguments dropped, ``use_cache=False``): block 0's hidden states, and each block's
    masks, position tables and other arguments, which differ between layers in models
    that mix sliding-window and full attention or use per-layer RoPE bases. Each block is
    then calibrated stage by stage by replaying only that block on its inputs, and, once
    the caller has processed all its layers, the (compressed) block is run once to produce
    the hidden states of the next block, which gets them with its own arguments. Yields
    ``(fqn, module, HessianAccumulator)``, and ``(fqn, module, None)`` for a layer of a
    block that never ran. Returns None (use :func:`stagewise_hessians`) when the model
    does not have that shape: no such list holding *every* target, or a block whose input
    cannot be replayed. ``stages``: a list each calibrated stage's fqns are appended to.
    Memory: the cached block inputs (one hidden-state tensor per calibration batch, plus
    every block's kwargs such as masks and rotary tables, mostly tensors the blocks share)
    and one stage's Hessians.
    """
    found = find_block_list(model, targets)
    if found is None:
        return None
    name, blocks = found
    if any(not f.startswith(name + ".") for f in targets):
        return None
    block_of = {}
    for fqn in targets:
        idx = fqn[len(name) + 1:].split(".", 1)[0]
        if not idx.isdigit():
            return None
        block_of.setdefault(int(idx), {})[fqn] = targets[fqn]
    own = _capture_block_calls(model, blocks, batches, device)
    if own is None or any(_hidden(c) is None for c in own[0]):
        return None
    calls = own[0]
    with torch.no_grad():   # dry run: can block 0's output feed block 1?
        if _next_call(calls[0], blocks[0](*calls[0].args, **calls[0].kwargs), own[1][0]) is None:
            return None

    def gen():
        nonlocal calls
        for b, block in enumerate(blocks):
            layers = block_of.get(b, {})
            if layers:
                trace = trace_linears(block, layers, calls[0], device)
                for fqn, mod, acc in stagewise_hessians(block, layers, calls, device, trace, stages):
                    yield fqn, mod, acc
                for fqn in trace.never_called:
                    yield fqn, layers[fqn], None
            if b + 1 < len(blocks) and any(k > b for k in block_of):
                nxt = []
                with torch.no_grad():
                    for c, template in zip(calls, own[b + 1]):
                        n = _next_call(c, block(*c.args, **c.kwargs), template)
                        if n is None:
                            raise RuntimeError(f"{name}.{b}: block output does not look like its hidden-state "
                                               "input; cannot chain blocks")
                        nxt.append(n)
                calls = nxt
    return gen()


class InputNormCollector:
    """Pre-hooks on many layers at once: per input column, the sum of squares over all rows seen."""

    def __init__(self, layers: dict[str, nn.Module]):
        self.layers = layers
        self.sumsq = {fqn: torch.zeros(m.in_features, dtype=torch.float64, device=m.weight.device)
                      for fqn, m in layers.items()}
        self.rows = {fqn: 0 for fqn in layers}

    def _hook(self, fqn: str):
        def hook(mod, args, kwargs):
            x = _first_tensor(args, kwargs)
            if x is not None and x.numel():
                x = x.detach().reshape(-1, x.shape[-1])
                acc = self.sumsq[fqn]
                acc += x.to(device=acc.device, dtype=torch.float32).square().sum(dim=0).double()
                self.rows[fqn] += x.shape[0]
            return None
        return hook

    def collect(self, model: nn.Module, batches: list[Any], device: torch.device) -> dict[str, torch.Tensor]:
        """Run every batch once; returns {fqn: ||X_j||_2 per column, fp32 [K]} (zeros for unseen layers)."""
        handles = [m.register_forward_pre_hook(self._hook(fqn), with_kwargs=True)
                   for fqn, m in self.layers.items()]
        try:
            with torch.no_grad():
                for batch in batches:
                    run_model(model, batch, device)
        finally:
            for h in handles:
                h.remove()
        return {fqn: s.sqrt().float() for fqn, s in self.sumsq.items()}


MAX_DAMP = 100.0  # beyond 100 x mean(diag H) the Hessian carries no useful information


def inverse_hessian_factor(H: torch.Tensor, percdamp: float, name: str, tag: str = "calib"
                           ) -> tuple[torch.Tensor | None, float, int]:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1 -> (U or None, damp used, retries).

    Starts at ``percdamp`` and multiplies the damping by 10 after every failed (or
    non-finite) factorisation, logging a WARNING ("<tag>: <name>: ...") each time;
    returns None once it would exceed MAX_DAMP or when H itself is not finite.
    """
    if not bool(torch.isfinite(H).all()):
        return None, percdamp, 0
    mean_diag = float(torch.diagonal(H).mean())
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    damp, retries = percdamp, 0
    while True:
        L, info = torch.linalg.cholesky_ex(H + (damp * mean_diag) * eye)
        if int(info) == 0 and bool(torch.isfinite(L).all()):
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0 and bool(torch.isfinite(U).all()) and bool((torch.diagonal(U) > 0).all()):
                return U, damp, retries
        nxt = damp * 10.0 if damp > 0 else 1e-4
        if nxt > MAX_DAMP:
            return None, damp, retries
        logger.warning("%s: %s: Cholesky of the damped Hessian failed at damp=%g x mean(diag H); "
                       "retrying at damp=%g", tag, name, damp, nxt)
        retries += 1
        damp = nxt
