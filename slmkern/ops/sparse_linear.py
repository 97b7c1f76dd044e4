"""sparse_linear: unstructured sparse weights (bitmask + packed nonzeros), float or int8 values.
"""
from __future__ import annotations

import torch

from slmkern.formats import bitmask as bitmask_format
from slmkern.formats.common import FLOAT_DTYPES
from slmkern.ops._lib import LIB, _linear_grads, _note_x_bias, _type, _value


LIB.define("sparse_linear(Tensor x, Tensor values, Tensor bitmask, Tensor row_offsets, Tensor? scales=None, "
           "Tensor? bias=None, Tensor? w_packed=None) -> Tensor")


def check_sparse_linear(x, values, bitmask, row_offsets, scales, bias, w_packed) -> int:
    """Shape/dtype/device facts of sparse_linear (no data reads: the fake checks these). Returns N.

    The data facts (padding bits, row_offsets vs popcounts, int8 range) are
    check_sparse_linear_data's; the CPU kernel runs both unless w_packed is given.
    """
    op = "sparse_linear"
    _type(isinstance(x, torch.Tensor) and x.dtype in FLOAT_DTYPES,
          f"{op}: x must be a float32/bfloat16/float16 tensor, got {getattr(x, 'dtype', type(x))}")
    _value(x.dim() >= 1, f"{op}: x must have shape (..., K), got a 0-d tensor")
    K = x.shape[-1]
    _value(K > 0, f"{op}: x must have K > 0 in its last dim, got K={K}")
    _type(bitmask.dtype == torch.uint8, f"{op}: bitmask must be torch.uint8, got {bitmask.dtype}")
    Kb = (K + 7) // 8
    _value(bitmask.dim() == 2 and bitmask.shape[0] > 0 and bitmask.shape[1] == Kb,
           f"{op}: bitmask must have shape (N, ceil(K/8)) = (N, {Kb}) with N > 0 for x with K={K}, "
           f"got {tuple(bitmask.shape)}")
    N = bitmask.shape[0]
    _type(row_offsets.dtype == torch.int64, f"{op}: row_offsets must be torch.int64, got {row_offsets.dtype}")
    _value(row_offsets.dim() == 1 and row_offsets.shape[0] == N + 1,
           f"{op}: row_offsets must have shape (N + 1,) = ({N + 1},), got {tuple(row_offsets.shape)}")
    _type(values.dtype in FLOAT_DTYPES + (torch.int8,),
          f"{op}: values must be float32/bfloat16/float16 or int8, got {values.dtype}")
    _value(values.dim() == 1, f"{op}: values must be 1-D [nnz], got shape {tuple(values.shape)}")
    int8v = values.dtype == torch.int8
    if int8v:
        _type(scales is not None, f"{op}: int8 values need scales (float32 (N,) = ({N},)), got None")
        _type(scales.dtype == torch.float32, f"{op}: scales must be torch.float32, got {scales.dtype}")
        _value(scales.dim() == 1 and scales.shape[0] == N,
               f"{op}: scales must have shape (N,) = ({N},), got {tuple(scales.shape)}")
    else:
        _type(scales is None, f"{op}: float values ({values.dtype}) take no scales; pass scales=None")
    dev = bitmask.device
    _value(x.device == dev and values.device == dev and row_offsets.device == dev
           and (scales is None or scales.device == dev),
           f"{op}: x ({x.device}), values ({values.device}), bitmask ({dev}), row_offsets "
           f"({row_offsets.device}) and scales must be on one device")
    if bias is not None:
        _type(bias.dtype in (x.dtype, torch.float32),
              f"{op}: bias must be {x.dtype} or torch.float32, got {bias.dtype}")
        _value(bias.dim() == 1 and bias.shape[0] == N,
               f"{op}: bias must have shape (N,) = ({N},), got {tuple(bias.shape)}")
        _value(bias.device == dev, f"{op}: bias is on {bias.device} but bitmask is on {dev}")
    if w_packed is not None:
        nbytes = bitmask_format.packed_bytes(N, K, values.shape[0], int8v)
        _type(w_packed.dtype == torch.uint8,
              f"{op}: w_packed must be torch.uint8 (from prepack_bitmask), got {w_packed.dtype}")
        _value(w_packed.dim() == 1 and w_packed.shape[0] == nbytes,
               f"{op}: w_packed must be 1-D with {nbytes} bytes for N={N}, K={K}, nnz={values.shape[0]} "
               f"({'int8' if int8v else 'float'} values), got {tuple(w_packed.shape)}; build it with "
               "slmkern._backends.cpu.prepack_bitmask(values, bitmask, row_offsets, K, scales)")
    return N


def check_sparse_linear_data(x, values, bitmask, row_offsets, scales) -> None:
    """The data facts of the bitmask format (reads the tensors): see formats.bitmask.validate."""
    bitmask_format.validate(values, bitmask, row_offsets, x.shape[-1], scales, where="sparse_linear")


def sparse_linear_ok(x, values, bitmask, row_offsets, scales, bias, w_packed) -> bool:
    """Fast pass of check_sparse_linear for concrete CPU tensors with w_packed (plain comparisons,
    cheapest first: this runs on every call, ~1.5 us)."""
    if w_packed is None:
        return False
    try:
        K = x.shape[-1]
        N = bitmask.shape[0]
        vdt = values.dtype
        int8v = vdt == torch.int8
        if (K <= 0 or N <= 0 or x.dtype not in FLOAT_DTYPES or bitmask.dtype != torch.uint8
                or row_offsets.dtype != torch.int64 or w_packed.dtype != torch.uint8
                or not (int8v or vdt in FLOAT_DTYPES) or values.dim() != 1
                or bitmask.shape != (N, (K + 7) // 8) or row_offsets.shape != (N + 1,)
                or not (x.is_cpu and values.is_cpu and bitmask.is_cpu and row_offsets.is_cpu and w_packed.is_cpu)):
            return False
        if int8v:
            if scales is None or scales.dtype != torch.float32 or scales.shape != (N,) or not scales.is_cpu:
                return False
        elif scales is not None:
            return False
        if bias is not None and (bias.dtype not in (x.dtype, torch.float32) or bias.shape != (N,)
                                 or not bias.is_cpu):
            return False
        return w_packed.shape == (bitmask_format.packed_bytes_cached(N, K, values.shape[0], int8v),)
    except Exception:  # anything odd: the full check names it
        return False


def _sparse_linear_fake(x, values, bitmask, row_offsets, scales=None, bias=None, w_packed=None):
    N = check_sparse_linear(x, values, bitmask, row_offsets, scales, bias, w_packed)
    return x.new_empty((*x.shape[:-1], N))


torch.library.register_fake("slmkern::sparse_linear", _sparse_linear_fake, lib=LIB)


def sparse_linear(x, values, bitmask, row_offsets, scales=None, bias=None, w_packed=None):
    """x (..., K) f32/bf16/f16, values [nnz] float|int8, bitmask (N, ceil(K/8)) uint8, row_offsets (N+1,) int64,
    scales (N,) f32 for int8 values, bias (N,)? -> (..., N) x.dtype.

    Unstructured sparse linear (format: slmkern.formats.bitmask). Float values: fp32 accumulation;
    int8 values: exactly w8a8_linear on the decompressed weight. ``w_packed`` (from
    ``slmkern._backends.cpu.prepack_bitmask``) spares the CPU kernel the validation and repack.
    """
    return torch.ops.slmkern.sparse_linear(x, values, bitmask, row_offsets, scales, bias, w_packed)


def _sparse_setup(ctx, inputs, output):
    x, values, bitmask, row_offsets, scales, bias, _ = inputs
    ctx.save_for_backward(values, bitmask, row_offsets, scales)
    ctx.K = x.shape[-1]
    _note_x_bias(ctx, x, bias)


def _sparse_backward(ctx, grad):
    values, bitmask, row_offsets, scales = ctx.saved_tensors
    return _linear_grads(ctx, grad, lambda: bitmask_format.dequantize(values, bitmask, row_offsets, ctx.K, scales),
                         7, 5)


torch.library.register_autograd("slmkern::sparse_linear", _sparse_backward, setup_context=_sparse_setup, lib=LIB)
