"""slmkern::attention: scaled dot-product attention for inference, heads-last output.

    attention(q, k, v, mask=None, scale=None, is_causal=False) -> out

- q (B, Hq, L, D), k and v (B, Hkv, S, D), one float dtype (float32/bfloat16/float16), any strides,
  Hq a multiple of Hkv (grouped-query heads: query head h reads key/value head h // (Hq // Hkv)).
- mask: None, bool (True = takes part, as torch's sdpa) or additive float (q's dtype or float32),
  broadcastable to (B, Hq, L, S). A query row whose every key is masked gives 0 (torch's convention).
- scale: None means 1 / sqrt(D). is_causal: key j visible to query i iff j <= i (top-left, as sdpa);
  not together with a mask.
- out: (B, L, Hq, D) contiguous, q's dtype: the layout the output projection reads, so no transpose
  copy follows (``out.transpose(1, 2)`` is sdpa's (B, Hq, L, D)). Computed in fp32.

The CPU kernel (csrc/x86/attention_avx2.cpp, scalar csrc/ref/attention_ref.cpp) exists for short rows
of small heads (encoders at seq 128, head dim 32), where torch's flash kernel runs at a third of the
FMA peak. CUDA runs torch's sdpa. Autograd recomputes slmkern.reference.attention.
"""
from __future__ import annotations

import math

import torch

from slmkern.formats.common import FLOAT_DTYPES
from slmkern.ops._lib import LIB, _type, _value

LIB.define("attention(Tensor q, Tensor k, Tensor v, Tensor? mask=None, float? scale=None, "
           "bool is_causal=False) -> Tensor")

OP = "attention"


def check_attention(q, k, v, mask=None, scale=None, is_causal=False) -> tuple[int, int, int, int, int, int]:
    """Every fact of the contract above; returns (B, Hq, Hkv, L, S, D)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _type(isinstance(t, torch.Tensor) and t.dtype in FLOAT_DTYPES,
              f"{OP}: {name} must be a float32/bfloat16/float16 tensor, got {getattr(t, 'dtype', type(t))}")
        _value(t.dim() == 4, f"{OP}: {name} must have 4 dims ({'B, Hq, L, D' if name == 'q' else 'B, Hkv, S, D'}), "
               f"got shape {tuple(t.shape)}")
    _type(k.dtype == q.dtype and v.dtype == q.dtype,
          f"{OP}: q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, Hq, L, D = q.shape
    _, Hkv, S, _ = k.shape
    _value(k.shape[0] == B and v.shape[0] == B,
           f"{OP}: q, k and v must have the same batch B={B}, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    _value(D > 0 and k.shape[3] == D and v.shape[3] == D,
           f"{OP}: q, k and v must share a head dim D > 0, got q {tuple(q.shape)}, k {tuple(k.shape)}, "
           f"v {tuple(v.shape)}")
    _value(v.shape[1] == Hkv and v.shape[2] == S,
           f"{OP}: v must have the shape of k (B, Hkv, S, D) = {tuple(k.shape)}, got {tuple(v.shape)}")
    _value(S > 0, f"{OP}: k and v need at least one key (S > 0), got S=0")
    _value(Hkv > 0 and Hq > 0 and Hq % Hkv == 0,
           f"{OP}: q's heads Hq={Hq} must be a positive multiple of k/v's heads Hkv={Hkv}")
    _value(q.device == k.device and v.device == k.device,
           f"{OP}: q ({q.device}), k ({k.device}) and v ({v.device}) must be on one device")
    _type(scale is None or (isinstance(scale, (int, float)) and not isinstance(scale, bool)),
          f"{OP}: scale must be None or a float, got {type(scale).__name__}")
    _value(scale is None or math.isfinite(scale), f"{OP}: scale must be finite, got {scale}")
    _type(isinstance(is_causal, bool), f"{OP}: is_causal must be a bool, got {type(is_causal).__name__}")
    if mask is not None:
        _type(isinstance(mask, torch.Tensor) and mask.dtype in (torch.bool, q.dtype, torch.float32),
              f"{OP}: mask must be None, bool (True = attend) or additive {q.dtype}/float32, "
              f"got {getattr(mask, 'dtype', type(mask))}")
        _value(not is_causal, f"{OP}: pass either mask or is_causal=True, not both")
        _value(mask.device == q.device, f"{OP}: mask is on {mask.device} but q is on {q.device}")
        ok = 1 <= mask.dim() <= 4
        if ok:
            try:
                ok = torch.broadcast_shapes(tuple(mask.shape), (B, Hq, L, S)) == (B, Hq, L, S)
            except RuntimeError:
                ok = False
        _value(ok, f"{OP}: mask must broadcast to (B, Hq, L, S) = {(B, Hq, L, S)}, got {tuple(mask.shape)}")
    return B, Hq, Hkv, L, S, D


def attention_ok(q, k, v, mask, scale, is_causal) -> bool:
    """Fast pass of check_attention for the common call (4-D CPU tensors, no odd types); False: not sure."""
    try:
        if not (q.dtype in FLOAT_DTYPES and k.dtype is q.dtype and v.dtype is q.dtype
                and q.dim() == 4 and k.dim() == 4 and k.shape == v.shape):
            return False
        B, Hq, L, D = q.shape
        _, Hkv, S, Dk = k.shape
        if k.shape[0] != B or Dk != D or D <= 0 or S <= 0 or Hkv <= 0 or Hq % Hkv:
            return False
        if not (q.is_cpu and k.is_cpu and v.is_cpu) or type(is_causal) is not bool:
            return False
        if scale is not None and (type(scale) is not float or not math.isfinite(scale)):
            return False
        if mask is not None:
            if is_causal or not mask.is_cpu or mask.dtype not in (torch.bool, q.dtype, torch.float32):
                return False
            if mask.dim() != 4 or any(m != 1 and m != t for m, t in zip(mask.shape, (B, Hq, L, S))):
                return False
        return True
    except Exception:  # anything unexpected: the full check explains it
        return False


def _fake(q, k, v, mask=None, scale=None, is_causal=False):
    B, Hq, _, L, _, D = check_attention(q, k, v, mask, scale, is_causal)
    return q.new_empty((B, L, Hq, D))


torch.library.register_fake("slmkern::attention", _fake, lib=LIB)


def _setup(ctx, inputs, output):
    q, k, v, mask, scale, is_causal = inputs
    ctx.save_for_backward(q, k, v, mask)
    ctx.scale, ctx.is_causal = scale, is_causal


def _backward(ctx, grad):
    from slmkern import reference

    q, k, v, mask = ctx.saved_tensors
    with torch.enable_grad():
        ins = [t.detach().requires_grad_(n) for t, n in zip((q, k, v), ctx.needs_input_grad[:3])]
        out = reference.attention(*ins, mask, ctx.scale, ctx.is_causal)
        want = [t for t in ins if t.requires_grad]
        got = iter(torch.autograd.grad(out, want, grad) if want else ())
    grads = [next(got) if n else None for n in ctx.needs_input_grad[:3]]
    return (*grads, None, None, None)


torch.library.register_autograd("slmkern::attention", _backward, setup_context=_setup, lib=LIB)


def attention(q, k, v, mask=None, scale=None, is_causal=False):
    """q (B, Hq, L, D), k/v (B, Hkv, S, D), mask bool/additive broadcastable to (B, Hq, L, S) -> (B, L, Hq, D).

    Inference attention with a heads-last output (see slmkern.ops.attention's module docstring).
    """
    return torch.ops.slmkern.attention(q, k, v, mask, scale, is_causal)
