"""sparse24_linear: x (M, K) f32/bf16/f16, values (N, K/2) f32/bf16/f16/int8, meta (N, ceil(K/8)) uint8,
scales (N,) f32 (int8 values only), bias (N,) f32/x.dtype? -> (M, N) x.dtype.

2:4 semi-structured weights (contract: briefs/SPARSE_CONTRACT.md, format slmkern/formats/sparse24.py):
every group of 4 dense columns 4g..4g+3 keeps 2 values, values[n, 2g + j] at in-group column c_j,
c0 = nibble & 3 and c1 = (nibble >> 2) & 3 of group g's nibble (low nibble of meta byte g // 2 for
even g). Nothing is decompressed to memory:

- M == 1 (decode): `_sparse24_gemv_kernel` on the CUDA cores. Instead of building the dense row it
  loads, for each kept value, the x entry it meets (a gather at 4g + c from the L1-resident row),
  so the work is K/2 multiply-adds. int8 values quantize the row in the kernel (as w8a8's GEMV)
  and accumulate in int32.
- M >= 2: `_sparse24_kernel`, a tiled tensor-core GEMM. Each (BLOCK_N x BLOCK_K) weight tile is
  expanded to dense in registers (where + interleave; no shared-memory gather) and is the dot's
  A operand: the kernel computes y's tile transposed, W_tile @ x_tile^T, so the expanded tile
  needs no transpose (tl.trans of it crashed triton 3.6's dot-operand pass on Hopper). int8 values take quantized rows (_act_quant.quantize_rows) and an int8 x int8 -> int32 dot.

Float values: y = x @ W.T + bias with fp32 accumulation (fp32 x: a tf32x3 dot; 16-bit x: weights
rounded to x's dtype when values are wider, as cuBLAS on a converted weight would).
int8 values: y = float(acc) * (sx[m] * scales[n]) + bias with w8a8's epilogue, bit-exact with
slmkern.reference.w8a8_linear on the decompressed int8 weight.
Whatever meta holds, every index stays inside its group: no input makes a kernel read out of bounds.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import INTERPRET, grouped_tile, launch, m_bucket, prune_to_bucket, tiled_configs
from ._act_quant import quantize_rows, row_absmax_params, row_block, store_row, store_tile_nm
from .w8a8 import _quantize

META_COLS = 8  # dense columns per meta byte: tiles start at multiples of 8


# --------------------------------------------------------------------------------------------
# 2:4 pieces shared with sparse24_w4a16.py
# --------------------------------------------------------------------------------------------

@triton.jit
def load_meta_indices(meta_ptr, n64, n_mask, k0, stride_mn, MB, BLOCK_K: tl.constexpr):
    """In-group columns (c0, c1), int32 (BLOCK_N, BLOCK_K // 4), of the groups of dense columns
    k0 .. k0 + BLOCK_K (k0 a multiple of 8); groups past the row's meta read as (0, 0)."""
    offs_b = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    b = tl.load(meta_ptr + n64[:, None] * stride_mn + offs_b[None, :],
                mask=n_mask[:, None] & (offs_b < MB)[None, :], other=0).to(tl.int32)
    nib = tl.interleave(b & 0xF, b >> 4)  # group 2i in the low nibble, 2i + 1 in the high one
    return nib & 3, (nib >> 2) & 3


@triton.jit
def split_pairs(v, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_N, BLOCK_K // 2) kept values -> (kept value 0, kept value 1), each (BLOCK_N, BLOCK_K // 4)."""
    return tl.split(tl.reshape(v, [BLOCK_N, BLOCK_K // 4, 2]))


@triton.jit
def expand24(v0, v1, c0, c1):
    """Kept values (v0 at column c0, v1 at c1), each (BLOCK_N, G) -> dense (BLOCK_N, 4 G), v's dtype.

    interleave(interleave(d0, d2), interleave(d1, d3)) lays column 4g + c at d_c[g]; interleave
    keeps each pair in one thread's registers, so no data moves between threads."""
    zero = tl.zeros_like(v0)
    d0 = tl.where(c0 == 0, v0, zero)
    d1 = tl.where(c0 == 1, v0, tl.where(c1 == 1, v1, zero))
    d2 = tl.where(c0 == 2, v0, tl.where(c1 == 2, v1, zero))
    d3 = tl.where(c1 == 3, v1, zero)
    return tl.interleave(tl.interleave(d0, d2), tl.interleave(d1, d3))


# --------------------------------------------------------------------------------------------
# M == 1: GEMV, each kept value meets the x entry its 2-bit index points at
# --------------------------------------------------------------------------------------------

@triton.jit
def load_group_indices(meta_ptr, n64, gg, mask, stride_mn):
    """In-group columns (c0, c1), int32, of groups gg (BLOCK_N, BLOCK_G) of rows n64, read from
    the group's nibble directly (the byte is re-read for both groups it holds: L1 hits)."""
    b = tl.load(meta_ptr + n64[:, None] * stride_mn + (gg >> 1)[None, :], mask=mask, other=0).to(tl.int32)
    nib = (b >> ((gg & 1) * 4)[None, :]) & 0xF
    return nib & 3, (nib >> 2) & 3


def _gemv_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 64}, num_warps=4)]
    # BLOCK_N * BLOCK_K / 2 kept values per step.
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bn, bk, w, s in ((32, 512, 4, 3), (16, 1024, 4, 3), (64, 256, 4, 3))]


@triton.autotune(configs=_gemv_configs(), key=["M_BUCKET", "N", "K"])
@triton.jit
def _sparse24_gemv_kernel(x_ptr, v_ptr, meta_ptr, ws_ptr, b_ptr, y_ptr, N, K, stride_xm, stride_vn, stride_mn,
                          stride_ym, M_BUCKET, INT8_VALUES: tl.constexpr, HAS_BIAS: tl.constexpr,
                          X_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Plain (gather) loads only: x entries at 4g + c (L1-resident: the row is K floats), kept
    # values 0 and 1 of each group, its meta nibble; no register reshapes between threads.
    BLOCK_G: tl.constexpr = BLOCK_K // 4
    pid_n = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    NG = K // 4
    if INT8_VALUES:
        inv, sx, ok = row_absmax_params(x_row, K, X_BLOCK)
        acc = tl.zeros([BLOCK_N, BLOCK_G], dtype=tl.int32)
    else:
        sx = 0.0  # unused by the float epilogue
        acc = tl.zeros([BLOCK_N, BLOCK_G], dtype=tl.float32)

    offs_g = tl.arange(0, BLOCK_G)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    n64 = offs_n.to(tl.int64)
    v_rows = v_ptr + n64[:, None] * stride_vn
    for g0 in range(0, NG, BLOCK_G):
        gg = g0 + offs_g
        mask = n_mask[:, None] & (gg < NG)[None, :]
        v0 = tl.load(v_rows + 2 * gg[None, :], mask=mask, other=0)
        v1 = tl.load(v_rows + 2 * gg[None, :] + 1, mask=mask, other=0)
        c0, c1 = load_group_indices(meta_ptr, n64, gg, mask, stride_mn)
        col = 4 * gg[None, :]  # 4g + c < K for every g < K / 4, whatever c (0..3)
        x0 = tl.load(x_row + col + c0, mask=mask, other=0.0).to(tl.float32)
        x1 = tl.load(x_row + col + c1, mask=mask, other=0.0).to(tl.float32)
        if INT8_VALUES:
            acc += v0.to(tl.int32) * _quantize(x0, inv, ok) + v1.to(tl.int32) * _quantize(x1, inv, ok)
        else:
            acc += v0.to(tl.float32) * x0 + v1.to(tl.float32) * x1

    store_row(tl.sum(acc, axis=1), row, sx, ws_ptr, b_ptr, y_ptr, stride_ym, offs_n, n_mask, INT8_VALUES, HAS_BIAS)


# --------------------------------------------------------------------------------------------
# M >= 2: tiled GEMM, weight tiles expanded to dense in registers
# --------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per M bucket: two each, so a benchmark
# sweep compiles few configs. BLOCK_K >= 32 (int8 tl.dot) and a multiple of 8 (meta bytes).
_GEMM_TILES = {
    16: ((16, 64, 128, 4, 4), (16, 128, 128, 4, 3)),
    64: ((32, 64, 128, 4, 4), (64, 128, 64, 4, 3)),
    256: ((64, 128, 64, 4, 3), (128, 128, 64, 8, 3)),
    1024: ((128, 128, 64, 8, 3), (128, 256, 64, 8, 3)),
}
# Interpreter: one small tile; GROUP_M=4 so the tests' M=65 (5 row tiles) covers a partial group.
_GEMM_CONFIGS = tiled_configs(_GEMM_TILES, interpret_tile=(16, 32, 32, 4, 1), group_m=4 if INTERPRET else 8)


@triton.autotune(configs=_GEMM_CONFIGS, key=["M_BUCKET", "N", "K"],
                 prune_configs_by={"early_config_prune": prune_to_bucket(_GEMM_TILES)})
@triton.jit
def _sparse24_kernel(a_ptr, sx_ptr, v_ptr, meta_ptr, ws_ptr, b_ptr, y_ptr, M, N, K, stride_am, stride_vn,
                     stride_mn, stride_ym, M_BUCKET, INT8_VALUES: tl.constexpr, HAS_BIAS: tl.constexpr,
                     DOT_IN_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    KH = K // 2
    MB = tl.cdiv(K, 8)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_j = tl.arange(0, BLOCK_K // 2)
    m_mask = offs_m < M
    n_mask = offs_n < N
    n64 = offs_n.to(tl.int64)
    a_cols = a_ptr + offs_m[None, :].to(tl.int64) * stride_am  # x tile read as (BLOCK_K, BLOCK_M)
    v_rows = v_ptr + n64[:, None] * stride_vn

    if INT8_VALUES:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.int32)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        jj = k0 // 2 + offs_j
        at = tl.load(a_cols + kk[:, None], mask=(kk < K)[:, None] & m_mask[None, :], other=0)
        v = tl.load(v_rows + jj[None, :], mask=n_mask[:, None] & (jj < KH)[None, :], other=0)
        c0, c1 = load_meta_indices(meta_ptr, n64, n_mask, k0, stride_mn, MB, BLOCK_K)
        v0, v1 = split_pairs(v, BLOCK_N, BLOCK_K)
        if INT8_VALUES:
            acc = tl.dot(expand24(v0, v1, c0, c1), at, acc, out_dtype=tl.int32)  # exact
        elif DOT_IN_FP32:
            w = expand24(v0, v1, c0, c1)
            if a_ptr.dtype.element_ty != tl.float32:  # interpreter bf16: the GPU's weight rounding
                w = w.to(a_ptr.dtype.element_ty).to(tl.float32)
            acc = tl.dot(w.to(tl.float32), at.to(tl.float32), acc, input_precision="tf32x3")
        else:
            w = expand24(v0, v1, c0, c1).to(a_ptr.dtype.element_ty)
            acc = tl.dot(w, at, acc)

    # acc is y's tile transposed, (BLOCK_N, BLOCK_M)
    store_tile_nm(acc, offs_m, offs_n, m_mask, n_mask, sx_ptr, ws_ptr, b_ptr, y_ptr, stride_ym, INT8_VALUES, HAS_BIAS,
                  BLOCK_N)


# --------------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------------

PATHS = ("gemv", "gemm")


def choose_path(M: int) -> str:
    return "gemv" if M == 1 else "gemm"


def dot_in_fp32(dtype: torch.dtype) -> bool:
    # fp32 x: a tf32x3 dot. The interpreter multiplies bf16 dot operands as raw uint16 (triton 3.9),
    # so bf16 takes fp32 operands there (same products, bf16-rounded weights), and only there.
    return dtype == torch.float32 or (INTERPRET and dtype == torch.bfloat16)


def sparse24_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, scales: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None, *, path: str | None = None) -> torch.Tensor:
    """x (M, K) f32/bf16/f16 with unit inner stride, values (N, K/2) float or int8, meta (N, ceil(K/8))
    uint8, both with unit inner stride, scales (N,) f32 contiguous (int8 values) or None, bias (N,)
    contiguous or None -> (M, N) x.dtype. Inputs are validated by the caller.

    path ("gemv" | "gemm") overrides the choice made from M (tests reach both paths on small shapes).
    """
    M, K = x.shape
    N = values.shape[0]
    int8_values = values.dtype == torch.int8
    path = path or choose_path(M)
    if path not in PATHS:
        raise ValueError(f"path: expected one of {PATHS}, got {path!r}")
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    dummy = scales if scales is not None else values  # never read when its flag is off
    b = bias if bias is not None else dummy
    ws = scales if int8_values else dummy
    if path == "gemv":
        def grid(meta_):
            return (triton.cdiv(N, meta_["BLOCK_N"]), M)

        launch(_sparse24_gemv_kernel)[grid](x, values, meta, ws, b, y, N, K, x.stride(0), values.stride(0),
                                            meta.stride(0), y.stride(0), m_bucket(M), INT8_VALUES=int8_values,
                                            HAS_BIAS=bias is not None, X_BLOCK=row_block(K))
        return y
    if int8_values:
        a, sx = quantize_rows(x)
    else:
        a, sx = x, dummy

    def grid(meta_):
        return (triton.cdiv(M, meta_["BLOCK_M"]) * triton.cdiv(N, meta_["BLOCK_N"]),)

    launch(_sparse24_kernel)[grid](a, sx, values, meta, ws, b, y, M, N, K, a.stride(0), values.stride(0),
                                   meta.stride(0), y.stride(0), m_bucket(M), INT8_VALUES=int8_values,
                                   HAS_BIAS=bias is not None, DOT_IN_FP32=dot_in_fp32(x.dtype))
    return y
