"""int8 weight format.

Canonical (what is saved): ``weight`` int8 ``[N, K]`` row-major like ``nn.Linear``,
values in [-127, 127] (symmetric; -128 is rejected so that the AVX2 sign trick and
the +128 activation shift stay exact), and ``weight_scale`` float32 ``[N]``:
``W_float[n, k] ~= weight[n, k] * weight_scale[n]``.

CPU packed layout (built at module construction by ``slmkern._backends.cpu.prepack_int8``,
never saved; see ``csrc/include/slmkern/common.h``)::

    tiles  int8  [Np/16][Kp/4][16][4]   tile[nb][kb][i][j] = W[16*nb + i, 4*kb + j] (0 outside)
    colsum int32 [Np]                   sum_k W[n, k]
    Np = ceil(N/16)*16, Kp = ceil(K/4)*4; one flat uint8 tensor of packed_bytes(N, K) bytes.
"""
from __future__ import annotations

import torch

NB, KB = 16, 4

# How w8a8_linear quantizes activations per token (the spec: reference.quantize_activations):
# "int8" symmetric, codes in [-127, 127]; "int7" asymmetric 7-bit, codes in [0, 127] minus a zero point.
ACTIVATIONS = ("int8", "int7")
# Int8Linear / Int8Config: one of those (w8a8_linear), or "float" (weight-only, w8a16_linear).
LINEAR_ACTIVATIONS = (*ACTIVATIONS, "float")
# w8a8_linear's fused output functions (the spec: reference.gelu_epilogue): applied to the fp32 output.
EPILOGUES = ("none", "gelu")


def _ceil(a: int, b: int) -> int:
    return (a + b - 1) // b * b


def packed_bytes(N: int, K: int) -> int:
    """Size in bytes of the CPU packed layout of an [N, K] int8 weight."""
    Np, Kp = _ceil(N, NB), _ceil(K, KB)
    return Np * Kp + Np * 4


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (N, K) float -> (int8 (N, K) in [-127, 127], scale fp32 (N,)), round-to-nearest.

    An all-zero row gets scale 1 (any scale reproduces zeros exactly).
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight: expected a 2-D float tensor, got {tuple(weight.shape)} {weight.dtype}")
    wf = weight.detach().float()
    amax = wf.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(wf / scale.unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
    return q, scale.contiguous()


def dequantize(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return w.float() * scale.float().unsqueeze(1)


def check_weight(w: torch.Tensor, name: str = "w") -> None:
    """Raise if w is not a canonical int8 weight (2-D, contiguous, int8, no -128)."""
    if w.dtype != torch.int8:
        raise TypeError(f"{name}: expected torch.int8, got {w.dtype}")
    if w.dim() != 2:
        raise ValueError(f"{name}: expected shape (N, K), got {tuple(w.shape)}")
    if bool((w == -128).any()):
        raise ValueError(f"{name}: contains -128; slmkern int8 weights are symmetric in [-127, 127]")


def pack_reference(w: torch.Tensor) -> torch.Tensor:
    """Pure-torch CPU packing (the spec of _C.int8_pack; used by tests)."""
    N, K = w.shape
    Np, Kp = _ceil(N, NB), _ceil(K, KB)
    wp = torch.zeros(Np, Kp, dtype=torch.int8)
    wp[:N, :K] = w.cpu()
    tiles = wp.reshape(Np // NB, NB, Kp // KB, KB).permute(0, 2, 1, 3).contiguous()
    colsum = torch.zeros(Np, dtype=torch.int32)
    colsum[:N] = w.cpu().to(torch.int32).sum(dim=1, dtype=torch.int32)
    return torch.cat([tiles.reshape(-1).view(torch.uint8), colsum.view(torch.uint8)])


def unpack_cpu(blob: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """The canonical int8 [N, K] weight held by a CPU packed blob: the exact inverse of the packing
    (``slmkern._backends.cpu.prepack_int8``; the tiles are a permutation of the weight's bytes; padding and
    colsum are dropped)."""
    if blob.dtype != torch.uint8 or blob.dim() != 1 or blob.shape[0] != packed_bytes(N, K):
        raise ValueError(f"blob: expected a 1-D uint8 packed int8 weight of {packed_bytes(N, K)} bytes for "
                         f"({N}, {K}), got {tuple(blob.shape)} {blob.dtype}")
    Np, Kp = _ceil(N, NB), _ceil(K, KB)
    tiles = blob[:Np * Kp].view(torch.int8).reshape(Np // NB, Kp // KB, NB, KB)
    return tiles.permute(0, 2, 1, 3).reshape(Np, Kp)[:N, :K].contiguous()
