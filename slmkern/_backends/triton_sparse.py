"""CUDA registrations of the sparse ops: validate shapes/dtypes, then call the Triton launchers in
slmkern.kernels.{sparse24, sparse24_w4a16, sparse}.

    sparse24_linear(x, values, meta, scales=None, bias=None, w_packed=None)
    sparse24_w4a16_linear(x, qvalues, meta, scales, zeros, group_size, bias=None, w_packed=None)
    sparse_linear(x, values, bitmask, row_offsets, scales=None, bias=None, w_packed=None)

`register(lib)` registers them on `lib` (ops.LIB) once the schemas exist; importing this module
registers nothing. The checks here are the shape/dtype/device facts only: reading meta or
row_offsets to validate their contents would cost a device sync per call, and the kernels never
read out of bounds whatever those hold (2:4 indices stay inside their group; bitmask value indices
outside [0, nnz) are masked). The format builders validate contents once. w_packed (a CPU layout)
is ignored. Without triton, CUDA tensors run slmkern.reference (logged once).
"""
from __future__ import annotations

import logging

import torch

from slmkern import ops, reference
from slmkern._backends import triton as _triton_backend
from slmkern._logging import log_once
from slmkern.formats.common import FLOAT_DTYPES, SPARSE24_INT4_GROUP_MULTIPLE, group_size_ok, group_size_rule
from slmkern.ops import _type, _value  # TypeError / ValueError with the message, as every op check

VALUE_DTYPES = FLOAT_DTYPES + (torch.int8,)


def _rows(op: str, name: str, t: torch.Tensor, shape: tuple, dtypes: tuple) -> None:
    """t: a tensor of one of `dtypes`, exactly `shape`, unit inner stride."""
    _type(isinstance(t, torch.Tensor) and t.dtype in dtypes,
          f"{op}: {name} must be a tensor of dtype {' / '.join(str(d) for d in dtypes)}, "
          f"got {getattr(t, 'dtype', type(t))}")
    _value(tuple(t.shape) == tuple(shape), f"{op}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    _value(t.dim() == 0 or t.numel() == 0 or t.stride(-1) == 1,
           f"{op}: {name} must have unit stride in its last dim, got strides {t.stride()}")


def _x(op: str, x) -> int:
    _type(isinstance(x, torch.Tensor) and x.dtype in FLOAT_DTYPES,
          f"{op}: x must be a float32/bfloat16/float16 tensor, got {getattr(x, 'dtype', type(x))}")
    _value(x.dim() >= 1, f"{op}: x must have shape (..., K), got a 0-d tensor")
    K = x.shape[-1]
    _value(K > 0, f"{op}: x must have K > 0 in its last dim, got shape {tuple(x.shape)}")
    return K


def _scales_bias(op: str, x, N: int, values_dtype, scales, bias) -> None:
    if values_dtype == torch.int8:
        _value(scales is not None, f"{op}: int8 values need scales (N,) = ({N},) float32, got None")
        _rows(op, "scales", scales, (N,), (torch.float32,))
    else:
        _value(scales is None, f"{op}: float values ({values_dtype}) take no scales, got a tensor")
    if bias is not None:
        _rows(op, "bias", bias, (N,), (x.dtype, torch.float32))


def _same_device(op: str, **tensors) -> None:
    devs = {name: t.device for name, t in tensors.items() if t is not None}
    _value(len(set(devs.values())) == 1,
           f"{op}: every tensor must be on one device, got " + ", ".join(f"{n} on {d}" for n, d in devs.items()))


def check_sparse24_linear_shapes(x, values, meta, scales, bias) -> tuple[int, int]:
    op = "sparse24_linear"
    K = _x(op, x)
    _value(K % 4 == 0, f"{op}: 2:4 needs K % 4 == 0, got K={K}")
    _type(isinstance(values, torch.Tensor) and values.dim() == 2,
          f"{op}: values must be a 2-D tensor (N, K/2), got {getattr(values, 'shape', type(values))}")
    N = values.shape[0]
    _value(N > 0, f"{op}: values must have N > 0 rows, got {tuple(values.shape)}")
    _rows(op, "values", values, (N, K // 2), VALUE_DTYPES)
    _rows(op, "meta", meta, (N, (K + 7) // 8), (torch.uint8,))
    _scales_bias(op, x, N, values.dtype, scales, bias)
    _same_device(op, x=x, values=values, meta=meta, scales=scales, bias=bias)
    return N, K


def check_sparse24_w4a16_linear_shapes(x, qvalues, meta, scales, zeros, group_size, bias) -> tuple[int, int, int]:
    op = "sparse24_w4a16_linear"
    K = _x(op, x)
    _value(K % 4 == 0, f"{op}: 2:4 needs K % 4 == 0, got K={K}")
    _type(isinstance(qvalues, torch.Tensor) and qvalues.dim() == 2,
          f"{op}: qvalues must be a 2-D uint8 tensor (N, K/4), got {getattr(qvalues, 'shape', type(qvalues))}")
    N = qvalues.shape[0]
    _value(N > 0, f"{op}: qvalues must have N > 0 rows, got {tuple(qvalues.shape)}")
    _rows(op, "qvalues", qvalues, (N, K // 4), (torch.uint8,))
    _rows(op, "meta", meta, (N, (K + 7) // 8), (torch.uint8,))
    _type(isinstance(group_size, int) and not isinstance(group_size, bool),
          f"{op}: group_size must be an int, got {type(group_size).__name__}")
    _value(group_size_ok(K, group_size, SPARSE24_INT4_GROUP_MULTIPLE),
           f"{op}: group_size must be {group_size_rule(SPARSE24_INT4_GROUP_MULTIPLE)}; got {group_size} for K={K}")
    g = K if group_size == -1 else group_size
    _rows(op, "scales", scales, (N, K // g), (torch.float32,))
    if zeros is not None:
        _rows(op, "zeros", zeros, (N, K // g), (torch.uint8,))
    if bias is not None:
        _rows(op, "bias", bias, (N,), (x.dtype, torch.float32))
    _same_device(op, x=x, qvalues=qvalues, meta=meta, scales=scales, zeros=zeros, bias=bias)
    return N, K, g


def check_sparse_linear_shapes(x, values, bitmask, row_offsets, scales, bias) -> tuple[int, int]:
    op = "sparse_linear"
    K = _x(op, x)
    _type(isinstance(bitmask, torch.Tensor) and bitmask.dim() == 2,
          f"{op}: bitmask must be a 2-D uint8 tensor (N, ceil(K/8)), got {getattr(bitmask, 'shape', type(bitmask))}")
    N = bitmask.shape[0]
    _value(N > 0, f"{op}: bitmask must have N > 0 rows, got {tuple(bitmask.shape)}")
    _rows(op, "bitmask", bitmask, (N, (K + 7) // 8), (torch.uint8,))
    _type(isinstance(values, torch.Tensor) and values.dim() == 1,
          f"{op}: values must be a 1-D tensor (nnz,), got {getattr(values, 'shape', type(values))}")
    _rows(op, "values", values, tuple(values.shape), VALUE_DTYPES)
    _rows(op, "row_offsets", row_offsets, (N + 1,), (torch.int64,))
    _scales_bias(op, x, N, values.dtype, scales, bias)
    _same_device(op, x=x, values=values, bitmask=bitmask, row_offsets=row_offsets, scales=scales, bias=bias)
    return N, K


def _fallback(op: str):
    """reference.<op> when slmkern.kernels is unavailable (logged once), else None."""
    if _triton_backend.kernels is not None:
        return None
    why = ("triton is not installed" if not _triton_backend.HAS_TRITON
           else f"slmkern.kernels failed to import ({_triton_backend._IMPORT_ERROR})")
    log_once(f"{op}-no-triton", f"slmkern: {op} runs the pure-torch reference on CUDA because {why}", logging.WARNING)
    return getattr(reference, op)


def _launch(x, N: int, fn, *args):
    """fn(x2d, *args) on x's rows, launched directly (not through wrap_triton's higher-order op),
    on x's device; (..., K) -> (..., N)."""
    x2 = ops.as_rows(x, x.shape[-1])
    with _triton_backend._set_wrap_triton_enabled(False), _triton_backend._on_device(x.device):
        y = fn(x2, *args)
    return y.reshape(*x.shape[:-1], N)


def _c(t):
    return t.contiguous() if t is not None else None


def sparse24_linear_cuda(x, values, meta, scales=None, bias=None, w_packed=None):
    N, _ = check_sparse24_linear_shapes(x, values, meta, scales, bias)
    ref = _fallback("sparse24_linear")
    if ref is not None:
        return ref(x, values, meta, scales, bias)
    from slmkern.kernels import sparse24   # on first use: importing this file needs no triton
    return _launch(x, N, sparse24.sparse24_linear, values, meta, _c(scales), _c(bias))


def sparse24_w4a16_linear_cuda(x, qvalues, meta, scales, zeros, group_size, bias=None, w_packed=None):
    N, _, g = check_sparse24_w4a16_linear_shapes(x, qvalues, meta, scales, zeros, group_size, bias)
    ref = _fallback("sparse24_w4a16_linear")
    if ref is not None:
        return ref(x, qvalues, meta, scales, zeros, group_size, bias)
    from slmkern.kernels import sparse24_w4a16
    return _launch(x, N, sparse24_w4a16.sparse24_w4a16_linear, qvalues, meta, scales.contiguous(), _c(zeros), g,
                   _c(bias))


def sparse_linear_cuda(x, values, bitmask, row_offsets, scales=None, bias=None, w_packed=None):
    N, _ = check_sparse_linear_shapes(x, values, bitmask, row_offsets, scales, bias)
    ref = _fallback("sparse_linear")
    if ref is not None:
        return ref(x, values, bitmask, row_offsets, scales, bias)
    from slmkern.kernels import sparse
    return _launch(x, N, sparse.sparse_linear, values.contiguous(), bitmask, row_offsets.contiguous(), _c(scales),
                   _c(bias))


def register(lib: torch.library.Library = ops.LIB) -> None:
    """Register the three CUDA kernels on `lib` (ops.LIB; call once, after the schemas are defined),
    as `<lib.ns>::sparse24_linear` etc."""
    for name, fn in (("sparse24_linear", sparse24_linear_cuda), ("sparse24_w4a16_linear", sparse24_w4a16_linear_cuda),
                     ("sparse_linear", sparse_linear_cuda)):
        torch.library.register_kernel(f"{lib.ns}::{name}", "cuda", fn, lib=lib)
