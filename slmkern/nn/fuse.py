"""Inference-time fusions of a module tree around slmkern's linears (nothing here is saved).

``fuse_siblings_(model)``: linears that read the same input (attention's query/key/value) run as one
kernel call on one stacked packed weight: the first of them called computes all, the others take their
slice. One activation quantization and one larger GEMM instead of three (MiniLM batch 32 on 2 AVX2
cores: 3 x 384x384 at 12.5 ms each vs one 384x1152 at 26 ms).

``fuse_gelu_(model)``: where an exact (erf) GELU directly follows an ``Int8Linear`` with int8/int7
activations, the linear computes it in its kernel's store (``set_epilogue("gelu")``) and the GELU module
is replaced by ``FusedActivation``, an identity that says where it went. One pass over the output less:
at MiniLM batch 32 that is 6 x 25 MB read and written again, and torch's erf GELU costs ~2.5 ns per
element on 2 AVX2 cores. The fused function is ``slmkern.reference.gelu_epilogue`` (within 2e-7 |v| + 1e-7
of exact GELU), so outputs move by far less than the int8 quantization itself.

Patterns (both as Hugging Face / torch write them):
- a module with ``dense`` and ``intermediate_act_fn`` (BERT, RoBERTa, XLM-R, ... ``*Intermediate``);
- an ``nn.Sequential`` with an Int8Linear immediately followed by a GELU.

``slmkern.nn.attention.use_attention_(model)``: a transformers encoder's attention layers run
slmkern::attention (heads-last output, no transpose copy; 2x torch's flash kernel at MiniLM's head dim 32).

Checkpoints are unaffected: ``slmkern.save`` records the model's own config (which still names the GELU)
and the linears' canonical tensors; ``slmkern.load`` rebuilds and fuses again.
"""
from __future__ import annotations

import threading

import torch
from torch import nn

from slmkern._logging import logger


class FusedActivation(nn.Module):
    """Identity left where an activation was fused into the preceding linear's kernel."""

    def __init__(self, kind: str, into: str) -> None:
        super().__init__()
        self.kind, self.into = kind, into

    def forward(self, x):
        return x

    def extra_repr(self) -> str:
        return f"{self.kind} fused into {self.into}"


def is_exact_gelu(mod: nn.Module) -> bool:
    """torch's nn.GELU() (erf form) or transformers' GELUActivation (erf, torch's or its Python twin)."""
    if isinstance(mod, nn.GELU):
        return mod.approximate == "none"
    return type(mod).__name__ == "GELUActivation" and type(mod).__module__.startswith("transformers")


def _fusable(lin) -> bool:
    from slmkern.nn.int8_linear import Int8Linear
    return type(lin) is Int8Linear and lin.activations != "float" and lin.epilogue == "none"


def fuse_gelu_(model: nn.Module, *, force: bool = False) -> list[str]:
    """Fuse every GELU that follows an Int8Linear into that linear (in place); returns the linears' names.

    Only where it pays: on CPU when the active w8a8 kernel fuses natively (AVX2 or the scalar spec; the
    VNNI kernel would hand the call to the slower AVX2 GEMM), unless ``force``.
    """
    from slmkern._backends import cpu as cpu_backend

    if not force and not cpu_backend.fuses_gelu():
        return []
    fused = []
    for name, mod in model.named_modules():
        prefix = f"{name}." if name else ""
        lin, act = getattr(mod, "dense", None), getattr(mod, "intermediate_act_fn", None)
        if isinstance(lin, nn.Module) and isinstance(act, nn.Module) and _fusable(lin) and is_exact_gelu(act) \
                and (force or lin._ref_tensor().device.type == "cpu"):
            lin.set_epilogue("gelu")
            mod.intermediate_act_fn = FusedActivation("GELU", f"{prefix}dense")
            fused.append(f"{prefix}dense")
        if isinstance(mod, nn.Sequential):
            keys = list(mod._modules)
            for a, b in zip(keys, keys[1:]):
                lin, act = mod._modules[a], mod._modules[b]
                if _fusable(lin) and is_exact_gelu(act) and (force or lin._ref_tensor().device.type == "cpu"):
                    lin.set_epilogue("gelu")
                    mod._modules[b] = FusedActivation("GELU", f"{prefix}{a}")
                    fused.append(f"{prefix}{a}")
    if fused:
        logger.info("slmkern: GELU fused into %d Int8Linear kernel epilogues (%s)", len(fused),
                    cpu_backend.op_isa("w8a8_linear"))
    return fused


# ----------------------------------------------------------------------------- linears sharing one input
def stacked_linear(mods: list[nn.Module]) -> nn.Module | None:
    """One slmkern linear whose output is the outputs of `mods` side by side (same input), or None: mods must be
    Int4Linear or Int8Linear of one class and one configuration but for out_features. Built from their
    canonical tensors stacked along N, through the checkpoint loader's own from_canonical."""
    from slmkern.nn.int4_linear import Int4Linear
    from slmkern.nn.int8_linear import Int8Linear

    first = mods[0]
    if len(mods) < 2 or type(first) not in (Int4Linear, Int8Linear) or any(type(m) is not type(first) for m in mods):
        return None
    configs = [dict(m.slmkern_config(), out_features=None) for m in mods]
    if any(c != configs[0] for c in configs) or any(getattr(m, "epilogue", "none") != "none" for m in mods):
        return None
    parts = [m.canonical_tensors() for m in mods]
    tensors = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
    config = dict(first.slmkern_config(), out_features=sum(m.out_features for m in mods))
    return type(first).from_canonical(tensors, config)   # packs the fused weight for the CPU kernels


def _version(t: torch.Tensor) -> int:
    """t's in-place version counter; inference tensors have none (-1: identity alone decides)."""
    return -1 if t.is_inference() else t._version


SIBLING_NAMES = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"))


class SiblingGroup:
    """Linears that read one input, served by one stacked linear (not a submodule of anything: never saved,
    never moved; a member off the CPU, or edited since, makes the group step aside for good).

    ``call(i, x)``: member i's output for x, or None (then the member computes it itself). The first member
    called with an x runs the stacked kernel and keeps the other slices until their members ask for them with
    the same x (same object, same version); any other x starts over."""

    __slots__ = ("fused", "sizes", "members", "refs", "dead", "_tls")

    def __init__(self, fused: nn.Module, members: list[nn.Module]) -> None:
        self.fused, self.members = fused, members
        self.sizes = [m.out_features for m in members]
        self.refs = [self._refs(m) for m in members]
        self.dead = False
        self._tls = threading.local()   # the kept slices are per thread: one model may serve several

    def __getstate__(self):   # pickle / deepcopy: the kept slices are per thread and per call, not state
        return {k: getattr(self, k) for k in ("fused", "sizes", "members", "refs", "dead")}

    def __setstate__(self, state):
        for k, v in state.items():
            setattr(self, k, v)
        self._tls = threading.local()

    @staticmethod
    def _refs(m: nn.Module) -> tuple:
        return tuple((id(t), _version(t)) if t is not None else None for t in m._buffers.values())

    def _valid(self) -> bool:
        if self.dead:
            return False
        if any(self._refs(m) != r for m, r in zip(self.members, self.refs)):
            self.dead = True
            self._tls = threading.local()
            logger.info("slmkern: a fused %s group stepped aside: a member's tensors changed",
                        "/".join(type(m).__name__ for m in self.members))
        return not self.dead

    def call(self, i: int, x: torch.Tensor):
        st = self._tls
        kept = getattr(st, "kept", None)      # (x, its version, slices, pending flags)
        if kept is not None and kept[0] is x and kept[3][i] and _version(x) == kept[1]:
            kept[3][i] = False
            if not any(kept[3]):
                st.kept = None
            return kept[2][i]
        st.kept = None
        if not self._valid():
            return None
        plan = self.fused._direct_plan()
        y = plan(x) if plan is not None else None
        if y is None:
            return None
        outs = y.split(self.sizes, -1)
        pending = [True] * len(self.sizes)
        pending[i] = False
        st.kept = (x, _version(x), outs, pending)
        return outs[i]


def fuse_siblings_(model: nn.Module) -> list[str]:
    """Group attention's query/key/value (q_proj/k_proj/v_proj) slmkern linears into one kernel call (in place,
    CPU modules with a packed weight only); returns the groups' parent names. Bit-identical outputs."""
    from slmkern._backends import cpu as cpu_backend

    if not cpu_backend.has_cpp():
        return []
    done = []
    for name, mod in model.named_modules():
        for names in SIBLING_NAMES:
            members = [getattr(mod, n, None) for n in names]
            if any(m is None or not hasattr(m, "_direct_plan") or m._buffers.get("w_packed") is None
                   or "_sibling" in m.__dict__ for m in members):
                continue
            fused = stacked_linear(members)
            if fused is None or fused._buffers.get("w_packed") is None:
                continue
            group = SiblingGroup(fused, members)
            for i, m in enumerate(members):
                m.__dict__["_sibling"] = (group, i)
            done.append(name)
    if done:
        logger.info("slmkern: %d query/key/value groups run as one kernel call each", len(done))
    return done


def fuse_(model: nn.Module) -> dict[str, list[str]]:
    """Every inference fusion above, in place (what slmkern.load applies), plus slmkern::attention for a
    transformers encoder (slmkern.nn.attention.use_attention_):
    {"gelu": [...], "siblings": [...], "attention": ["slmkern"] or []}."""
    from slmkern.nn.attention import NAME, use_attention_

    return {"gelu": fuse_gelu_(model), "siblings": fuse_siblings_(model),
            "attention": [NAME] if use_attention_(model) else []}
