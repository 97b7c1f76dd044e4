"""w8a8_linear and w8a16_linear: int8 weights (per-channel scales), dynamic int8/int7 or float activations.

Schema, the shared check (check_int8_linear) and its fast pass, fakes, autograd, wrappers.
"""
from __future__ import annotations

import torch

from slmkern.formats import int8 as int8_format
from slmkern.formats.common import FLOAT_DTYPES
from slmkern.ops._lib import LIB, _linear_grads, _note_x_bias, _type, _value, shape_only


LIB.define("w8a8_linear(Tensor x, Tensor w, Tensor w_scale, Tensor? bias=None, Tensor? w_packed=None, "
           "str activations='int8', str epilogue='none') -> Tensor")
LIB.define("w8a16_linear(Tensor x, Tensor w, Tensor w_scale, Tensor? bias=None, Tensor? w_packed=None) -> Tensor")


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


# ----------------------------------------------------------------------------- autograd
# The ops are inference kernels, but a model that holds them may still be trained around
# them (adapters, distillation of other layers). Gradients flow to x (and bias) through the
# dequantized weight: exact for the weight-only ops, the straight-through estimate for the
# dynamic-int8 ones. Quantized weights, scales and zero points get no gradient.


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


for _op in ("w8a8_linear", "w8a16_linear"):
    torch.library.register_autograd(f"slmkern::{_op}", _int8_backward, setup_context=_int8_setup, lib=LIB)
