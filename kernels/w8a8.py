"""w8a8_linear: x (M, K) f32/bf16/f16, w (N, K) int8, w_scale (N,) f32, bias (N,) f32/x.dtype? -> (M, N) x.dtype.

Dynamic per-row symmetric int8 activations, an int8 x int8 -> int32 tl.dot, per-channel dequant:
y[m, n] = float(sum_k qx[m, k] * w[n, k]) * (sx[m] * w_scale[n]) + bias[n].
Bit-exact with slmkern.reference.w8a8_linear: the quantizer uses IEEE division (div_rn) and rounds
half to even with a truncating convert and compares, the epilogue rounds the product before adding
the bias (so no compiler FMA contraction can change a result), and outputs round to nearest even.

Two paths, chosen by M:
- M == 1 (decode): `_w8a8_gemv_kernel`, one program per BLOCK_N outputs, quantizes the row itself
  (x is K floats, re-read from L2 by each program) and reduces int32 products on the CUDA cores;
  one launch, weight bytes dominate.
- M >= 2: `_quantize_rows_s8_kernel` writes qx (M, K) int8 + sx (M,) once, then `_w8a8_kernel`
  runs a tiled int8 tensor-core GEMM with autotuned tiles per M bucket.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from slmkern.reference import ACT_ZERO_THRESHOLD

from ._util import INTERPRET, cast_out, grouped_tile, launch, m_bucket, prune_to_bucket, tiled_configs

_INF = tl.constexpr(float("inf"))
_ZERO_THRESHOLD = tl.constexpr(ACT_ZERO_THRESHOLD)  # 2^-100, exact in fp32


@triton.jit
def _nan_to_inf_abs(xf):
    """|x| with NaN mapped to +inf, so a max over it is +inf exactly when the row is non-finite."""
    a = tl.abs(xf)
    return tl.where(a != a, _INF, a)


@triton.jit
def _row_quant_params(amax):
    """amax (fp32, NaN already mapped to inf) -> (inv, scale, ok) as reference.quantize_rows_s8."""
    finite = amax < _INF
    ok = finite & (amax >= _ZERO_THRESHOLD)
    safe = tl.where(ok, amax, 1.0)
    # IEEE division: Triton's `/` on fp32 may lower to an approximate divide.
    inv = tl.math.div_rn(tl.full(safe.shape, 127.0, tl.float32), safe)
    scale = tl.math.div_rn(safe, tl.full(safe.shape, 127.0, tl.float32))
    # not finite -> NaN, written as inf - inf: a NaN global constexpr never compares equal to itself,
    # which makes Triton's cache check reject the compiled kernel ("global variable _NAN has changed").
    scale = tl.where(ok, scale, tl.where(finite, 0.0, amax - amax))
    return inv, scale, ok


@triton.jit
def _round_half_even_i32(v):
    """fp32 -> int32, round half to even (|v| < 2^30).

    Uses a truncating convert and compares only: an fp add on v = x * inv could be contracted
    with that multiply into an FMA (which skips the product's rounding) and break exactness.
    """
    t = v.to(tl.int32)  # toward zero
    tf = t.to(tl.float32)
    odd = (t & 1) != 0
    up = (v > tf + 0.5) | ((v == tf + 0.5) & odd)
    down = (v < tf - 0.5) | ((v == tf - 0.5) & odd)
    return t + up.to(tl.int32) - down.to(tl.int32)


@triton.jit
def _quantize(xf, inv, ok):
    """xf fp32, inv/ok broadcastable to xf -> int32 in [-127, 127] (0 where the row is not ok)."""
    v = tl.where(ok, xf * inv, 0.0)
    q = _round_half_even_i32(v)
    return tl.minimum(tl.maximum(q, -127), 127)


@triton.jit
def _dequant_epilogue(acc_i32, sx, ws, bias, HAS_BIAS: tl.constexpr):
    """float(acc) * (sx * ws) [+ bias], each op rounded separately in fp32 like the reference."""
    t = sx * ws
    accf = acc_i32.to(tl.float32)
    if HAS_BIAS:
        # fma(a, b, +0) is the rounded product (only a -0 product turns +0), and adding the bias
        # to it cannot be contracted into one FMA. Differs from the reference only for bias -0.0.
        y = tl.fma(accf, t, 0.0) + bias
    else:
        y = accf * t
    return y


# --------------------------------------------------------------------------------------------
# M == 1: fused quantize + GEMV
# --------------------------------------------------------------------------------------------

def _gemv_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 64}, num_warps=4)]
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bn, bk, w, s in ((16, 512, 4, 3), (32, 512, 4, 3), (64, 256, 4, 3), (16, 1024, 8, 3))
    ]


@triton.autotune(configs=_gemv_configs(), key=["M_BUCKET", "N", "K"])
@triton.jit
def _w8a8_gemv_kernel(x_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, N, K, stride_xm, stride_ym, M_BUCKET,
                      HAS_BIAS: tl.constexpr, X_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    x_row = x_ptr + row * stride_xm

    # Pass 1: the row's absmax. Every program recomputes it (K floats from L2 cost less than a
    # second launch); X_BLOCK covers the whole row in one step up to K = 4096.
    offs_x = tl.arange(0, X_BLOCK)
    amax_vec = tl.zeros([X_BLOCK], dtype=tl.float32)
    for k0 in range(0, K, X_BLOCK):
        kx = k0 + offs_x
        xf = tl.load(x_row + kx, mask=kx < K, other=0.0).to(tl.float32)
        amax_vec = tl.maximum(amax_vec, _nan_to_inf_abs(xf))
    inv, sx, ok = _row_quant_params(tl.max(amax_vec, axis=0))

    # Pass 2: quantize a chunk of x, multiply with a (BLOCK_N, BLOCK_K) weight tile, reduce along K.
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
    acc = tl.zeros([BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_mask = kk < K
        xf = tl.load(x_row + kk, mask=k_mask, other=0.0).to(tl.float32)
        q = _quantize(xf, inv, ok)
        wt = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0)
        acc += tl.sum(wt.to(tl.int32) * q[None, :], axis=1)
        w_ptrs += BLOCK_K

    ws = tl.load(ws_ptr + offs_n, mask=n_mask, other=0.0)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    y = _dequant_epilogue(acc, sx, ws, bias, HAS_BIAS)
    tl.store(y_ptr + row * stride_ym + offs_n, cast_out(y, y_ptr.dtype.element_ty), mask=n_mask)


# --------------------------------------------------------------------------------------------
# M >= 2: quantize rows once, then a tiled int8 GEMM
# --------------------------------------------------------------------------------------------

@triton.jit
def _quantize_rows_s8_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    x_row = x_ptr + row * stride_xm
    amax_vec = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        xf = tl.load(x_row + kk, mask=kk < K, other=0.0).to(tl.float32)
        amax_vec = tl.maximum(amax_vec, _nan_to_inf_abs(xf))
    inv, sx, ok = _row_quant_params(tl.max(amax_vec, axis=0))
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        xf = tl.load(x_row + kk, mask=kk < K, other=0.0).to(tl.float32)
        tl.store(q_ptr + row * K + kk, _quantize(xf, inv, ok).to(tl.int8), mask=kk < K)
    tl.store(s_ptr + row, sx)


@triton.jit
def _quantize_rows_u7_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, BLOCK_K: tl.constexpr):
    """activations="int7": writes q - zero (int8, in [-127, 127]) and the row scale, as
    reference.quantize_activations(x, "int7"); the int8 GEMM below then serves both schemes."""
    row = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    x_row = x_ptr + row * stride_xm
    lo_vec = tl.zeros([BLOCK_K], dtype=tl.float32)
    hi_vec = tl.zeros([BLOCK_K], dtype=tl.float32)
    bad_vec = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        xf = tl.load(x_row + kk, mask=kk < K, other=0.0).to(tl.float32)
        a = _nan_to_inf_abs(xf)
        bad_vec = tl.maximum(bad_vec, tl.where(a < _INF, 0.0, 1.0))
        fin = tl.where(a < _INF, xf, 0.0)
        lo_vec = tl.minimum(lo_vec, fin)
        hi_vec = tl.maximum(hi_vec, fin)
    lo = tl.min(lo_vec, axis=0)
    rng = tl.max(hi_vec, axis=0) - lo
    finite = (tl.max(bad_vec, axis=0) == 0.0) & (rng < _INF)
    ok = finite & (rng >= _ZERO_THRESHOLD)
    safe = tl.where(ok, rng, 1.0)
    inv = tl.math.div_rn(tl.full(safe.shape, 127.0, tl.float32), safe)
    sx = tl.math.div_rn(safe, tl.full(safe.shape, 127.0, tl.float32))
    t = tl.where(finite, 0.0, _INF)
    sx = tl.where(ok, sx, tl.where(finite, 0.0, t - t))  # inf - inf: NaN (see _row_quant_params)
    zero = tl.minimum(tl.maximum(_round_half_even_i32(tl.where(ok, -lo * inv, 0.0)), 0), 127)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        xf = tl.load(x_row + kk, mask=kk < K, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(_round_half_even_i32(tl.where(ok, xf * inv, 0.0)) + zero, 0), 127)
        tl.store(q_ptr + row * K + kk, tl.where(ok, q - zero, 0).to(tl.int8), mask=kk < K)
    tl.store(s_ptr + row, sx)


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per M bucket; int8 tl.dot needs BLOCK_K >= 32.
_GEMM_TILES = {
    16: ((16, 32, 128, 4, 4), (16, 64, 128, 4, 4), (16, 64, 256, 4, 3), (16, 128, 128, 4, 4)),
    64: ((32, 64, 128, 4, 4), (64, 64, 128, 4, 4), (32, 128, 128, 4, 4), (64, 128, 128, 4, 3)),
    256: ((64, 128, 128, 4, 3), (128, 128, 128, 8, 3), (64, 256, 128, 8, 3), (128, 64, 128, 4, 4)),
    1024: ((128, 128, 128, 8, 3), (128, 256, 128, 8, 3), (64, 128, 128, 4, 4), (128, 128, 64, 4, 4)),
}


# Interpreter: one small tile; GROUP_M=4 so the tests' M=65 (5 row tiles) covers a partial group.
_GEMM_CONFIGS = tiled_configs(_GEMM_TILES, interpret_tile=(16, 32, 32, 4, 1), group_m=4 if INTERPRET else 8)


@triton.autotune(configs=_GEMM_CONFIGS, key=["M_BUCKET", "N", "K"],
                 prune_configs_by={"early_config_prune": prune_to_bucket(_GEMM_TILES)})
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def _w8a8_kernel(q_ptr, sx_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, M, N, K, stride_ym, M_BUCKET,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr):
    # Grouped tile order: GROUP_M row-tiles sweep the N tiles together, so weight tiles are reused from L2.
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    a_ptrs = q_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :]
    b_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * K + offs_k[:, None]  # (BLOCK_K, BLOCK_N) view of w.T

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=m_mask[:, None], other=0)
            b = tl.load(b_ptrs, mask=n_mask[None, :], other=0)
        else:
            k_mask = (k0 + offs_k) < K
            a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0)
            b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)  # int8 x int8 -> int32: exact
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    sx = tl.load(sx_ptr + offs_m, mask=m_mask, other=0.0)
    ws = tl.load(ws_ptr + offs_n, mask=n_mask, other=0.0)
    bias = tl.zeros([1, BLOCK_N], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y = _dequant_epilogue(acc, sx[:, None], ws[None, :], bias, HAS_BIAS)
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, cast_out(y, y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------

def _row_block(K: int) -> int:
    """Block for a pass over one row of x: the whole row up to 4096 (64 in the interpreter, so the
    tests' K = 130 takes several steps)."""
    return max(16, min(triton.next_power_of_2(K), 64 if INTERPRET else 4096))


def _quantize_rows(kernel, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One program per row of x (M, K) (unit inner stride): int8 codes (M, K) and fp32 scales (M,)."""
    M, K = x.shape
    q = torch.empty((M, K), dtype=torch.int8, device=x.device)
    sx = torch.empty((M,), dtype=torch.float32, device=x.device)
    if M > 0:
        block_k = _row_block(K)
        launch(kernel)[(M,)](x, q, sx, K, x.stride(0), BLOCK_K=block_k,
                             num_warps=8 if block_k >= 2048 else 4 if block_k >= 512 else 2)
    return q, sx


def quantize_rows_s8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) float rows (unit inner stride) -> (q int8 (M, K), scale fp32 (M,)), as reference.quantize_rows_s8."""
    return _quantize_rows(_quantize_rows_s8_kernel, x)


def quantize_rows_u7(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) float rows (unit inner stride) -> (q - zero int8 (M, K), scale fp32 (M,)), as
    reference.quantize_activations(x, "int7")."""
    return _quantize_rows(_quantize_rows_u7_kernel, x)


def _gemv(x, w, w_scale, bias, y):
    M, K = x.shape
    N = w.shape[0]

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), M)

    launch(_w8a8_gemv_kernel)[grid](x, w, w_scale, bias if bias is not None else w_scale, y, N, K,
                                    x.stride(0), y.stride(0), m_bucket(M), HAS_BIAS=bias is not None,
                                    X_BLOCK=_row_block(K))


def _gemm(q, sx, w, w_scale, bias, y):
    M, K = q.shape
    N = w.shape[0]

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    launch(_w8a8_kernel)[grid](q, sx, w, w_scale, bias if bias is not None else w_scale, y, M, N, K,
                               y.stride(0), m_bucket(M), HAS_BIAS=bias is not None)


def w8a8_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None = None, activations: str = "int8") -> torch.Tensor:
    """x (M, K) f32/bf16/f16 with unit inner stride, w (N, K) int8 contiguous, w_scale (N,) f32
    contiguous, bias (N,) contiguous or None -> (M, N) x.dtype. Inputs are validated by the caller.
    activations "int7": rows quantized by quantize_rows_u7, then the same int8 GEMM (no fused GEMV)."""
    M, K = x.shape
    N = w.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    if activations == "int7":
        q, sx = quantize_rows_u7(x)
        _gemm(q, sx, w, w_scale, bias, y)
    elif M == 1:
        _gemv(x, w, w_scale, bias, y)
    else:
        q, sx = quantize_rows_s8(x)
        _gemm(q, sx, w, w_scale, bias, y)
    return y
