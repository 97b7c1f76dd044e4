"""sparse24_linear and sparse24_w4a16_linear: 2:4 semi-structured weights (float, int8 or int4 kept values).
"""
from __future__ import annotations

import torch

from slmkern.formats import sparse24 as sparse24_format
from slmkern.formats.common import (FLOAT_DTYPES, SPARSE24_INT4_GROUP_MULTIPLE, group_size_ok,
                                    group_size_rule)
from slmkern.ops._lib import LIB, _linear_grads, _note_x_bias, _type, _value


# Format: slmkern/formats/sparse24.py. Value facts (meta nibbles c0 < c1, zero padding bits,
# int8 values in [-127, 127], zeros in 0..15) need the data: sparse24_format.validate* checks
# them where the canonical tensors are consumed (the CPU prepack_*, the on-the-fly CPU pack, the
# reference kernel); the fakes and the w_packed fast path check shapes and dtypes only.

LIB.define("sparse24_linear(Tensor x, Tensor values, Tensor meta, Tensor? scales=None, Tensor? bias=None, "
           "Tensor? w_packed=None) -> Tensor")
LIB.define("sparse24_w4a16_linear(Tensor x, Tensor qvalues, Tensor meta, Tensor scales, Tensor? zeros, "
           "int group_size, Tensor? bias=None, Tensor? w_packed=None) -> Tensor")

_S24_VALUE_DTYPES = FLOAT_DTYPES + (torch.int8,)


def _check_x_k4(op: str, x) -> int:
    _type(isinstance(x, torch.Tensor) and x.dtype in FLOAT_DTYPES,
          f"{op}: x must be a float32/bfloat16/float16 tensor, got {getattr(x, 'dtype', type(x))}")
    _value(x.dim() >= 1, f"{op}: x must have shape (..., K), got a 0-d tensor")
    K = x.shape[-1]
    _value(K > 0 and K % 4 == 0, f"{op}: K (x's last dim) must be a positive multiple of 4 for 2:4, got K={K}")
    return K


def _check_meta_bias(op: str, x, meta, bias, N, K, dev) -> None:
    mc = (K + 7) // 8
    _type(isinstance(meta, torch.Tensor) and meta.dtype == torch.uint8,
          f"{op}: meta must be torch.uint8 (N, ceil(K/8)), got {getattr(meta, 'dtype', type(meta))}")
    _value(meta.dim() == 2 and meta.shape[0] == N and meta.shape[1] == mc,
           f"{op}: meta must have shape (N, ceil(K/8)) = ({N}, {mc}), got {tuple(meta.shape)}")
    _value(meta.stride(1) == 1 and meta.stride(0) == mc, f"{op}: meta must be contiguous, got strides {meta.stride()}")
    _value(meta.device == dev and x.device == dev,
           f"{op}: x ({x.device}) and meta ({meta.device}) must be on the weight's device ({dev})")
    if bias is not None:
        _type(bias.dtype in (x.dtype, torch.float32), f"{op}: bias must be {x.dtype} or torch.float32, got {bias.dtype}")
        _value(bias.dim() == 1 and bias.shape[0] == N, f"{op}: bias must have shape (N,) = ({N},), got {tuple(bias.shape)}")
        _value(bias.device == dev, f"{op}: bias is on {bias.device} but the weight is on {dev}")


def check_sparse24_linear(op: str, x, values, meta, scales, bias, w_packed) -> tuple[int, int]:
    """Shape/dtype/device facts of sparse24_linear (fake and real kernels); returns (N, K)."""
    K = _check_x_k4(op, x)
    _type(isinstance(values, torch.Tensor) and values.dtype in _S24_VALUE_DTYPES,
          f"{op}: values must be float32/bfloat16/float16 or int8 (N, K/2), got {getattr(values, 'dtype', type(values))}")
    _value(values.dim() == 2 and values.shape[1] * 2 == K and values.shape[0] > 0,
           f"{op}: values must have shape (N, K/2) = (N, {K // 2}) for x with K={K}, got {tuple(values.shape)}")
    N = values.shape[0]
    _value(values.stride(1) == 1 and values.stride(0) == K // 2,
           f"{op}: values must be contiguous (N, K/2), got strides {values.stride()} (call .contiguous())")
    _check_meta_bias(op, x, meta, bias, N, K, values.device)
    if values.dtype == torch.int8:
        _value(scales is not None, f"{op}: scales (N,) float32 are required with int8 values, got None")
        _type(scales.dtype == torch.float32, f"{op}: scales must be torch.float32, got {scales.dtype}")
        _value(scales.dim() == 1 and scales.shape[0] == N, f"{op}: scales must have shape (N,) = ({N},), got {tuple(scales.shape)}")
        _value(scales.device == values.device, f"{op}: scales is on {scales.device} but values is on {values.device}")
    else:
        _value(scales is None, f"{op}: scales must be None with float values ({values.dtype}); int8 values take scales")
    if w_packed is not None:
        nbytes = sparse24_format.packed_bytes(N, K, values.dtype)
        _type(w_packed.dtype == torch.uint8, f"{op}: w_packed must be torch.uint8 (from prepack), got {w_packed.dtype}")
        _value(w_packed.dim() == 1 and w_packed.shape[0] == nbytes,
               f"{op}: w_packed must be 1-D with {nbytes} bytes for ({N}, {K}) {values.dtype} values, got "
               f"{tuple(w_packed.shape)}; build it with slmkern._backends.cpu.prepack_sparse24(values, meta, scales)")
    return N, K


def sparse24_linear_ok(x, values, meta, scales, bias, w_packed) -> bool:
    """Fast pass of check_sparse24_linear for concrete CPU tensors (plain comparisons)."""
    try:
        K = x.shape[-1]
        N = values.shape[0]
        ok = (x.dtype in FLOAT_DTYPES and K > 0 and K % 4 == 0 and values.dtype in _S24_VALUE_DTYPES
              and values.shape == (N, K // 2) and N > 0 and values.stride() == (K // 2, 1)
              and meta.dtype == torch.uint8 and meta.shape == (N, (K + 7) // 8) and meta.stride() == ((K + 7) // 8, 1)
              and x.is_cpu and values.is_cpu and meta.is_cpu)
        if ok:
            if values.dtype == torch.int8:
                ok = scales is not None and scales.dtype == torch.float32 and scales.shape == (N,) and scales.is_cpu
            else:
                ok = scales is None
        if ok and bias is not None:
            ok = bias.dtype in (x.dtype, torch.float32) and bias.shape == (N,) and bias.is_cpu
        if ok and w_packed is not None:
            ok = (w_packed.dtype == torch.uint8 and w_packed.is_cpu
                  and w_packed.shape == (sparse24_format.packed_bytes(N, K, values.dtype),))
        return bool(ok)
    except Exception:  # anything odd: the full check names it
        return False


def check_sparse24_w4a16_linear(op: str, x, qvalues, meta, scales, zeros, group_size, bias, w_packed) -> tuple[int, int, int]:
    """Shape/dtype/device facts of sparse24_w4a16_linear; returns (N, K, g)."""
    K = _check_x_k4(op, x)
    _type(isinstance(qvalues, torch.Tensor) and qvalues.dtype == torch.uint8,
          f"{op}: qvalues must be torch.uint8 (N, K/4), got {getattr(qvalues, 'dtype', type(qvalues))}")
    _value(qvalues.dim() == 2 and qvalues.shape[1] * 4 == K and qvalues.shape[0] > 0,
           f"{op}: qvalues must have shape (N, K/4) = (N, {K // 4}) for x with K={K}, got {tuple(qvalues.shape)}")
    N = qvalues.shape[0]
    _value(qvalues.stride(1) == 1 and qvalues.stride(0) == K // 4,
           f"{op}: qvalues must be contiguous (N, K/4), got strides {qvalues.stride()}")
    _check_meta_bias(op, x, meta, bias, N, K, qvalues.device)
    _type(isinstance(group_size, int) and not isinstance(group_size, bool),
          f"{op}: group_size must be an int, got {type(group_size).__name__}")
    _value(group_size_ok(K, group_size, SPARSE24_INT4_GROUP_MULTIPLE),
           f"{op}: group_size must be {group_size_rule(SPARSE24_INT4_GROUP_MULTIPLE)}; got {group_size} for K={K}")
    g = K if group_size == -1 else group_size
    G = K // g
    _type(scales.dtype == torch.float32, f"{op}: scales must be torch.float32, got {scales.dtype}")
    _value(scales.dim() == 2 and scales.shape[0] == N and scales.shape[1] == G,
           f"{op}: scales must have shape (N, K/group_size) = ({N}, {G}), got {tuple(scales.shape)}")
    _value(scales.device == qvalues.device, f"{op}: scales is on {scales.device} but qvalues is on {qvalues.device}")
    if zeros is not None:
        _type(zeros.dtype == torch.uint8, f"{op}: zeros must be None or torch.uint8 (0..15), got {zeros.dtype}")
        _value(zeros.dim() == 2 and zeros.shape[0] == N and zeros.shape[1] == G,
               f"{op}: zeros must have shape (N, K/group_size) = ({N}, {G}), got {tuple(zeros.shape)}")
        _value(zeros.device == qvalues.device, f"{op}: zeros is on {zeros.device} but qvalues is on {qvalues.device}")
    if w_packed is not None:
        nbytes = sparse24_format.packed_bytes_int4(N, K, g, zeros is not None)
        _type(w_packed.dtype == torch.uint8, f"{op}: w_packed must be torch.uint8 (from prepack), got {w_packed.dtype}")
        _value(w_packed.dim() == 1 and w_packed.shape[0] == nbytes,
               f"{op}: w_packed must be 1-D with {nbytes} bytes, got {tuple(w_packed.shape)}; build it with "
               "slmkern._backends.cpu.prepack_sparse24_int4(qvalues, meta, scales, zeros, group_size)")
    return N, K, g


def _sparse24_linear_fake(x, values, meta, scales=None, bias=None, w_packed=None):
    N, _ = check_sparse24_linear("sparse24_linear", x, values, meta, scales, bias, w_packed)
    return x.new_empty((*x.shape[:-1], N))


def _sparse24_w4a16_linear_fake(x, qvalues, meta, scales, zeros, group_size, bias=None, w_packed=None):
    N, _, _ = check_sparse24_w4a16_linear("sparse24_w4a16_linear", x, qvalues, meta, scales, zeros, group_size,
                                          bias, w_packed)
    return x.new_empty((*x.shape[:-1], N))


torch.library.register_fake("slmkern::sparse24_linear", _sparse24_linear_fake, lib=LIB)
torch.library.register_fake("slmkern::sparse24_w4a16_linear", _sparse24_w4a16_linear_fake, lib=LIB)


def sparse24_linear(x, values, meta, scales=None, bias=None, w_packed=None):
    """x (..., K) f32/bf16/f16, values (N, K/2) float or int8, meta uint8 (N, ceil(K/8)), scales (N,)? -> (..., N) x.dtype.

    2:4 semi-structured weight. Float values: fp32 accumulation. int8 values (with per-row
    scales): bit-exact w8a8_linear on the decompressed weight. ``w_packed`` from
    ``slmkern._backends.cpu.prepack_sparse24`` spares the CPU kernel a full validation and a repack.
    """
    return torch.ops.slmkern.sparse24_linear(x, values, meta, scales, bias, w_packed)


def sparse24_w4a16_linear(x, qvalues, meta, scales, zeros, group_size, bias=None, w_packed=None):
    """x (..., K) f32/bf16/f16, qvalues uint8 (N, K/4), meta uint8, scales (N, K/g) f32, zeros (N, K/g)? -> (..., N).

    2:4 weight with int4 kept values, weight-only (fp32 accumulation). ``w_packed`` from
    ``slmkern._backends.cpu.prepack_sparse24_int4``.
    """
    return torch.ops.slmkern.sparse24_w4a16_linear(x, qvalues, meta, scales, zeros, group_size, bias, w_packed)


def _s24_setup(ctx, inputs, output):
    x, values, meta, scales, bias, _ = inputs
    ctx.save_for_backward(values, meta, scales)
    _note_x_bias(ctx, x, bias)


def _s24_backward(ctx, grad):
    values, meta, scales = ctx.saved_tensors

    def dense():
        w = sparse24_format.decompress(values, meta).float()
        return w * scales.unsqueeze(1) if scales is not None else w

    return _linear_grads(ctx, grad, dense, 6, 4)


def _s24_w4_setup(ctx, inputs, output):
    x, qvalues, meta, scales, zeros, group_size, bias, _ = inputs
    ctx.save_for_backward(qvalues, meta, scales, zeros)
    ctx.group_size = group_size
    _note_x_bias(ctx, x, bias)


def _s24_w4_backward(ctx, grad):
    qvalues, meta, scales, zeros = ctx.saved_tensors
    return _linear_grads(ctx, grad, lambda: sparse24_format.decompress_int4(qvalues, meta, scales, zeros,
                                                                            ctx.group_size), 8, 6)


torch.library.register_autograd("slmkern::sparse24_linear", _s24_backward, setup_context=_s24_setup, lib=LIB)
torch.library.register_autograd("slmkern::sparse24_w4a16_linear", _s24_w4_backward, setup_context=_s24_w4_setup,
                                lib=LIB)
