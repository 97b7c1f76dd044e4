"""sparse_linear: x (M, K) f32/bf16/f16, values (nnz,) f32/bf16/f16/int8, bitmask (N, ceil(K/8)) uint8,
row_offsets (N + 1,) int64, scales (N,) f32 (int8 values only), bias (N,) f32/x.dtype? -> (M, N) x.dtype.

Unstructured sparsity as a bitmask (contract: briefs/SPARSE_CONTRACT.md, format
slmkern/formats/bitmask.py): bit i of byte b of row n marks column 8b + i; row n's nonzeros are
values[row_offsets[n] : row_offsets[n + 1]] in column order. A program walks its rows' K in tiles
and keeps, per row, the index of the tile's first value (row_offsets[n] plus the popcount of the
tiles before); inside a tile an exclusive prefix sum of the bits gives each set bit its value.
Value indices outside [0, nnz) are masked, so whatever row_offsets holds, nothing is read out of
bounds (the op validates row_offsets against the popcounts before this runs).

- M == 1: `_sparse_gemv_kernel`, multiply-reduce on the CUDA cores; int8 values quantize the row
  in the kernel (as w8a8's GEMV) and accumulate in int32.
- M >= 2: `_sparse_kernel`, the tile expanded to dense in registers as the A operand of a
  tensor-core tl.dot computing y's tile transposed (as sparse24.py; int8: quantized rows from
  _act_quant.quantize_rows (= w8a8.quantize_rows_s8), int8 x int8 -> int32).

Float values: y = x @ W.T + bias, fp32 accumulation (as sparse24.py); int8 values: w8a8's epilogue,
bit-exact with slmkern.reference.w8a8_linear on the dense int8 weight.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import INTERPRET, grouped_tile, launch, m_bucket, prune_to_bucket, tiled_configs
from ._act_quant import quantize_rows, row_absmax_params, row_block, store_row, store_tile_nm
from .sparse24 import dot_in_fp32
from .w8a8 import _quantize


@triton.jit
def _load_tile(v_ptr, mask_ptr, n64, n_mask, start, kk, K, NNZ, stride_bn):
    """(dense weight tile (BLOCK_N, BLOCK_K) in values' dtype, its bits per row) for columns kk."""
    live = n_mask[:, None] & (kk < K)[None, :]
    byte = tl.load(mask_ptr + n64[:, None] * stride_bn + (kk >> 3)[None, :], mask=live, other=0).to(tl.int32)
    bit = (byte >> (kk & 7)[None, :]) & 1
    pos = start[:, None] + (tl.cumsum(bit, axis=1) - bit)  # index of this column's value, if set
    take = (bit != 0) & (pos >= 0) & (pos < NNZ)
    w = tl.load(v_ptr + pos, mask=take, other=0)
    return w, tl.sum(bit, axis=1)


# --------------------------------------------------------------------------------------------
# M == 1: GEMV
# --------------------------------------------------------------------------------------------

def _gemv_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 64}, num_warps=4)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bn, bk, w, s in ((16, 256, 4, 3), (32, 256, 4, 3), (16, 512, 4, 3))]


@triton.autotune(configs=_gemv_configs(), key=["M_BUCKET", "N", "K"])
@triton.jit
def _sparse_gemv_kernel(x_ptr, v_ptr, mask_ptr, off_ptr, ws_ptr, b_ptr, y_ptr, N, K, NNZ, stride_xm, stride_bn,
                        stride_ym, M_BUCKET, INT8_VALUES: tl.constexpr, HAS_BIAS: tl.constexpr,
                        X_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    if INT8_VALUES:
        inv, sx, ok = row_absmax_params(x_row, K, X_BLOCK)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.int32)
    else:
        sx = 0.0  # unused by the float epilogue
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)

    offs_k = tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    n64 = offs_n.to(tl.int64)
    start = tl.load(off_ptr + offs_n, mask=n_mask, other=0)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        xf = tl.load(x_row + kk, mask=kk < K, other=0.0).to(tl.float32)
        w, count = _load_tile(v_ptr, mask_ptr, n64, n_mask, start, kk, K, NNZ, stride_bn)
        start += count
        if INT8_VALUES:
            acc += w.to(tl.int32) * _quantize(xf, inv, ok)[None, :]
        else:
            acc += w.to(tl.float32) * xf[None, :]

    store_row(tl.sum(acc, axis=1), row, sx, ws_ptr, b_ptr, y_ptr, stride_ym, offs_n, n_mask, INT8_VALUES, HAS_BIAS)


# --------------------------------------------------------------------------------------------
# M >= 2: tiled GEMM
# --------------------------------------------------------------------------------------------

_GEMM_TILES = {
    16: ((16, 64, 64, 4, 4), (16, 128, 64, 4, 3)),
    64: ((32, 64, 64, 4, 4), (64, 128, 64, 4, 3)),
    256: ((64, 128, 64, 4, 3), (128, 128, 64, 8, 3)),
    1024: ((128, 128, 64, 8, 3), (128, 256, 64, 8, 3)),
}
_GEMM_CONFIGS = tiled_configs(_GEMM_TILES, interpret_tile=(16, 32, 32, 4, 1), group_m=4 if INTERPRET else 8)


@triton.autotune(configs=_GEMM_CONFIGS, key=["M_BUCKET", "N", "K"],
                 prune_configs_by={"early_config_prune": prune_to_bucket(_GEMM_TILES)})
@triton.jit
def _sparse_kernel(a_ptr, sx_ptr, v_ptr, mask_ptr, off_ptr, ws_ptr, b_ptr, y_ptr, M, N, K, NNZ, stride_am,
                   stride_bn, stride_ym, M_BUCKET, INT8_VALUES: tl.constexpr, HAS_BIAS: tl.constexpr,
                   DOT_IN_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    n64 = offs_n.to(tl.int64)
    a_cols = a_ptr + offs_m[None, :].to(tl.int64) * stride_am  # x tile read as (BLOCK_K, BLOCK_M)
    start = tl.load(off_ptr + offs_n, mask=n_mask, other=0)

    if INT8_VALUES:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.int32)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        at = tl.load(a_cols + kk[:, None], mask=(kk < K)[:, None] & m_mask[None, :], other=0)
        w, count = _load_tile(v_ptr, mask_ptr, n64, n_mask, start, kk, K, NNZ, stride_bn)
        start += count
        if INT8_VALUES:
            acc = tl.dot(w, at, acc, out_dtype=tl.int32)  # int8 x int8 -> int32: exact
        elif DOT_IN_FP32:
            if a_ptr.dtype.element_ty != tl.float32:  # interpreter bf16: the GPU's weight rounding
                w = w.to(a_ptr.dtype.element_ty)
            acc = tl.dot(w.to(tl.float32), at.to(tl.float32), acc, input_precision="tf32x3")
        else:
            acc = tl.dot(w.to(a_ptr.dtype.element_ty), at, acc)

    # acc is y's tile transposed, (BLOCK_N, BLOCK_M)
    store_tile_nm(acc, offs_m, offs_n, m_mask, n_mask, sx_ptr, ws_ptr, b_ptr, y_ptr, stride_ym, INT8_VALUES, HAS_BIAS,
                  BLOCK_N)


# --------------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------------

PATHS = ("gemv", "gemm")


def choose_path(M: int) -> str:
    return "gemv" if M == 1 else "gemm"


def sparse_linear(x: torch.Tensor, values: torch.Tensor, bitmask: torch.Tensor, row_offsets: torch.Tensor,
                  scales: torch.Tensor | None = None, bias: torch.Tensor | None = None, *,
                  path: str | None = None) -> torch.Tensor:
    """x (M, K) f32/bf16/f16 with unit inner stride, values (nnz,) float or int8 contiguous, bitmask
    (N, ceil(K/8)) uint8 with unit inner stride, row_offsets (N + 1,) int64 contiguous, scales (N,) f32
    contiguous (int8 values) or None, bias (N,) contiguous or None -> (M, N) x.dtype.
    Inputs are validated by the caller. path ("gemv" | "gemm") overrides the choice made from M."""
    M, K = x.shape
    N = bitmask.shape[0]
    nnz = values.shape[0]
    int8_values = values.dtype == torch.int8
    path = path or choose_path(M)
    if path not in PATHS:
        raise ValueError(f"path: expected one of {PATHS}, got {path!r}")
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    if nnz == 0:  # every row 100% sparse: any valid pointer will do, no value is ever read (NNZ = 0)
        values = torch.zeros(1, dtype=values.dtype, device=values.device)
    dummy = scales if scales is not None else row_offsets
    b = bias if bias is not None else dummy
    ws = scales if int8_values else dummy
    if path == "gemv":
        def grid(meta_):
            return (triton.cdiv(N, meta_["BLOCK_N"]), M)

        launch(_sparse_gemv_kernel)[grid](x, values, bitmask, row_offsets, ws, b, y, N, K, nnz, x.stride(0),
                                          bitmask.stride(0), y.stride(0), m_bucket(M), INT8_VALUES=int8_values,
                                          HAS_BIAS=bias is not None, X_BLOCK=row_block(K))
        return y
    if int8_values:
        a, sx = quantize_rows(x)
    else:
        a, sx = x, dummy

    def grid(meta_):
        return (triton.cdiv(M, meta_["BLOCK_M"]) * triton.cdiv(N, meta_["BLOCK_N"]),)

    launch(_sparse_kernel)[grid](a, sx, values, bitmask, row_offsets, ws, b, y, M, N, K, nnz, a.stride(0),
                                 bitmask.stride(0), y.stride(0), m_bucket(M), INT8_VALUES=int8_values,
                                 HAS_BIAS=bias is not None, DOT_IN_FP32=dot_in_fp32(x.dtype))
    return y
