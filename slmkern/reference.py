"""Pure-torch implementation of every slmkern op: the definition of "correct".

Every kernel (C++ on CPU, Triton on CUDA) is tested against these functions on
fresh random data. They run on any device and are the fallback for devices
without a dedicated kernel. Integer parts are exact; float epilogues use the
same fp32 operation order as the kernels (no fused multiply-add), so integer
paths match bit for bit.
"""
from __future__ import annotations

import torch

from slmkern.formats.common import FLOAT_DTYPES

# Rows whose absmax is below this quantize to all-zero with scale 0, which
# keeps 127 / absmax finite. Mirrors kActZeroThreshold in csrc/include/slmkern/common.h.
ACT_ZERO_THRESHOLD = 2.0 ** -100


def quantize_rows_s8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) float -> (q int8 (M, K), scale fp32 (M,)): dynamic per-row symmetric int8.

    amax = max|x|; scale = amax / 127; q = clamp(round_half_even(x * (127 / amax)), -127, 127).
    A row with a NaN or inf gets q = 0 and scale = NaN, so its outputs are NaN.
    A row with amax < 2^-100 (e.g. all zeros) gets q = 0 and scale = 0.
    """
    xf = x.float()
    amax = xf.abs().amax(dim=-1)
    finite = torch.isfinite(amax)
    ok = finite & (amax >= ACT_ZERO_THRESHOLD)
    safe = torch.where(ok, amax, torch.ones_like(amax))
    inv = torch.full_like(amax, 127.0) / safe
    q = torch.round(xf * inv.unsqueeze(-1)).clamp_(-127, 127)
    q = torch.where(ok.unsqueeze(-1), q, torch.zeros_like(q)).to(torch.int8)
    scale = torch.where(ok, safe / 127.0, torch.where(finite, torch.zeros_like(amax),
                                                      torch.full_like(amax, float("nan"))))
    return q, scale


def quantize_rows_u7(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (M, K) float -> (q uint8 (M, K) in [0, 127], scale fp32 (M,), zero int32 (M,)): dynamic per-row
    asymmetric 7-bit, the ``activations="int7"`` scheme of w8a8_linear (FBGEMM's reduce_range).

    lo = min(0, min x), hi = max(0, max x), range = hi - lo; inv = 127 / range;
    zero = clamp(round_half_even(-lo * inv), 0, 127); q = clamp(round_half_even(x * inv) + zero, 0, 127);
    scale = range / 127, each step one fp32 rounding. The integer activation is q - zero, in [-127, 127].
    A row with a NaN or inf (or whose range overflows fp32) gets q = 0, zero = 0, scale = NaN; a row with
    range < 2^-100 (e.g. all zeros) gets q = 0, zero = 0, scale = 0.
    """
    xf = x.float()
    finite = torch.isfinite(xf).all(dim=-1)
    xs = torch.where(torch.isfinite(xf), xf, torch.zeros_like(xf))
    lo = xs.amin(dim=-1).clamp(max=0.0)
    hi = xs.amax(dim=-1).clamp(min=0.0)
    rng = hi - lo
    finite = finite & torch.isfinite(rng)
    ok = finite & (rng >= ACT_ZERO_THRESHOLD)
    safe = torch.where(ok, rng, torch.ones_like(rng))
    inv = torch.full_like(rng, 127.0) / safe
    zero = torch.round(-torch.where(ok, lo, torch.zeros_like(lo)) * inv).clamp_(0, 127)
    q = (torch.round(xf * inv.unsqueeze(-1)) + zero.unsqueeze(-1)).clamp_(0, 127)
    q = torch.where(ok.unsqueeze(-1), q, torch.zeros_like(q)).to(torch.uint8)
    scale = torch.where(ok, safe / 127.0, torch.where(finite, torch.zeros_like(rng),
                                                      torch.full_like(rng, float("nan"))))
    return q, scale, torch.where(ok, zero, torch.zeros_like(zero)).to(torch.int32)


def quantize_activations(x: torch.Tensor, activations: str = "int8") -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> (int8 activations (M, K) in [-127, 127], scale (M,)) under w8a8_linear's scheme:
    "int8" = quantize_rows_s8; "int7" = q - zero from quantize_rows_u7."""
    if activations == "int7":
        q, scale, zero = quantize_rows_u7(x)
        return (q.to(torch.int16) - zero.to(torch.int16).unsqueeze(-1)).to(torch.int8), scale
    return quantize_rows_s8(x)


# GELU of the "gelu" epilogue: 0.5 v (1 + erf(v / sqrt 2)) with erf from Abramowitz & Stegun 7.1.26
# (|error| < 1.5e-7) and exp from a Cody-Waite reduction plus a degree-7 polynomial. Every step below is
# one fp32 operation, rounded once, in this order; the C++ kernels (gelu8 / gelu_ref) do the same ones,
# so the fused epilogue is bit-exact with this function. Within 2e-7 * |v| + 1e-7 of torch's exact GELU
# (tests/test_w8a8.py::test_gelu_epilogue_close_to_torch).
_GELU_C = dict(rsqrt2=0.70710677, p=0.3275911, a1=0.254829592, a2=-0.284496736, a3=1.421413741,
               a4=-1.453152027, a5=1.061405429, log2e=1.44269504, ln2_hi=0.693359375, ln2_lo=-2.12194440e-4,
               e0=1.9875691500e-4, e1=1.3981999507e-3, e2=8.3334519073e-3, e3=4.1665795894e-2,
               e4=1.6666665459e-1, e5=5.0000001201e-1, lo=-87.0)


_GELU_T = {k: torch.tensor(x, dtype=torch.float32) for k, x in _GELU_C.items()}   # 0-d: scalars on any device


def gelu_epilogue(v: torch.Tensor) -> torch.Tensor:
    """fp32 v -> GELU(v) in fp32, the "gelu" epilogue of w8a8_linear (see _GELU_C)."""
    c = _GELU_T
    v = v.float()
    z = v * c["rsqrt2"]
    a = z.abs()
    t = torch.div(torch.ones_like(a), (a * c["p"]) + 1.0)
    p = t * c["a5"]
    for k in ("a4", "a3", "a2", "a1"):
        p = (p + c[k]) * t
    s = torch.clamp(-(a * a), min=_GELU_C["lo"])          # exp(s), s in [-87, 0]
    n = torch.round(s * c["log2e"])
    r = s - n * c["ln2_hi"]
    r = r - n * c["ln2_lo"]
    e = r * c["e0"]
    for k in ("e1", "e2", "e3", "e4", "e5"):
        e = (e + c[k]) * r
    e = (e * r + r) + 1.0                                   # 1 + r + r^2 (e5 + r (e4 + ...))
    scale = ((n.to(torch.int32) + 127) << 23).view(torch.float32)
    erfc = p * (e * scale)
    h = torch.where(z < 0, erfc, 2.0 - erfc)               # 1 + erf(z)
    return (v * 0.5) * h


def _int_matmul_exact(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (M, K) int8 @ b (N, K).T int8 -> int32 (M, N), exact (float64 holds every partial sum)."""
    return (a.double() @ b.double().T).to(torch.int32)


def _epilogue(acc_f32: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = acc_f32 * scale
    if bias is not None:
        y = y + bias.float()
    return y


def w8a8_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None = None, w_packed: torch.Tensor | None = None,
                activations: str = "int8", epilogue: str = "none") -> torch.Tensor:
    """x (..., K) f32/bf16/f16, w (N, K) int8, w_scale (N,) f32 -> (..., N) in x.dtype.

    Dynamic per-token int8 activations, int32 accumulation, per-channel dequant:
    y = float(qx @ w.T) * (sx * w_scale) + bias, with qx, sx = quantize_activations(x, activations)
    ("int8": symmetric, "int7": asymmetric 7-bit); epilogue "gelu": y = gelu_epilogue(y) before the
    cast to x.dtype. w_packed (a CPU layout) is ignored.
    """
    K, N = x.shape[-1], w.shape[0]
    x2 = x.reshape(-1, K)
    q, sx = quantize_activations(x2, activations)
    acc = _int_matmul_exact(q, w).float()
    y = _epilogue(acc, sx.unsqueeze(1) * w_scale.float().unsqueeze(0), bias)
    if epilogue == "gelu":
        y = gelu_epilogue(y)
    return y.to(x.dtype).reshape(*x.shape[:-1], N)


def w8a16_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                 bias: torch.Tensor | None = None, w_packed: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) f32/bf16/f16, w (N, K) int8, w_scale (N,) f32 -> (..., N) in x.dtype.

    Weight-only int8: y = (x @ float(w).T) * w_scale + bias, accumulated in fp32.
    """
    K, N = x.shape[-1], w.shape[0]
    x2 = x.reshape(-1, K).float()
    acc = x2 @ w.float().T
    y = _epilogue(acc, w_scale.float().unsqueeze(0), bias)
    return y.to(x.dtype).reshape(*x.shape[:-1], N)


# ----------------------------------------------------------------------------- int4 (W4A16, W4A8)
from slmkern.formats import int4 as _int4  # noqa: E402  (pure torch, no cycle)


def _check_x(op: str, x) -> int:
    """x (..., K) in FLOAT_DTYPES; returns K."""
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: x must be a float32/bfloat16/float16 tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have shape (..., K), got a 0-d tensor")
    return x.shape[-1]


def _check_bias(op: str, x: torch.Tensor, bias, N: int) -> None:
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor) or bias.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"{op}: bias must be {x.dtype} or torch.float32, got {getattr(bias, 'dtype', type(bias))}")
    if bias.dim() != 1 or bias.shape[0] != N:
        raise ValueError(f"{op}: bias must have shape (N,) = ({N},), got {tuple(bias.shape)}")


def _check_int4_linear(op: str, x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor,
                       zeros: torch.Tensor | None, group_size: int, bias: torch.Tensor | None):
    K = _check_x(op, x)
    if isinstance(w, torch.Tensor) and w.dim() == 2 and 2 * w.shape[1] != K:
        raise ValueError(f"{op}: w must have shape (N, K/2) = (N, {K / 2:g}) for x with K={K}, "
                         f"got {tuple(w.shape)}")
    if zeros is not None and zeros.dtype == torch.float32:
        # float zero points (HQQ-style) are an op-level extension of the canonical uint8 ones
        N, K, g = _int4.check(w, scales, None, group_size)
        if zeros.shape != scales.shape:
            raise ValueError(f"{op}: zeros must have the shape of scales {tuple(scales.shape)}, "
                             f"got {tuple(zeros.shape)}")
    else:
        N, K, g = _int4.check(w, scales, zeros, group_size)
    _check_bias(op, x, bias, N)
    return N, K, g


def int4_weight(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, g: int) -> torch.Tensor:
    """Dequantized fp32 [N, K] weight of an int4 op's arguments: canonical codes w uint8 [N, K/2]
    (slmkern.formats.int4), uint8, float32 or no zero points."""
    if zeros is not None and zeros.dtype == torch.float32:
        N, K = w.shape[0], 2 * w.shape[1]
        codes = _int4.unpack(w).float().reshape(N, K // g, g)
        return ((codes - zeros.unsqueeze(-1)) * scales.unsqueeze(-1)).reshape(N, K)
    return _int4.dequantize(w, scales, zeros, g)


def w4a16_linear(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor,
                 zeros: torch.Tensor | None, group_size: int,
                 bias: torch.Tensor | None = None, w_packed: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) f32/bf16/f16, w (N, K/2) uint8, scales (N, K/g) f32, zeros (N, K/g) uint8? -> (..., N) x.dtype.

    Weight-only int4 (format: slmkern.formats.int4; w holds the canonical codes): W = (code - z) *
    scale in fp32 (z = zeros, or 8 when zeros is None), then y = x @ W.T + bias accumulated in fp32.
    Kernels match it within fp32 accumulation-order tolerance. w_packed (the CPU blob) is ignored.
    """
    N, K, g = _check_int4_linear("w4a16_linear", x, w, scales, zeros, group_size, bias)
    W = int4_weight(w, scales, zeros, g)
    y = x.reshape(-1, K).float() @ W.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], N)


def w4a8_linear(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor,
                zeros: torch.Tensor | None, group_size: int,
                bias: torch.Tensor | None = None, w_packed: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) f32/bf16/f16, w (N, K/2) uint8, scales (N, K/g) f32, zeros (N, K/g) uint8? -> (..., N) x.dtype.

    Dynamic per-row int8 activations (``qx, sx = quantize_rows_s8(x)``), then for each
    group i (k in [i*g, (i+1)*g)) an exact int32 partial

        acc_i[m, n] = sum_k qx[m, k] * code[n, k]  -  z[n, i] * sum_k qx[m, k]

    (the zero point is applied through the per-group activation sum; z = 8 when
    zeros is None), and the fp32 epilogue, in exactly this order, each step a
    separate fp32 multiply or add (no FMA):

        y = 0;  for i = 0, 1, ..., K/g - 1:  y = y + float(acc_i) * scales[n, i]
        y = y * sx[m];  y = y + bias[n]

    Integer parts are exact; a CPU kernel following this order is bit-exact.
    Rows with NaN/inf give NaN outputs; all-zero rows give bias.

    float32 zeros (HQQ-style, not integers) cannot enter the int32 partial; then
    y = sx * sum_i (scales[n,i] * dot_i - scales[n,i] * z[n,i] * xsum_i) + bias, in float64
    (dot_i = sum_k qx*code exact, xsum_i = sum_k qx), rounded once to fp32.
    w holds the canonical codes (slmkern.formats.int4); w_packed (the CPU blob) is ignored.
    """
    N, K, g = _check_int4_linear("w4a8_linear", x, w, scales, zeros, group_size, bias)
    G = K // g
    qx, sx = quantize_rows_s8(x.reshape(-1, K))
    if zeros is not None and zeros.dtype == torch.float32:
        M = qx.shape[0]
        qg = qx.reshape(M, G, g).double()
        cg = _int4.unpack(w).reshape(N, G, g).double()
        dots = torch.einsum("mgk,ngk->mng", qg, cg)
        xsum = qg.sum(dim=-1).unsqueeze(1)                            # (M, 1, G)
        s64, z64 = scales.double().unsqueeze(0), zeros.double().unsqueeze(0)
        y = ((s64 * dots - s64 * z64 * xsum).sum(-1) * sx.double().unsqueeze(1)).float()
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], N)
    M = qx.shape[0]
    qg = qx.reshape(M, G, g).double()
    cg = _int4.unpack(w).reshape(N, G, g).double()
    z = _int4.zero_tensor(scales, zeros).double()                  # (N, G) small integers
    dots = torch.einsum("mgk,ngk->gmn", qg, cg)                      # exact: |partial| < 2^53
    xsum = qg.sum(dim=-1)                                            # (M, G)
    acc = (dots - xsum.T.unsqueeze(2) * z.T.unsqueeze(1)).to(torch.int32)   # (G, M, N)
    y = torch.zeros(M, N, dtype=torch.float32, device=x.device)
    for i in range(G):
        y = y + acc[i].float() * scales[:, i].unsqueeze(0)
    y = y * sx.unsqueeze(1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], N)


# ============================================================================= unstructured (bitmask)
from slmkern.formats import bitmask as _bitmask  # noqa: E402  (pure torch, no cycle)


def sparse_linear(x: torch.Tensor, values: torch.Tensor, bitmask: torch.Tensor, row_offsets: torch.Tensor,
                  scales: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                  w_packed: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) f32/bf16/f16, values [nnz] float or int8, bitmask (N, ceil(K/8)) uint8,
    row_offsets (N+1,) int64, scales (N,) f32 (int8 values only), bias (N,)? -> (..., N) x.dtype.

    Decompress (slmkern.formats.bitmask), then the dense spec:
    float values: y = x.float() @ W.float().T + bias (fp32 accumulation);
    int8 values : y = w8a8_linear(x, W_int8, scales, bias), bit for bit. w_packed is ignored.
    """
    K = x.shape[-1]
    W = _bitmask.decompress(values, bitmask, row_offsets, K)
    if values.dtype == torch.int8:
        return w8a8_linear(x, W, scales, bias)
    N = W.shape[0]
    y = x.reshape(-1, K).float() @ W.float().T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], N)


# ============================================================================= 2:4 semi-structured
# sparse24_linear / sparse24_w4a16_linear: decompress (slmkern.formats.sparse24), then the dense spec.

def sparse24_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                    scales: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                    w_packed: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) f32/bf16/f16, values (N, K/2) float or int8, meta uint8 (N, ceil(K/8)), scales (N,)? -> (..., N).

    Float values: y = x.float() @ W.float().T + bias (fp32). int8 values: exactly
    w8a8_linear(x, W_int8, scales, bias) on the decompressed int8 weight. w_packed is ignored.
    """
    from slmkern.formats import sparse24 as _s24

    w = _s24.decompress(values, meta)
    if values.dtype == torch.int8:
        return w8a8_linear(x, w, scales, bias)
    K, N = x.shape[-1], w.shape[0]
    y = x.reshape(-1, K).float() @ w.float().T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], N)


def sparse24_w4a16_linear(x: torch.Tensor, qvalues: torch.Tensor, meta: torch.Tensor, scales: torch.Tensor,
                          zeros: torch.Tensor | None, group_size: int, bias: torch.Tensor | None = None,
                          w_packed: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) f32/bf16/f16, qvalues uint8 (N, K/4), meta, scales (N, K/g) f32, zeros (N, K/g) uint8? -> (..., N).

    y = x.float() @ W.T + bias with W = (code - zero) * scale at kept positions, 0 elsewhere (fp32).
    w_packed (the CPU blob) is ignored.
    """
    from slmkern.formats import sparse24 as _s24

    op = "sparse24_w4a16_linear"
    K = _check_x(op, x)
    N, Kq, _ = _s24.validate_int4(qvalues, meta, scales, zeros, group_size, data=False)
    if Kq != K:
        raise ValueError(f"{op}: qvalues must have shape (N, K/4) = (N, {K / 4:g}) for x with K={K}, "
                         f"got {tuple(qvalues.shape)}")
    _check_bias(op, x, bias, N)
    w = _s24.decompress_int4(qvalues, meta, scales, zeros, group_size)
    y = x.reshape(-1, K).float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], N)
# ============================================================================= end 2:4


# ----------------------------------------------------------------------------- attention
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              scale: float | None = None, is_causal: bool = False) -> torch.Tensor:
    """slmkern::attention's spec (slmkern/ops/attention.py): fp32 softmax(scale q k^T + mask) v, a query
    row with every key masked gives 0, grouped-query heads; returns (B, L, Hq, D) in q's dtype."""
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    qf, kf, vf = q.float(), k.float(), v.float()
    if Hkv != Hq:
        kf, vf = kf.repeat_interleave(Hq // Hkv, dim=1), vf.repeat_interleave(Hq // Hkv, dim=1)
    s = (qf @ kf.transpose(-1, -2)) * (D ** -0.5 if scale is None else scale)
    if is_causal:
        keep = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    elif mask is not None:
        # a bool mask is added as 0 / -inf, as sdpa's math path does (a NaN score stays NaN either way)
        s = s + (torch.zeros(mask.shape, device=q.device).masked_fill(~mask, float("-inf"))
                 if mask.dtype == torch.bool else mask.float())
    dead = torch.isneginf(s).all(-1, keepdim=True)         # every key masked: 0, as torch's sdpa
    p = torch.softmax(s.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    return (p @ vf).transpose(1, 2).contiguous().to(q.dtype)
