"""w4a16_linear: x (M, K) f32/bf16/f16, w (N, K/2) uint8 int4, scales (N, K/g) f32, zeros (N, K/g) u8/f32?,
bias (N,) f32/x.dtype? -> (M, N) x.dtype.

Weight-only int4 (format: slmkern/formats/int4.py): W[n, k] = (code - z) * s of k's group
(z = 8 without zeros), y = x @ W.T + bias with fp32 accumulation, as slmkern.reference.w4a16_linear.
Nibbles are unpacked in registers (mask / shift), never written back to memory.

Three paths, chosen by M:
- M == 1 (decode): `_w4a16_gemv_kernel` on the CUDA cores. Each step covers GROUPS_PER_STEP
  whole groups of BLOCK_N rows: a group's dot with x is summed against code - z, then multiplied
  by the group's scale once, so the per-weight work is unpack (mask / shift), code -> float by
  the 2^23 bit trick (an OR and the subtraction of 2^23 + z: no int->float convert), one FMA.
  A chunk of x is loaded contiguously and split into its even and odd k, which meet the low and
  high nibbles of the same bytes.
- 2 <= M < DEQUANT_MIN_M: `_w4a16_kernel`, a tiled tensor-core GEMM. Each (CHUNK_K x BLOCK_N)
  weight tile is dequantized in registers to x's dtype ((code - z) * s, the scale and zero loaded
  once per group) right before tl.dot; fp32 x uses a tf32x3 dot on fp32 weights.
- M >= DEQUANT_MIN_M (prefill): `_w4_dequant_kernel` writes W in x's dtype once and cuBLAS
  (torch.matmul) multiplies: at that size the GEMM is compute-bound and cuBLAS's tensor-core
  schedule is worth more than the 2-byte-per-weight round trip.

Both kernels split K over SPLIT_K programs when there are too few output tiles to fill the GPU
(decode and small batches on narrow layers); splits own whole groups and are summed in a fixed
order by `_splitk_reduce_kernel` (no atomics: deterministic).

Accuracy vs the reference (fp32 weights, one fp32 matmul): fp32 x differs only in summation
order (the tiled path uses a tf32x3 dot, ~fp32 accurate; its hi/lo split turns an infinite x into
NaN where the reference may give inf); bf16/fp16 x in the tiled and dequantize paths also round
each dequantized weight to x's dtype before the 16-bit dot (as tinygemm and cuBLAS on dequantized
weights do). The GEMV computes in fp32 throughout.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._int4 import (choose_split_k, codes_minus_zero, dequantize, gemv_heuristics,
                    load_zero_offset, prune_tiles, split_groups, splitk_reduce, tile_heuristics)
from ._util import INTERPRET, cast_out, grouped_tile, launch, m_bucket, tiled_configs

DEQUANT_MIN_M = 1024
MIN_DOT_K = 16  # a 16-bit tl.dot needs K >= 16


# --------------------------------------------------------------------------------------------
# M == 1: GEMV
# --------------------------------------------------------------------------------------------

def _gemv_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 64}, num_warps=4)]
    # BLOCK_N * BLOCK_K / 2 weight bytes per step: 4 KiB (~100 registers, more blocks per SM),
    # 8 KiB (4 warps) or 16 KiB (8 warps) (~200 registers, more bytes in flight per block).
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bn, bk, w, s in ((32, 256, 4, 3), (16, 512, 4, 3), (32, 512, 4, 2), (64, 256, 4, 2),
                                 (64, 512, 8, 2))]


@triton.autotune(configs=_gemv_configs(), key=["M_BUCKET", "N", "K", "GROUP_SIZE", "SPLIT_K"])
@triton.heuristics(gemv_heuristics(MIN_DOT_K))
@triton.jit
def _w4a16_gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                       M_BUCKET, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, FLOAT_ZEROS: tl.constexpr,
                       HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, CHUNK_K: tl.constexpr, GROUPS_PER_STEP: tl.constexpr,
                       EVEN_CHUNK: tl.constexpr):
    row = tl.program_id(2).to(tl.int64)
    G = K // GROUP_SIZE
    g_begin, g_end = split_groups(G, SPLIT_K)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    n64 = offs_n.to(tl.int64)
    offs_g = tl.arange(0, GROUPS_PER_STEP)
    offs_j = tl.arange(0, CHUNK_K // 2)
    offs_c = tl.arange(0, CHUNK_K)
    x_row = x_ptr + row * stride_xm
    w_rows = w_ptr + n64[:, None, None] * stride_wn

    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for g0 in range(g_begin, g_end, GROUPS_PER_STEP):
        gi = g0 + offs_g
        g_mask = gi < g_end
        sz_off = n64[:, None] * G + gi[None, :]              # (BLOCK_N, GROUPS_PER_STEP)
        sz_mask = n_mask[:, None] & g_mask[None, :]
        zoff = load_zero_offset(z_ptr + sz_off, sz_mask, HAS_ZEROS, FLOAT_ZEROS)
        if HAS_ZEROS:
            zoff = zoff[:, :, None]
        part = tl.zeros([BLOCK_N, GROUPS_PER_STEP], dtype=tl.float32)
        for c0 in range(0, GROUP_SIZE, CHUNK_K):
            xm = g_mask[:, None]
            bm = g_mask[:, None]
            if not EVEN_CHUNK:
                xm = xm & ((c0 + offs_c) < GROUP_SIZE)[None, :]
                bm = bm & ((c0 // 2 + offs_j) < GROUP_SIZE // 2)[None, :]
            # x chunk loaded contiguously, then split into the k that meet low and high nibbles
            xv = tl.load(x_row + (gi[:, None] * GROUP_SIZE + c0 + offs_c[None, :]), mask=xm, other=0.0)
            xe, xo = tl.split(tl.reshape(xv.to(tl.float32), [GROUPS_PER_STEP, CHUNK_K // 2, 2]))
            kb = gi[:, None] * (GROUP_SIZE // 2) + c0 // 2 + offs_j[None, :]  # byte index of k = 2 * kb
            b = tl.load(w_rows + kb[None, :, :], mask=n_mask[:, None, None] & bm[None, :, :], other=0)
            lo = codes_minus_zero(b & 0xF, zoff, FLOAT_ZEROS)
            hi = codes_minus_zero(b >> 4, zoff, FLOAT_ZEROS)
            part += tl.sum(lo * xe[None, :, :] + hi * xo[None, :, :], axis=2)
        s = tl.load(s_ptr + sz_off, mask=sz_mask, other=0.0)
        acc += tl.sum(part * s, axis=1)

    if SPLIT_K == 1:
        y = acc
        if HAS_BIAS:
            y = y + tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * stride_ym + offs_n, cast_out(y, y_ptr.dtype.element_ty), mask=n_mask)
    else:
        split = tl.program_id(1).to(tl.int64)
        tl.store(ws_ptr + (split * M + row) * N + offs_n, acc, mask=n_mask)


# --------------------------------------------------------------------------------------------
# 2 <= M < DEQUANT_MIN_M: tiled GEMM, weights dequantized in registers before tl.dot
# --------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per M bucket; BLOCK_K is clamped to the group.
_GEMM_TILES = {
    16: ((16, 64, 64, 4, 4), (16, 128, 64, 4, 4), (16, 64, 128, 4, 3), (16, 32, 128, 4, 4)),
    64: ((32, 64, 64, 4, 4), (64, 64, 64, 4, 4), (64, 128, 64, 4, 3), (32, 128, 128, 4, 3)),
    256: ((64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (64, 256, 64, 8, 3), (128, 64, 64, 4, 4)),
    1024: ((128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 128, 32, 4, 4)),
}
# Interpreter: one small tile; GROUP_M=4 so the tests' M=65 (5 row tiles) covers a partial group.
_GEMM_CONFIGS = tiled_configs(_GEMM_TILES, interpret_tile=(16, 32, 32, 4, 1), group_m=4 if INTERPRET else 8)


@triton.autotune(configs=_GEMM_CONFIGS, key=["M_BUCKET", "N", "K", "GROUP_SIZE", "SPLIT_K"],
                 prune_configs_by={"early_config_prune": prune_tiles(_GEMM_TILES, MIN_DOT_K)})
@triton.heuristics(tile_heuristics(MIN_DOT_K))
@triton.jit
def _w4a16_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                  M_BUCKET, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, FLOAT_ZEROS: tl.constexpr,
                  HAS_BIAS: tl.constexpr,
                  SPLIT_K: tl.constexpr, DOT_IN_FP32: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                  CHUNK_K: tl.constexpr, EVEN_CHUNK: tl.constexpr):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    G = K // GROUP_SIZE
    g_begin, g_end = split_groups(G, SPLIT_K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, CHUNK_K)
    offs_h = tl.arange(0, CHUNK_K // 2)
    m_mask = offs_m < M
    n_mask = offs_n < N
    n64 = offs_n.to(tl.int64)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    w_rows = w_ptr + n64[:, None] * stride_wn

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for gi in range(g_begin, g_end):
        s = tl.load(s_ptr + n64 * G + gi, mask=n_mask, other=0.0)[:, None]
        zoff = load_zero_offset(z_ptr + n64 * G + gi, n_mask, HAS_ZEROS, FLOAT_ZEROS)
        if HAS_ZEROS:
            zoff = zoff[:, None]
        for c0 in range(0, GROUP_SIZE, CHUNK_K):
            k = gi * GROUP_SIZE + c0
            if EVEN_CHUNK:
                a = tl.load(x_rows + (k + offs_k)[None, :], mask=m_mask[:, None], other=0.0)
                b = tl.load(w_rows + (k // 2 + offs_h)[None, :], mask=n_mask[:, None], other=0)
            else:
                a = tl.load(x_rows + (k + offs_k)[None, :],
                            mask=m_mask[:, None] & ((c0 + offs_k) < GROUP_SIZE)[None, :], other=0.0)
                b = tl.load(w_rows + (k // 2 + offs_h)[None, :],
                            mask=n_mask[:, None] & ((c0 // 2 + offs_h) < GROUP_SIZE // 2)[None, :], other=0)
            codes = tl.interleave(b & 0xF, b >> 4)           # (BLOCK_N, CHUNK_K), k in natural order
            wv = codes_minus_zero(codes, zoff, FLOAT_ZEROS) * s
            if DOT_IN_FP32:
                if x_ptr.dtype.element_ty != tl.float32:   # interpreter bf16: same weight rounding as the GPU
                    wv = wv.to(x_ptr.dtype.element_ty).to(tl.float32)
                acc = tl.dot(a.to(tl.float32), tl.trans(wv), acc, input_precision="tf32x3")
            else:
                acc = tl.dot(a, tl.trans(wv.to(x_ptr.dtype.element_ty)), acc)

    if SPLIT_K == 1:
        y = acc
        if HAS_BIAS:
            y = y + tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, cast_out(y, y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
    else:
        split = tl.program_id(1).to(tl.int64)
        ws_ptrs = ws_ptr + (split * M + offs_m[:, None].to(tl.int64)) * N + offs_n[None, :]
        tl.store(ws_ptrs, acc, mask=m_mask[:, None] & n_mask[None, :])


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------

PATHS = ("gemv", "gemm", "dequant")


def choose_path(M: int) -> str:
    return "gemv" if M == 1 else "dequant" if M >= DEQUANT_MIN_M else "gemm"


def _dot_in_fp32(dtype: torch.dtype) -> bool:
    # fp32 x: a tf32x3 dot. The interpreter multiplies bf16 dot operands as raw uint16 (triton 3.9),
    # so bf16 takes fp32 operands there (same products, bf16-rounded weights), and only there.
    return dtype == torch.float32 or (INTERPRET and dtype == torch.bfloat16)


def _tiles(path: str, M: int, N: int) -> int:
    """Output tiles of a typical config, for the split-K choice (configs are tuned later)."""
    if path == "gemv":
        return triton.cdiv(N, 64) * M
    bm = 16 if M <= 16 else 64 if M <= 256 else 128
    return triton.cdiv(M, bm) * triton.cdiv(N, 128)


def w4a16_linear(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 group_size: int, bias: torch.Tensor | None = None, *, path: str | None = None,
                 split_k: int | None = None) -> torch.Tensor:
    """x (M, K) f32/bf16/f16 with unit inner stride, w (N, K/2) uint8, scales (N, G) f32, zeros (N, G)
    uint8/f32 or None, all contiguous, group_size g (K % g == 0, g even; -1 = K), bias (N,) or None
    -> (M, N) x.dtype. Inputs are validated by the caller.

    path ("gemv" | "gemm" | "dequant") and split_k override the choices made from M and the
    GPU's size (tests use them to reach every path on small shapes).
    """
    M, K = x.shape
    N = w.shape[0]
    g = K if group_size == -1 else group_size
    path = path or choose_path(M)
    if path not in PATHS:
        raise ValueError(f"path: expected one of {PATHS}, got {path!r}")
    if path == "gemm" and g % MIN_DOT_K and not INTERPRET:
        # Groups that are not whole tl.dot chunks (e.g. g = 10) gave wrong sums on an H200 with
        # Triton 3.6 (the interpreter agrees with the reference); such groups take the exact
        # dequantize + matmul path on the GPU until that is understood.
        import logging
        from slmkern._logging import log_once
        log_once(f"w4a16-gemm-g{g}", f"slmkern: w4a16_linear with group_size {g} (not a multiple of "
                 f"{MIN_DOT_K}) uses dequantize + matmul on CUDA", logging.INFO)
        path = "dequant"
    if M == 0:
        return torch.empty((0, N), dtype=x.dtype, device=x.device)
    if path == "dequant":
        wd = dequantize(w, scales, zeros, g, x.dtype)
        if bias is None:
            return torch.matmul(x, wd.t())
        return torch.addmm(bias.to(x.dtype), x, wd.t())
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    G = K // g
    S = max(1, min(split_k or choose_split_k(_tiles(path, M, N), M, G, K, x.device), G))
    # without split-K the kernels never touch ws: any fp32 tensor will do (not y: no aliased outputs)
    ws = torch.empty((S, M, N), dtype=torch.float32, device=x.device) if S > 1 else scales
    z = zeros if zeros is not None else scales
    b = bias if bias is not None else scales
    common = dict(GROUP_SIZE=g, HAS_ZEROS=zeros is not None,
                  FLOAT_ZEROS=zeros is not None and zeros.dtype == torch.float32,
                  HAS_BIAS=bias is not None, SPLIT_K=S)
    if path == "gemv":
        def grid(meta):
            return (triton.cdiv(N, meta["BLOCK_N"]), S, M)

        launch(_w4a16_gemv_kernel)[grid](x, w, scales, z, b, y, ws, M, N, K, x.stride(0), w.stride(0), y.stride(0),
                                         m_bucket(M), **common)
    else:
        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), S)

        launch(_w4a16_kernel)[grid](x, w, scales, z, b, y, ws, M, N, K, x.stride(0), w.stride(0), y.stride(0),
                                    m_bucket(M), DOT_IN_FP32=_dot_in_fp32(x.dtype), **common)
    if S > 1:
        splitk_reduce(ws, None, bias, y)
    return y
