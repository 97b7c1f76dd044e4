"""What every slmkern linear module shares: fp32 scale buffers that survive
``model.half()``, and a CPU-only packed layout rebuilt after loads and device moves.

One copy of each weight: on CPU, once packed, a module keeps the packed layout only.
The canonical buffers that layout holds exactly (``DERIVED``: the codes, a permutation
of the packed bytes) are dropped and derived from it when read (``state_dict``, save,
export, ``module.weight``); loads and device moves rebuild them first. A derived tensor
is an inference tensor: writing into it raises instead of silently changing a copy
the kernels never read (load a new weight with ``load_state_dict``, or ``unpack_()``,
edit, ``prepack()``).
"""
from __future__ import annotations

import threading

import torch
from torch import nn


_BUILDING = threading.local()   # .defer: from_canonical is constructing (the load packs right after)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class PackedLinearBase(nn.Module):
    """Subclasses set FP32_BUFFERS and implement ``_pack_cpu() -> Tensor | None`` and
    ``_init_kwargs() -> dict`` (JSON-able constructor arguments).

    Save/load protocol (``slmkern.checkpoint``): ``slmkern_config()`` describes the module
    in JSON, ``canonical_tensors()`` are its portable buffers (the ``state_dict``: never
    the packed kernel layout), and ``cls.from_canonical(tensors, config)`` rebuilds it,
    checking every tensor's name, shape and dtype, and repacks for the local device.
    """

    FP32_BUFFERS: tuple[str, ...] = ()
    DERIVED: tuple[str, ...] = ()   # canonical buffers the CPU packed layout holds exactly

    def _unpack_cpu(self, name: str) -> torch.Tensor:  # pragma: no cover - abstract
        """The canonical buffer `name` (one of DERIVED), read back from ``w_packed``."""
        raise NotImplementedError

    def _init_kwargs(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def slmkern_config(self) -> dict:
        """JSON description: {"class": ..., constructor arguments...}; dtype names the bias dtype."""
        kw = dict(self._init_kwargs())
        bias = getattr(self, "bias", None)
        kw["dtype"] = str(bias.dtype if bias is not None else torch.float32).removeprefix("torch.")
        return {"class": type(self).__name__, **kw}

    def canonical_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items()}

    # ------------------------------------------------------------------ one copy of each weight
    def __getattr__(self, name: str):
        derived = self.__dict__.get("_derived")
        if derived is not None and name in derived:
            return self._derive(name)
        return super().__getattr__(name)

    def __setattr__(self, name: str, value) -> None:
        derived = self.__dict__.get("_derived")
        if derived is not None and (name in derived or name == "w_packed"):
            # an assigned canonical buffer replaces the derived one (repack to use it); a replaced or
            # dropped packed layout takes the only copy of the codes with it: bring them back first
            self.unpack_()
        super().__setattr__(name, value)

    def _derive(self, name: str) -> torch.Tensor:
        with torch.inference_mode():
            return self._unpack_cpu(name)

    def _op_weight(self, name: str, x: torch.Tensor | None = None) -> torch.Tensor:
        """What the op call gets for the canonical buffer `name`: the buffer; once dropped, a zero-stride
        stand-in of its shape and dtype (the CPU kernels read w_packed only, see slmkern.ops), or the
        derived tensor where autograd needs the values."""
        derived = self.__dict__.get("_derived")
        if derived is None or name not in derived:
            return self._buffers[name]
        if x is not None and x.requires_grad and torch.is_grad_enabled():
            return self._unpack_cpu(name)
        return derived[name]

    def _drop_derived(self) -> None:
        """After packing on CPU: free the canonical buffers the packed layout holds (once each)."""
        from slmkern._backends import cpu
        if not self.DERIVED or self._buffers.get("w_packed") is None or not cpu.has_cpp():
            return   # without _C the pure-torch reference reads the canonical buffers
        derived = self.__dict__.get("_derived") or {}
        for name in self.DERIVED:
            t = self._buffers.get(name)
            if t is None or name in derived:
                continue
            derived[name] = torch.zeros((), dtype=t.dtype).expand(t.shape)
            self._buffers[name] = None   # keeps its slot (state_dict order); __getattr__ derives it
        self.__dict__["_derived"] = derived

    def unpack_(self) -> None:
        """Back to the canonical buffers (before a load, a repack or a device move, or to edit them in
        place: ``mod.unpack_(); mod.weight.copy_(w); mod.prepack()``)."""
        derived = self.__dict__.pop("_derived", None)
        if derived:
            for name in derived:
                self._buffers[name] = self._unpack_cpu(name)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        derived = self.__dict__.get("_derived")
        if derived:
            # put each derived tensor back in its own slot, keeping the buffers' order
            items = list(destination.items())
            new = {}
            for name in self._buffers:
                key = prefix + name
                if name in derived:
                    new[key] = self._unpack_cpu(name)
                elif key in destination:
                    new[key] = destination[key]
            ours = set(new)
            rest_before = [(k, v) for k, v in items if k not in ours and not k.startswith(prefix)]
            rest_after = [(k, v) for k, v in items if k not in ours and k.startswith(prefix)]
            destination.clear()
            destination.update(rest_before)
            destination.update(new)
            destination.update(rest_after)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.unpack_()   # the load writes into real buffers; the post-load hook packs and drops again
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def from_canonical(cls, tensors: dict[str, torch.Tensor], config: dict, device=None) -> "PackedLinearBase":
        """Rebuild from canonical tensors; ValueError naming any missing/unexpected/misshapen tensor."""
        kw = {k: v for k, v in config.items() if k != "class"}
        if config.get("class", cls.__name__) != cls.__name__:
            raise ValueError(f"config class: expected {cls.__name__}, got {config.get('class')!r}")
        dtype = kw.pop("dtype", "float32")
        if dtype not in _DTYPES:
            raise ValueError(f"config dtype: expected one of {sorted(_DTYPES)}, got {dtype!r}")
        try:
            mod = cls(**kw, device="meta", dtype=_DTYPES[dtype])
        except TypeError as exc:
            raise ValueError(f"config for {cls.__name__} does not match its constructor: {exc}") from None
        expected = mod.state_dict()
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        if missing or extra:
            raise ValueError(f"{cls.__name__}: tensors do not match its config (missing {missing}, unexpected {extra})")
        for name, exp in expected.items():
            got = tensors[name]
            if tuple(got.shape) != tuple(exp.shape) or got.dtype != exp.dtype:
                raise ValueError(f"{cls.__name__}: tensor {name!r} is {tuple(got.shape)} {got.dtype}, "
                                 f"its config says {tuple(exp.shape)} {exp.dtype}")
        _BUILDING.defer = True   # no pack of the constructor's placeholder weights: the load packs once
        try:
            mod = cls(**kw, device=device, dtype=_DTYPES[dtype])
        finally:
            _BUILDING.defer = False
        mod.load_state_dict(tensors)  # the post-load hook packs for this device
        return mod

    def _init_packing(self) -> None:
        self.register_buffer("w_packed", None, persistent=False)
        self.register_load_state_dict_post_hook(_prepack_after_load)   # a module-level function: picklable

    # ------------------------------------------------------------------ pickle / copy.deepcopy
    def __getstate__(self) -> dict:
        """pickle (``torch.save(module)``) and ``copy.deepcopy``: the canonical buffers (derived ones read back)
        and never the packed layout or the cached kernel call (``_plan``: raw pointers into this instance's
        tensors); ``__setstate__`` repacks for the local machine, as a load does. Nothing here changes self."""
        state = self.__dict__.copy()
        state.pop("_plan", None)
        derived = state.pop("_derived", None) or {}
        buffers = dict(self._buffers)
        for name in derived:
            buffers[name] = self._unpack_cpu(name)
        state["_repack"] = buffers.get("w_packed") is not None
        buffers["w_packed"] = None
        state["_buffers"] = buffers
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        repack = state.pop("_repack", False)
        super().__setstate__(state)
        if repack:
            self.prepack()   # off the CPU (torch.load with map_location) this leaves w_packed None

    def _pack_cpu(self) -> torch.Tensor | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _ref_tensor(self) -> torch.Tensor:
        """A canonical buffer that tells which device the module lives on."""
        for name, t in self._buffers.items():
            if t is not None and name != "w_packed":
                return t
        raise RuntimeError(f"{type(self).__name__} holds no canonical buffer")

    @torch.no_grad()
    def prepack(self) -> None:
        """(Re)build the CPU kernels' layout from the canonical buffers; a no-op off the CPU."""
        if getattr(_BUILDING, "defer", False):
            return
        self.unpack_()
        self.w_packed = self._pack_cpu() if self._ref_tensor().device.type == "cpu" else None
        self._drop_derived()

    def _apply(self, fn, recurse=True):
        if self.__dict__.get("_derived") and not _keeps_cpu_codes(fn):
            self.unpack_()   # a device move takes the canonical buffers along
        keep = {name: getattr(self, name) for name in self.FP32_BUFFERS if getattr(self, name) is not None}
        out = super()._apply(fn, recurse)
        # model.half()/.to(bf16) must not round the scales: restore them in fp32 from the originals.
        for name, orig in keep.items():
            now = getattr(self, name)
            if now.dtype != orig.dtype:
                setattr(self, name, orig.to(device=now.device))
        # The packed layout belongs to the CPU kernels only.
        if self._ref_tensor().device.type != "cpu":
            self.w_packed = None
        elif self.w_packed is None or self.w_packed.device.type != "cpu":
            self.prepack()
        else:
            self._drop_derived()
        return out


def _prepack_after_load(module: PackedLinearBase, incompatible_keys) -> None:
    """load_state_dict post-hook: repack from the loaded canonical buffers."""
    module.prepack()


def _keeps_cpu_codes(fn) -> bool:
    """Does fn (a Module._apply function) leave CPU integer tensors where and what they are?"""
    try:
        probe = torch.zeros(1, dtype=torch.uint8)
        out = fn(probe)
        return isinstance(out, torch.Tensor) and out.device.type == "cpu" and out.dtype == torch.uint8
    except Exception:
        return False
