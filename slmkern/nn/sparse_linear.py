"""SparseLinear: a drop-in nn.Linear for pruned weights (2:4 or unstructured; float, int8 or int4 values)."""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from slmkern import ops  # noqa: F401  (defines torch.ops.slmkern.*)
from slmkern._backends import cpu as cpu_backend
from slmkern._logging import log_once
from slmkern.formats import bitmask as bitmask_format
from slmkern.formats import int8 as int8_format
from slmkern.formats import sparse24 as sparse24_format
from slmkern.nn._base import PackedLinearBase

FORMATS = ("2:4", "unstructured", "dense")
VALUES = ("float", "int8", "int4")

# format="auto": the sparsity from which the unstructured (bitmask) kernel replaces the dense kernel
# of the same value type on this project's reference CPU (2-core Zen 4). The module cannot know the
# batch size it will see, so the thresholds weigh decode (M = 1, bandwidth-bound: what sparsity is
# for) against prefill. Crossover table: benchmarks/NOTES.md, "Session 4" (the interleaved layout):
# float values vs dense F.linear: M = 1 and M = 16 win from 30% (2.3x, 1.1x), but large M needs
# more: at 50-60% M = 128 runs 1.1-1.5x and M = 512 0.7-0.8x; at 70% M = 128 runs 1.9x.
# int8 values vs our dense w8a8_linear: M = 1 wins from ~50% (1.5x; 75%: 2.4x), but M = 16 stays at
# 0.5-0.7x below 90% and M = 128 at ~0.85x, so "auto" switches only where decode gains >= 2.4x (75%).
# Below the threshold "auto" keeps the layer dense (and logs why).
AUTO_UNSTRUCTURED_MIN_SPARSITY = {"float": 0.70, "int8": 0.75}


def is_24_sparse(w: torch.Tensor) -> bool:
    """Every group of 4 consecutive input columns holds at most 2 nonzeros (needs K % 4 == 0)."""
    N, K = w.shape
    return K % 4 == 0 and bool(((w.reshape(N, K // 4, 4) != 0).sum(-1) <= 2).all())


def choose_format(w: torch.Tensor, values: str) -> tuple[str, str]:
    """format="auto": (format, why) from the weight's sparsity pattern and the measured thresholds."""
    sparsity = float((w == 0).float().mean())
    if values == "int4":
        if is_24_sparse(w):
            return "2:4", "2:4 pattern"
        return "dense", f"int4 values need the 2:4 pattern (sparsity {sparsity:.0%} unstructured)"
    if is_24_sparse(w) and sparsity >= 0.5 - 1e-9:
        return "2:4", "2:4 pattern"
    need = AUTO_UNSTRUCTURED_MIN_SPARSITY[values]
    if sparsity >= need:
        return "unstructured", f"sparsity {sparsity:.0%} >= {need:.0%}"
    return "dense", (f"sparsity {sparsity:.0%} is below {need:.0%}, where the unstructured {values} "
                     "kernel starts to beat dense on CPU")


# sparsify (sparsify_ and the recipe step): below this sparsity the unstructured (bitmask) kernel is
# slower than the dense kernel of the same value type at every batch size measured, so a layer asked
# for format="unstructured" stays dense (or 2:4 when it has that pattern) and the report says why.
# Measured: benchmarks/NOTES.md, session 4, "Crossover" table (`python -m benchmarks.bench_sparse
# --crossover`, (K, N) = (2048, 8192), two threads, 2-vCPU AMD EPYC Zen 4 (Genoa) KVM guest):
#   float values vs fp32 F.linear: 30% -> M=1 2.25x, M=16 1.12x, M=128 0.90x (40%: M=128 1.02x);
#     30% is the lowest sparsity measured, and it already wins at M=1 and 16.
#   int8 values vs our w8a8_linear: 40% -> M=1 0.99x, M=128 0.83x; 50% -> M=1 1.49-1.54x,
#     M=128 0.83x (M=128 stays below 1x up to 80%, 1.03x at 90%).
# The threshold is the M=1 (decode) crossover: the batch-1 case sparse weights are for. format="auto"
# asks for more (AUTO_UNSTRUCTURED_MIN_SPARSITY: 70% / 75%, so that prefill does not slow down either).
UNSTRUCTURED_CROSSOVER_SPARSITY = {"float": 0.30, "int8": 0.50}


def sparse_format_for(weight, fmt: str, values: str) -> tuple[str, str | None]:
    """The format a pruned weight is packed in when ``fmt`` is asked for: (format, why it differs or None).

    "unstructured" below :data:`UNSTRUCTURED_CROSSOVER_SPARSITY` falls back to what format="auto" picks
    for it (2:4 if the weight has that pattern, else dense); "auto" asks SparseLinear's own rule.
    """
    if fmt == "auto":
        return choose_format(weight, values)
    if fmt == "unstructured" and values in UNSTRUCTURED_CROSSOVER_SPARSITY:
        sparsity = float((weight == 0).float().mean())
        need = UNSTRUCTURED_CROSSOVER_SPARSITY[values]
        if sparsity + 1e-9 < need:
            other, _ = choose_format(weight, values)
            return other, (f"sparsity {sparsity:.0%} is below {need:.0%}, the measured crossover of the "
                           f"unstructured {values} kernel vs dense; kept {other}")
    return fmt, None


class SparseLinear(PackedLinearBase):
    """y = x @ W.T + b with a pruned W kept in a sparse format.

    format "2:4"          -> slmkern::sparse24_linear (float or int8 values) or
                             slmkern::sparse24_w4a16_linear (int4 values)
    format "unstructured" -> slmkern::sparse_linear (bitmask; float or int8 values)
    format "dense"        -> what "auto" falls back to when sparse would be slower:
                             F.linear (float values) or slmkern::w8a8_linear (int8 values)
    int8 values use dynamic per-token int8 activations, like Int8Linear(activations="int8").

    Buffers (the canonical formats in slmkern/formats/, saved in state_dict) depend on the format:
      2:4: values [N, K/2] (or qvalues [N, K/4] for int4), meta, scales (int8/int4), zeros (int4)
      unstructured: values [nnz], bitmask, row_offsets, scales (int8)
      dense: weight [N, K], scales (int8)
    On CPU the module also keeps the kernel's packed copy (w_packed, not saved).
    """

    FP32_BUFFERS = ("scales",)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, format: str = "2:4",
                 values: str = "float", *, nnz: int = 0, group_size: int = 128, symmetric: bool = False,
                 value_dtype: torch.dtype = torch.float32, device=None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if format not in FORMATS:
            raise ValueError(f"format: expected one of {FORMATS}, got {format!r}")
        if values not in VALUES:
            raise ValueError(f"values: expected one of {VALUES}, got {values!r}")
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"in_features/out_features must be > 0, got {in_features}, {out_features}")
        if values == "int4" and format != "2:4":
            raise ValueError(f"values='int4' needs format='2:4' (got {format!r}); use Int4Linear for dense int4")
        if format == "2:4" and in_features % 4:
            raise ValueError(f"in_features: format '2:4' needs a multiple of 4, got {in_features}")
        if isinstance(value_dtype, str):  # from a JSON config (slmkern.checkpoint)
            value_dtype = getattr(torch, value_dtype, None)
        if value_dtype not in sparse24_format.FLOAT_DTYPES:
            raise TypeError(f"value_dtype: expected float32/bfloat16/float16, got {value_dtype}")
        N, K = out_features, in_features
        self.in_features, self.out_features = K, N
        self.format, self.value_kind, self.nnz = format, values, int(nnz)
        self.group_size = (K if group_size == -1 else group_size) if values == "int4" else None
        if values == "int4" and (self.group_size % 4 or K % self.group_size):
            raise ValueError(f"group_size: must be a multiple of 4 dividing in_features={K}, got {group_size}")
        vdt = torch.int8 if values == "int8" else value_dtype
        kw = dict(device=device)
        names = []
        if format == "2:4":
            if values == "int4":
                self.register_buffer("qvalues", torch.zeros(N, K // 4, dtype=torch.uint8, **kw))
                names.append("qvalues")
            else:
                self.register_buffer("values", torch.zeros(N, K // 2, dtype=vdt, **kw))
                names.append("values")
            # an all-zero weight in canonical form: kept columns 0, 1 of every group (nibble 0b0100)
            meta = torch.full((N, (K + 7) // 8), 0x44, dtype=torch.uint8, **kw)
            if K % 8:
                meta[:, -1] = 0x04  # the unused last high nibble stays 0
            self.register_buffer("meta", meta)
            names.append("meta")
        elif format == "unstructured":
            self.register_buffer("values", torch.zeros(self.nnz, dtype=vdt, **kw))
            self.register_buffer("bitmask", torch.zeros(N, (K + 7) // 8, dtype=torch.uint8, **kw))
            self.register_buffer("row_offsets", torch.zeros(N + 1, dtype=torch.int64, **kw))
            names += ["values", "bitmask", "row_offsets"]
        else:
            self.register_buffer("weight", torch.zeros(N, K, dtype=vdt, **kw))
            names.append("weight")
        if values == "int8":
            self.register_buffer("scales", torch.ones(N, dtype=torch.float32, **kw))
        elif values == "int4":
            G = K // self.group_size
            self.register_buffer("scales", torch.ones(N, G, dtype=torch.float32, **kw))
            self.register_buffer("zeros", None if symmetric else torch.full((N, G), 8, dtype=torch.uint8, **kw))
        else:
            self.register_buffer("scales", None)
        self.symmetric = symmetric
        self.register_buffer("bias", torch.zeros(N, dtype=dtype, **kw) if bias else None)
        self._device_buffer = names[0]
        self._init_packing()
        if not (format == "unstructured" and self.nnz):
            self.prepack()  # else: zero bitmask + nnz values is not canonical until filled / loaded

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_linear(cls, linear: nn.Linear, format: str = "auto", values: str = "float", *,
                    group_size: int = 128, symmetric: bool = False,
                    value_dtype: torch.dtype | None = None) -> "SparseLinear":
        """Convert a pruned nn.Linear (zeros already in its weight: slmkern.algorithms prunes).

        format="auto" picks 2:4 when the weight has that pattern, unstructured when its sparsity
        reaches AUTO_UNSTRUCTURED_MIN_SPARSITY[values], else dense (logged once, with the reason).
        values: "float" (kept in value_dtype, default the weight's dtype), "int8" (per-row RTN,
        dynamic int8 activations) or "int4" (2:4 only; group-wise min/max RTN over the kept values).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected torch.nn.Linear, got {type(linear).__name__}")
        if format not in FORMATS + ("auto",):
            raise ValueError(f"format: expected 'auto' or one of {FORMATS}, got {format!r}")
        if values not in VALUES:
            raise ValueError(f"values: expected one of {VALUES}, got {values!r}")
        w = linear.weight.detach()
        if not w.is_floating_point():
            raise TypeError(f"linear.weight: expected a float tensor, got {w.dtype}")
        N, K = w.shape
        if format == "auto":
            format, why = choose_format(w, values)
            if format == "dense":
                log_once(f"sparse-auto-dense-{values}-{why}", f"slmkern: SparseLinear keeps a {N}x{K} layer dense: {why}",
                         logging.INFO)
        if format == "2:4" and not is_24_sparse(w):
            raise ValueError("linear.weight: not 2:4 sparse (some group of 4 input columns has more than 2 "
                             "nonzeros, or in_features % 4 != 0); prune it first, e.g. "
                             "slmkern.algorithms.magnitude.magnitude_prune_(model, '2:4')")
        vdt = value_dtype or (w.dtype if w.dtype in sparse24_format.FLOAT_DTYPES else torch.float32)
        has_bias = linear.bias is not None
        kw = dict(group_size=group_size, symmetric=symmetric, value_dtype=vdt, device=w.device,
                  dtype=linear.bias.dtype if has_bias else w.dtype)
        if format == "2:4":
            mod = cls(K, N, has_bias, "2:4", values, **kw)
            if values == "float":
                v, meta = sparse24_format.compress(w.to(vdt))
                mod.values.copy_(v)
            elif values == "int8":
                v, meta, scales = sparse24_format.compress_int8(w.float())
                mod.values.copy_(v)
                mod.scales.copy_(scales)
            else:
                q, meta, scales, zeros = sparse24_format.compress_int4(w.float(), group_size, symmetric)
                mod.qvalues.copy_(q)
                mod.scales.copy_(scales)
                if zeros is not None:
                    mod.zeros.copy_(zeros)
            mod.meta.copy_(meta)
        elif format == "unstructured":
            if values == "int4":
                raise ValueError("values='int4' needs the 2:4 pattern; unstructured int4 is not supported")
            if values == "float":
                v, bm, offs = bitmask_format.compress(w.to(vdt))
                scales = None
            else:
                v, bm, offs, scales = bitmask_format.compress_int8(w.float())
            mod = cls(K, N, has_bias, "unstructured", values, nnz=v.numel(), **kw)
            mod.values.copy_(v)
            mod.bitmask.copy_(bm)
            mod.row_offsets.copy_(offs)
            if scales is not None:
                mod.scales.copy_(scales)
        else:
            if values == "int4":
                raise ValueError("format 'dense' with int4 values: use slmkern.nn.Int4Linear")
            mod = cls(K, N, has_bias, "dense", values, **kw)
            if values == "float":
                mod.weight.copy_(w.to(vdt))
            else:
                q, scales = int8_format.quantize_per_channel(w.float())
                mod.weight.copy_(q)
                mod.scales.copy_(scales)
        if has_bias:
            mod.bias.copy_(linear.bias.detach())
        mod.prepack()
        return mod

    # ------------------------------------------------------------------ packing and forward

    def _init_kwargs(self) -> dict:
        vdt = self.values.dtype if self.format != "dense" and self.value_kind == "float" else (
            self.weight.dtype if self.format == "dense" and self.value_kind == "float" else torch.float32)
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "format": self.format, "values": self.value_kind, "nnz": self.nnz,
                "group_size": self.group_size if self.group_size is not None else 128,
                "symmetric": self.symmetric, "value_dtype": str(vdt).removeprefix("torch.")}

    def _ref_tensor(self) -> torch.Tensor:
        return getattr(self, self._device_buffer)

    def _pack_cpu(self) -> torch.Tensor | None:
        if self.format == "2:4":
            if self.value_kind == "int4":
                return cpu_backend.prepack_sparse24_int4(self.qvalues, self.meta, self.scales, self.zeros,
                                                         self.group_size)
            return cpu_backend.prepack_sparse24(self.values, self.meta, self.scales)
        if self.format == "unstructured":
            return cpu_backend.prepack_bitmask(self.values, self.bitmask, self.row_offsets, self.in_features,
                                               self.scales)
        if self.value_kind == "int8":
            int8_format.check_weight(self.weight, "weight")
            return cpu_backend.prepack_int8(self.weight)
        return None

    def _plan_refs(self) -> tuple:
        """The tensors the kernel call reads, in the order of the matching cpu.*_plan's refs."""
        b = self._buffers
        if self.format == "2:4":
            if self.value_kind == "int4":
                return (b["w_packed"], b["qvalues"], b["meta"], b["scales"], b["zeros"], b["bias"])
            return (b["w_packed"], b["values"], b["meta"], b["scales"], b["bias"])
        if self.format == "unstructured":
            return (b["w_packed"], b["values"], b["bitmask"], b["row_offsets"], b["scales"], b["bias"])
        return (b["w_packed"], b["weight"], b["scales"], b["bias"])

    def _direct_plan(self):
        """The CPU kernel call with this module's weight-side facts checked once (slmkern._backends.cpu)."""
        refs = self._plan_refs()
        plan = self.__dict__.get("_plan")
        if plan is None or not plan.valid_for(refs):
            wp, *mid, bias = refs
            if self.format == "2:4" and self.value_kind == "int4":
                qv, meta, sc, zeros = mid
                plan = cpu_backend.sparse24_w4a16_linear_plan(qv, meta, sc, zeros, self.group_size, bias, wp)
            elif self.format == "2:4":
                plan = cpu_backend.sparse24_linear_plan(*mid, bias, wp)
            elif self.format == "unstructured":
                vals, bm, ro, sc = mid
                plan = cpu_backend.sparse_linear_plan(vals, bm, ro, self.in_features, sc, bias, wp)
            else:
                plan = cpu_backend.int8_linear_plan("w8a8_linear", *mid, bias, wp)
            self.__dict__["_plan"] = plan
        return plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # CPU fast path (as Int8Linear's): no custom-op dispatch, weight-side checks done once; it steps
        # aside while compiling, tracing, under a dispatch mode or a functorch transform, and for any x
        # it does not take (the op then runs with its full checks).
        if self._buffers.get("w_packed") is not None and not cpu_backend.module_fast_path_off():
            y = self._direct_plan()(x)
            if y is not None:
                return y
        if self.format == "2:4":
            if self.value_kind == "int4":
                return torch.ops.slmkern.sparse24_w4a16_linear(x, self.qvalues, self.meta, self.scales, self.zeros,
                                                               self.group_size, self.bias, self.w_packed)
            return torch.ops.slmkern.sparse24_linear(x, self.values, self.meta, self.scales, self.bias,
                                                     self.w_packed)
        if self.format == "unstructured":
            return torch.ops.slmkern.sparse_linear(x, self.values, self.bitmask, self.row_offsets, self.scales,
                                                   self.bias, self.w_packed)
        if self.value_kind == "int8":
            return torch.ops.slmkern.w8a8_linear(x, self.weight, self.scales, self.bias, self.w_packed)
        b = self.bias.to(x.dtype) if self.bias is not None else None
        if x.dtype != torch.float32 and not x.is_contiguous():
            # Reduced-precision F.linear on a row-strided x returned NaN on an AMX/AVX512-BF16 Xeon
            # when the gap between rows held NaN (nightly fuzz, bf16, K=97, row stride 102): the
            # oneDNN bf16 GEMM evidently reads past K into the gap (odd K padded to VNNI pairs) and
            # multiplies it by zero padding. A contiguous copy keeps the gap out of its reach.
            x = x.contiguous()
        return F.linear(x, self.weight.to(x.dtype), b)

    # ------------------------------------------------------------------ introspection

    def dense_weight(self) -> torch.Tensor:
        """The fp32 weight this module computes with (dequantized, zeros restored)."""
        if self.format == "2:4":
            if self.value_kind == "int4":
                return sparse24_format.decompress_int4(self.qvalues, self.meta, self.scales, self.zeros,
                                                       self.group_size)
            w = sparse24_format.decompress(self.values, self.meta).float()
        elif self.format == "unstructured":
            w = bitmask_format.decompress(self.values, self.bitmask, self.row_offsets, self.in_features).float()
        else:
            w = self.weight.float()
        return w * self.scales.unsqueeze(1) if self.value_kind == "int8" else w

    @property
    def sparsity(self) -> float:
        return float((self.dense_weight() == 0).float().mean())

    def weight_bytes(self) -> int:
        """Bytes of the canonical buffers (what is saved), bias excluded."""
        return sum(b.numel() * b.element_size() for name, b in self.named_buffers()
                   if b is not None and name not in ("bias", "w_packed"))

    def extra_repr(self) -> str:
        s = (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
             f"format={self.format!r}, values={self.value_kind!r}")
        if self.value_kind == "int4":
            s += f", group_size={self.group_size}, symmetric={self.symmetric}"
        if self.format == "unstructured":
            s += f", nnz={self.nnz}"
        return s
