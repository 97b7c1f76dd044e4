"""CPU packed layout of int4 weights (built once per module by ``slmkern._backends.cpu.prepack_int4``,
never saved).

From the canonical int4 weight (``w`` uint8 [N, K/2] low nibble first, ``scales``
fp32 [N, K/g], ``zeros`` None / uint8 / fp32 [N, K/g]; see slmkern/formats/int4.py)
to one flat uint8 blob for the C++ kernels (``csrc/include/slmkern/int4.h``)::

    NT = ceil(N/16) tiles of 16 output channels, G = K/g groups, gp = ceil(g/8)*8, nblk = gp/8
    tile t, group q (group_bytes = nblk*64 + 64*(1 + asym) bytes, tiles then groups in order):
        nblk blocks of 64 bytes: block b, byte 4*i + j (channel n = 16t + i, k0 = q*g + 8b):
            low nibble  = u[n, k0 + j]       (j = 0..3)
            high nibble = u[n, k0 + 4 + j]
            0 past the group's end (k >= (q+1)*g) and for n >= N
        s  fp32[16]  scales[n, q]            (0 for n >= N)
        sz fp32[16]  scales[n, q] * z[n, q]  only when zeros is not None
                     (-offsets[n, q] for an offset-form weight, see :func:`set_offsets`)

Read as 16 dwords, a block holds channel i in dword i: the low nibbles are one
16-channel x 4-k vpdpbusd operand, the high nibbles the next.
"""
from __future__ import annotations

import torch

from slmkern.formats.common import INT4_GROUP_MULTIPLE, resolve_group_size

NB, KB = 16, 8
ZEROS_KIND = {None: 0, torch.uint8: 1, torch.float32: 2}


def layout(N: int, K: int, group_size: int, asym: bool) -> dict:
    g = K if group_size == -1 else group_size
    NT, G, gp = -(-N // NB), K // g, -(-g // KB) * KB
    nblk = gp // KB
    group_bytes = nblk * 64 + 64 * (2 if asym else 1)
    return {"NT": NT, "G": G, "g": g, "gp": gp, "nblk": nblk, "group_bytes": group_bytes,
            "tile_bytes": G * group_bytes, "total": NT * G * group_bytes}


def packed_bytes(N: int, K: int, group_size: int, asym: bool) -> int:
    """Size in bytes of the CPU packed layout (asym: the weight has zero points)."""
    g = K if group_size == -1 else group_size
    return -(-N // NB) * (K // g) * ((g + KB - 1) // KB * 64 + (128 if asym else 64))


def check_canonical(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                    group_size: int) -> tuple[int, int, int]:
    """Raise unless (w, scales, zeros, group_size) is a canonical int4 weight; returns (N, K, g)."""
    if not isinstance(w, torch.Tensor) or w.dtype != torch.uint8:
        raise TypeError(f"w: expected torch.uint8 [N, K/2], got {getattr(w, 'dtype', type(w))}")
    if w.dim() != 2 or w.shape[0] == 0 or w.shape[1] == 0:
        raise ValueError(f"w: expected a non-empty 2-D tensor (N, K/2), got {tuple(w.shape)}")
    N, K = w.shape[0], 2 * w.shape[1]
    g = resolve_group_size(K, group_size, INT4_GROUP_MULTIPLE)
    if not isinstance(scales, torch.Tensor) or scales.dtype != torch.float32:
        raise TypeError(f"scales: expected torch.float32 [N, K/g], got {getattr(scales, 'dtype', type(scales))}")
    if tuple(scales.shape) != (N, K // g):
        raise ValueError(f"scales: expected shape (N, K/g) = ({N}, {K // g}), got {tuple(scales.shape)}")
    if zeros is not None:
        if not isinstance(zeros, torch.Tensor) or zeros.dtype not in (torch.uint8, torch.float32):
            raise TypeError(f"zeros: expected None, torch.uint8 or torch.float32 [N, K/g], "
                            f"got {getattr(zeros, 'dtype', type(zeros))}")
        if tuple(zeros.shape) != (N, K // g):
            raise ValueError(f"zeros: expected shape (N, K/g) = ({N}, {K // g}), got {tuple(zeros.shape)}")
        if zeros.dtype == torch.uint8 and zeros.numel() and int(zeros.max()) > 15:
            raise ValueError(f"zeros: uint8 zero points must lie in 0..15, found {int(zeros.max())}")
    return N, K, g


def pack_reference(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                   group_size: int) -> torch.Tensor:
    """Pure-torch packing (the spec of _C.int4_pack; used by tests and when _C is missing)."""
    N, K, g = check_canonical(w, scales, zeros, group_size)
    L = layout(N, K, g, zeros is not None)
    NT, G, gp, nblk = L["NT"], L["G"], L["gp"], L["nblk"]
    w = w.cpu()
    u = torch.stack((w & 0xF, w >> 4), dim=-1).reshape(N, K)
    up = torch.zeros(NT * NB, G, gp, dtype=torch.uint8)
    up[:N, :, :g] = u.reshape(N, G, g)
    # [NT, 16, G, nblk, 2 (lo/hi), 4] -> [NT, G, nblk, 16, 4] bytes
    up = up.reshape(NT, NB, G, nblk, 2, 4)
    blocks = (up[..., 0, :] | (up[..., 1, :] << 4)).permute(0, 2, 3, 1, 4).reshape(NT, G, nblk * 64)
    s = torch.zeros(NT * NB, G, dtype=torch.float32)
    s[:N] = scales.cpu()
    parts = [blocks, s.reshape(NT, NB, G).permute(0, 2, 1).contiguous().view(torch.uint8).reshape(NT, G, 64)]
    if zeros is not None:
        sz = torch.zeros(NT * NB, G, dtype=torch.float32)
        sz[:N] = scales.cpu() * zeros.cpu().float()
        parts.append(sz.reshape(NT, NB, G).permute(0, 2, 1).contiguous().view(torch.uint8).reshape(NT, G, 64))
    return torch.cat(parts, dim=2).reshape(-1).contiguous()


def set_offsets(blob: torch.Tensor, N: int, K: int, g: int, offsets: torch.Tensor) -> torch.Tensor:
    """Overwrite the asymmetric blob's per-group sz with -offsets (kernels: W = u*s - sz = u*s + offset)."""
    L = layout(N, K, g, True)
    NT, G, nblk = L["NT"], L["G"], L["nblk"]
    sz = torch.zeros(NT * NB, G, dtype=torch.float32)
    sz[:N] = -offsets.detach().cpu().float()
    grp = blob.view(NT, G, L["group_bytes"])
    grp[:, :, nblk * 64 + 64:] = sz.reshape(NT, NB, G).permute(0, 2, 1).contiguous().view(torch.uint8).reshape(
        NT, G, 64)
    return blob


def unpack_codes(blob: torch.Tensor, N: int, K: int, group_size: int, asym: bool) -> torch.Tensor:
    """The canonical uint8 [N, K/2] codes held by a CPU packed blob: the exact inverse of the code part of
    the packing (the blocks are a permutation of the nibbles; padding, scales and sz are skipped)."""
    L = layout(N, K, group_size, asym)
    if blob.dtype != torch.uint8 or blob.dim() != 1 or blob.shape[0] != L["total"]:
        raise ValueError(f"blob: expected a 1-D uint8 packed int4 weight of {L['total']} bytes for ({N}, {K}), "
                         f"group_size={group_size}, asym={asym}; got {tuple(blob.shape)} {blob.dtype}")
    NT, G, g, gp, nblk = L["NT"], L["G"], L["g"], L["gp"], L["nblk"]
    blocks = blob.view(NT, G, L["group_bytes"])[:, :, :nblk * 64].reshape(NT, G, nblk, NB, 4)
    # [NT, G, nblk, 16, 4] bytes -> [NT, 16, G, nblk, 2 (lo/hi), 4] nibbles -> [rows, G, gp] codes
    u = torch.stack((blocks & 0xF, blocks >> 4), dim=-2).permute(0, 3, 1, 2, 4, 5).reshape(NT * NB, G, gp)
    u = u[:N, :, :g].reshape(N, K // 2, 2)
    return (u[..., 0] | (u[..., 1] << 4)).contiguous()
