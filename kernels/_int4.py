"""Pieces shared by the int4 kernels (w4a16.py, w4a8.py): split-K choice and its deterministic
reduction, the dequantize kernel behind the large-M cuBLAS path, config pruning.

Canonical int4 weight (slmkern/formats/int4.py): w uint8 (N, K/2), byte j of row n holds
code[n, 2j] in bits 0-3 and code[n, 2j+1] in bits 4-7; scales fp32 (N, G); zeros uint8/fp32
(N, G) or None (z = 8); W[n, k] = (code - z[n, k // g]) * s[n, k // g], G = K / g.

Split-K never uses atomics: split s writes its fp32 partial sums to its own slice of a
workspace (SPLIT_K, M, N) and `_splitk_reduce_kernel` adds the slices in order 0, 1, ...,
so results are deterministic (and autotuning, which re-runs a kernel, cannot double-count).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._util import INTERPRET, cast_out, launch

SYMMETRIC_ZERO = 8  # z of every group when zeros is None (slmkern.formats.int4.SYMMETRIC_ZERO)
_Z8 = tl.constexpr(SYMMETRIC_ZERO)
# The fp32 with bits 0x4B000000 | c is 2^23 + c for 0 <= c < 2^23: an OR and a subtraction turn a
# code into a float without an int->float convert (a quarter-rate instruction on NVIDIA GPUs).
_MAGIC_BITS = tl.constexpr(0x4B000000)
_MAGIC = tl.constexpr(8388608.0)
_MAGIC_Z8 = tl.constexpr(8388608.0 + SYMMETRIC_ZERO)
MAX_SPLIT_K = 16
MIN_K_PER_SPLIT = 256  # a split below this many k does more bookkeeping than work


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (0 for anything else: no split-K there)."""
    if device.type != "cuda":
        return 0
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def choose_split_k(tiles: int, M: int, G: int, K: int, device: torch.device) -> int:
    """Splits of the K reduction so that `tiles` output tiles fill the GPU about twice.

    Splits fall on group boundaries (each split owns ceil(G / SPLIT_K) whole groups), so there
    are at most G of them; the fp32 workspace they write and re-read (8 * SPLIT_K * M * N bytes)
    stays under a quarter of the weight bytes (K * N / 2); 1 off CUDA (the interpreter tests
    force other values explicitly).
    """
    sms = sm_count(device)
    if sms == 0 or tiles >= sms:
        return 1
    want = triton.cdiv(2 * sms, max(tiles, 1))
    return int(max(1, min(want, G, MAX_SPLIT_K, K // MIN_K_PER_SPLIT, K // (64 * M))))


def pow2_at_least(n: int, lo: int) -> int:
    return max(lo, triton.next_power_of_2(n))


def chunk_k(block_k: int, group_size: int, min_k: int) -> int:
    """K extent of one tile step: BLOCK_K, but never past one group (padded to a power of two)."""
    return min(block_k, pow2_at_least(group_size, min_k))


def prune_tiles(tiles_by_bucket: dict, min_k: int):
    """early_config_prune: the tiles of the call's M_BUCKET, minus those that become the same tile
    once BLOCK_K is clamped to the group (chunk_k); keeps the first of each."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        wanted = set(tiles_by_bucket.get(args["M_BUCKET"], ()))
        g = args["GROUP_SIZE"]
        seen, kept = set(), []
        for c in configs:
            kw = c.kwargs
            tile = (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], c.num_warps, c.num_stages)
            if wanted and tile not in wanted:
                continue
            eff = (kw["BLOCK_M"], kw["BLOCK_N"], chunk_k(kw["BLOCK_K"], g, min_k), c.num_warps, c.num_stages)
            if eff not in seen:
                seen.add(eff)
                kept.append(c)
        return kept or list(configs[:1])

    return prune


def gemv_heuristics(min_k: int) -> dict:
    """Derived GEMV constexprs: CHUNK_K (k per group per step), GROUPS_PER_STEP, EVEN_CHUNK.
    (Each computed from the config alone: no heuristic reads another's result.)"""
    def chunk(a):
        return chunk_k(a["BLOCK_K"], a["GROUP_SIZE"], min_k)

    return {
        "CHUNK_K": chunk,
        "GROUPS_PER_STEP": lambda a: max(1, a["BLOCK_K"] // chunk(a)),
        "EVEN_CHUNK": lambda a: a["GROUP_SIZE"] % chunk(a) == 0,
    }


def tile_heuristics(min_k: int) -> dict:
    """Derived tiled-GEMM constexprs: CHUNK_K (the dot's K), EVEN_CHUNK."""
    def chunk(a):
        return chunk_k(a["BLOCK_K"], a["GROUP_SIZE"], min_k)

    return {
        "CHUNK_K": chunk,
        "EVEN_CHUNK": lambda a: a["GROUP_SIZE"] % chunk(a) == 0,
    }


@triton.jit
def load_zero_offset(ptrs, mask, HAS_ZEROS: tl.constexpr, FLOAT_ZEROS: tl.constexpr):
    """What `codes_minus_zero` subtracts: 2^23 + z (exact for integer z <= 255), or fp32 zeros as they are."""
    if HAS_ZEROS:
        z = tl.load(ptrs, mask=mask, other=0).to(tl.float32)
        if not FLOAT_ZEROS:
            z = z + _MAGIC
        return z
    else:
        return _MAGIC_Z8


@triton.jit
def codes_minus_zero(nib, zoff, FLOAT_ZEROS: tl.constexpr):
    """fp32 code - z from 4-bit codes (any integer dtype) and zoff = load_zero_offset(...)."""
    f = (nib.to(tl.int32) | _MAGIC_BITS).to(tl.float32, bitcast=True)  # 2^23 + code, exact
    if FLOAT_ZEROS:
        return (f - _MAGIC) - zoff
    else:
        return f - zoff


@triton.jit
def split_groups(G, SPLIT_K: tl.constexpr):
    """[g_begin, g_end) of this program's split (program_id(1))."""
    per = tl.cdiv(G, SPLIT_K)
    g_begin = tl.program_id(1) * per
    g_end = tl.minimum(G, g_begin + per)
    return g_begin, g_end


# --------------------------------------------------------------------------------------------
# split-K reduction
# --------------------------------------------------------------------------------------------

@triton.jit
def _splitk_reduce_kernel(ws_ptr, sx_ptr, b_ptr, y_ptr, M, N, stride_ym, SPLIT_K: tl.constexpr,
                          HAS_ROW_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    """y[m, n] = (sum_s ws[s, m, n]) [* sx[m]] [+ bias[n]], slices added in split order."""
    row = tl.program_id(1).to(tl.int64)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    ptrs = ws_ptr + row * N + offs_n
    y = tl.load(ptrs, mask=n_mask, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        y = y + tl.load(ptrs + s * M * N, mask=n_mask, other=0.0)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    if HAS_ROW_SCALE:
        sx = tl.load(sx_ptr + row)
        if HAS_BIAS:
            # the rounded product, then the bias: no FMA contraction (as the reference's two steps)
            y = tl.fma(y, sx, 0.0) + bias
        else:
            y = y * sx
    elif HAS_BIAS:
        y = y + bias
    tl.store(y_ptr + row * stride_ym + offs_n, cast_out(y, y_ptr.dtype.element_ty), mask=n_mask)


def splitk_reduce(ws: torch.Tensor, sx: torch.Tensor | None, bias: torch.Tensor | None, y: torch.Tensor) -> None:
    S, M, N = ws.shape
    block_n = min(1024, triton.next_power_of_2(N)) if not INTERPRET else 32
    grid = (triton.cdiv(N, block_n), M)
    launch(_splitk_reduce_kernel)[grid](ws, sx if sx is not None else ws, bias if bias is not None else ws, y,
                                        M, N, y.stride(0), SPLIT_K=S, HAS_ROW_SCALE=sx is not None,
                                        HAS_BIAS=bias is not None, BLOCK_N=block_n,
                                        num_warps=4 if block_n >= 512 else 1)


# --------------------------------------------------------------------------------------------
# dequantize (large-M path of w4a16: W in x's dtype, then cuBLAS)
# --------------------------------------------------------------------------------------------

@triton.jit
def _w4_dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_wn, GROUP_SIZE: tl.constexpr,
                       HAS_ZEROS: tl.constexpr, FLOAT_ZEROS: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, SCALE_PER_TILE: tl.constexpr):
    """out (N, K) = ((code - z) * s) in out's dtype (round to nearest even)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    offs_h = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    k_mask = offs_k < K
    G = K // GROUP_SIZE
    n64 = offs_n.to(tl.int64)
    b = tl.load(w_ptr + n64[:, None] * stride_wn + offs_h[None, :],
                mask=n_mask[:, None] & (offs_h < K // 2)[None, :], other=0)
    codes = tl.interleave(b & 0xF, b >> 4)  # (BLOCK_N, BLOCK_K), column j is k = k0 + j
    if SCALE_PER_TILE:  # the tile lies inside one group: one scale (and zero) per row
        gi = k0 // GROUP_SIZE
        s = tl.load(s_ptr + n64 * G + gi, mask=n_mask, other=0.0)[:, None]
        zoff = load_zero_offset(z_ptr + n64 * G + gi, n_mask, HAS_ZEROS, FLOAT_ZEROS)
        if HAS_ZEROS:
            zoff = zoff[:, None]
    else:
        sz_off = n64[:, None] * G + (offs_k // GROUP_SIZE)[None, :]
        sz_mask = n_mask[:, None] & k_mask[None, :]
        s = tl.load(s_ptr + sz_off, mask=sz_mask, other=0.0)
        zoff = load_zero_offset(z_ptr + sz_off, sz_mask, HAS_ZEROS, FLOAT_ZEROS)
    wv = codes_minus_zero(codes, zoff, FLOAT_ZEROS) * s
    tl.store(out_ptr + n64[:, None] * K + offs_k[None, :], cast_out(wv, out_ptr.dtype.element_ty),
             mask=n_mask[:, None] & k_mask[None, :])


def dequantize(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int,
               dtype: torch.dtype) -> torch.Tensor:
    """Canonical int4 (validated, contiguous) -> W (N, K) in `dtype`."""
    N, K = w.shape[0], 2 * w.shape[1]
    out = torch.empty((N, K), dtype=dtype, device=w.device)
    block_n, block_k = (16, 32) if INTERPRET else (32, 256)
    grid = (triton.cdiv(N, block_n), triton.cdiv(K, block_k))
    launch(_w4_dequant_kernel)[grid](w, scales, zeros if zeros is not None else scales, out, N, K, w.stride(0),
                                     GROUP_SIZE=group_size, HAS_ZEROS=zeros is not None,
                                     FLOAT_ZEROS=zeros is not None and zeros.dtype == torch.float32,
                                     BLOCK_N=block_n, BLOCK_K=block_k,
                                     SCALE_PER_TILE=group_size % block_k == 0, num_warps=4)
    return out
