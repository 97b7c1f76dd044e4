"""What every slmkern linear module shares: fp32 scale buffers that survive
``model.half()``, and a CPU-only packed layout rebuilt after loads and device moves."""
from __future__ import annotations

import torch
from torch import nn


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
        mod = cls(**kw, device=device, dtype=_DTYPES[dtype])
        mod.load_state_dict(tensors)  # the post-load hook repacks for this device
        return mod

    def _init_packing(self) -> None:
        self.register_buffer("w_packed", None, persistent=False)
        self.register_load_state_dict_post_hook(lambda module, keys: module.prepack())

    def _pack_cpu(self) -> torch.Tensor | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _ref_tensor(self) -> torch.Tensor:
        """A canonical buffer that tells which device the module lives on."""
        return self.weight

    @torch.no_grad()
    def prepack(self) -> None:
        """(Re)build the CPU kernels' layout from the canonical buffers; a no-op off the CPU."""
        self.w_packed = self._pack_cpu() if self._ref_tensor().device.type == "cpu" else None

    def _apply(self, fn, recurse=True):
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
        return out
