"""sparse24_w4a16_linear: x (M, K) f32/bf16/f16, qvalues (N, K/4) uint8, meta (N, ceil(K/8)) uint8,
scales (N, K/g) f32, zeros (N, K/g) uint8?, group_size g, bias (N,) f32/x.dtype? -> (M, N) x.dtype.

2:4 x int4 (the Sparse-Marlin idea; contract: briefs/SPARSE_CONTRACT.md): the K/2 kept values of a
row are int4 codes, kept value j in byte j // 2 (low nibble first), at the dense positions the 2:4
meta gives (see sparse24.py). Groups run over DENSE columns, so kept value j belongs to group
j // (g / 2); W[n, k] = (code - z) * s at kept positions (z = 8 without zeros), y = x @ W.T + bias
with fp32 accumulation. Dequantized in registers, never written to memory:

- M == 1: `_sparse24_w4a16_gemv_kernel`, kept values (code - z) * s multiplied with the x entries
  their 2-bit indices point at (gathered from the L1-resident row), on the CUDA cores.
- M >= 2: `_sparse24_w4a16_kernel`, each (BLOCK_N x BLOCK_K) tile dequantized, expanded to dense
  (sparse24.expand24) in fp32, rounded to x's dtype, then the A operand of a tensor-core tl.dot
  computing y's tile transposed (as sparse24.py; fp32 x: tf32x3).

Scales (and zeros) are loaded once per row per tile when the tile lies inside one group
(SCALE_PER_TILE: g a multiple of BLOCK_K), in the GEMM once per whole group in the tile
(WHOLE_GROUPS: BLOCK_K a multiple of g, g a power of two), else per kept value (any g that is a
multiple of 4, e.g. g = K).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._act_quant import store_row, store_tile_nm
from ._int4 import codes_minus_zero, load_zero_offset
from ._util import INTERPRET, grouped_tile, launch, m_bucket, prune_to_bucket, tiled_configs
from .sparse24 import dot_in_fp32, expand24, load_group_indices, load_meta_indices, split_pairs


def _scale_flags(block_k_key: str = "BLOCK_K") -> dict:
    def per_tile(a):
        return a["GROUP_SIZE"] % a[block_k_key] == 0

    def whole(a):
        g = a["GROUP_SIZE"]
        return not per_tile(a) and a[block_k_key] % g == 0 and g & (g - 1) == 0

    return {"SCALE_PER_TILE": per_tile, "WHOLE_GROUPS": whole}


@triton.jit
def _dequant_kept(codes, s_ptr, z_ptr, n64, n_mask, j0, G, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SCALE_PER_TILE: tl.constexpr,
                  WHOLE_GROUPS: tl.constexpr):
    """codes (BLOCK_N, BLOCK_K // 2) of kept values j0 .. j0 + BLOCK_K / 2 -> fp32 (code - z) * s."""
    HALF_G: tl.constexpr = GROUP_SIZE // 2  # kept values per group
    if SCALE_PER_TILE:
        gi = j0 // HALF_G
        s = tl.load(s_ptr + n64 * G + gi, mask=n_mask, other=0.0)[:, None]
        zoff = load_zero_offset(z_ptr + n64 * G + gi, n_mask, HAS_ZEROS, False)
        if HAS_ZEROS:
            zoff = zoff[:, None]
        return codes_minus_zero(codes, zoff, False) * s
    elif WHOLE_GROUPS:
        TILE_G: tl.constexpr = BLOCK_K // GROUP_SIZE
        gi = j0 // HALF_G + tl.arange(0, TILE_G)
        off = n64[:, None] * G + gi[None, :]
        mask = n_mask[:, None] & (gi < G)[None, :]
        s = tl.load(s_ptr + off, mask=mask, other=0.0)[:, :, None]
        zoff = load_zero_offset(z_ptr + off, mask, HAS_ZEROS, False)
        if HAS_ZEROS:
            zoff = zoff[:, :, None]
        c3 = tl.reshape(codes, [BLOCK_N, TILE_G, HALF_G])
        return tl.reshape(codes_minus_zero(c3, zoff, False) * s, [BLOCK_N, BLOCK_K // 2])
    else:
        gi = (j0 + tl.arange(0, BLOCK_K // 2)) // HALF_G
        off = n64[:, None] * G + gi[None, :]
        mask = n_mask[:, None] & (gi < G)[None, :]
        s = tl.load(s_ptr + off, mask=mask, other=0.0)
        zoff = load_zero_offset(z_ptr + off, mask, HAS_ZEROS, False)
        return codes_minus_zero(codes, zoff, False) * s


@triton.jit
def _load_codes(q_ptr, n64, n_mask, j0, stride_qn, KQ, BLOCK_K: tl.constexpr):
    """int4 codes (BLOCK_N, BLOCK_K // 2) of kept values j0 .. (j0 even), from bytes j0/2 .. ."""
    offs_q = j0 // 2 + tl.arange(0, BLOCK_K // 4)
    b = tl.load(q_ptr + n64[:, None] * stride_qn + offs_q[None, :],
                mask=n_mask[:, None] & (offs_q < KQ)[None, :], other=0)
    return tl.interleave(b & 0xF, b >> 4)


# --------------------------------------------------------------------------------------------
# M == 1: GEMV
# --------------------------------------------------------------------------------------------

def _gemv_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 64}, num_warps=4)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bn, bk, w, s in ((32, 512, 4, 3), (64, 256, 4, 3), (16, 1024, 4, 3))]


@triton.autotune(configs=_gemv_configs(), key=["M_BUCKET", "N", "K", "GROUP_SIZE"])
@triton.heuristics({"SCALE_PER_TILE": lambda a: a["GROUP_SIZE"] % a["BLOCK_K"] == 0})
@triton.jit
def _sparse24_w4a16_gemv_kernel(x_ptr, q_ptr, meta_ptr, s_ptr, z_ptr, b_ptr, y_ptr, N, K, stride_xm, stride_qn,
                                stride_mn, stride_ym, M_BUCKET, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr,
                                HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                SCALE_PER_TILE: tl.constexpr):
    # Byte g of a row holds both kept codes of group g (kept values 2g, 2g + 1): one byte load per
    # group, plus its meta nibble and the two x entries it meets (gathers from the L1-resident row).
    BLOCK_G: tl.constexpr = BLOCK_K // 4
    pid_n = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    G = K // GROUP_SIZE
    NG = K // 4
    offs_g = tl.arange(0, BLOCK_G)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    n64 = offs_n.to(tl.int64)
    acc = tl.zeros([BLOCK_N, BLOCK_G], dtype=tl.float32)
    for g0 in range(0, NG, BLOCK_G):
        gg = g0 + offs_g
        mask = n_mask[:, None] & (gg < NG)[None, :]
        b = tl.load(q_ptr + n64[:, None] * stride_qn + gg[None, :], mask=mask, other=0)
        if SCALE_PER_TILE:  # the step's BLOCK_K dense columns lie in one group
            gi = (4 * g0) // GROUP_SIZE
            s = tl.load(s_ptr + n64 * G + gi, mask=n_mask, other=0.0)[:, None]
            zoff = load_zero_offset(z_ptr + n64 * G + gi, n_mask, HAS_ZEROS, False)
            if HAS_ZEROS:
                zoff = zoff[:, None]
        else:
            off = n64[:, None] * G + ((4 * gg) // GROUP_SIZE)[None, :]
            s = tl.load(s_ptr + off, mask=mask, other=0.0)
            zoff = load_zero_offset(z_ptr + off, mask, HAS_ZEROS, False)
        c0, c1 = load_group_indices(meta_ptr, n64, gg, mask, stride_mn)
        col = 4 * gg[None, :]
        x0 = tl.load(x_row + col + c0, mask=mask, other=0.0).to(tl.float32)
        x1 = tl.load(x_row + col + c1, mask=mask, other=0.0).to(tl.float32)
        w0 = codes_minus_zero(b & 0xF, zoff, False)
        w1 = codes_minus_zero(b >> 4, zoff, False)
        acc += (w0 * x0 + w1 * x1) * s
    # float epilogue (INT8_VALUES=False: the scale arguments are never read)
    store_row(tl.sum(acc, axis=1), row, 0.0, b_ptr, b_ptr, y_ptr, stride_ym, offs_n, n_mask, False, HAS_BIAS)


# --------------------------------------------------------------------------------------------
# M >= 2: tiled GEMM
# --------------------------------------------------------------------------------------------

# BLOCK_K <= 128 so that g = 128 tiles take one scale per row (SCALE_PER_TILE).
_GEMM_TILES = {
    16: ((16, 64, 128, 4, 4), (16, 128, 64, 4, 4)),
    64: ((32, 64, 128, 4, 4), (64, 128, 64, 4, 3)),
    256: ((64, 128, 64, 4, 3), (128, 128, 64, 8, 3)),
    1024: ((128, 128, 64, 8, 3), (128, 256, 64, 8, 3)),
}
_GEMM_CONFIGS = tiled_configs(_GEMM_TILES, interpret_tile=(16, 32, 32, 4, 1), group_m=4 if INTERPRET else 8)


@triton.autotune(configs=_GEMM_CONFIGS, key=["M_BUCKET", "N", "K", "GROUP_SIZE"],
                 prune_configs_by={"early_config_prune": prune_to_bucket(_GEMM_TILES)})
@triton.heuristics(_scale_flags())
@triton.jit
def _sparse24_w4a16_kernel(x_ptr, q_ptr, meta_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_qn,
                           stride_mn, stride_ym, M_BUCKET, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr,
                           HAS_BIAS: tl.constexpr, DOT_IN_FP32: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                           SCALE_PER_TILE: tl.constexpr, WHOLE_GROUPS: tl.constexpr):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    G = K // GROUP_SIZE
    KQ = K // 4
    MB = tl.cdiv(K, 8)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    n64 = offs_n.to(tl.int64)
    x_cols = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm  # x tile read as (BLOCK_K, BLOCK_M)

    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        at = tl.load(x_cols + kk[:, None], mask=(kk < K)[:, None] & m_mask[None, :], other=0.0)
        codes = _load_codes(q_ptr, n64, n_mask, k0 // 2, stride_qn, KQ, BLOCK_K)
        v = _dequant_kept(codes, s_ptr, z_ptr, n64, n_mask, k0 // 2, G, GROUP_SIZE, HAS_ZEROS, BLOCK_N, BLOCK_K,
                          SCALE_PER_TILE, WHOLE_GROUPS)
        c0, c1 = load_meta_indices(meta_ptr, n64, n_mask, k0, stride_mn, MB, BLOCK_K)
        v0, v1 = split_pairs(v, BLOCK_N, BLOCK_K)
        w = expand24(v0, v1, c0, c1)  # fp32; rounded to x's dtype last (see sparse24._sparse24_kernel)
        if DOT_IN_FP32:
            if x_ptr.dtype.element_ty != tl.float32:  # interpreter bf16: the GPU's weight rounding
                w = w.to(x_ptr.dtype.element_ty).to(tl.float32)
            acc = tl.dot(w, at.to(tl.float32), acc, input_precision="tf32x3")
        else:
            acc = tl.dot(w.to(x_ptr.dtype.element_ty), at, acc)

    store_tile_nm(acc, offs_m, offs_n, m_mask, n_mask, b_ptr, b_ptr, b_ptr, y_ptr, stride_ym, False, HAS_BIAS, BLOCK_N)


# --------------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------------

PATHS = ("gemv", "gemm")


def choose_path(M: int) -> str:
    return "gemv" if M == 1 else "gemm"


def sparse24_w4a16_linear(x: torch.Tensor, qvalues: torch.Tensor, meta: torch.Tensor, scales: torch.Tensor,
                          zeros: torch.Tensor | None, group_size: int, bias: torch.Tensor | None = None, *,
                          path: str | None = None) -> torch.Tensor:
    """x (M, K) f32/bf16/f16 with unit inner stride, qvalues (N, K/4) uint8 and meta (N, ceil(K/8)) uint8
    with unit inner stride, scales (N, K/g) f32 and zeros (N, K/g) uint8 or None contiguous, group_size
    g (a multiple of 4 dividing K; -1 = K), bias (N,) contiguous or None -> (M, N) x.dtype.
    Inputs are validated by the caller. path ("gemv" | "gemm") overrides the choice made from M."""
    M, K = x.shape
    N = qvalues.shape[0]
    g = K if group_size == -1 else group_size
    path = path or choose_path(M)
    if path not in PATHS:
        raise ValueError(f"path: expected one of {PATHS}, got {path!r}")
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    z = zeros if zeros is not None else scales  # never read without HAS_ZEROS
    b = bias if bias is not None else scales
    common = dict(GROUP_SIZE=g, HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None)
    args = (x, qvalues, meta, scales, z, b, y)
    strides = (x.stride(0), qvalues.stride(0), meta.stride(0), y.stride(0), m_bucket(M))
    if path == "gemv":
        def grid(meta_):
            return (triton.cdiv(N, meta_["BLOCK_N"]), M)

        launch(_sparse24_w4a16_gemv_kernel)[grid](*args, N, K, *strides, **common)
    else:
        def grid(meta_):
            return (triton.cdiv(M, meta_["BLOCK_M"]) * triton.cdiv(N, meta_["BLOCK_N"]),)

        launch(_sparse24_w4a16_kernel)[grid](*args, M, N, K, *strides, DOT_IN_FP32=dot_in_fp32(x.dtype), **common)
    return y
