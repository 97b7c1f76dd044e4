"""Int4Linear: a drop-in nn.Linear with group-wise int4 weights."""
from __future__ import annotations

import torch
from torch import nn

from slmkern import ops
from slmkern._backends import cpu as cpu_backend
from slmkern.formats import int4 as int4_format
from slmkern.nn._base import PackedLinearBase

ACTIVATIONS = ("float", "int8")
METHODS = ("rtn", "hqq")


class Int4Linear(PackedLinearBase):
    """y = x @ W.T + b with W in the canonical int4 format (``slmkern.formats.int4``).

    activations="float" -> slmkern::w4a16_linear (weight-only; float activations)
    activations="int8"  -> slmkern::w4a8_linear  (dynamic per-token int8 activations)

    Buffers ``weight`` (uint8 [N, K/2], two codes per byte), ``weight_scale`` (fp32
    [N, K/g]), ``weight_zero`` (uint8 [N, K/g], absent when symmetric) and ``bias``
    go into ``state_dict``. On CPU the module holds the kernel's packed layout and derives
    ``weight`` from it when read (one copy of each weight: slmkern.nn._base).
    offsets=True (imported GGUF Q4_1): ``weight_offset`` (fp32 [N, K/g]) replaces the saved zero
    points, W = code * s + offset (slmkern.formats.int4, offset form); ``weight_zero`` is then the
    derived float zero point passed at op level (not saved).
    """

    DERIVED = ("weight",)
    FP32_BUFFERS = ("weight_scale", "weight_offset", "weight_zero")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 128,
                 symmetric: bool = False, activations: str = "float", device=None,
                 dtype: torch.dtype = torch.float32, offsets: bool = False) -> None:
        super().__init__()
        if activations not in ACTIVATIONS:
            raise ValueError(f"activations: expected one of {ACTIVATIONS}, got {activations!r}")
        g = int4_format.resolve_group_size(in_features, group_size)
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.symmetric, self.activations = g, symmetric, activations
        G = in_features // g
        self.register_buffer("weight", torch.full((out_features, in_features // 2), 0x88, dtype=torch.uint8,
                                                  device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, G, dtype=torch.float32, device=device))
        if offsets and symmetric:
            raise ValueError("offsets: the offset form is asymmetric; pass symmetric=False")
        self.offsets = offsets
        self.register_buffer("weight_offset", torch.zeros(out_features, G, dtype=torch.float32, device=device)
                             if offsets else None)
        self.register_buffer("weight_zero", None if symmetric else
                             torch.zeros(out_features, G, dtype=torch.float32, device=device) if offsets else
                             torch.full((out_features, G), 8, dtype=torch.uint8, device=device),
                             persistent=not offsets)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self._init_packing()
        self.prepack()

    @classmethod
    def from_int4(cls, linear: nn.Linear, q: int4_format.Int4Weight, activations: str = "float") -> "Int4Linear":
        """Wrap an already-quantized weight (e.g. from GPTQ) with `linear`'s shape and bias."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected torch.nn.Linear, got {type(linear).__name__}")
        int4_format.check(q.packed, q.scales, q.zeros, q.group_size)
        if q.shape != tuple(linear.weight.shape):
            raise ValueError(f"q: shape {q.shape} does not match linear.weight {tuple(linear.weight.shape)}")
        w = linear.weight
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, q.group_size,
                  q.zeros is None, activations, device=w.device, dtype=w.dtype)
        mod.unpack_()
        mod.weight.copy_(q.packed)
        mod.weight_scale.copy_(q.scales)
        if q.zeros is not None:
            mod.weight_zero.copy_(q.zeros)
        if linear.bias is not None:
            mod.bias.data.copy_(linear.bias.detach())
        mod.prepack()
        return mod

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128, symmetric: bool = False,
                    activations: str = "float", method: str = "rtn", clip: str = "mse") -> "Int4Linear":
        """Quantize an nn.Linear data-free: method "rtn" (clip "minmax" or "mse") or "hqq".

        GPTQ needs calibration data: use ``slmkern.quantize_(model, Int4Config(method="gptq"), calibration=...)``.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected torch.nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        if method == "rtn":
            from slmkern.algorithms.rtn import rtn_quantize
            q = rtn_quantize(w, group_size, symmetric, clip=clip)
        elif method == "hqq":
            from slmkern.algorithms.hqq import hqq_quantize
            q = hqq_quantize(w, group_size, symmetric)
        else:
            raise ValueError(f"method: expected one of {METHODS} (gptq needs calibration data), got {method!r}")
        return cls.from_int4(linear, q, activations)

    def _init_kwargs(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "group_size": self.group_size, "symmetric": self.symmetric, "activations": self.activations,
                **({"offsets": True} if self.offsets else {})}

    @torch.no_grad()
    def prepack(self) -> None:
        if self.offsets:  # the op-level float zero points follow the saved offsets and scales
            self.weight_zero = int4_format.offset_zero_points(self.weight_scale, self.weight_offset)
        super().prepack()

    def _unpack_cpu(self, name: str) -> torch.Tensor:
        from slmkern.formats import int4_cpu
        return int4_cpu.unpack_codes(self._buffers["w_packed"], self.out_features, self.in_features,
                                     self.group_size, self._buffers["weight_zero"] is not None)

    def _pack_cpu(self) -> torch.Tensor:
        return cpu_backend.prepack_int4(self.weight, self.weight_scale, self.weight_zero, self.group_size,
                                        offsets=self.weight_offset)

    def dequantized_weight(self) -> torch.Tensor:
        if self.offsets:
            return int4_format.dequantize_offset(self.weight, self.weight_scale, self.weight_offset, self.group_size)
        return int4_format.dequantize(self.weight, self.weight_scale, self.weight_zero, self.group_size)

    def _direct_plan(self):
        """The CPU kernel call with this module's weight-side facts checked once (slmkern._backends.cpu)."""
        buf = self._buffers
        refs = (buf["w_packed"], self._op_weight("weight"), buf["weight_scale"], buf["weight_zero"],
                buf["bias"])  # the weight: its stand-in once dropped (else the plan never matches)
        plan = self.__dict__.get("_plan")
        if plan is None or not plan.valid_for(refs):
            from slmkern._backends import cpu
            op = "w4a16_linear" if self.activations == "float" else "w4a8_linear"
            plan = cpu.int4_linear_plan(op, self._op_weight("weight"), self.weight_scale, self.weight_zero,
                                        self.group_size, self.bias, self.w_packed)
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
        op = ops.w4a16_linear if self.activations == "float" else ops.w4a8_linear
        return op(x, self._op_weight("weight", x), self.weight_scale, self.weight_zero, self.group_size, self.bias,
                  packed)

    def extra_repr(self) -> str:
        op = "w4a16_linear" if self.activations == "float" else "w4a8_linear"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}, activations={self.activations}, op={op}"
                + (", offsets=True" if self.offsets else ""))
