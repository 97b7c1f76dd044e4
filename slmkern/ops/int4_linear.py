"""w4a16_linear and w4a8_linear: int4 group-quantized weights, float or dynamic int8 activations.

Schema, the shared check (check_int4_linear) and its fast pass, fakes, autograd, wrappers.
"""
from __future__ import annotations

import torch

from slmkern.formats import int4_cpu as int4_cpu_format
from slmkern.formats.common import FLOAT_DTYPES, INT4_GROUP_MULTIPLE, group_size_ok, group_size_rule
from slmkern.ops._lib import LIB, _linear_grads, _note_x_bias, _type, _value, shape_only


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


# ----------------------------------------------------------------------------- autograd (see int8_linear.py)
def _int4_setup(ctx, inputs, output):
    x, w, scales, zeros, group_size, bias, _ = inputs
    ctx.save_for_backward(w, scales, zeros)
    ctx.group_size = group_size if group_size > 0 else x.shape[-1]
    _note_x_bias(ctx, x, bias)


def _int4_backward(ctx, grad):
    from slmkern.reference import int4_weight

    w, scales, zeros = ctx.saved_tensors
    return _linear_grads(ctx, grad, lambda: int4_weight(w, scales, zeros, ctx.group_size), 7, 5)


for _op in ("w4a16_linear", "w4a8_linear"):
    torch.library.register_autograd(f"slmkern::{_op}", _int4_backward, setup_context=_int4_setup, lib=LIB)
