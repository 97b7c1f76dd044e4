"""w8a16_linear: x (M, K) f32/bf16/f16, w (N, K) int8, w_scale (N,) f32, bias (N,) f32/x.dtype? -> (M, N) x.dtype.

Weight-only int8: y[m, n] = (sum_k x[m, k] * float(w[n, k])) * w_scale[n] + bias[n], fp32 accumulation.
int8 values are exact in bf16/fp16, so weight tiles are dequantized in registers to x's dtype and fed
to a 16-bit tensor-core tl.dot (fp32 inputs use tf32x3, ~fp32 accurate; its hi/lo split turns an
infinite x into NaN where the reference gives inf); the per-channel scale is applied once in the
epilogue instead of per element.

Two paths, chosen by M:
- M == 1 (decode): `_w8a16_gemv_kernel`, fp32 multiply-reduce over (BLOCK_N, BLOCK_K) weight tiles.
- M >= 2: `_w8a16_kernel`, a tiled GEMM with autotuned tiles per M bucket.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import INTERPRET, cast_out, grouped_tile, launch, m_bucket, prune_to_bucket, tiled_configs


@triton.jit
def _scale_bias_epilogue(acc, ws, bias, HAS_BIAS: tl.constexpr):
    y = acc * ws
    if HAS_BIAS:
        y = y + bias
    return y


# --------------------------------------------------------------------------------------------
# M == 1: GEMV
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
def _w8a16_gemv_kernel(x_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, N, K, stride_xm, stride_ym, M_BUCKET,
                       HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    x_row = x_ptr + row * stride_xm
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_mask = kk < K
        xf = tl.load(x_row + kk, mask=k_mask, other=0.0).to(tl.float32)
        wt = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0)
        acc += tl.sum(wt.to(tl.float32) * xf[None, :], axis=1)
        w_ptrs += BLOCK_K
    ws = tl.load(ws_ptr + offs_n, mask=n_mask, other=0.0)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    y = _scale_bias_epilogue(acc, ws, bias, HAS_BIAS)
    tl.store(y_ptr + row * stride_ym + offs_n, cast_out(y, y_ptr.dtype.element_ty), mask=n_mask)


# --------------------------------------------------------------------------------------------
# M >= 2: tiled GEMM, int8 weight tiles dequantized in registers
# --------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per M bucket.
_GEMM_TILES = {
    16: ((16, 32, 128, 4, 4), (16, 64, 128, 4, 4), (16, 64, 256, 4, 3), (16, 128, 64, 4, 4)),
    64: ((32, 64, 64, 4, 4), (64, 64, 64, 4, 4), (32, 128, 64, 4, 4), (64, 128, 64, 4, 3)),
    256: ((64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (64, 256, 64, 8, 3), (128, 64, 64, 4, 4)),
    1024: ((128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 128, 32, 4, 4)),
}

# Interpreter: one small tile; GROUP_M=4 so the tests' M=65 (5 row tiles) covers a partial group.
_GEMM_CONFIGS = tiled_configs(_GEMM_TILES, interpret_tile=(16, 32, 32, 4, 1), group_m=4 if INTERPRET else 8)


@triton.autotune(configs=_GEMM_CONFIGS, key=["M_BUCKET", "N", "K"],
                 prune_configs_by={"early_config_prune": prune_to_bucket(_GEMM_TILES)})
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def _w8a16_kernel(x_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_ym, M_BUCKET,
                  HAS_BIAS: tl.constexpr, DOT_IN_FP32: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr):
    # Grouped tile order: GROUP_M row-tiles sweep the N tiles together, so weight tiles are reused from L2.
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    a_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    b_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * K + offs_k[:, None]  # (BLOCK_K, BLOCK_N) view of w.T

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=m_mask[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=n_mask[None, :], other=0)
        else:
            k_mask = (k0 + offs_k) < K
            a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0)
        # int8 -> x's dtype is exact (|w| <= 127 fits bf16/fp16 mantissas); the scale waits for the epilogue.
        if DOT_IN_FP32:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32x3")
        else:
            acc = tl.dot(a, b.to(a.dtype), acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    ws = tl.load(ws_ptr + offs_n, mask=n_mask, other=0.0)
    bias = tl.zeros([1, BLOCK_N], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y = _scale_bias_epilogue(acc, ws[None, :], bias, HAS_BIAS)
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, cast_out(y, y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------

def _dot_in_fp32(dtype: torch.dtype) -> bool:
    # fp32 x: a tf32x3 dot. The interpreter's tl.dot also multiplies bf16 tiles as raw uint16
    # (triton 3.9); fp32 operands give the same products exactly (bf16 x int8 fits fp32), so bf16
    # takes that route there, and only there.
    return dtype == torch.float32 or (INTERPRET and dtype == torch.bfloat16)


def _gemv(x, w, w_scale, bias, y):
    M, K = x.shape
    N = w.shape[0]

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), M)

    launch(_w8a16_gemv_kernel)[grid](x, w, w_scale, bias if bias is not None else w_scale, y, N, K,
                                     x.stride(0), y.stride(0), m_bucket(M), HAS_BIAS=bias is not None)


def _gemm(x, w, w_scale, bias, y):
    M, K = x.shape
    N = w.shape[0]

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    launch(_w8a16_kernel)[grid](x, w, w_scale, bias if bias is not None else w_scale, y, M, N, K,
                                x.stride(0), y.stride(0), m_bucket(M), HAS_BIAS=bias is not None,
                                DOT_IN_FP32=_dot_in_fp32(x.dtype))


def w8a16_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) f32/bf16/f16 with unit inner stride, w (N, K) int8 contiguous, w_scale (N,) f32
    contiguous, bias (N,) contiguous or None -> (M, N) x.dtype. Inputs are validated by the caller."""
    M, K = x.shape
    N = w.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    if M == 1:
        _gemv(x, w, w_scale, bias, y)
    else:
        _gemm(x, w, w_scale, bias, y)
    return y
