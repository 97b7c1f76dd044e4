"""Int8Linear: a drop-in nn.Linear with int8 per-channel weights."""
from __future__ import annotations

import torch
from torch import nn

from slmkern import ops
from slmkern._backends import cpu as cpu_backend
from slmkern.formats import int8 as int8_format
from slmkern.nn._base import PackedLinearBase

ACTIVATIONS = int8_format.LINEAR_ACTIVATIONS


class Int8Linear(PackedLinearBase):
    """y = x @ W.T + b with W stored as int8 [N, K] + fp32 per-channel scales.

    activations="int8"  -> slmkern::w8a8_linear  (dynamic per-token int8 activations)
    activations="int7"  -> slmkern::w8a8_linear(activations="int7")  (per-token asymmetric 7-bit:
                           FBGEMM's reduce_range; on AVX2 without VNNI its GEMM is ~1.25x faster)
    activations="float" -> slmkern::w8a16_linear (weight-only; float activations)

    ``epilogue`` ("none" or "gelu", for int8/int7 activations) is a runtime setting, never saved: "gelu"
    returns gelu(x @ W.T + b) from the kernel's store (slmkern.nn.fuse_gelu_ sets it where a GELU follows).

    Buffers ``weight`` (int8), ``weight_scale`` (fp32) and ``bias`` are the
    canonical format and go into ``state_dict``. On CPU the module holds the kernel's
    packed layout (``w_packed``, not saved, rebuilt after every load) and derives
    ``weight`` from it when read (one copy of each weight: slmkern.nn._base).
    """

    FP32_BUFFERS = ("weight_scale",)
    DERIVED = ("weight",)

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 activations: str = "int8", device=None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if activations not in ACTIVATIONS:
            raise ValueError(f"activations: expected one of {ACTIVATIONS}, got {activations!r}")
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"in_features/out_features must be > 0, got {in_features}, {out_features}")
        self.in_features, self.out_features, self.activations = in_features, out_features, activations
        self.epilogue = "none"
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self._init_packing()
        self.prepack()

    @classmethod
    def from_linear(cls, linear: nn.Linear, activations: str = "int8") -> "Int8Linear":
        """Quantize an nn.Linear's weight per output channel (round-to-nearest, symmetric)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected torch.nn.Linear, got {type(linear).__name__}")
        q, scale = int8_format.quantize_per_channel(linear.weight.detach())
        return cls.from_int8(linear, q, scale, activations)

    @classmethod
    @torch.no_grad()
    def from_int8(cls, linear: nn.Linear, q: torch.Tensor, scale: torch.Tensor,
                  activations: str = "int8") -> "Int8Linear":
        """Wrap already-quantized int8 codes ``q`` [N, K] and per-row ``scale`` [N] with `linear`'s shape and bias."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected torch.nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, activations,
                  device=w.device, dtype=w.dtype)
        mod.unpack_()   # one weight copy: canonical buffers until prepack()
        mod.weight.copy_(q)
        mod.weight_scale.copy_(scale)
        if linear.bias is not None:
            mod.bias.copy_(linear.bias.detach())
        mod.prepack()
        return mod

    def set_epilogue(self, epilogue: str) -> "Int8Linear":
        """Fuse an output function into the kernel: "gelu" (reference.gelu_epilogue) or "none"."""
        if epilogue not in int8_format.EPILOGUES:
            raise ValueError(f"epilogue: expected one of {int8_format.EPILOGUES}, got {epilogue!r}")
        if epilogue != "none" and self.activations == "float":
            raise ValueError("epilogue: only Int8Linear with int8/int7 activations (w8a8_linear) fuses one")
        self.epilogue = epilogue
        self.__dict__.pop("_plan", None)
        return self

    def _init_kwargs(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "activations": self.activations}

    def _pack_cpu(self) -> torch.Tensor:
        int8_format.check_weight(self.weight, "weight")
        return cpu_backend.prepack_int8(self.weight)

    def _unpack_cpu(self, name: str) -> torch.Tensor:
        return int8_format.unpack_cpu(self._buffers["w_packed"], self.out_features, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        return int8_format.dequantize(self.weight, self.weight_scale)

    def _direct_plan(self):
        """The CPU kernel call with this module's weight-side facts checked once (slmkern._backends.cpu)."""
        buf = self._buffers
        refs = (buf["w_packed"], self._op_weight("weight"), buf["weight_scale"], buf["bias"])  # the stand-in once dropped
        plan = self.__dict__.get("_plan")
        if plan is None or not plan.valid_for(refs):
            from slmkern._backends import cpu
            op = "w8a16_linear" if self.activations == "float" else "w8a8_linear"
            plan = cpu.int8_linear_plan(op, self._op_weight("weight"), self.weight_scale, self.bias, self.w_packed,
                                        self.activations, self.epilogue)
            self.__dict__["_plan"] = plan
        return plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # CPU fast path: no custom-op dispatch, weights checked once; not while compiling, tracing, under a
        # dispatch mode or a functorch transform; any x it does not take (None) goes through the op.
        if self._buffers["w_packed"] is not None and not cpu_backend.module_fast_path_off():
            sib = self.__dict__.get("_sibling")   # slmkern.nn.fuse.fuse_siblings_: one call for q/k/v
            y = sib[0].call(sib[1], x) if sib is not None else None
            if y is None:
                y = self._direct_plan()(x)
            if y is not None:
                return y
        packed = self.w_packed if x.device.type == "cpu" else None
        w = self._op_weight("weight", x)
        if self.activations == "float":
            return ops.w8a16_linear(x, w, self.weight_scale, self.bias, packed)
        return ops.w8a8_linear(x, w, self.weight_scale, self.bias, packed, self.activations, self.epilogue)

    def extra_repr(self) -> str:
        op = "w8a16_linear" if self.activations == "float" else "w8a8_linear"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, activations={self.activations}, op={op}"
                + (f", epilogue={self.epilogue}" if self.epilogue != "none" else ""))
