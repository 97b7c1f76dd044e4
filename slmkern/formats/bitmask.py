"""Unstructured sparse weights: the bitmask format (op ``sparse_linear``).

Canonical (what is saved), for a weight ``W [N, K]`` like ``nn.Linear``::

    bitmask      uint8 [N, ceil(K/8)]  bit i (LSB = bit 0) of byte b <-> column 8*b + i;
                                       bits of columns >= K are 0
    values       1-D [nnz]             the kept entries in row-major order (row by row,
                                       increasing column); float32/bfloat16/float16
                                       ("float values") or int8 in [-127, 127] ("int8 values")
    row_offsets  int64 [N + 1]         row n's values are values[row_offsets[n]:row_offsets[n+1]];
                                       row_offsets[0] = 0, row_offsets[N] = nnz and
                                       row_offsets[n+1] - row_offsets[n] = popcount(bitmask[n])
    scales       float32 [N]           int8 values only: W[n, k] = values[.] * scales[n]

Row example, K = 10: bitmask[n] = [0b0000_0101, 0b0000_0010] keeps columns 0, 2 and 9; the
second byte's bits 2..7 (columns 10..15) must be 0. A row with no kept entry (100% sparse) is
legal and contributes only the bias. compressed-tensors' sparse-bitmask stores the [N] start
offsets: drop / append the last entry of row_offsets to convert.

CPU packed layout (built once by ``slmkern._backends.cpu.prepack_bitmask``, never saved;
csrc/include/slmkern/bitmask.h).
Rows in blocks of 8 (Nb = ceil(N/8)), Kw = ceil(K/64)::

    masks    uint64 [Nb][Kw][8]      word b of the block's 8 rows in one 64-byte line (the bitmask
                                     as little-endian 64-bit words; rows >= N are 0)
    boffsets int64  [Nb + 1]         index of each block's first value in `values`
    rowsum   int32  [Nb * 8]         int8 values only: per-row value sums (for the +128 shift)
    values   int8 [nnz] or fp32 [nnz] (bf16/f16 widened, exact) in consumption order: block by
             block, word by word, row by row, ascending column; then 64 zero bytes
    each section starts at a multiple of 64 bytes; one flat uint8 tensor of packed_bytes(...) bytes.
"""
from __future__ import annotations

import functools

import torch

from slmkern.formats.common import FLOAT_DTYPES
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def _a64(b: int) -> int:
    return (b + 63) // 64 * 64


def packed_bytes(N: int, K: int, nnz: int, int8_values: bool) -> int:
    """Size in bytes of the CPU packed layout (mirrors sparse_packed_bytes in bitmask.h)."""
    Kw, Nb = (K + 63) // 64, (N + 7) // 8
    head = _a64(Nb * Kw * 64) + _a64((Nb + 1) * 8) + (_a64(Nb * 32) if int8_values else 0)
    return head + nnz * (1 if int8_values else 4) + 64


@functools.lru_cache(maxsize=256)
def packed_bytes_cached(N: int, K: int, nnz: int, int8_values: bool) -> int:
    """packed_bytes for plain ints (the per-call fast check in ops.sparse_linear_ok)."""
    return packed_bytes(N, K, nnz, int8_values)


def _bits(bitmask: torch.Tensor, K: int) -> torch.Tensor:
    """uint8 [N, ceil(K/8)] -> bool [N, K]."""
    shifts = torch.arange(8, device=bitmask.device, dtype=torch.uint8)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :K].bool()


def _pack_bits(keep: torch.Tensor) -> torch.Tensor:
    """bool [N, K] -> uint8 [N, ceil(K/8)] (LSB first, zero padding bits)."""
    N, K = keep.shape
    Kb = (K + 7) // 8
    padded = torch.zeros(N, Kb * 8, dtype=torch.uint8, device=keep.device)
    padded[:, :K] = keep.to(torch.uint8)
    weights = (1 << torch.arange(8, device=keep.device, dtype=torch.int32))
    return (padded.reshape(N, Kb, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8)


def compress(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dense (N, K) float or int8 -> (values [nnz] in dense.dtype, bitmask uint8, row_offsets int64).

    Keeps exactly the nonzero entries, so decompress(compress(W)) == W. For int8 values from a
    float weight use :func:`compress_int8`.
    """
    if not isinstance(dense, torch.Tensor) or dense.dim() != 2:
        raise ValueError(f"dense: expected a 2-D (N, K) tensor, got {getattr(dense, 'shape', type(dense))}")
    if dense.dtype not in FLOAT_DTYPES + (torch.int8,):
        raise TypeError(f"dense: expected float32/bfloat16/float16 or int8, got {dense.dtype}")
    if dense.dtype == torch.int8 and bool((dense == -128).any()):
        raise ValueError("dense: int8 weights must lie in [-127, 127] (found -128)")
    N, K = dense.shape
    if N <= 0 or K <= 0:
        raise ValueError(f"dense: need N > 0 and K > 0, got {tuple(dense.shape)}")
    keep = dense != 0
    values = dense[keep].contiguous()  # boolean indexing walks row-major: row by row, increasing column
    counts = keep.sum(dim=1, dtype=torch.int64)
    row_offsets = torch.zeros(N + 1, dtype=torch.int64, device=dense.device)
    row_offsets[1:] = torch.cumsum(counts, 0)
    return values, _pack_bits(keep), row_offsets


def compress_int8(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dense (N, K) float -> (values int8 [nnz], bitmask, row_offsets, scales fp32 [N]).

    Per-row symmetric round-to-nearest (slmkern.formats.int8.quantize_per_channel); entries
    that round to 0 are dropped, so the mask is that of the int8 weight.
    """
    from slmkern.formats.int8 import quantize_per_channel

    if not isinstance(dense, torch.Tensor) or dense.dim() != 2 or not dense.is_floating_point():
        raise ValueError(f"dense: expected a 2-D float tensor, got {getattr(dense, 'shape', type(dense))}")
    q, scales = quantize_per_channel(dense)
    values, bitmask, row_offsets = compress(q)
    return values, bitmask, row_offsets, scales


def decompress(values: torch.Tensor, bitmask: torch.Tensor, row_offsets: torch.Tensor, K: int) -> torch.Tensor:
    """(values, bitmask, row_offsets) -> dense (N, K) in values.dtype (int8 stays int8; see dequantize)."""
    validate(values, bitmask, row_offsets, K, scales=None, check_scales=False)
    keep = _bits(bitmask, K)
    dense = torch.zeros(keep.shape, dtype=values.dtype, device=values.device)
    dense[keep] = values
    return dense


def dequantize(values: torch.Tensor, bitmask: torch.Tensor, row_offsets: torch.Tensor, K: int,
               scales: torch.Tensor | None) -> torch.Tensor:
    """Dense fp32 (N, K) weight: float values widened, int8 values times scales[n]."""
    dense = decompress(values, bitmask, row_offsets, K)
    if values.dtype == torch.int8:
        return dense.float() * scales.float().unsqueeze(1)
    return dense.float()


def check_shapes(values: torch.Tensor, bitmask: torch.Tensor, row_offsets: torch.Tensor, K: int,
                 scales: torch.Tensor | None, check_scales: bool = True, where: str = "bitmask format") -> int:
    """Dtype/shape facts that need no data (what a fake kernel can check). Returns N."""
    def typ(cond, msg):
        if not cond:
            raise TypeError(f"{where}: {msg}")

    def val(cond, msg):
        if not cond:
            raise ValueError(f"{where}: {msg}")

    for name, t in (("values", values), ("bitmask", bitmask), ("row_offsets", row_offsets)):
        typ(isinstance(t, torch.Tensor), f"{name} must be a tensor, got {type(t).__name__}")
    typ(isinstance(K, int) and not isinstance(K, bool), f"K must be an int, got {type(K).__name__}")
    val(K > 0, f"K must be > 0, got {K}")
    typ(bitmask.dtype == torch.uint8, f"bitmask must be torch.uint8, got {bitmask.dtype}")
    Kb = (K + 7) // 8
    val(bitmask.dim() == 2 and bitmask.shape[0] > 0 and bitmask.shape[1] == Kb,
        f"bitmask must have shape (N, ceil(K/8)) = (N, {Kb}) with N > 0 for K={K}, got {tuple(bitmask.shape)}")
    N = bitmask.shape[0]
    typ(row_offsets.dtype == torch.int64, f"row_offsets must be torch.int64, got {row_offsets.dtype}")
    val(row_offsets.dim() == 1 and row_offsets.shape[0] == N + 1,
        f"row_offsets must have shape (N + 1,) = ({N + 1},), got {tuple(row_offsets.shape)}")
    typ(values.dtype in FLOAT_DTYPES + (torch.int8,),
        f"values must be float32/bfloat16/float16 or int8, got {values.dtype}")
    val(values.dim() == 1, f"values must be 1-D [nnz], got shape {tuple(values.shape)}")
    if check_scales:
        if values.dtype == torch.int8:
            typ(scales is not None, "int8 values need scales (float32 [N])")
            typ(scales.dtype == torch.float32, f"scales must be torch.float32, got {scales.dtype}")
            val(scales.dim() == 1 and scales.shape[0] == N,
                f"scales must have shape (N,) = ({N},), got {tuple(scales.shape)}")
        else:
            typ(scales is None, f"float values ({values.dtype}) take no scales; pass scales=None")
    return N


def validate(values: torch.Tensor, bitmask: torch.Tensor, row_offsets: torch.Tensor, K: int,
             scales: torch.Tensor | None = None, check_scales: bool = True, where: str = "bitmask format") -> int:
    """Every canonical fact, data included (padding bits, offsets vs popcounts, int8 range). Returns N.

    Raises TypeError/ValueError naming the offending argument.
    """
    N = check_shapes(values, bitmask, row_offsets, K, scales, check_scales, where)
    for name, t in (("values", values), ("row_offsets", row_offsets)):
        if t.device != bitmask.device:
            raise ValueError(f"{where}: {name} is on {t.device} but bitmask is on {bitmask.device}")
    if K % 8:
        pad = bitmask[:, -1] >> (K % 8)
        if bool((pad != 0).any()):
            row = int(torch.nonzero(pad)[0, 0])
            raise ValueError(f"{where}: bitmask has bits set past column K-1={K - 1} (padding bits of its "
                             f"last byte must be 0), first in row {row}")
    ro = row_offsets
    if int(ro[0]) != 0:
        raise ValueError(f"{where}: row_offsets[0] must be 0, got {int(ro[0])}")
    diffs = ro[1:] - ro[:-1]
    if bool((diffs < 0).any()):
        row = int(torch.nonzero(diffs < 0)[0, 0])
        raise ValueError(f"{where}: row_offsets must be non-decreasing, but row_offsets[{row + 1}] < "
                         f"row_offsets[{row}]")
    nnz = values.shape[0]
    if int(ro[-1]) != nnz:
        raise ValueError(f"{where}: row_offsets[N] = {int(ro[-1])} but values has {nnz} entries "
                         "(values/row_offsets length mismatch)")
    counts = _POPCOUNT.to(bitmask.device)[bitmask.long()].sum(dim=1)
    if not torch.equal(counts, diffs):
        row = int(torch.nonzero(counts != diffs)[0, 0])
        raise ValueError(f"{where}: row_offsets does not match the bitmask popcounts: row {row} has "
                         f"{int(counts[row])} bits set but row_offsets gives {int(diffs[row])} values")
    if values.dtype == torch.int8 and nnz and bool((values == -128).any()):
        raise ValueError(f"{where}: int8 values must lie in [-127, 127] (found -128)")
    return N


def pack_reference(values, bitmask, row_offsets, K: int) -> torch.Tensor:
    """Pure-torch CPU packing (the spec of _C.sparse_pack; used without the extension and by tests)."""
    N = bitmask.shape[0]
    nnz = values.shape[0]
    int8v = values.dtype == torch.int8
    Kw, Nb = (K + 63) // 64, (N + 7) // 8
    out = torch.zeros(packed_bytes(N, K, nnz, int8v), dtype=torch.uint8)
    m = torch.zeros(Nb * 8, Kw * 8, dtype=torch.uint8)
    m[:N, :bitmask.shape[1]] = bitmask.cpu()
    # [Nb, 8 rows, Kw, 8 bytes] -> [Nb, Kw, 8 rows, 8 bytes]: word b of a block's rows side by side
    out[:Nb * Kw * 64] = m.reshape(Nb, 8, Kw, 8).transpose(1, 2).reshape(-1)
    o = _a64(Nb * Kw * 64)
    # values in consumption order: sort the nonzeros (row-major now) by (block, word, row, column)
    keep = _bits(bitmask.cpu(), K)
    rows, cols = keep.nonzero(as_tuple=True)
    key = (((rows // 8) * Kw + cols // 64) * 8 + rows % 8) * 64 + cols % 64
    order = torch.argsort(key)
    block_nnz = torch.zeros(Nb, dtype=torch.int64).index_add_(0, rows // 8, torch.ones_like(rows))
    boffsets = torch.zeros(Nb + 1, dtype=torch.int64)
    boffsets[1:] = torch.cumsum(block_nnz, 0)
    out[o:o + (Nb + 1) * 8] = boffsets.view(torch.uint8)
    o += _a64((Nb + 1) * 8)
    if int8v:
        v = values.cpu().to(torch.int32)
        rowsum = torch.zeros(Nb * 8, dtype=torch.int32)
        rowsum.index_add_(0, rows, v)
        out[o:o + Nb * 32] = rowsum.view(torch.uint8)
        o += _a64(Nb * 32)
        out[o:o + nnz] = values.cpu().contiguous()[order].view(torch.uint8)
    else:
        out[o:o + 4 * nnz] = values.cpu().float().contiguous()[order].view(torch.uint8)
    return out
