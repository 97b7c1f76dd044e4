"""CPU registrations: validate, then call the C++ kernels in slmkern._C; the CPU prepackers (``prepack_*``)."""
from __future__ import annotations

import logging

import torch

from slmkern import ops, reference
from slmkern._logging import log_once
from slmkern.formats import bitmask as bitmask_format
from slmkern.formats import int4 as int4_format
from slmkern.formats import int4_cpu
from slmkern.formats import int8 as int8_format
from slmkern.formats import sparse24 as sparse24_format

try:
    from slmkern import _C
except ImportError as exc:  # a source tree without a built extension
    _C = None
    _IMPORT_ERROR: Exception | None = exc
else:
    _IMPORT_ERROR = None

DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_ACT_CODE = {"int8": 0, "int7": 1}   # w8a8_linear's activations -> ActQuant (common.h)
_EPI_CODE = {"none": 0, "gelu": 1}   # w8a8_linear's epilogue -> Epilogue (common.h)


def fuses_gelu() -> bool:
    """Does the active w8a8_linear variant fuse the gelu epilogue into its GEMM (AVX2, scalar)? The VNNI
    variant hands such calls to the AVX2 kernel, slower than its own GEMM plus a separate GELU."""
    return _C is not None and op_isa("w8a8_linear") in ("avx2", "ref")


def has_cpp() -> bool:
    return _C is not None


def _aligned(op: str, w_packed):
    """The packed layouts hold int32/int64/fp32 sections at 64-byte offsets from the blob's start:
    a blob that is a misaligned view (not something prepack_* returns) is copied once per call."""
    if w_packed is not None and w_packed.data_ptr() % 64:
        log_once(f"{op}-misaligned", f"slmkern: {op} got a w_packed that is not 64-byte aligned; copying it "
                 "on every call (pass the tensor prepack_* returned)")
        return w_packed.clone()
    return w_packed


# ----------------------------------------------------------------------------- prepack
# Canonical weight -> the CPU blob layout its format defines (slmkern.formats: int8, int4_cpu, bitmask,
# sparse24), packed by slmkern._C, or by the format's pure-torch pack_reference without the extension.
# One-off, at module build (slmkern.nn keeps the blob as w_packed); the ops' w_packed argument.

def prepack_int8(w: torch.Tensor) -> torch.Tensor:
    """Canonical int8 [N, K] -> CPU packed uint8 blob (slmkern.formats.int8) for the C++ kernels."""
    int8_format.check_weight(w)
    w = w.detach().cpu().contiguous()
    N, K = w.shape
    if not has_cpp():
        return int8_format.pack_reference(w)
    out = torch.empty(int8_format.packed_bytes(N, K), dtype=torch.uint8)
    _C.int8_pack(w.data_ptr(), N, K, K, out.data_ptr())
    return out


def prepack_int4(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None,
                 group_size: int = 128, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """Canonical int4 weight -> CPU packed uint8 blob (slmkern.formats.int4_cpu) for the C++ kernels.

    offsets (float32 [N, K/g], the offset form ``W = code*s + offset`` of slmkern.formats.int4): the
    blob's additive term becomes exactly ``-offsets``; zeros must then be the op-level float zero points
    (slmkern.formats.int4.offset_zero_points), which only select the asymmetric layout.
    """
    N, K, g = int4_cpu.check_canonical(w, scales, zeros, group_size)
    if offsets is not None:
        if zeros is None or zeros.dtype != torch.float32:
            raise ValueError("zeros: an offset-form weight (offsets given) packs with float32 zero points "
                             "(slmkern.formats.int4.offset_zero_points), got "
                             f"{None if zeros is None else zeros.dtype}")
        int4_format.check_offsets(scales, offsets)
        return int4_cpu.set_offsets(prepack_int4(w, scales, zeros, g), N, K, g, offsets)
    if not has_cpp():
        return int4_cpu.pack_reference(w, scales, zeros, g)
    w = w.detach().cpu().contiguous()
    scales = scales.detach().cpu().contiguous()
    z = zeros.detach().cpu().contiguous() if zeros is not None else None
    out = torch.empty(int4_cpu.packed_bytes(N, K, g, z is not None), dtype=torch.uint8)
    _C.int4_pack(w.data_ptr(), N, K, K // 2, scales.data_ptr(), z.data_ptr() if z is not None else 0,
                 int4_cpu.ZEROS_KIND[z.dtype if z is not None else None], g, out.data_ptr())
    return out


def prepack_bitmask(values: torch.Tensor, bitmask: torch.Tensor, row_offsets: torch.Tensor, K: int,
                    scales: torch.Tensor | None = None) -> torch.Tensor:
    """Canonical bitmask tensors -> CPU packed uint8 blob (slmkern.formats.bitmask); validates fully first."""
    bitmask_format.validate(values, bitmask, row_offsets, K, scales)
    values = values.detach().cpu().contiguous()
    bitmask = bitmask.detach().cpu().contiguous()
    row_offsets = row_offsets.detach().cpu().contiguous()
    if not has_cpp():
        return bitmask_format.pack_reference(values, bitmask, row_offsets, K)
    N, nnz, int8v = bitmask.shape[0], values.shape[0], values.dtype == torch.int8
    out = torch.empty(bitmask_format.packed_bytes(N, K, nnz, int8v), dtype=torch.uint8)
    vcode = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.int8: 0}[values.dtype]
    _C.sparse_pack(bitmask.data_ptr(), row_offsets.data_ptr(), values.data_ptr() if nnz else 0, vcode,
                   int(int8v), N, K, nnz, out.data_ptr())
    return out


def prepack_sparse24(values: torch.Tensor, meta: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
    """Canonical 2:4 (values, meta[, scales]) -> CPU packed uint8 blob (slmkern.formats.sparse24); validates fully."""
    sparse24_format.validate(values, meta, scales)
    values, meta = values.detach().cpu().contiguous(), meta.detach().cpu().contiguous()
    N, K = values.shape[0], 2 * values.shape[1]
    if not has_cpp() or not hasattr(_C, "sparse24_pack"):
        return sparse24_format.pack_reference(values, meta)
    out = torch.empty(sparse24_format.packed_bytes(N, K, values.dtype), dtype=torch.uint8)
    _C.sparse24_pack(values.data_ptr(), meta.data_ptr(), N, K, sparse24_format.value_code(values.dtype),
                     out.data_ptr())
    return out


def prepack_sparse24_int4(qvalues, meta, scales, zeros, group_size: int) -> torch.Tensor:
    """int4 2:4 tensors -> CPU blob: the dense int4 CPU layout (slmkern.formats.int4_cpu) of the
    expanded weight, run by the w4a16 kernels. (No 2:4-specific int4 kernel yet: no bandwidth saving.)"""
    N, K, g = sparse24_format.validate_int4(qvalues, meta, scales, zeros, group_size)
    return prepack_int4(sparse24_format.int4_to_dense_int4(qvalues, meta, zeros, g), scales.cpu(),
                        zeros.cpu() if zeros is not None else None, g)


def _int8_linear(op: str, x, w, w_scale, bias, w_packed, activations: str | None = None,
                 epilogue: str = "none"):
    """activations: None for w8a16_linear; "int8" / "int7" for w8a8_linear (and its epilogue)."""
    if not ops.int8_linear_ok(x, w, w_scale, bias, w_packed):
        ops.check_int8_linear(op, x, w, w_scale, bias, w_packed)
    if activations is not None and (activations not in _ACT_CODE or epilogue not in _EPI_CODE):
        ops.check_activations(op, activations, epilogue)
    if _C is None:
        if ops.shape_only(w, w_packed):
            raise ValueError(f"{op}: w is a shape-only stand-in, which needs slmkern._C ({_IMPORT_ERROR})")
        log_once(f"{op}-no-cpp", f"slmkern: {op} runs the pure-torch reference on CPU because "
                 f"slmkern._C failed to import ({_IMPORT_ERROR})", logging.WARNING)
        if activations is not None:
            return reference.w8a8_linear(x, w, w_scale, bias, activations=activations, epilogue=epilogue)
        return getattr(reference, op)(x, w, w_scale, bias)
    N, K = w.shape
    x2 = ops.as_rows(x, K)
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=x.dtype)
    if M > 0:
        if w_packed is None:
            log_once(f"{op}-repack", f"slmkern: {op} got no w_packed and repacks w on every call; "
                     "use slmkern.nn.Int8Linear or pass slmkern._backends.cpu.prepack_int8(w)")
            w_packed = prepack_int8(w)
        scale = w_scale.contiguous()
        b = bias.float().contiguous() if bias is not None else None
        w_packed = _aligned(op, w_packed)  # bound: the kernel reads it after this line
        act = () if activations is None else (_ACT_CODE[activations], _EPI_CODE[epilogue])   # w8a8 only
        getattr(_C, op)(x2.data_ptr(), DTYPE_CODE[x.dtype], M, K, N, max(x2.stride(0), K), *act,
                        w_packed.data_ptr(), scale.data_ptr(), b.data_ptr() if b is not None else 0,
                        y.data_ptr(), N, torch.get_num_threads())
    return y.reshape(*x.shape[:-1], N)


@torch.library.register_kernel("slmkern::w8a8_linear", "cpu", lib=ops.LIB)
def w8a8_linear_cpu(x, w, w_scale, bias=None, w_packed=None, activations="int8", epilogue="none"):
    return _int8_linear("w8a8_linear", x, w, w_scale, bias, w_packed, activations, epilogue)


@torch.library.register_kernel("slmkern::w8a16_linear", "cpu", lib=ops.LIB)
def w8a16_linear_cpu(x, w, w_scale, bias=None, w_packed=None):
    return _int8_linear("w8a16_linear", x, w, w_scale, bias, w_packed)


def op_isa(op: str) -> str:
    """Which ISA variant the C++ kernel of `op` runs now ("reference" without the extension)."""
    return _C.op_isa(op) if _C is not None else "reference"


# ----------------------------------------------------------------------------- int4 weights
def _int4_linear(op: str, x, w, scales, zeros, group_size, bias, w_packed):
    g = ops.check_int4_linear_fast(op, x, w, scales, zeros, group_size, bias, w_packed)
    if _C is None:
        if ops.shape_only(w, w_packed):
            raise ValueError(f"{op}: w is a shape-only stand-in, which needs slmkern._C ({_IMPORT_ERROR})")
        ops.check_int4_zero_values(op, zeros)
        log_once(f"{op}-no-cpp", f"slmkern: {op} runs the pure-torch reference on CPU because "
                 f"slmkern._C failed to import ({_IMPORT_ERROR})", logging.WARNING)
        return getattr(reference, op)(x, w, scales, zeros, group_size, bias)
    N, K = w.shape[0], x.shape[-1]
    x2 = ops.as_rows(x, K)
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=x.dtype)
    if M > 0:
        if w_packed is None:
            ops.check_int4_zero_values(op, zeros)
            log_once(f"{op}-repack", f"slmkern: {op} got no w_packed and repacks w on every call; "
                     "use slmkern.nn.Int4Linear or pass slmkern._backends.cpu.prepack_int4(w, scales, zeros, "
                     "group_size)")
            w_packed = prepack_int4(w, scales, zeros, g)
        elif not w_packed.is_contiguous():
            w_packed = w_packed.contiguous()
        b = bias.float().contiguous() if bias is not None else None
        w_packed = _aligned(op, w_packed)  # bound: the kernel reads it after this line
        getattr(_C, op)(x2.data_ptr(), DTYPE_CODE[x.dtype], M, K, N, max(x2.stride(0), K), g, zeros is not None,
                        w_packed.data_ptr(), b.data_ptr() if b is not None else 0, y.data_ptr(), N,
                        torch.get_num_threads())
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], N)


@torch.library.register_kernel("slmkern::w4a16_linear", "cpu", lib=ops.LIB)
def w4a16_linear_cpu(x, w, scales, zeros, group_size, bias=None, w_packed=None):
    return _int4_linear("w4a16_linear", x, w, scales, zeros, group_size, bias, w_packed)


@torch.library.register_kernel("slmkern::w4a8_linear", "cpu", lib=ops.LIB)
def w4a8_linear_cpu(x, w, scales, zeros, group_size, bias=None, w_packed=None):
    return _int4_linear("w4a8_linear", x, w, scales, zeros, group_size, bias, w_packed)


# ============================================================================= unstructured (bitmask)
@torch.library.register_kernel("slmkern::sparse_linear", "cpu", lib=ops.LIB)
def sparse_linear_cpu(x, values, bitmask, row_offsets, scales=None, bias=None, w_packed=None):
    if w_packed is None or not ops.sparse_linear_ok(x, values, bitmask, row_offsets, scales, bias, w_packed):
        ops.check_sparse_linear(x, values, bitmask, row_offsets, scales, bias, w_packed)
        if w_packed is None:
            ops.check_sparse_linear_data(x, values, bitmask, row_offsets, scales)
    if _C is None:
        log_once("sparse_linear-no-cpp", "slmkern: sparse_linear runs the pure-torch reference on CPU because "
                 f"slmkern._C failed to import ({_IMPORT_ERROR})", logging.WARNING)
        return reference.sparse_linear(x, values, bitmask, row_offsets, scales, bias)
    K, N = x.shape[-1], bitmask.shape[0]
    x2 = ops.as_rows(x, K)
    M = x2.shape[0]
    y = x2.new_empty((M, N))
    if M > 0:
        if w_packed is None:
            log_once("sparse_linear-repack", "slmkern: sparse_linear got no w_packed and repacks the weight on "
                     "every call; use slmkern.nn.SparseLinear or pass slmkern._backends.cpu.prepack_bitmask(values, "
                     "bitmask, row_offsets, K, scales)")
            w_packed = prepack_bitmask(values, bitmask, row_offsets, K, scales)
        elif not w_packed.is_contiguous():
            w_packed = w_packed.contiguous()
        int8v = values.dtype == torch.int8
        s = scales.contiguous() if int8v else None
        b = None if bias is None else (bias if bias.dtype == torch.float32 and bias.is_contiguous()
                                       else bias.float().contiguous())
        w_packed = _aligned("sparse_linear", w_packed)  # bound: the kernel reads it after this line
        _C.sparse_linear(x2.data_ptr(), DTYPE_CODE[x.dtype], M, K, N, max(x2.stride(0), K), w_packed.data_ptr(),
                         int(int8v), values.shape[0], s.data_ptr() if s is not None else 0,
                         b.data_ptr() if b is not None else 0, y.data_ptr(), N, torch.get_num_threads())
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], N)


# ============================================================================= 2:4 semi-structured


@torch.library.register_kernel("slmkern::sparse24_linear", "cpu", lib=ops.LIB)
def sparse24_linear_cpu(x, values, meta, scales=None, bias=None, w_packed=None):
    op = "sparse24_linear"
    if not ops.sparse24_linear_ok(x, values, meta, scales, bias, w_packed):
        ops.check_sparse24_linear(op, x, values, meta, scales, bias, w_packed)
    if w_packed is None:  # the canonical tensors are read: every value fact is checked first
        sparse24_format.validate(values, meta, scales)
    if _C is None:
        log_once(f"{op}-no-cpp", f"slmkern: {op} runs the pure-torch reference on CPU because "
                 f"slmkern._C failed to import ({_IMPORT_ERROR})", logging.WARNING)
        return reference.sparse24_linear(x, values, meta, scales, bias)
    N, K = values.shape[0], x.shape[-1]
    x2 = ops.as_rows(x, K)
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=x.dtype)
    if M > 0:
        if w_packed is None:
            log_once(f"{op}-repack", f"slmkern: {op} got no w_packed and packs the weight on every call; "
                     "pass slmkern._backends.cpu.prepack_sparse24(values, meta, scales)")
            w_packed = prepack_sparse24(values, meta, scales)
        elif not w_packed.is_contiguous():
            w_packed = w_packed.contiguous()
        s = scales.contiguous() if scales is not None else None
        b = bias.float().contiguous() if bias is not None else None
        w_packed = _aligned("sparse24_linear", w_packed)  # bound: the kernel reads it after this line
        _C.sparse24_linear(x2.data_ptr(), DTYPE_CODE[x.dtype], M, K, N, max(x2.stride(0), K), w_packed.data_ptr(),
                           sparse24_format.value_code(values.dtype), s.data_ptr() if s is not None else 0,
                           b.data_ptr() if b is not None else 0, y.data_ptr(), N, torch.get_num_threads())
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], N)


@torch.library.register_kernel("slmkern::sparse24_w4a16_linear", "cpu", lib=ops.LIB)
def sparse24_w4a16_linear_cpu(x, qvalues, meta, scales, zeros, group_size, bias=None, w_packed=None):
    """Runs the dense w4a16 CPU kernel on the expanded int4 weight (pruned codes = zero point)."""
    op = "sparse24_w4a16_linear"
    N, K, g = ops.check_sparse24_w4a16_linear(op, x, qvalues, meta, scales, zeros, group_size, bias, w_packed)
    if w_packed is None:
        sparse24_format.validate_int4(qvalues, meta, scales, zeros, group_size)
    if _C is None:
        log_once(f"{op}-no-cpp", f"slmkern: {op} runs the pure-torch reference on CPU because "
                 f"slmkern._C failed to import ({_IMPORT_ERROR})", logging.WARNING)
        return reference.sparse24_w4a16_linear(x, qvalues, meta, scales, zeros, group_size, bias)
    if w_packed is None:
        log_once(f"{op}-repack", f"slmkern: {op} got no w_packed and packs the weight on every call; "
                 "pass slmkern._backends.cpu.prepack_sparse24_int4(qvalues, meta, scales, zeros, group_size)")
        w_packed = prepack_sparse24_int4(qvalues, meta, scales, zeros, g)
    x2 = ops.as_rows(x, K)
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=x.dtype)
    if M > 0:
        b = bias.float().contiguous() if bias is not None else None
        w_packed = _aligned("sparse24_w4a16_linear", w_packed.contiguous())  # bound: the kernel reads it after this line
        _C.w4a16_linear(x2.data_ptr(), DTYPE_CODE[x.dtype], M, K, N, max(x2.stride(0), K), g, zeros is not None,
                        w_packed.data_ptr(), b.data_ptr() if b is not None else 0, y.data_ptr(), N,
                        torch.get_num_threads())
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], N)
# ============================================================================= end 2:4


# ----------------------------------------------------------------------------- attention
def _attention_mask(mask, B: int, Hq: int, L: int, S: int) -> torch.Tensor | None:
    """The mask as the kernel reads it: additive fp32, 4-D (broadcast dims stride 0), unit stride over S."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=torch.float32).masked_fill_(~mask, float("-inf"))
    elif mask.dtype != torch.float32:
        mask = mask.float()
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    if mask.stride(-1) != 1 and mask.shape[-1] != 1:
        mask = mask.contiguous()
    return mask.expand(B, Hq, L, S)


@torch.library.register_kernel("slmkern::attention", "cpu", lib=ops.LIB)
def attention_cpu(q, k, v, mask=None, scale=None, is_causal=False):
    if not ops.attention_ok(q, k, v, mask, scale, is_causal):
        ops.check_attention(q, k, v, mask, scale, is_causal)
    if _C is None:
        log_once("attention-no-cpp", "slmkern: attention runs the pure-torch reference on CPU because "
                 f"slmkern._C failed to import ({_IMPORT_ERROR})", logging.WARNING)
        return reference.attention(q, k, v, mask, scale, is_causal)
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    dt = q.dtype
    if dt != torch.float32:                      # computed in fp32 (the contract), one conversion each way
        q, k, v = q.float(), k.float(), v.float()
    q, k, v = (t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous() for t in (q, k, v))
    m = _attention_mask(mask, B, Hq, L, S)
    out = torch.empty((B, L, Hq, D), dtype=torch.float32)
    ms = m.stride()[:3] if m is not None else (0, 0, 0)
    _C.attention(q.data_ptr(), *q.stride()[:3], k.data_ptr(), *k.stride()[:3], v.data_ptr(), *v.stride()[:3],
                 m.data_ptr() if m is not None else 0, *ms, out.data_ptr(), B, Hq, Hkv, L, S, D,
                 D ** -0.5 if scale is None else float(scale), bool(is_causal), torch.get_num_threads())
    return out if dt == torch.float32 else out.to(dt)


# ============================================================================= module fast path
# A module's weight-side arguments never change between calls, so Int8Linear / Int4Linear check them
# once (with the ops' own checks, so a bad module fails with the ops' messages) and keep the kernel
# call ready in a LinearPlan; per call only x is looked at. Anything unusual about x (dtype, device,
# K, a tensor subclass, autograd, tracing, a dispatch mode) goes through torch.ops.slmkern.<op> instead,
# which raises the usual errors. Saves the custom-op dispatch and the per-call weight checks
# (~15 us of ~20 us per M=1 call on the dev box; SmolLM2 decodes 211 linears per token).
_dispatch_modes = torch._C._len_torch_dispatch_stack
_functorch_active = torch._C._are_functorch_transforms_active


def module_fast_path_off() -> bool:
    """True while anything must see the op itself: torch.compile/export, torch.jit.trace, a dispatch mode
    (FakeTensor, FlopCounter, ...) or a functorch transform (vmap, grad)."""
    return (torch.compiler.is_compiling() or torch.jit.is_tracing() or bool(_dispatch_modes())
            or _functorch_active())


class LinearPlan:
    """The ready CPU kernel call of one module: ``plan(x) -> y``, or None when x needs the op path."""

    __slots__ = ("fn", "K", "N", "mid", "refs", "bias_dtype", "bias_version", "_keep")

    def __init__(self, fn, K: int, N: int, mid: tuple, refs: tuple, bias, keep: tuple):
        self.fn, self.K, self.N, self.mid, self.refs, self._keep = fn, K, N, mid, refs, keep
        self.bias_dtype = bias.dtype if bias is not None else None
        self.bias_version = bias._version if bias is not None else 0

    def valid_for(self, refs: tuple) -> bool:
        """Still the plan of a module holding exactly these tensors (none replaced or edited in place)?"""
        mine = self.refs
        if len(mine) != len(refs):
            return False
        for a, b in zip(mine, refs):
            if a is not b:
                return False
        b = refs[-1]
        return b is None or b._version == self.bias_version

    def __call__(self, x: torch.Tensor, threads: int = 0):
        """y for x, or None; threads: the kernel's thread count (0: torch.get_num_threads())."""
        if self.fn is None or type(x) is not torch.Tensor or not x.is_cpu:
            return None
        code = DTYPE_CODE.get(x.dtype)
        K = self.K
        if code is None or x.dim() == 0 or x.shape[-1] != K:
            return None
        if self.bias_dtype is not None and self.bias_dtype is not x.dtype and self.bias_dtype is not torch.float32:
            return None
        if x.requires_grad and torch.is_grad_enabled():
            return None
        N = self.N
        if x.is_contiguous():   # the common case: rows of K, no reshape on either side
            M = x.numel() // K
            y = torch.empty(x.shape[:-1] + (N,), dtype=x.dtype, device="cpu")
            if M > 0:
                self.fn(x.data_ptr(), code, M, K, N, K, *self.mid, y.data_ptr(), N,
                        threads or torch.get_num_threads())
            return y
        x2 = ops.as_rows(x, K)
        M = x2.shape[0]
        y = torch.empty((M, N), dtype=x.dtype, device="cpu")
        if M > 0:
            self.fn(x2.data_ptr(), code, M, K, N, max(x2.stride(0), K), *self.mid, y.data_ptr(), N,
                    threads or torch.get_num_threads())
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], N)


def _x0(K: int, bias) -> torch.Tensor:
    """An empty x of width K for running an op's shape checks on the weight side alone."""
    return torch.empty((0, K), dtype=bias.dtype if bias is not None and bias.dtype in DTYPE_CODE else torch.float32)


def _plan_ready(op: str, w_packed, bias):
    """(aligned contiguous w_packed, fp32 contiguous bias) the kernel can read directly, or None."""
    if _C is None or w_packed is None or not w_packed.is_cpu or not w_packed.is_contiguous() \
            or w_packed.data_ptr() % 64:
        return None
    b = None if bias is None else bias.detach().float().contiguous()
    return w_packed, b


def int8_linear_plan(op: str, w, w_scale, bias, w_packed, activations: str = "int8",
                     epilogue: str = "none") -> LinearPlan:
    """Plan of an Int8Linear (w8a8_linear / w8a16_linear); checks every weight-side fact now.
    activations, epilogue: w8a8_linear's (ignored by w8a16_linear)."""
    refs = (w_packed, w, w_scale, bias)
    ready = _plan_ready(op, w_packed, bias) if w.is_cpu else None
    if ready is None or not w_scale.is_contiguous():
        return LinearPlan(None, 0, 0, (), refs, bias, ())
    N, K = w.shape
    ops.check_int8_linear(op, _x0(K, bias), w, w_scale, bias, w_packed)
    act = ()
    if op == "w8a8_linear":
        ops.check_activations(op, activations, epilogue)
        act = (_ACT_CODE[activations], _EPI_CODE[epilogue])
    wp, b = ready
    mid = (*act, wp.data_ptr(), w_scale.data_ptr(), b.data_ptr() if b is not None else 0)
    return LinearPlan(getattr(_C, op), K, N, mid, refs, bias, (wp, w_scale, b))


def int4_linear_plan(op: str, w, scales, zeros, group_size: int, bias, w_packed) -> LinearPlan:
    """Plan of an Int4Linear (w4a16_linear / w4a8_linear); checks every weight-side fact now."""
    refs = (w_packed, w, scales, zeros, bias)
    ready = _plan_ready(op, w_packed, bias) if w.is_cpu else None
    if ready is None:
        return LinearPlan(None, 0, 0, (), refs, bias, ())
    N, K = w.shape[0], w.shape[1] * 2
    g = ops.check_int4_linear(op, _x0(K, bias), w, scales, zeros, group_size, bias, w_packed)
    ops.check_int4_zero_values(op, zeros)
    wp, b = ready
    mid = (g, zeros is not None, wp.data_ptr(), b.data_ptr() if b is not None else 0)
    return LinearPlan(getattr(_C, op), K, N, mid, refs, bias, (wp, b))


def sparse24_linear_plan(values, meta, scales, bias, w_packed) -> LinearPlan:
    """Plan of a 2:4 SparseLinear with float or int8 values (sparse24_linear)."""
    refs = (w_packed, values, meta, scales, bias)
    ready = _plan_ready("sparse24_linear", w_packed, bias) if values.is_cpu else None
    if ready is None or (scales is not None and not scales.is_contiguous()):
        return LinearPlan(None, 0, 0, (), refs, bias, ())
    K = 2 * values.shape[1]
    N, _ = ops.check_sparse24_linear("sparse24_linear", _x0(K, bias), values, meta, scales, bias, w_packed)
    wp, b = ready
    mid = (wp.data_ptr(), sparse24_format.value_code(values.dtype), scales.data_ptr() if scales is not None else 0,
           b.data_ptr() if b is not None else 0)
    return LinearPlan(_C.sparse24_linear, K, N, mid, refs, bias, (wp, scales, b))


def sparse24_w4a16_linear_plan(qvalues, meta, scales, zeros, group_size: int, bias, w_packed) -> LinearPlan:
    """Plan of a 2:4 SparseLinear with int4 values (sparse24_w4a16_linear: the w4a16 kernel, expanded weight)."""
    op = "sparse24_w4a16_linear"
    refs = (w_packed, qvalues, meta, scales, zeros, bias)
    ready = _plan_ready(op, w_packed, bias) if qvalues.is_cpu else None
    if ready is None:
        return LinearPlan(None, 0, 0, (), refs, bias, ())
    K = 4 * qvalues.shape[1]
    N, _, g = ops.check_sparse24_w4a16_linear(op, _x0(K, bias), qvalues, meta, scales, zeros, group_size, bias,
                                              w_packed)
    wp, b = ready
    mid = (g, zeros is not None, wp.data_ptr(), b.data_ptr() if b is not None else 0)
    return LinearPlan(_C.w4a16_linear, K, N, mid, refs, bias, (wp, b))


def sparse_linear_plan(values, bitmask, row_offsets, K: int, scales, bias, w_packed) -> LinearPlan:
    """Plan of an unstructured SparseLinear (sparse_linear, bitmask format)."""
    refs = (w_packed, values, bitmask, row_offsets, scales, bias)
    ready = _plan_ready("sparse_linear", w_packed, bias) if values.is_cpu else None
    if ready is None or (scales is not None and not scales.is_contiguous()):
        return LinearPlan(None, 0, 0, (), refs, bias, ())
    N = ops.check_sparse_linear(_x0(K, bias), values, bitmask, row_offsets, scales, bias, w_packed)
    wp, b = ready
    int8v = values.dtype == torch.int8
    mid = (wp.data_ptr(), int(int8v), values.shape[0], scales.data_ptr() if int8v else 0,
           b.data_ptr() if b is not None else 0)
    return LinearPlan(_C.sparse_linear, K, N, mid, refs, bias, (wp, scales, b))
