"""Every slmkern op: its torch.library schema, its input checks and its fake (meta) kernel.

Backends register real kernels elsewhere (``_backends/cpu.py`` -> C++,
``_backends/triton.py`` -> Triton, ``_backends/__init__.py`` -> reference for any
other device). Each op's docstring first line states its shapes and dtypes; the
checks here enforce exactly those facts, raising TypeError/ValueError that name
the argument before any kernel runs.
"""
from __future__ import annotations

import torch

from slmkern.formats import int8 as int8_format
from slmkern.formats.common import (FLOAT_DTYPES, INT4_GROUP_MULTIPLE, SPARSE24_INT4_GROUP_MULTIPLE, group_size_ok,
                                    group_size_rule)
from slmkern.ops._lib import LIB, _type, _value

LIB.define("w8a8_linear(Tensor x, Tensor w, Tensor w_scale, Tensor? bias=None, Tensor? w_packed=None, "
           "str activations='int8', str epilogue='none') -> Tensor")
LIB.define("w8a16_linear(Tensor x, Tensor w, Tensor w_scale, Tensor? bias=None, Tensor? w_packed=None) -> Tensor")


def as_rows(x: torch.Tensor, K: int) -> torch.Tensor:
    """(..., K) -> (M, K) with unit inner stride and row stride >= K (copies only if needed)."""
    if x.dim() == 2 and x.stride(1) == 1 and x.stride(0) >= K:   # the common case, on every kernel call
        return x
    x2 = x.reshape(-1, K)
    if x2.stride(1) != 1 or (x2.shape[0] > 1 and x2.stride(0) < K):
        x2 = x2.contiguous()
    return x2


def shape_only(w: torch.Tensor, w_packed: torch.Tensor | None) -> bool:
    """Is w a zero-stride stand-in that carries the weight's shape and dtype only?

    Accepted wherever w_packed (the CPU kernels' layout) is given: the CPU kernels read the
    weight from w_packed alone, so a module that holds only its packed copy passes
    ``torch.zeros((), dtype).expand(N, K)`` (or (N, K/2)) as w. Fakes read w's shape only.
    """
    return w_packed is not None and w.dim() == 2 and w.stride() == (0, 0) and w.device.type == "cpu"


def check_int8_linear(op: str, x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                      bias: torch.Tensor | None, w_packed: torch.Tensor | None) -> None:
    """Shape/dtype/device facts of w8a8_linear and w8a16_linear (shared by fake and real kernels)."""
    _type(isinstance(x, torch.Tensor) and x.dtype in FLOAT_DTYPES,
          f"{op}: x must be a float32/bfloat16/float16 tensor, got {getattr(x, 'dtype', type(x))}")
    _value(x.dim() >= 1, f"{op}: x must have shape (..., K), got a 0-d tensor")
    _type(w.dtype == torch.int8, f"{op}: w must be torch.int8 of shape (N, K), got {w.dtype}")
    _value(w.dim() == 2, f"{op}: w must have shape (N, K), got {tuple(w.shape)}")
    N, K = w.shape
    _value(K > 0 and N > 0, f"{op}: w must have N > 0 and K > 0, got {tuple(w.shape)}")
    _value(x.shape[-1] == K, f"{op}: x has K={x.shape[-1]} in its last dim but w is (N={N}, K={K})")
    _value((w.stride(1) == 1 and w.stride(0) == K) or shape_only(w, w_packed),
           f"{op}: w must be contiguous (N, K) with strides ({K}, 1), got strides {w.stride()} "
           "(call .contiguous(); broadcast/expanded weights are not accepted without w_packed)")
    _type(w_scale.dtype == torch.float32, f"{op}: w_scale must be torch.float32, got {w_scale.dtype}")
    _value(w_scale.dim() == 1 and w_scale.shape[0] == N,
           f"{op}: w_scale must have shape (N,) = ({N},), got {tuple(w_scale.shape)}")
    _value(x.device == w.device and w_scale.device == w.device,
           f"{op}: x ({x.device}), w ({w.device}) and w_scale ({w_scale.device}) must be on one device")
    if bias is not None:
        _type(bias.dtype in (x.dtype, torch.float32),
              f"{op}: bias must be {x.dtype} or torch.float32, got {bias.dtype}")
        _value(bias.dim() == 1 and bias.shape[0] == N,
               f"{op}: bias must have shape (N,) = ({N},), got {tuple(bias.shape)}")
        _value(bias.device == w.device, f"{op}: bias is on {bias.device} but w is on {w.device}")
    if w_packed is not None:
        _type(w_packed.dtype == torch.uint8, f"{op}: w_packed must be torch.uint8 (from prepack), got {w_packed.dtype}")
        _value(w_packed.dim() == 1 and w_packed.shape[0] == int8_format.packed_bytes(N, K),
               f"{op}: w_packed must be 1-D with {int8_format.packed_bytes(N, K)} bytes for w of shape "
               f"({N}, {K}), got {tuple(w_packed.shape)}; build it with slmkern._backends.cpu.prepack_int8(w)")


def int8_linear_ok(x, w, w_scale, bias, w_packed) -> bool:
    """Fast pass of check_int8_linear for concrete tensors: True when every fact holds.

    Real kernels call this first and fall back to check_int8_linear (which raises with
    a message naming the argument) only when it says False: building the messages
    costs more than a small-M kernel.
    """
    try:
        if x.dtype not in FLOAT_DTYPES or x.dim() < 1 or w.dtype != torch.int8 or w.dim() != 2:
            return False
        N, K = w.shape
        if N <= 0 or K <= 0 or x.shape[-1] != K or (w.stride() != (K, 1) and not shape_only(w, w_packed)):
            return False
        if w_scale.dtype != torch.float32 or w_scale.shape != (N,):
            return False
        dev = w.device
        if x.device != dev or w_scale.device != dev:
            return False
        if bias is not None and (bias.dtype not in (x.dtype, torch.float32) or bias.shape != (N,)
                                 or bias.device != dev):
            return False
        if w_packed is not None and (w_packed.dtype != torch.uint8 or
                                     w_packed.shape != (int8_format.packed_bytes(N, K),)):
            return False
        return True
    except Exception:  # anything unexpected (wrong types): let the full check explain it
        return False


def _int8_linear_fake(op: str):
    def fake(x, w, w_scale, bias=None, w_packed=None):
        check_int8_linear(op, x, w, w_scale, bias, w_packed)
        return x.new_empty((*x.shape[:-1], w.shape[0]))
    return fake


ACTIVATIONS = int8_format.ACTIVATIONS  # w8a8_linear's activation schemes (reference.quantize_activations)
EPILOGUES = int8_format.EPILOGUES      # w8a8_linear's fused output functions (reference.gelu_epilogue)


def check_activations(op: str, activations, epilogue="none") -> None:
    _value(activations in ACTIVATIONS,
           f"{op}: activations must be one of {ACTIVATIONS} (int8: symmetric per-token; int7: asymmetric "
           f"7-bit per-token), got {activations!r}")
    _value(epilogue in EPILOGUES, f"{op}: epilogue must be one of {EPILOGUES}, got {epilogue!r}")


def _w8a8_fake(x, w, w_scale, bias=None, w_packed=None, activations="int8", epilogue="none"):
    check_activations("w8a8_linear", activations, epilogue)
    check_int8_linear("w8a8_linear", x, w, w_scale, bias, w_packed)
    return x.new_empty((*x.shape[:-1], w.shape[0]))


torch.library.register_fake("slmkern::w8a8_linear", _w8a8_fake, lib=LIB)
torch.library.register_fake("slmkern::w8a16_linear", _int8_linear_fake("w8a16_linear"), lib=LIB)


def w8a8_linear(x, w, w_scale, bias=None, w_packed=None, activations="int8", epilogue="none"):
    """x (..., K) f32/bf16/f16, w (N, K) int8, w_scale (N,) f32, bias (N,)? -> (..., N) x.dtype.

    Dynamic per-token int8 activations, int32 accumulation, per-channel dequant.
    ``activations``: "int8" (symmetric, codes in [-127, 127]) or "int7" (asymmetric 7-bit with a
    per-token zero point, FBGEMM's reduce_range: on AVX2 without VNNI its GEMM needs 3 vector ops per
    32 MACs instead of 4). ``epilogue``: "none", or "gelu" (y = gelu(y), fused in the CPU kernel's
    store; the function is reference.gelu_epilogue, within 2e-7 |y| + 1e-7 of exact GELU).
    ``w_packed`` (from ``slmkern._backends.cpu.prepack_int8``) spares the CPU kernel a repack.
    """
    return torch.ops.slmkern.w8a8_linear(x, w, w_scale, bias, w_packed, activations, epilogue)


def w8a16_linear(x, w, w_scale, bias=None, w_packed=None):
    """x (..., K) f32/bf16/f16, w (N, K) int8, w_scale (N,) f32, bias (N,)? -> (..., N) x.dtype.

    Weight-only int8: weights dequantized in-kernel, fp32 accumulation.
    """
    return torch.ops.slmkern.w8a16_linear(x, w, w_scale, bias, w_packed)


# ----------------------------------------------------------------------------- int4 weights
from slmkern.formats import int4_cpu as int4_cpu_format  # noqa: E402

LIB.define("w4a16_linear(Tensor x, Tensor w, Tensor scales, Tensor? zeros, int group_size, "
           "Tensor? bias=None, Tensor? w_packed=None) -> Tensor")
LIB.define("w4a8_linear(Tensor x, Tensor w, Tensor scales, Tensor? zeros, int group_size, "
           "Tensor? bias=None, Tensor? w_packed=None) -> Tensor")

INT4_MAX_K = 1 << 20  # keeps every int32 group sum of the kernels far from overflow


def check_int4_linear(op: str, x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor,
                      zeros: torch.Tensor | None, group_size: int, bias: torch.Tensor | None,
                      w_packed: torch.Tensor | None) -> int:
    """Shape/dtype/device facts of w4a16_linear and w4a8_linear; returns the group size g (-1 -> K).

    Value facts (uint8 zeros in 0..15) need the data: see check_int4_zero_values.
    """
    _type(isinstance(x, torch.Tensor) and x.dtype in FLOAT_DTYPES,
          f"{op}: x must be a float32/bfloat16/float16 tensor, got {getattr(x, 'dtype', type(x))}")
    _value(x.dim() >= 1, f"{op}: x must have shape (..., K), got a 0-d tensor")
    K = x.shape[-1]
    _value(K % 2 == 0, f"{op}: K (x's last dim) must be even for int4 weights (two per byte), got K={K}")
    _value(0 < K <= INT4_MAX_K, f"{op}: K (x's last dim) must be in 1..{INT4_MAX_K}, got K={K}")
    _type(w.dtype == torch.uint8, f"{op}: w must be torch.uint8 of shape (N, K/2) (two int4 codes per byte), "
          f"got {w.dtype}")
    _value(w.dim() == 2 and w.shape[1] * 2 == K and w.shape[0] > 0,
           f"{op}: w must have shape (N, K/2) = (N, {K // 2}) for x with K={K}, got {tuple(w.shape)}")
    N = w.shape[0]
    _value((w.stride(1) == 1 and w.stride(0) == K // 2) or shape_only(w, w_packed),
           f"{op}: w must be contiguous (N, K/2) with strides ({K // 2}, 1), got strides {w.stride()} "
           "(call .contiguous(); broadcast/expanded weights are not accepted without w_packed)")
    _type(isinstance(group_size, int) and not isinstance(group_size, bool),
          f"{op}: group_size must be an int, got {type(group_size).__name__}")
    _value(group_size_ok(K, group_size, INT4_GROUP_MULTIPLE),
           f"{op}: group_size must be {group_size_rule(INT4_GROUP_MULTIPLE)}; got {group_size} for K={K}")
    g = K if group_size == -1 else group_size
    G = K // g
    _type(scales.dtype == torch.float32, f"{op}: scales must be torch.float32, got {scales.dtype}")
    _value(scales.dim() == 2 and scales.shape[0] == N and scales.shape[1] == G,
           f"{op}: scales must have shape (N, K/group_size) = ({N}, {G}), got {tuple(scales.shape)}")
    if zeros is not None:
        _type(zeros.dtype in (torch.uint8, torch.float32),
              f"{op}: zeros must be None, torch.uint8 (0..15) or torch.float32, got {zeros.dtype}")
        _value(zeros.dim() == 2 and zeros.shape[0] == N and zeros.shape[1] == G,
               f"{op}: zeros must have shape (N, K/group_size) = ({N}, {G}), got {tuple(zeros.shape)}")
        _value(zeros.device == w.device, f"{op}: zeros is on {zeros.device} but w is on {w.device}")
    _value(x.device == w.device and scales.device == w.device,
           f"{op}: x ({x.device}), w ({w.device}) and scales ({scales.device}) must be on one device")
    if bias is not None:
        _type(bias.dtype in (x.dtype, torch.float32),
              f"{op}: bias must be {x.dtype} or torch.float32, got {bias.dtype}")
        _value(bias.dim() == 1 and bias.shape[0] == N,
               f"{op}: bias must have shape (N,) = ({N},), got {tuple(bias.shape)}")
        _value(bias.device == w.device, f"{op}: bias is on {bias.device} but w is on {w.device}")
    if w_packed is not None:
        nbytes = int4_cpu_format.packed_bytes(N, K, g, zeros is not None)
        _type(w_packed.dtype == torch.uint8,
              f"{op}: w_packed must be torch.uint8 (from prepack), got {w_packed.dtype}")
        _value(w_packed.dim() == 1 and w_packed.shape[0] == nbytes,
               f"{op}: w_packed must be 1-D with {nbytes} bytes for w ({N}, {K // 2}), group_size={group_size} "
               f"and zeros {'given' if zeros is not None else 'None'}, got {tuple(w_packed.shape)}; build it with "
               "slmkern._backends.cpu.prepack_int4(w, scales, zeros, group_size)")
    return g


def check_int4_linear_fast(op: str, x, w, scales, zeros, group_size, bias, w_packed) -> int:
    """check_int4_linear for concrete CPU tensors at a fraction of its cost (plain comparisons).

    The per-call check of the CPU kernels: if any fact fails, check_int4_linear
    runs and raises its precise error. Returns the group size g.
    """
    try:
        K = x.shape[-1]
        N = w.shape[0]
        g = K if group_size == -1 else group_size
        G = K // g if type(group_size) is int and g > 0 else -1
        ok = (x.dtype in FLOAT_DTYPES and K % 2 == 0 and 0 < K <= INT4_MAX_K and G > 0 and g % INT4_GROUP_MULTIPLE == 0
              and G * g == K and w.dtype == torch.uint8 and w.shape == (N, K // 2)
              and (w.stride() == (K // 2, 1) or shape_only(w, w_packed))
              and N > 0 and scales.dtype == torch.float32 and scales.shape == (N, G)
              and x.is_cpu and w.is_cpu and scales.is_cpu)
        if ok and zeros is not None:
            ok = zeros.dtype in (torch.uint8, torch.float32) and zeros.shape == (N, G) and zeros.is_cpu
        if ok and bias is not None:
            ok = bias.dtype in (x.dtype, torch.float32) and bias.shape == (N,) and bias.is_cpu
        if ok and w_packed is not None:
            ok = (w_packed.dtype == torch.uint8 and w_packed.shape == (int4_cpu_format.packed_bytes(N, K, g, zeros is not None),)
                  and w_packed.is_cpu)
        if ok:
            return g
    except Exception:  # anything odd (non-tensors, ...): let the full check name it
        pass
    return check_int4_linear(op, x, w, scales, zeros, group_size, bias, w_packed)


def check_int4_zero_values(op: str, zeros: torch.Tensor | None) -> None:
    """uint8 zero points must be 0..15 (reads the data: real kernels only, not fakes)."""
    if zeros is not None and zeros.dtype == torch.uint8 and zeros.numel():
        zmax = int(zeros.max())
        _value(zmax <= 15, f"{op}: zeros (uint8) must lie in 0..15, found {zmax}")


def _int4_linear_fake(op: str):
    def fake(x, w, scales, zeros, group_size, bias=None, w_packed=None):
        check_int4_linear(op, x, w, scales, zeros, group_size, bias, w_packed)
        return x.new_empty((*x.shape[:-1], w.shape[0]))
    return fake


torch.library.register_fake("slmkern::w4a16_linear", _int4_linear_fake("w4a16_linear"), lib=LIB)
torch.library.register_fake("slmkern::w4a8_linear", _int4_linear_fake("w4a8_linear"), lib=LIB)


def w4a16_linear(x, w, scales, zeros, group_size, bias=None, w_packed=None):
    """x (..., K) f32/bf16/f16, w (N, K/2) uint8 int4, scales (N, K/g) f32, zeros (N, K/g)? -> (..., N) x.dtype.

    Weight-only int4: W = (u - z) * s (z = 8 without zeros), y = x @ W.T + bias, fp32 accumulation.
    ``w_packed`` (from ``slmkern._backends.cpu.prepack_int4``) spares the CPU kernel a repack.
    """
    return torch.ops.slmkern.w4a16_linear(x, w, scales, zeros, group_size, bias, w_packed)


def w4a8_linear(x, w, scales, zeros, group_size, bias=None, w_packed=None):
    """x (..., K) f32/bf16/f16, w (N, K/2) uint8 int4, scales (N, K/g) f32, zeros (N, K/g)? -> (..., N) x.dtype.

    Dynamic per-token int8 activations, exact int32 group sums:
    y = sx * sum_g (s*acc_g - (s*z)*asum_g) + bias.
    """
    return torch.ops.slmkern.w4a8_linear(x, w, scales, zeros, group_size, bias, w_packed)


# ----------------------------------------------------------------------------- autograd
# The ops are inference kernels, but a model that holds them may still be trained around
# them (adapters, distillation of other layers). Gradients flow to x (and bias) through the
# dequantized weight: exact for the weight-only ops, the straight-through estimate for the
# dynamic-int8 ones. Quantized weights, scales and zero points get no gradient.


def _note_x_bias(ctx, x, bias) -> None:
    ctx.x_dtype, ctx.has_bias = x.dtype, bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _linear_grads(ctx, grad, dense_weight, n_inputs: int, bias_index: int) -> tuple:
    """Gradients of y = x @ W.T + b for an op with n_inputs arguments: x (argument 0) gets
    grad @ W with W = dense_weight() (fp32, built only when needed), bias (argument bias_index)
    gets grad summed over rows; every other argument None."""
    out = [None] * n_inputs
    if ctx.needs_input_grad[0]:
        out[0] = (grad.float() @ dense_weight()).to(ctx.x_dtype)
    if ctx.has_bias and ctx.needs_input_grad[bias_index]:
        out[bias_index] = grad.reshape(-1, grad.shape[-1]).float().sum(0).to(ctx.bias_dtype)
    return tuple(out)


def _int8_setup(ctx, inputs, output):
    x, w, w_scale, bias = inputs[:4]
    ctx.n_inputs = len(inputs)   # w8a8_linear has activations and epilogue too
    ctx.gelu = len(inputs) > 6 and inputs[6] == "gelu"
    if ctx.gelu:   # d gelu(u) / du at the pre-activation u, recomputed from x in backward
        ctx.act = inputs[5]
        ctx.save_for_backward(w, w_scale, x, bias if bias is not None else w_scale.new_empty(0))
    else:
        ctx.save_for_backward(w, w_scale)
    _note_x_bias(ctx, x, bias)


def _int8_backward(ctx, grad):
    if ctx.gelu:
        from slmkern.reference import w8a8_linear as ref_w8a8
        w, w_scale, x, bias = ctx.saved_tensors
        u = ref_w8a8(x.detach(), w, w_scale, bias if ctx.has_bias else None, activations=ctx.act).double()
        cdf = 0.5 * (1.0 + torch.erf(u * 0.5 ** 0.5))
        pdf = torch.exp(-0.5 * u * u) * (2.0 * torch.pi) ** -0.5
        grad = (grad.double() * (cdf + u * pdf)).to(grad.dtype)
    else:
        w, w_scale = ctx.saved_tensors
    return _linear_grads(ctx, grad, lambda: w.float() * w_scale.unsqueeze(1), ctx.n_inputs, 3)


def _int4_setup(ctx, inputs, output):
    x, w, scales, zeros, group_size, bias, _ = inputs
    ctx.save_for_backward(w, scales, zeros)
    ctx.group_size = group_size if group_size > 0 else x.shape[-1]
    _note_x_bias(ctx, x, bias)


def _int4_backward(ctx, grad):
    from slmkern.reference import int4_weight

    w, scales, zeros = ctx.saved_tensors
    return _linear_grads(ctx, grad, lambda: int4_weight(w, scales, zeros, ctx.group_size), 7, 5)


for _op in ("w8a8_linear", "w8a16_linear"):
    torch.library.register_autograd(f"slmkern::{_op}", _int8_backward, setup_context=_int8_setup, lib=LIB)
for _op in ("w4a16_linear", "w4a8_linear"):
    torch.library.register_autograd(f"slmkern::{_op}", _int4_backward, setup_context=_int4_setup, lib=LIB)


# ============================================================================= unstructured (bitmask)
from slmkern.formats import bitmask as bitmask_format  # noqa: E402

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


# ============================================================================= 2:4 semi-structured
# Format: slmkern/formats/sparse24.py. Value facts (meta nibbles c0 < c1, zero padding bits,
# int8 values in [-127, 127], zeros in 0..15) need the data: sparse24_format.validate* checks
# them where the canonical tensors are consumed (the CPU prepack_*, the on-the-fly CPU pack, the
# reference kernel); the fakes and the w_packed fast path check shapes and dtypes only.
from slmkern.formats import sparse24 as sparse24_format  # noqa: E402

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
# ============================================================================= end 2:4


# ============================================================================= attention (ops/attention.py)
from slmkern.ops.attention import attention, attention_ok, check_attention  # noqa: E402,F401
