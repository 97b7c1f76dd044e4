"""2:4 semi-structured weight format (the contract: /work/briefs/SPARSE_CONTRACT.md).

Canonical (what is saved), for a Linear weight W ``[N, K]`` with K % 4 == 0 and at most two
nonzeros in every group of 4 consecutive columns (4g .. 4g+3) of a row:

``values [N, K/2]``  values[n, 2g + j] = the j-th kept value (j = 0, 1) of group g, kept columns
    in increasing order. float32/bfloat16/float16 ("float values"), or int8 in [-127, 127] with
    per-row ``scales [N]`` float32, W = values * scales[n] ("int8 values").

``meta uint8 [N, ceil(K/8)]``  two groups per byte::

        byte b:  bits 0-1 = c0(group 2b)   bits 2-3 = c1(group 2b)      (low nibble)
                 bits 4-5 = c0(group 2b+1) bits 6-7 = c1(group 2b+1)    (high nibble)

    c0 < c1 are the in-group columns of kept values 0 and 1. If K % 8 == 4 the last high nibble
    is 0. Read as a little-endian integer, kept value i of a row sits at bits 2i .. 2i+1 of the
    row's meta: the kernels read 16 kept values per 32-bit word.

Canonical compression of a group with fewer than 2 nonzeros: kept columns = its nonzero columns,
then the lowest unused columns, sorted; padding values are 0 (dense -> values, meta -> dense is
exact and deterministic).

2:4 x int4 ("int4 values"): the [N, K/2] kept values are int4 codes 0..15, ``qvalues uint8
[N, K/4]`` (kept value j in byte j // 2, low nibble first), ``scales float32 [N, K/g]`` over the
DENSE columns, ``zeros uint8 [N, K/g]`` in 0..15 or None (= 8):
W[n, k] = (code - zero[n, k // g]) * scale[n, k // g] at kept positions, 0 elsewhere.
Padding codes equal the zero point, so they dequantize to exactly 0.

CPU packed layouts (built by ``slmkern._backends.cpu.prepack_sparse24``, never saved;
csrc/include/slmkern/sparse24.h)::

    float values, version 1:
    Np = ceil(N/4)*4, Kp = ceil(K/128)*128, C = Kp/128 chunks of 128 dense columns (64 kept values)
    block(t, c), t < Np/4 row tiles of 4 rows, c < C, stored t-major:
        values[4][64]   the 64 kept values of chunk c of rows 4t..4t+3, value dtype, zero padded
        meta  [4][16]   their meta bytes (16 per row), zero padded

    int8 values, version 2 (16 rows = the 16 int32 lanes of one vpdpbusd):
    Np = ceil(N/16)*16, Kp = ceil(K/32)*32, S = Kp/32 blocks; a block is 4 windows of 8 dense
    columns (one canonical meta byte, 4 kept values per row)
    block(t, s), t < Np/16 row tiles of 16 rows, s < S, 320 bytes, stored t-major:
        values[4][16][4] int8   [w][r][j] = kept value 16s + 4w + j of row 16t + r
        meta  [8][4][2]  uint8  [r//2][w][r%2] = canonical meta byte 4s + w of row 16t + r
    rowsum int32 [Np]   sum of the row's kept values (the +128 shift of u8 activations)
One row tile is one sequential stream: the M=1 kernels read exactly the bytes they need, in order.
"""
from __future__ import annotations

import torch

from slmkern.formats.common import FLOAT_DTYPES, SPARSE24_INT4_GROUP_MULTIPLE, group_size_ok, group_size_rule

VALUE_DTYPES = FLOAT_DTYPES + (torch.int8,)
CHUNK_K = 128   # dense columns per packed chunk
TILE_N = 4      # rows per packed tile
I8_TILE_N = 16      # int8 values: rows per packed tile
I8_BLOCK_K = 32     # int8 values: dense columns per block (4 windows of 8)
I8_BLOCK_BYTES = 320
SYMMETRIC_ZERO = 8


def _ceil(a: int, b: int) -> int:
    return (a + b - 1) // b * b


def meta_cols(K: int) -> int:
    return (K + 7) // 8


def value_code(dtype: torch.dtype) -> int:
    """C++ value-dtype code: 0 f32, 1 bf16, 2 f16, 3 int8."""
    return {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.int8: 3}[dtype]


def packed_bytes(N: int, K: int, values_dtype: torch.dtype) -> int:
    """Bytes of the CPU packed layout for an [N, K] 2:4 weight with values of `values_dtype`."""
    if values_dtype == torch.int8:
        Np, Kp = _ceil(N, I8_TILE_N), _ceil(K, I8_BLOCK_K)
        return (Np // I8_TILE_N) * (Kp // I8_BLOCK_K) * I8_BLOCK_BYTES + 4 * Np
    Np, Kp = _ceil(N, TILE_N), _ceil(K, CHUNK_K)
    vs = torch.empty((), dtype=values_dtype).element_size()
    return (Np // TILE_N) * (Kp // CHUNK_K) * (TILE_N * (CHUNK_K // 2) * vs + TILE_N * (CHUNK_K // 8))


# ----------------------------------------------------------------------------- compress / decompress

def _canonical_table() -> torch.Tensor:
    """(16, 2): nonzero pattern of a group (bit c = column c) -> its canonical kept columns."""
    rows = []
    for p in range(16):
        cols = [c for c in range(4) if p >> c & 1][:2]
        cols += [c for c in range(4) if c not in cols][: 2 - len(cols)]   # lowest unused columns
        rows.append(sorted(cols))
    return torch.tensor(rows, dtype=torch.int64)


_CANONICAL = _canonical_table()


def _kept_columns(nz: torch.Tensor) -> torch.Tensor:
    """nz bool (N, G, 4) with <= 2 True per group -> canonical kept columns (N, G, 2), sorted."""
    pattern = (nz.to(torch.int64) * torch.tensor([1, 2, 4, 8], device=nz.device)).sum(-1)
    return _CANONICAL.to(nz.device)[pattern]


def _meta_from_cols(cols: torch.Tensor, K: int) -> torch.Tensor:
    N, G, _ = cols.shape
    nib = (cols[..., 0] | (cols[..., 1] << 2)).to(torch.uint8)     # (N, G)
    if G % 2:
        nib = torch.cat([nib, torch.zeros(N, 1, dtype=torch.uint8, device=nib.device)], dim=1)
    nib = nib.reshape(N, -1, 2)
    return (nib[..., 0] | (nib[..., 1] << 4)).contiguous()


def _cols_from_meta(meta: torch.Tensor, K: int) -> torch.Tensor:
    """meta (N, ceil(K/8)) -> in-group columns (N, K/4, 2) as int64."""
    m = meta.to(torch.int64)
    nib = torch.stack([m & 0xF, m >> 4], dim=-1).reshape(m.shape[0], -1)[:, : K // 4]
    return torch.stack([nib & 3, (nib >> 2) & 3], dim=-1)


def _check_dense(dense: torch.Tensor) -> tuple[int, int]:
    if not isinstance(dense, torch.Tensor) or dense.dim() != 2:
        raise ValueError(f"dense: expected a 2-D tensor (N, K), got {getattr(dense, 'shape', type(dense))}")
    N, K = dense.shape
    if K % 4 != 0 or K == 0 or N == 0:
        raise ValueError(f"dense: K must be a positive multiple of 4 for 2:4 sparsity, got K={K} (N={N})")
    return N, K


def compress(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dense (N, K) float or int8, <= 2 nonzeros per group of 4 -> (values (N, K/2) same dtype, meta uint8).

    Raises ValueError if a group has more than 2 nonzeros (prune first: slmkern.algorithms).
    """
    N, K = _check_dense(dense)
    if dense.dtype not in VALUE_DTYPES:
        raise TypeError(f"dense: expected float32/bfloat16/float16 or int8, got {dense.dtype}")
    g = dense.detach().reshape(N, K // 4, 4)
    nz = g != 0
    cnt = nz.sum(-1)
    if bool((cnt > 2).any()):
        bad = int((cnt > 2).nonzero()[0, 0])
        raise ValueError(f"dense: row {bad} has a group of 4 columns with more than 2 nonzeros; not 2:4 sparse")
    cols = _kept_columns(nz)
    values = g.gather(-1, cols).reshape(N, K // 2).contiguous()
    return values, _meta_from_cols(cols, K)


def decompress(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """(values (N, K/2), meta) -> dense (N, K) in values.dtype (int8 stays int8: scale separately)."""
    N, H = values.shape
    K = 2 * H
    cols = _cols_from_meta(meta, K)                                   # (N, G, 2)
    out = torch.zeros(N, K // 4, 4, dtype=values.dtype, device=values.device)
    out.scatter_(-1, cols.to(values.device), values.reshape(N, K // 4, 2))
    return out.reshape(N, K)


def compress_int8(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dense float (N, K), 2:4 sparse -> (values int8 (N, K/2), meta, scales fp32 (N,)), per-row RTN."""
    from slmkern.formats import int8 as int8_format

    _check_dense(dense)
    q, scales = int8_format.quantize_per_channel(dense)
    values, meta = compress(dense)                       # pattern from the float weight
    qv = q.reshape(q.shape[0], -1, 4).gather(-1, _cols_from_meta(meta, q.shape[1]).to(q.device))
    return qv.reshape(values.shape).contiguous(), meta, scales


def compress_int4(dense: torch.Tensor, group_size: int = 128, symmetric: bool = False):
    """dense float (N, K), 2:4 sparse -> (qvalues uint8 (N, K/4), meta, scales (N, K/g), zeros or None).

    Min/max round-to-nearest over the KEPT values of each dense group; padding codes = zero point.
    """
    N, K = _check_dense(dense)
    if isinstance(group_size, bool) or not isinstance(group_size, int) \
            or not group_size_ok(K, group_size, SPARSE24_INT4_GROUP_MULTIPLE):
        raise ValueError(f"group_size: must be {group_size_rule(SPARSE24_INT4_GROUP_MULTIPLE)}, "
                         f"got {group_size} for K={K}")
    g = K if group_size == -1 else group_size
    values, meta = compress(dense.float())
    v = values.float().reshape(N, K // g, g // 2)
    if symmetric:
        amax = v.abs().amax(-1)
        s = torch.where(amax > 0, amax / 7.5, torch.ones_like(amax))
        z = torch.full_like(s, SYMMETRIC_ZERO)
    else:
        lo, hi = v.amin(-1).clamp(max=0), v.amax(-1).clamp(min=0)
        s = torch.where(hi > lo, (hi - lo) / 15, torch.ones_like(lo))
        z = torch.round(-lo / s).clamp(0, 15)
    codes = torch.where(v != 0, torch.round(v / s.unsqueeze(-1)) + z.unsqueeze(-1), z.unsqueeze(-1))
    codes = codes.clamp(0, 15).to(torch.uint8).reshape(N, K // 2)
    q = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()
    zeros = None if symmetric else z.to(torch.uint8).contiguous()
    return q, meta, s.float().contiguous(), zeros


def unpack_int4_codes(qvalues: torch.Tensor) -> torch.Tensor:
    q = qvalues.to(torch.int16)
    return torch.stack([q & 0xF, q >> 4], dim=-1).reshape(q.shape[0], -1)


def decompress_int4(qvalues, meta, scales, zeros, group_size: int) -> torch.Tensor:
    """Dequantized fp32 dense (N, K) of int4 values; 0 at non-kept positions."""
    N, K = qvalues.shape[0], 4 * qvalues.shape[1]
    g = K if group_size == -1 else group_size
    codes = unpack_int4_codes(qvalues).float().reshape(N, K // g, g // 2)
    z = torch.full_like(scales, SYMMETRIC_ZERO) if zeros is None else zeros.float()
    kept = ((codes - z.unsqueeze(-1)) * scales.unsqueeze(-1)).reshape(N, K // 2)
    return decompress(kept, meta)


# ----------------------------------------------------------------------------- validation

def _check_meta(meta: torch.Tensor, N: int, K: int, name: str = "meta", data: bool = True) -> None:
    if not isinstance(meta, torch.Tensor) or meta.dtype != torch.uint8:
        raise TypeError(f"{name}: must be torch.uint8 [N, ceil(K/8)], got {getattr(meta, 'dtype', type(meta))}")
    if meta.dim() != 2 or tuple(meta.shape) != (N, meta_cols(K)):
        raise ValueError(f"{name}: must have shape (N, ceil(K/8)) = ({N}, {meta_cols(K)}), got {tuple(meta.shape)}")
    if not data or meta.numel() == 0:
        return
    m = meta.to(torch.int16)
    lo, hi = m & 0xF, m >> 4
    bad_lo = (lo & 3) >= (lo >> 2)
    if K % 8 == 4:
        bad_hi = (hi[:, :-1] & 3) >= (hi[:, :-1] >> 2)
        if bool((hi[:, -1] != 0).any()):
            raise ValueError(f"{name}: K={K} has K % 8 == 4, so the last high nibble of every row must be 0 "
                             "(nonzero padding bits)")
    else:
        bad_hi = (hi & 3) >= (hi >> 2)
    if bool(bad_lo.any()) or bool(bad_hi.any()):
        raise ValueError(f"{name}: every nibble must hold in-group columns c0 < c1 (bits 0-1 < bits 2-3)")


def validate(values: torch.Tensor, meta: torch.Tensor, scales: torch.Tensor | None = None,
             data: bool = True) -> tuple[int, int]:
    """Full canonical check of (values, meta, scales); returns (N, K). data=False skips value reads."""
    if not isinstance(values, torch.Tensor) or values.dtype not in VALUE_DTYPES:
        raise TypeError(f"values: must be float32/bfloat16/float16 or int8 (N, K/2), "
                        f"got {getattr(values, 'dtype', type(values))}")
    if values.dim() != 2 or values.shape[0] == 0 or values.shape[1] == 0:
        raise ValueError(f"values: must have shape (N, K/2) with N, K > 0, got {tuple(values.shape)}")
    N, K = values.shape[0], 2 * values.shape[1]
    if K % 4 != 0:
        raise ValueError(f"K: must be a multiple of 4 for 2:4 (values has K/2={K // 2} columns, K={K})")
    if values.stride() != (K // 2, 1):
        raise ValueError(f"values: must be contiguous (N, K/2), got strides {values.stride()}")
    _check_meta(meta, N, K, data=data)
    if meta.stride() != (meta_cols(K), 1):
        raise ValueError(f"meta: must be contiguous, got strides {meta.stride()}")
    if values.dtype == torch.int8:
        if scales is None:
            raise ValueError("scales: int8 values need per-row scales (N,) float32, got None")
        if data and bool((values == -128).any()):
            raise ValueError("values: int8 values must lie in [-127, 127], found -128")
    elif scales is not None:
        raise ValueError(f"scales: must be None for float values ({values.dtype}); scales go with int8 values")
    if scales is not None:
        if not isinstance(scales, torch.Tensor) or scales.dtype != torch.float32:
            raise TypeError(f"scales: must be torch.float32 (N,), got {getattr(scales, 'dtype', type(scales))}")
        if tuple(scales.shape) != (N,):
            raise ValueError(f"scales: must have shape (N,) = ({N},), got {tuple(scales.shape)}")
    return N, K


def validate_int4(qvalues, meta, scales, zeros, group_size: int, data: bool = True) -> tuple[int, int, int]:
    """Full canonical check of the int4-values tensors; returns (N, K, g)."""
    if not isinstance(qvalues, torch.Tensor) or qvalues.dtype != torch.uint8:
        raise TypeError(f"qvalues: must be torch.uint8 (N, K/4), got {getattr(qvalues, 'dtype', type(qvalues))}")
    if qvalues.dim() != 2 or qvalues.shape[0] == 0 or qvalues.shape[1] == 0:
        raise ValueError(f"qvalues: must have shape (N, K/4) with N, K > 0, got {tuple(qvalues.shape)}")
    if qvalues.stride() != (qvalues.shape[1], 1):
        raise ValueError(f"qvalues: must be contiguous, got strides {qvalues.stride()}")
    N, K = qvalues.shape[0], 4 * qvalues.shape[1]
    _check_meta(meta, N, K, data=data)
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size: must be an int, got {type(group_size).__name__}")
    if not group_size_ok(K, group_size, SPARSE24_INT4_GROUP_MULTIPLE):
        raise ValueError(f"group_size: must be {group_size_rule(SPARSE24_INT4_GROUP_MULTIPLE)}, "
                         f"got {group_size} for K={K}")
    g = K if group_size == -1 else group_size
    G = K // g
    if not isinstance(scales, torch.Tensor) or scales.dtype != torch.float32:
        raise TypeError(f"scales: must be torch.float32 (N, K/group_size), got {getattr(scales, 'dtype', type(scales))}")
    if tuple(scales.shape) != (N, G):
        raise ValueError(f"scales: must have shape (N, K/group_size) = ({N}, {G}), got {tuple(scales.shape)}")
    if zeros is not None:
        if not isinstance(zeros, torch.Tensor) or zeros.dtype != torch.uint8:
            raise TypeError(f"zeros: must be None or torch.uint8 (N, K/group_size), got {getattr(zeros, 'dtype', type(zeros))}")
        if tuple(zeros.shape) != (N, G):
            raise ValueError(f"zeros: must have shape (N, K/group_size) = ({N}, {G}), got {tuple(zeros.shape)}")
        if data and zeros.numel() and int(zeros.max()) > 15:
            raise ValueError(f"zeros: must lie in 0..15, found {int(zeros.max())}")
    return N, K, g


# ----------------------------------------------------------------------------- CPU packing

def _zero_padded(values: torch.Tensor, meta: torch.Tensor, Np: int, Kp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """values / meta copied into zero tensors of Np rows and Kp dense columns (the packers' padding)."""
    v = torch.zeros(Np, Kp // 2, dtype=values.dtype)
    v[: values.shape[0], : values.shape[1]] = values
    mt = torch.zeros(Np, Kp // 8, dtype=torch.uint8)
    mt[: meta.shape[0], : meta.shape[1]] = meta
    return v, mt


def _pack_reference_int8(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    N, K = values.shape[0], 2 * values.shape[1]
    Np, Kp = _ceil(N, I8_TILE_N), _ceil(K, I8_BLOCK_K)
    T, S = Np // I8_TILE_N, Kp // I8_BLOCK_K
    v, mt = _zero_padded(values, meta, Np, Kp)
    vb = v.view(torch.uint8).reshape(T, I8_TILE_N, S, 4, 4).permute(0, 2, 3, 1, 4).reshape(T, S, 256)  # [t][s][w][r][j]
    mb = mt.reshape(T, I8_TILE_N // 2, 2, S, 4).permute(0, 3, 1, 4, 2).reshape(T, S, 64)  # [t][s][r//2][w][r%2]
    rs = torch.zeros(Np, dtype=torch.int32)
    rs[:N] = values.to(torch.int32).sum(1, dtype=torch.int32)
    return torch.cat([torch.cat([vb, mb], dim=2).reshape(-1), rs.view(torch.uint8)])


def pack_reference(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Pure-torch CPU packing (the spec of the packed layouts in the module docstring)."""
    values, meta = values.detach().cpu(), meta.detach().cpu()
    if values.dtype == torch.int8:
        return _pack_reference_int8(values, meta)
    N, K = values.shape[0], 2 * values.shape[1]
    Np, Kp = _ceil(N, TILE_N), _ceil(K, CHUNK_K)
    C, T = Kp // CHUNK_K, Np // TILE_N
    v, mt = _zero_padded(values, meta, Np, Kp)
    vb = v.reshape(T, TILE_N, C, CHUNK_K // 2).permute(0, 2, 1, 3).contiguous()
    vb = vb.reshape(T, C, -1).view(torch.uint8).reshape(T, C, -1)
    mb = mt.reshape(T, TILE_N, C, CHUNK_K // 8).permute(0, 2, 1, 3).reshape(T, C, -1)
    return torch.cat([vb, mb], dim=2).reshape(-1)


def int4_to_dense_int4(qvalues, meta, zeros, group_size: int) -> torch.Tensor:
    """int4 2:4 codes -> the dense int4 format's packed (N, K/2) codes (slmkern.formats.int4):
    kept positions hold their code, the others the group's zero point (so they dequantize to 0)."""
    N, K = qvalues.shape[0], 4 * qvalues.shape[1]
    g = K if group_size == -1 else group_size
    codes = unpack_int4_codes(qvalues).to(torch.uint8)                 # (N, K/2)
    z = (torch.full((N, K // g), SYMMETRIC_ZERO, dtype=torch.uint8) if zeros is None else zeros.cpu())
    dense = z.repeat_interleave(g, dim=1).reshape(N, K // 4, 4).clone()
    cols = _cols_from_meta(meta.cpu(), K)
    dense.scatter_(-1, cols, codes.cpu().reshape(N, K // 4, 2))
    dense = dense.reshape(N, K)
    return (dense[:, 0::2] | (dense[:, 1::2] << 4)).contiguous()


def packed_bytes_int4(N: int, K: int, group_size: int, has_zeros: bool) -> int:
    from slmkern.formats import int4_cpu

    g = K if group_size == -1 else group_size
    return int4_cpu.packed_bytes(N, K, g, has_zeros)
