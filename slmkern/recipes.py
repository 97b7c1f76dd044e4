"""Recipes: ``slmkern.compress(model, recipe, calibration=None, teacher=None)``.

A recipe is an ordered list of steps, written in Python, YAML or JSON::

    ignore: ["classifier"]            # fnmatch patterns (or "re:<regex>") on module names
    targets: ["bert.encoder.*"]       # optional: only these (default: every nn.Linear)
    steps:
      - prune:    {algorithm: wanda, pattern: "2:4"}          # magnitude | wanda | sparsegpt
      - quantize: {algorithm: int8, activations: int8}        # int8 | rtn | hqq | gptq (+ Int4Config fields)
      - distill:  {steps: 200, lr: 5.0e-5, temperature: 2.0}  # recovery against the dense teacher
      - sparsify: {format: "2:4", values: int8}               # pack into SparseLinear (last step)

A pattern matches a module when it matches its name or the name of one of its parents;
every pattern must match at least one module. Quantization is kept *pending* (float
weights on a fixed int8/int4 grid) until the end, so a later ``distill`` step trains
with the exact grid (straight-through) and the final packing reproduces it; pruning
masks stay fixed through distillation. Layers a kernel cannot take stay dense and the
report says why.

Heads and poolers (``lm_head``, ``classifier``, ``bert.pooler.dense``, anything tied to the input
embedding: :func:`slmkern.algorithms._prune.head_reason`, the rule quantize_, sparsify_ and the
pruners follow too) stay dense in every step unless the recipe's ``targets`` or a quantize step's
``targets`` name them, or a quantize step sets ``skip_names: []``. A tied head stays tied unless it
is compressed. A head quantized to int8 (either activation mode) keeps one table: the embedding becomes
:class:`slmkern.nn.Int8Embedding`, reading the head's int8 codes and scales (:func:`tie_int8_table`); any
other compressed head (int4, sparse, or an int8 head whose weight a smoothing/distill step changed) unties
and the embedding keeps its own fp32 copy. The report gives the bytes either way.
``sparsify`` with ``format: unstructured`` never packs a layer below the kernel's measured
crossover sparsity (:data:`slmkern.nn.sparse_linear.UNSTRUCTURED_CROSSOVER_SPARSITY`).
"""
from __future__ import annotations

import copy
import dataclasses
import fnmatch
import json
import re
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from slmkern.config import Int4Config, Int8Config

STEP_KINDS = ("prune", "quantize", "distill", "sparsify")
PRUNE_ALGORITHMS = {"magnitude": "magnitude_prune_", "wanda": "wanda_prune_", "sparsegpt": "sparsegpt_prune_"}
QUANT_ALGORITHMS = ("int8", "rtn", "hqq", "gptq")
SPARSE_FORMATS = ("auto", "2:4", "unstructured")
SPARSE_VALUES = ("float", "int8", "int4")
DISTILL_KEYS = ("steps", "lr", "temperature", "hidden_weight", "label_weight", "weight_decay",
                "train_embeddings", "seed")


class RecipeError(ValueError):
    """A recipe that cannot be parsed or applied (unknown step/algorithm/option, pattern matching nothing)."""


class StepUnavailable(RecipeError):
    """A step needs a piece (algorithm or kernel) that this build does not have."""


@dataclasses.dataclass(frozen=True)
class Step:
    kind: str
    options: dict

    def to_dict(self) -> dict:
        return {self.kind: dict(self.options)}


@dataclasses.dataclass(frozen=True)
class Recipe:
    steps: tuple[Step, ...]
    ignore: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"ignore": list(self.ignore), "targets": list(self.targets), "steps": [s.to_dict() for s in self.steps]}


# ----------------------------------------------------------------------------- parsing
def _quant_config(opts: dict, where: str) -> Int8Config | Int4Config:
    opts = dict(opts)
    alg = opts.pop("algorithm", None)
    nested = opts.pop("config", None) or {}
    if not isinstance(nested, dict):
        raise RecipeError(f"{where}: config must be a mapping, got {type(nested).__name__}")
    fields = {**nested, **opts}
    fields.pop("type", None)
    if alg not in QUANT_ALGORITHMS:
        raise RecipeError(f"{where}: unknown quantize algorithm {alg!r}; expected one of {QUANT_ALGORITHMS}")
    try:
        if alg == "int8":
            return Int8Config(**fields)
        return Int4Config(**{**fields, "method": alg})
    except TypeError as exc:
        raise RecipeError(f"{where}: bad option for {alg}: {exc}") from None
    except ValueError as exc:
        raise RecipeError(f"{where}: {exc}") from None


def _check_pattern(pattern: Any, where: str) -> None:
    if isinstance(pattern, bool) or not isinstance(pattern, (int, float, str)):
        raise RecipeError(f"{where}: pattern must be a sparsity fraction or 'N:M', got {pattern!r}")
    if isinstance(pattern, str):
        if not re.fullmatch(r"\d+:\d+", pattern):
            raise RecipeError(f"{where}: pattern {pattern!r}: expected a fraction like 0.5 or 'N:M' like '2:4'")
    elif not 0.0 < float(pattern) < 1.0:
        raise RecipeError(f"{where}: sparsity {pattern!r} must lie strictly between 0 and 1")


def _parse_step(raw: Any, i: int) -> Step:
    where = f"recipe step {i}"
    if isinstance(raw, Step):
        return raw
    if not isinstance(raw, dict) or len(raw) != 1:
        raise RecipeError(f"{where}: expected a mapping with exactly one of {STEP_KINDS}, got {raw!r}")
    (kind, opts), = raw.items()
    if kind not in STEP_KINDS:
        raise RecipeError(f"{where}: unknown step {kind!r}; expected one of {STEP_KINDS}")
    opts = {} if opts is None else opts
    if not isinstance(opts, dict):
        raise RecipeError(f"{where} ({kind}): options must be a mapping, got {type(opts).__name__}")
    where = f"{where} ({kind})"
    if kind == "prune":
        alg = opts.get("algorithm")
        if alg not in PRUNE_ALGORITHMS:
            raise RecipeError(f"{where}: unknown prune algorithm {alg!r}; expected one of {tuple(PRUNE_ALGORITHMS)}")
        if "pattern" not in opts:
            raise RecipeError(f"{where}: needs a pattern (a sparsity like 0.5 or '2:4')")
        _check_pattern(opts["pattern"], where)
        bad = set(opts) - {"algorithm", "pattern", "scope"}
        if bad:
            raise RecipeError(f"{where}: unknown option(s) {sorted(bad)}")
    elif kind == "quantize":
        _patterns(opts.get("ignore"), f"{where} ignore")
        _patterns(opts.get("targets"), f"{where} targets")
        _quant_config({k: v for k, v in opts.items() if k not in ("ignore", "targets")}, where)
    elif kind == "distill":
        bad = set(opts) - set(DISTILL_KEYS)
        if bad:
            raise RecipeError(f"{where}: unknown option(s) {sorted(bad)}; expected some of {DISTILL_KEYS}")
    elif kind == "sparsify":
        if opts.get("format", "auto") not in SPARSE_FORMATS:
            raise RecipeError(f"{where}: format {opts.get('format')!r}: expected one of {SPARSE_FORMATS}")
        if opts.get("values", "float") not in SPARSE_VALUES:
            raise RecipeError(f"{where}: values {opts.get('values')!r}: expected one of {SPARSE_VALUES}")
        bad = set(opts) - {"format", "values"}
        if bad:
            raise RecipeError(f"{where}: unknown option(s) {sorted(bad)}")
    return Step(kind, dict(opts))


def _patterns(value: Any, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) and p for p in value):
        raise RecipeError(f"recipe {name}: expected a list of module-name patterns, got {value!r}")
    return tuple(value)


def parse_recipe(recipe: Any) -> Recipe:
    """A Recipe from a Recipe, a list of steps, a mapping {steps, ignore, targets}, or a .yaml/.yml/.json file."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, (str, Path)):
        path = Path(recipe)
        if not path.is_file():
            raise RecipeError(f"recipe: file {str(path)!r} not found")
        text = path.read_text()
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml
                recipe = yaml.safe_load(text)
            elif path.suffix == ".json":
                recipe = json.loads(text)
            else:
                raise RecipeError(f"recipe: {str(path)!r}: expected a .yaml, .yml or .json file")
        except RecipeError:
            raise
        except Exception as exc:  # yaml.YAMLError / json.JSONDecodeError
            raise RecipeError(f"recipe: {str(path)!r} could not be parsed: {exc}") from None
    if isinstance(recipe, (list, tuple)):
        recipe = {"steps": list(recipe)}
    if not isinstance(recipe, dict):
        raise RecipeError(f"recipe: expected a list of steps or a mapping with 'steps', got {type(recipe).__name__}")
    bad = set(recipe) - {"steps", "ignore", "targets", "name", "description"}
    if bad:
        raise RecipeError(f"recipe: unknown key(s) {sorted(bad)}; expected steps, ignore, targets")
    steps = recipe.get("steps")
    if not isinstance(steps, (list, tuple)) or not steps:
        raise RecipeError("recipe: 'steps' must be a non-empty list")
    parsed = tuple(_parse_step(s, i) for i, s in enumerate(steps))
    kinds = [s.kind for s in parsed]
    if "sparsify" in kinds and kinds.index("sparsify") != len(kinds) - 1:
        raise RecipeError("recipe: 'sparsify' packs the layers and must be the last step")
    if "prune" in kinds and "quantize" in kinds and kinds.index("quantize") < max(i for i, k in enumerate(kinds)
                                                                                 if k == "prune"):
        raise RecipeError("recipe: 'prune' must come before 'quantize'")
    return Recipe(parsed, _patterns(recipe.get("ignore"), "ignore"), _patterns(recipe.get("targets"), "targets"))


# ----------------------------------------------------------------------------- report
@dataclasses.dataclass
class LayerResult:
    format: str
    bytes: int
    rel_err: float           # ||W_eff - W||_F / ||W||_F against the original dense weight
    note: str = ""


@dataclasses.dataclass
class CompressReport:
    layers: dict[str, LayerResult] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)

    def total_bytes(self) -> int:
        return sum(r.bytes for r in self.layers.values())

    def to_dict(self) -> dict:
        return {"layers": {k: dataclasses.asdict(v) for k, v in self.layers.items()}, "notes": list(self.notes),
                "total_bytes": self.total_bytes()}

    def __str__(self) -> str:
        w = max([len(k) for k in self.layers] + [5])
        lines = [f"{'layer':<{w}}  {'format':<28}{'bytes':>11}{'rel_err':>10}  note", "-" * (w + 60)]
        for name, r in self.layers.items():
            lines.append(f"{name:<{w}}  {r.format:<28}{r.bytes:>11,}{r.rel_err:>10.4f}  {r.note}")
        lines.append(f"{'total':<{w}}  {'':<28}{self.total_bytes():>11,}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


# ----------------------------------------------------------------------------- pending quantization
@dataclasses.dataclass
class _Pending:
    """A layer's quantization grid, fixed at the quantize step; applied (or trained through) later."""

    config: Int8Config | Int4Config
    scales: torch.Tensor
    zeros: torch.Tensor | None = None
    group_size: int = 0
    note: str = ""

    def fake(self, w: torch.Tensor) -> torch.Tensor:
        if isinstance(self.config, Int8Config):
            s = self.scales.to(w.device).unsqueeze(1)
            return torch.clamp(torch.round(w.float() / s), -127, 127).mul(s).to(w.dtype)
        from slmkern.formats import int4
        codes = int4.quantize_codes(w.float(), self.scales.to(w.device), self.zeros, self.group_size)
        return int4.dequantize(int4.pack(codes), self.scales.to(w.device), self.zeros, self.group_size).to(w.dtype)

    def pack(self, linear: nn.Linear) -> nn.Module:
        from slmkern.nn import Int4Linear, Int8Linear
        w = linear.weight.detach()
        if isinstance(self.config, Int8Config):
            q = torch.clamp(torch.round(w.float() / self.scales.unsqueeze(1)), -127, 127).to(torch.int8)
            return Int8Linear.from_int8(linear, q, self.scales, self.config.activations)
        from slmkern.formats import int4
        codes = int4.quantize_codes(w.float(), self.scales, self.zeros, self.group_size)
        q = int4.Int4Weight(int4.pack(codes), self.scales.contiguous(), self.zeros)
        return Int4Linear.from_int4(linear, q, activations=self.config.activations)

    def describe(self) -> str:
        if isinstance(self.config, Int8Config):
            return {"int8": "int8 W8A8", "int7": "int8 W8A8 (7-bit activations)"}.get(self.config.activations,
                                                                                      "int8 W8A16")
        act = "W4A8" if self.config.activations == "int8" else "W4A16"
        return f"int4 {act} g{self.group_size} {self.config.method}"


# ----------------------------------------------------------------------------- helpers
def _matches(fqn: str, pattern: str) -> bool:
    names = [fqn] + [fqn[:i] for i, c in enumerate(fqn) if c == "."]
    if pattern.startswith("re:"):
        rx = re.compile(pattern[3:])
        return any(rx.fullmatch(n) for n in names)
    return any(fnmatch.fnmatchcase(n, pattern) for n in names)


def _select(model: nn.Module, recipe: Recipe) -> dict[str, nn.Linear]:
    linears = {fqn: m for fqn, m in model.named_modules() if type(m) is nn.Linear}
    if not linears:
        raise ValueError("model: has no torch.nn.Linear layers to compress")
    names = [n for n, _ in model.named_modules() if n]
    for kind, pats in (("ignore", recipe.ignore), ("targets", recipe.targets)):
        for p in pats:
            if p.startswith("re:"):
                try:
                    re.compile(p[3:])
                except re.error as exc:
                    raise RecipeError(f"recipe {kind}: bad regex {p!r}: {exc}") from None
            if not any(_matches(n, p) for n in names):
                raise RecipeError(f"recipe {kind}: pattern {p!r} matches no module of the model")
    sel = {f: m for f, m in linears.items()
           if (not recipe.targets or any(_matches(f, p) for p in recipe.targets))
           and not any(_matches(f, p) for p in recipe.ignore)}
    if not sel:
        raise RecipeError("recipe: targets/ignore leave no nn.Linear layer to compress")
    return sel


# ----------------------------------------------------------------------------- tied weights
# One rule, here and in quantize_: a Linear whose weight is shared (a tied lm_head and the input
# embedding) stays tied while it stays a float nn.Linear. Only a layer that is compressed gets its
# own weight (compressed in place, or replaced by a packed module); the other holders keep the fp32
# tensor, and the report says so with the bytes that copy costs.
def tied_holders(model: nn.Module, weight: torch.Tensor, skip: str = "") -> list[str]:
    """Names ("module.param") of the parameters of ``model`` that are ``weight`` itself, except ``skip``."""
    out = []
    for name, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            full = f"{name}.{pname}" if name else pname
            if p is weight and full != skip:
                out.append(full)
    return out


def untied_note(model: nn.Module, fqn: str, weight: torch.Tensor, holders: list[str]) -> str:
    """The report line for a tied layer that was compressed: who keeps the fp32 tensor, and its bytes.
    Also clears ``config.tie_word_embeddings`` so a save/load round trip does not tie them again."""
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
        cfg.tie_word_embeddings = False
    nbytes = weight.numel() * weight.element_size()
    return (f"{fqn}: weight was tied to {', '.join(holders)}; compressing it untied them, so "
            f"{holders[0]} keeps its own {str(weight.dtype).replace('torch.', '')} copy "
            f"({nbytes:,} bytes) next to the compressed {fqn}")


def tie_int8_table(model: nn.Module, fqn: str, head: nn.Module, weight: torch.Tensor,
                   holders: list[str]) -> str | None:
    """One table for a tied head quantized to int8: every holder of the shared fp32 ``weight`` that is an
    nn.Embedding is replaced by :class:`slmkern.nn.Int8Embedding` reading ``head``'s int8 codes and scales, so the
    fp32 copy is freed. Only when the head's table is the round-to-nearest int8 table of that very weight (not
    when smoothing, AWQ or distillation changed the head's weight first). Returns the report line, or None
    when it does not apply (then the caller keeps the untied copy and says so with :func:`untied_note`).
    int4 and sparse heads are not tied this way: their embedding keeps its own fp32 copy.
    Clears ``config.tie_word_embeddings``: no parameter is shared any more (Hugging Face's tie_weights must not
    try); the tie lives in the Int8Embedding, and slmkern.save / slmkern.load record and rebuild it."""
    from slmkern.formats import int8 as int8_format
    from slmkern.nn import Int8Embedding, Int8Linear

    if type(head) is not Int8Linear or not holders:
        return None
    embs = []
    for h in holders:
        parent, _, pname = h.rpartition(".")
        mod = model.get_submodule(parent) if parent else model
        if type(mod) is not nn.Embedding or pname != "weight" or mod.max_norm is not None \
                or tuple(mod.weight.shape) != (head.out_features, head.in_features):
            return None
        embs.append((parent, mod))
    with torch.no_grad():
        q, scale = int8_format.quantize_per_channel(weight.detach())
        if not (torch.equal(q.to(head.weight_scale.device), head.weight)
                and torch.equal(scale.to(head.weight_scale.device), head.weight_scale)):
            return None
    for parent, mod in embs:
        _set_submodule(model, parent, Int8Embedding.from_embedding(mod, head))
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
        cfg.tie_word_embeddings = False
    nbytes = weight.numel() * weight.element_size()
    return (f"{fqn}: weight was tied to {', '.join(holders)}; {', '.join(p for p, _ in embs)} now reads the int8 "
            f"head's table (Int8Embedding: one table), saving the {str(weight.dtype).replace('torch.', '')} copy "
            f"({nbytes:,} bytes)")


def _untie_for_update(layers: dict[str, nn.Linear], shared: dict[str, torch.Tensor]) -> list[str]:
    """Before a step writes into these layers' weights: give each layer still sharing its weight its own copy."""
    done = []
    for f, m in layers.items():
        if f in shared and m.weight is shared[f]:
            m.weight = nn.Parameter(m.weight.detach().clone(), requires_grad=m.weight.requires_grad)
            done.append(f)
    return done


def _retie(layers: dict[str, nn.Linear], shared: dict[str, torch.Tensor], names: list[str]) -> None:
    """Undo :func:`_untie_for_update` for layers the step left alone (their copy is unchanged)."""
    for f in names:
        m = layers[f]
        if type(m) is nn.Linear and torch.equal(m.weight, shared[f]):
            m.weight = shared[f]


def _check_calibration(model: nn.Module, batches: list, name: str = "calibration") -> None:
    from slmkern.algorithms import _calib
    dev = _calib.model_device(model)
    b = batches[0]
    if isinstance(b, dict):
        for k, v in b.items():
            if k in ("input_ids", "attention_mask", "token_type_ids") and isinstance(v, torch.Tensor) and v.dim() != 2:
                raise ValueError(f"{name}: batch 0 {k!r} has shape {tuple(v.shape)}; expected (batch, seq_len)")
    try:
        with torch.no_grad():
            _calib.run_model(model, {k: v for k, v in b.items() if k != "labels"} if isinstance(b, dict) else b, dev)
    except Exception as exc:  # a shape mismatch surfaces as RuntimeError/IndexError deep inside the model
        raise ValueError(f"{name}: batch 0 cannot be run through the model ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}); check its shape and keys") from None


def _need(kind: str, module: str, attr: str):
    import importlib
    try:
        mod = importlib.import_module(module)
        return getattr(mod, attr)
    except (ImportError, AttributeError):
        raise StepUnavailable(f"step {kind!r} needs {module}.{attr}, not available in this build") from None


def _module_bytes(m: nn.Module) -> int:
    if type(m) is nn.Linear:
        return sum(t.numel() * t.element_size() for t in (m.weight, m.bias) if t is not None)
    return sum(t.numel() * t.element_size() for t in m.state_dict().values())


@torch.no_grad()
def _effective_weight(m: nn.Module) -> torch.Tensor:
    """W as the module stores it: its dequantized weight, else (m(I) - m(0))^T (any Linear-like module)."""
    if type(m) is nn.Linear:
        return m.weight.detach().float()
    if hasattr(m, "dequantized_weight"):
        return m.dequantized_weight().float()
    K = m.in_features
    dev = next(iter(m.buffers())).device
    eye = torch.eye(K, device=dev)
    return (m(eye) - m(torch.zeros(1, K, device=dev))).float().T


def needs_calibration(recipe: Recipe) -> bool:
    for s in recipe.steps:
        if s.kind == "prune" and s.options["algorithm"] in ("wanda", "sparsegpt"):
            return True
        if s.kind == "quantize" and (s.options.get("algorithm") == "gptq" or s.options.get("awq")
                                     or s.options.get("smooth") is not None):
            return True
        if s.kind == "distill":
            return True
    return False


# ----------------------------------------------------------------------------- compress
def compress(model: nn.Module, recipe: Any, calibration: Any = None, teacher: nn.Module | None = None, *,
             distill_data: Any = None, progress: bool = True) -> CompressReport:
    """Apply ``recipe`` to ``model`` in place; returns a CompressReport (per layer format, bytes, error).

    calibration: an iterable of model inputs (tokenizer-output dicts, tuples or tensors), needed by
    wanda/sparsegpt pruning, GPTQ and distillation (which trains on ``distill_data`` if given, else on
    the calibration batches; ``labels`` in a batch add a task loss when label_weight > 0).
    teacher: the dense model for distillation (default: a copy of ``model`` taken before any step).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected torch.nn.Module, got {type(model).__name__}")
    recipe = parse_recipe(recipe)
    selected = _select(model, recipe)
    from slmkern.algorithms import _calib
    batches = None
    if calibration is not None:
        batches = _calib.as_batches(calibration)
        _check_calibration(model, batches)
    elif needs_calibration(recipe):
        raise ValueError("calibration: this recipe (wanda/sparsegpt/gptq/distill) needs calibration data "
                         "(an iterable of model inputs)")
    # fail early on a missing piece, before the model is touched
    for s in recipe.steps:
        if s.kind == "prune":
            _need("prune", f"slmkern.algorithms.{s.options['algorithm']}", PRUNE_ALGORITHMS[s.options["algorithm"]])
        if s.kind == "sparsify":
            _need("sparsify", "slmkern.nn", "SparseLinear")
    shared = {f: m.weight for f, m in selected.items() if tied_holders(model, m.weight, f"{f}.weight")}
    if any(s.kind == "distill" for s in recipe.steps) and teacher is None:
        teacher = copy.deepcopy(model).eval()
    originals = {f: m.weight.detach().float().clone() for f, m in selected.items()}
    report = CompressReport()
    masks: dict[str, torch.Tensor] = {}
    pending: dict[str, _Pending] = {}
    skipped: dict[str, str] = {}
    sparse_after: dict | None = next((s.options for s in recipe.steps if s.kind == "sparsify"), None)
    sparse_notes: dict[str, str] = {}
    # heads and poolers stay dense unless the recipe's targets name them (the rule prune/quantize_/sparsify_ follow)
    from slmkern.algorithms._prune import head_reason
    held = {f: why for f, m in selected.items()
            if (why := head_reason(model, m, f)) and not any(_matches(f, p) for p in recipe.targets)}
    skipped.update(held)
    done: set[str] = set()       # packed by sparsify
    live = lambda: {f: m for f, m in selected.items() if f not in done}  # noqa: E731

    for i, step in enumerate(recipe.steps):
        o = step.options
        if step.kind == "prune":
            fn = _need("prune", f"slmkern.algorithms.{o['algorithm']}", PRUNE_ALGORITHMS[o["algorithm"]])
            names = set(live()) - set(held)
            flt = lambda m, fqn, names=names: fqn in names  # noqa: E731
            untied = _untie_for_update({f: selected[f] for f in names}, shared)
            if o["algorithm"] == "magnitude":
                prep = fn(model, o["pattern"], scope=o.get("scope", "layer"), filter_fn=flt)
            else:
                prep = fn(model, batches, o["pattern"], filter_fn=flt)
            _retie(selected, shared, [f for f in untied if f not in prep.layers])
            for f in names:
                if f in prep.layers:
                    masks[f] = selected[f].weight.detach() != 0
            report.notes.append(f"step {i}: prune {o['algorithm']} {o['pattern']} on {len(names)} layer(s)")
        elif step.kind == "quantize":
            o = dict(o)
            scope = Recipe((), _patterns(o.pop("ignore", None), "quantize ignore"),
                           _patterns(o.pop("targets", None), "quantize targets"))
            cfg = _quant_config(o, f"recipe step {i} (quantize)")
            layers = {f: m for f, m in live().items()
                      if (not scope.targets or any(_matches(f, p) for p in scope.targets))
                      and not any(_matches(f, p) for p in scope.ignore)
                      and (f not in held or any(_matches(f, p) for p in scope.targets)
                           or not cfg.skip_names)}   # skip_names: [] takes every layer, heads included
            for kind, pats in (("ignore", scope.ignore), ("targets", scope.targets)):
                for p in pats:
                    if not any(_matches(f, p) for f in selected):
                        raise RecipeError(f"recipe step {i} (quantize) {kind}: pattern {p!r} matches no selected layer")
            _quantize_step(model, cfg, layers, batches, pending, skipped, masks, report, progress, shared)
            report.notes.append(f"step {i}: quantize {o.get('algorithm')} -> {len(pending)} layer(s) pending")
        elif step.kind == "distill":
            from slmkern.algorithms.distill import distill
            fq = {f: p.fake for f, p in pending.items()}
            if sparse_after and sparse_after.get("values") in ("int8", "int4"):
                for f in live():
                    fq.setdefault(f, _dynamic_fake(sparse_after["values"]))
            data = _calib.as_batches(distill_data) if distill_data is not None else batches
            dopts = {k: v for k, v in o.items()}
            r = distill(model, teacher, data, masks={f: m for f, m in masks.items() if f not in done},
                        fake_quant=fq, progress=progress, **dopts)
            report.notes.append(f"step {i}: {r}")
        elif step.kind == "sparsify":
            SparseLinear = _need("sparsify", "slmkern.nn", "SparseLinear")
            from slmkern.nn.sparse_linear import sparse_format_for
            for f, lin in live().items():
                if f in held:
                    continue
                fmt, why = o.get("format", "auto"), None
                if fmt == "unstructured":
                    fmt, why = sparse_format_for(lin.weight.detach(), fmt, o.get("values", "float"))
                try:
                    new = SparseLinear.from_linear(lin, format=fmt, values=o.get("values", "float"))
                except (ValueError, TypeError, NotImplementedError) as exc:
                    skipped[f] = f"sparse kernel cannot take it: {exc}"
                    continue
                _set_submodule(model, f, new)
                pending.pop(f, None)
                selected[f] = new
                done.add(f)
                if why:
                    sparse_notes[f] = why
    # pack what is still pending
    for f, p in pending.items():
        if f in done:
            continue
        new = p.pack(selected[f])
        _set_submodule(model, f, new)
        selected[f] = new
    # report
    for f, m in selected.items():
        why = skipped.get(f, "") if type(m) is nn.Linear else ""
        fmt = _describe(m, pending.get(f))
        err = (_effective_weight(m) - originals[f]).norm() / originals[f].norm().clamp(min=1e-30)
        note = why or (pending[f].note if f in pending else "") or sparse_notes.get(f, "")
        if f in masks and type(m) is nn.Linear:
            fmt = f"dense fp32 {float((m.weight == 0).float().mean()):.0%} zeros"
        report.layers[f] = LayerResult(fmt, _module_bytes(m), float(err), note)
    for f, m in model.named_modules():
        if type(m) is nn.Linear and f not in report.layers:
            report.layers[f] = LayerResult("dense fp32", _module_bytes(m), 0.0, "excluded by recipe ignore/targets")
    for f, w in shared.items():
        m = selected[f]
        if type(m) is nn.Linear and m.weight is w:
            report.layers[f].note = "; ".join(x for x in (report.layers[f].note, "stays tied (not compressed)") if x)
            continue
        holders = tied_holders(model, w, f"{f}.weight")
        if holders:
            report.notes.append(tie_int8_table(model, f, m, w, holders) or untied_note(model, f, w, holders))
    return report


def _describe(m: nn.Module, p: _Pending | None) -> str:
    if type(m) is nn.Linear:
        return "dense fp32"
    if p is not None and type(m).__name__ in ("Int8Linear", "Int4Linear"):
        return p.describe()
    name = type(m).__name__
    extra = [f"{k}={getattr(m, k)}" for k in ("format", "values", "activations", "group_size") if hasattr(m, k)]
    return f"{name} {' '.join(extra)}".strip()


def _dynamic_fake(values: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Fake quantization for weights a later sparsify step stores as int8/int4 (scales follow the weight)."""
    def fake_int8(w: torch.Tensor) -> torch.Tensor:
        s = (w.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-12)
        return torch.clamp(torch.round(w / s), -127, 127) * s

    def fake_int4(w: torch.Tensor) -> torch.Tensor:
        N, K = w.shape
        g = 128 if K % 128 == 0 else (64 if K % 64 == 0 else K)
        wg = w.reshape(N, K // g, g)
        s = (wg.abs().amax(dim=-1, keepdim=True) / 7.5).clamp(min=1e-12)
        return (torch.clamp(torch.round(wg / s), -8, 7) * s).reshape(N, K)

    return fake_int8 if values == "int8" else fake_int4


def _set_submodule(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _quantize_step(model, cfg, layers: dict[str, nn.Linear], batches, pending, skipped, masks, report,
                   progress: bool, shared: dict[str, torch.Tensor]) -> None:
    from slmkern.formats import int4
    from slmkern.formats import int8 as int8_format
    todo: dict[str, nn.Linear] = {}
    for f, m in layers.items():
        if f in pending:
            continue  # an earlier quantize step took it
        if any(f == s or f.endswith("." + s) for s in cfg.skip_names):
            skipped[f] = f"name matches skip_names {cfg.skip_names} (set skip_names: [] to include it)"
            continue
        if isinstance(cfg, Int4Config):
            try:
                int4.resolve_group_size(m.in_features, cfg.group_size)
            except ValueError as exc:
                skipped[f] = f"int4 kernel cannot take in_features={m.in_features}: {exc}"
                continue
        todo[f] = m
    if not todo:
        return
    untied = _untie_for_update(todo, shared)   # the grid is written into the weights below
    if isinstance(cfg, Int8Config) and cfg.smooth is not None:  # SmoothQuant scales, folded the same way
        from slmkern.algorithms.awq import smooth_scale_model
        report.notes.append(str(smooth_scale_model(model, batches, cfg.smooth, filter_fn=lambda m, fqn: fqn in todo)))
    if isinstance(cfg, Int4Config) and cfg.awq:  # scales folded into norms / up_proj, function unchanged
        from slmkern.algorithms.awq import awq_scale_model
        arep = awq_scale_model(model, batches, cfg.group_size, cfg.symmetric, filter_fn=lambda m, fqn: fqn in todo,
                               grid=cfg.awq_grid)
        report.notes.append(str(arep).splitlines()[0])
    with torch.no_grad():
        if isinstance(cfg, Int8Config):
            for f, m in todo.items():
                _, scale = int8_format.quantize_per_channel(m.weight)
                pending[f] = _Pending(cfg, scale)
        elif cfg.method == "gptq":
            from slmkern.algorithms.gptq import gptq_quantize_model
            weights, grep = gptq_quantize_model(
                model, batches, cfg.group_size, cfg.symmetric, filter_fn=lambda m, fqn: fqn in todo,
                act_order=cfg.act_order, percdamp=cfg.percdamp, block_size=cfg.block_size, clip=cfg.clip,
                write_back=True, progress=progress)
            for f, q in weights.items():
                st = grep.layers.get(f)
                note = f"gptq out-err {st.rel_err:.2e} (rtn {st.rtn_rel_err:.2e})" if st is not None else ""
                if st is not None and st.fallback:
                    note += f"; {st.fallback}"
                pending[f] = _Pending(cfg, q.scales, q.zeros, q.group_size, note)
        else:
            from slmkern.algorithms.hqq import hqq_quantize
            from slmkern.algorithms.rtn import rtn_quantize
            for f, m in todo.items():
                if cfg.method == "rtn":
                    q = rtn_quantize(m.weight.detach(), cfg.group_size, cfg.symmetric, clip=cfg.clip)
                else:
                    q = hqq_quantize(m.weight.detach(), cfg.group_size, cfg.symmetric)
                pending[f] = _Pending(cfg, q.scales, q.zeros, q.group_size)
        # the float weights now sit on their grid (pruned zeros kept), as later steps must see them
        for f in todo:
            if f in pending:
                m = todo[f]
                w = m.weight.detach()
                if f in masks:
                    w = w * masks[f]
                m.weight.copy_(pending[f].fake(w))
    _retie(todo, shared, [f for f in untied if f not in pending])
