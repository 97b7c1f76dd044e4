"""w4a8_linear: x (M, K) f32/bf16/f16, w (N, K/2) uint8 int4, scales (N, K/g) f32, zeros (N, K/g) u8/f32?,
bias (N,) f32/x.dtype? -> (M, N) x.dtype.

Dynamic per-row int8 activations (w8a8's `_quantize_rows_s8_kernel`, bit-exact with
reference.quantize_rows_s8), int4 weights whose codes (0..15) are int8 dot operands as they are.
Per group i, exactly as slmkern.reference.w4a8_linear:

    acc_i[m, n] = sum_k qx[m, k] * code[n, k]  -  z[n, i] * sum_k qx[m, k]     (int32, exact)
    y = 0;  for i in order: y = y + float(acc_i) * s[n, i];  y = y * sx[m];  y = y + bias[n]

The zero point goes through the per-group activation sum (one int32 row sum per tile step), so
weights are never shifted or scaled before the dot: unpack (mask / shift), interleave, dot.

Paths, chosen by M:
- M == 1 (decode): `_w4a8_gemv_kernel` on the CUDA cores, GROUPS_PER_STEP groups per step
  (even and odd k of qx meet the low and high nibbles of the same bytes).
- M >= 2: `_w4a8_kernel`, a tiled int8 tensor-core GEMM (int32 accumulation per group).
Both split K over whole groups when the output tiles alone cannot fill the GPU; the fp32 slices
are added in split order by `_splitk_reduce_kernel`, which also applies sx and the bias.

Bit-exactness: the tiled kernel without split-K adds the groups in the reference's order with
rounded products (tl.fma(a, b, 0) then an add: no FMA contraction can skip a rounding), so it
matches the reference bit for bit for uint8/None zeros. The GEMV sums GROUPS_PER_STEP groups as
a tree and split-K re-associates the group sum: both agree to fp32 rounding (tolerance-tested).
fp32 zeros (allowed by the op) use s*acc - (s*z)*asum per group (tolerance).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._int4 import (_Z8, choose_split_k, gemv_heuristics, prune_tiles, split_groups,
                    splitk_reduce, tile_heuristics)
from ._util import INTERPRET, cast_out, grouped_tile, launch, m_bucket, tiled_configs
from .w8a8 import quantize_rows_s8

MIN_DOT_K = 32  # an int8 tl.dot needs K >= 32


@triton.jit
def _group_term(d, asum, s, z, HAS_ZEROS: tl.constexpr, FLOAT_ZEROS: tl.constexpr):
    """fp32 float(d - z * asum) * s (rounded product), from int32 d and asum; fp32 zeros: s*d - (s*z)*asum."""
    if FLOAT_ZEROS:
        return d.to(tl.float32) * s - (s * z) * asum.to(tl.float32)
    else:
        if HAS_ZEROS:
            acc = d - z * asum
        else:
            acc = d - _Z8 * asum
        return tl.fma(acc.to(tl.float32), s, 0.0)


@triton.jit
def _load_zeros(ptrs, mask, FLOAT_ZEROS: tl.constexpr):
    """Zero points as int32 (uint8 storage) or fp32."""
    z = tl.load(ptrs, mask=mask, other=0)
    if FLOAT_ZEROS:
        return z.to(tl.float32)
    else:
        return z.to(tl.int32)


@triton.jit
def _epilogue(y, sx, bias, HAS_BIAS: tl.constexpr):
    """y * sx [+ bias], each step rounded (the reference's order)."""
    if HAS_BIAS:
        return tl.fma(y, sx, 0.0) + bias
    else:
        return y * sx


# --------------------------------------------------------------------------------------------
# M == 1: GEMV
# --------------------------------------------------------------------------------------------

def _gemv_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 64}, num_warps=4)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bn, bk, w, s in ((32, 256, 4, 3), (16, 512, 4, 3), (32, 512, 4, 2), (64, 256, 4, 2),
                                 (64, 512, 8, 2))]


@triton.autotune(configs=_gemv_configs(), key=["M_BUCKET", "N", "K", "GROUP_SIZE", "SPLIT_K"])
@triton.heuristics(gemv_heuristics(MIN_DOT_K))
@triton.jit
def _w4a8_gemv_kernel(q_ptr, sx_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, M, N, K, stride_wn, stride_ym, M_BUCKET,
                      GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, FLOAT_ZEROS: tl.constexpr,
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
    q_row = q_ptr + row * K
    w_rows = w_ptr + n64[:, None, None] * stride_wn

    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for g0 in range(g_begin, g_end, GROUPS_PER_STEP):
        gi = g0 + offs_g
        g_mask = gi < g_end
        d = tl.zeros([BLOCK_N, GROUPS_PER_STEP], dtype=tl.int32)
        asum = tl.zeros([GROUPS_PER_STEP], dtype=tl.int32)
        for c0 in range(0, GROUP_SIZE, CHUNK_K):
            qm = g_mask[:, None]
            bm = g_mask[:, None]
            if not EVEN_CHUNK:
                qm = qm & ((c0 + offs_c) < GROUP_SIZE)[None, :]
                bm = bm & ((c0 // 2 + offs_j) < GROUP_SIZE // 2)[None, :]
            # qx chunk loaded contiguously, then split into the k that meet low and high nibbles
            qv = tl.load(q_row + (gi[:, None] * GROUP_SIZE + c0 + offs_c[None, :]), mask=qm, other=0)
            qe, qo = tl.split(tl.reshape(qv.to(tl.int32), [GROUPS_PER_STEP, CHUNK_K // 2, 2]))
            kb = gi[:, None] * (GROUP_SIZE // 2) + c0 // 2 + offs_j[None, :]  # byte index of k = 2 * kb
            b = tl.load(w_rows + kb[None, :, :], mask=n_mask[:, None, None] & bm[None, :, :], other=0)
            lo = (b & 0xF).to(tl.int32)
            hi = (b >> 4).to(tl.int32)
            d += tl.sum(lo * qe[None, :, :] + hi * qo[None, :, :], axis=2)
            asum += tl.sum(qe + qo, axis=1)
        sz_off = n64[:, None] * G + gi[None, :]
        sz_mask = n_mask[:, None] & g_mask[None, :]
        s = tl.load(s_ptr + sz_off, mask=sz_mask, other=0.0)
        z = 0
        if HAS_ZEROS:
            z = _load_zeros(z_ptr + sz_off, sz_mask, FLOAT_ZEROS)
        acc += tl.sum(_group_term(d, asum[None, :], s, z, HAS_ZEROS, FLOAT_ZEROS), axis=1)

    if SPLIT_K == 1:
        sx = tl.load(sx_ptr + row)
        bias = 0.0
        if HAS_BIAS:
            bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        y = _epilogue(acc, sx, bias, HAS_BIAS)
        tl.store(y_ptr + row * stride_ym + offs_n, cast_out(y, y_ptr.dtype.element_ty), mask=n_mask)
    else:
        split = tl.program_id(1).to(tl.int64)
        tl.store(ws_ptr + (split * M + row) * N + offs_n, acc, mask=n_mask)


# --------------------------------------------------------------------------------------------
# M >= 2: tiled int8 GEMM, one int32 accumulator per group
# --------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per M bucket; BLOCK_K is clamped to the group.
_GEMM_TILES = {
    16: ((16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (16, 64, 256, 4, 3), (16, 32, 128, 4, 4)),
    64: ((32, 64, 128, 4, 4), (64, 64, 128, 4, 4), (32, 128, 128, 4, 4), (64, 128, 128, 4, 3)),
    256: ((64, 128, 128, 4, 3), (128, 128, 128, 8, 3), (64, 256, 128, 8, 3), (128, 64, 128, 4, 4)),
    1024: ((128, 128, 128, 8, 3), (128, 256, 128, 8, 3), (64, 128, 128, 4, 4), (128, 128, 64, 4, 4)),
}
# Interpreter: one small tile; GROUP_M=4 so the tests' M=65 (5 row tiles) covers a partial group.
_GEMM_CONFIGS = tiled_configs(_GEMM_TILES, interpret_tile=(16, 32, 32, 4, 1), group_m=4 if INTERPRET else 8)


@triton.autotune(configs=_GEMM_CONFIGS, key=["M_BUCKET", "N", "K", "GROUP_SIZE", "SPLIT_K"],
                 prune_configs_by={"early_config_prune": prune_tiles(_GEMM_TILES, MIN_DOT_K)})
@triton.heuristics(tile_heuristics(MIN_DOT_K))
@triton.jit
def _w4a8_kernel(q_ptr, sx_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, M, N, K, stride_wn, stride_ym, M_BUCKET,
                 GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, FLOAT_ZEROS: tl.constexpr,
                 HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, CHUNK_K: tl.constexpr, EVEN_CHUNK: tl.constexpr):
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
    q_rows = q_ptr + offs_m[:, None].to(tl.int64) * K
    w_rows = w_ptr + n64[:, None] * stride_wn

    y = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for gi in range(g_begin, g_end):
        d = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        asum = tl.zeros([BLOCK_M], dtype=tl.int32)
        for c0 in range(0, GROUP_SIZE, CHUNK_K):
            k = gi * GROUP_SIZE + c0
            if EVEN_CHUNK:
                a = tl.load(q_rows + (k + offs_k)[None, :], mask=m_mask[:, None], other=0)
                b = tl.load(w_rows + (k // 2 + offs_h)[None, :], mask=n_mask[:, None], other=0)
            else:
                a = tl.load(q_rows + (k + offs_k)[None, :],
                            mask=m_mask[:, None] & ((c0 + offs_k) < GROUP_SIZE)[None, :], other=0)
                b = tl.load(w_rows + (k // 2 + offs_h)[None, :],
                            mask=n_mask[:, None] & ((c0 // 2 + offs_h) < GROUP_SIZE // 2)[None, :], other=0)
            codes = tl.interleave(b & 0xF, b >> 4).to(tl.int8)  # (BLOCK_N, CHUNK_K), 0..15
            d = tl.dot(a, tl.trans(codes), d, out_dtype=tl.int32)                    # int8 x int8 -> int32: exact
            asum += tl.sum(a.to(tl.int32), axis=1)
        s = tl.load(s_ptr + n64 * G + gi, mask=n_mask, other=0.0)[None, :]
        z = 0
        if HAS_ZEROS:
            z = _load_zeros(z_ptr + n64 * G + gi, n_mask, FLOAT_ZEROS)[None, :]
        y = y + _group_term(d, asum[:, None], s, z, HAS_ZEROS, FLOAT_ZEROS)

    if SPLIT_K == 1:
        sx = tl.load(sx_ptr + offs_m, mask=m_mask, other=0.0)[:, None]
        bias = tl.zeros([1, BLOCK_N], dtype=tl.float32)
        if HAS_BIAS:
            bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        y = _epilogue(y, sx, bias, HAS_BIAS)
        y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, cast_out(y, y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
    else:
        split = tl.program_id(1).to(tl.int64)
        ws_ptrs = ws_ptr + (split * M + offs_m[:, None].to(tl.int64)) * N + offs_n[None, :]
        tl.store(ws_ptrs, y, mask=m_mask[:, None] & n_mask[None, :])


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------

PATHS = ("gemv", "gemm")


def choose_path(M: int) -> str:
    return "gemv" if M == 1 else "gemm"


def _tiles(path: str, M: int, N: int) -> int:
    if path == "gemv":
        return triton.cdiv(N, 64) * M
    bm = 16 if M <= 16 else 64 if M <= 256 else 128
    return triton.cdiv(M, bm) * triton.cdiv(N, 128)


def w4a8_linear(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                group_size: int, bias: torch.Tensor | None = None, *, path: str | None = None,
                split_k: int | None = None) -> torch.Tensor:
    """x (M, K) f32/bf16/f16 with unit inner stride, w (N, K/2) uint8, scales (N, G) f32, zeros (N, G)
    uint8/f32 or None, all contiguous, group_size g (K % g == 0, g even; -1 = K), bias (N,) or None
    -> (M, N) x.dtype. Inputs are validated by the caller.

    path ("gemv" | "gemm") and split_k override the choices made from M and the GPU's size.
    """
    M, K = x.shape
    N = w.shape[0]
    g = K if group_size == -1 else group_size
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    path = path or choose_path(M)
    if path not in PATHS:
        raise ValueError(f"path: expected one of {PATHS}, got {path!r}")
    G = K // g
    S = max(1, min(split_k or choose_split_k(_tiles(path, M, N), M, G, K, x.device), G))
    q, sx = quantize_rows_s8(x)
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

        launch(_w4a8_gemv_kernel)[grid](q, sx, w, scales, z, b, y, ws, M, N, K, w.stride(0), y.stride(0),
                                        m_bucket(M), **common)
    else:
        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), S)

        launch(_w4a8_kernel)[grid](q, sx, w, scales, z, b, y, ws, M, N, K, w.stride(0), y.stride(0),
                                        m_bucket(M), **common)
    if S > 1:
        splitk_reduce(ws, sx, bias, y)
    return y
