"""AWQ GEMM checkpoints (AutoAWQ ``WQLinear_GEMM``, version "gemm", 4-bit) -> slmkern int4.

Bit layout of one Linear ``P`` with in_features K, out_features N, group size g, G = K / g::

    P.qweight  int32 [K, N/8]   packed along N with AWQ's interleaved order: nibble slot i (bits 4i..4i+3)
                                of word qweight[k, c] holds output n = 8*c + ORDER[i],
                                ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
                                    code[k, 8c + ORDER[i]] = (qweight[k, c] >> (4 * i)) & 0xF
                                (equivalently output 8c + j sits in slot SLOT[j], SLOT = [0, 4, 1, 5, 2, 6, 3, 7])
    P.qzeros   int32 [G, N/8]   the zero points, same packing and order (the real zero, 0..15; no "minus one")
    P.scales   float16 [G, N]
    P.bias     float16 [N]      (optional)

    dequantization:   W[n, k] = scales[k // g, n] * (code[k, n] - zero[k // g, n])

The import transposes to slmkern's ``[N, K]`` layout (codes, ``scales.T`` in fp32 (exact), zeros
uint8 ``[N, G]``, ``None`` when every zero is 8). Group sizes outside slmkern's rule
(``slmkern.formats.common.group_size_ok``: an even g dividing K, or K), N % 8 != 0 and other bit widths are
refused with a CheckpointError. GEMV / Marlin / Exllama AWQ variants are other
layouts and are not read here.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from torch import nn

from slmkern.formats import int4 as int4_format
from slmkern.formats.common import INT4_GROUP_MULTIPLE, group_size_ok, group_size_rule
from slmkern.interop._safetensors_io import CheckpointError, check_int4_groups, read_checkpoint, read_json

__all__ = ["CheckpointError", "ORDER", "unpack_awq", "dequantize_awq", "awq_to_int4", "load_awq", "awq_config"]

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)   # slot i holds column offset ORDER[i]


def _unpack_cols(words: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] in AWQ order -> unsigned nibbles int16 [R, 8C] in natural column order."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    slots = (words.to(torch.int32).unsqueeze(-1) >> shifts) & 0xF          # [R, C, 8]: slot i
    out = torch.empty_like(slots)
    out[..., list(ORDER)] = slots                                          # column ORDER[i] <- slot i
    return out.reshape(words.shape[0], -1).to(torch.int16)


def unpack_awq(t: Mapping[str, torch.Tensor], group_size: int, where: str = "layer", shape=None):
    """Validate one AWQ GEMM layer -> (codes int16 [N, K], zeros int16 [N, G], scales fp32 [N, G], g)."""
    for name in ("qweight", "qzeros", "scales"):
        if name not in t or not isinstance(t[name], torch.Tensor):
            raise CheckpointError(f"{where}.{name}: missing from the checkpoint (have {sorted(t)})")
    qw, qz, sc = t["qweight"], t["qzeros"], t["scales"]
    if qw.dtype != torch.int32 or qw.dim() != 2 or qw.numel() == 0:
        raise CheckpointError(f"{where}.qweight: expected int32 [K, N/8], got {qw.dtype} {tuple(qw.shape)}")
    K, N = qw.shape[0], qw.shape[1] * 8
    if shape is not None and (N, K) != tuple(shape):
        raise CheckpointError(f"{where}.qweight: holds a [{N}, {K}] weight (N, K), the model's Linear is {tuple(shape)}")
    g, _ = check_int4_groups(where, K, N, group_size, qz, sc)
    codes = _unpack_cols(qw).T.contiguous()
    zeros = _unpack_cols(qz).T.contiguous()
    return codes, zeros, sc.to(torch.float32).T.contiguous(), g


def dequantize_awq(t: Mapping[str, torch.Tensor], group_size: int, where: str = "layer") -> torch.Tensor:
    """The reference dequantization of an AWQ GEMM layer -> float32 W [N, K]."""
    codes, z, s, g = unpack_awq(t, group_size, where)
    N, K = codes.shape
    w = (codes.float().reshape(N, K // g, g) - z.float().unsqueeze(-1)) * s.unsqueeze(-1)
    return w.reshape(N, K)


def awq_to_int4(t: Mapping[str, torch.Tensor], group_size: int, where: str = "layer",
                shape=None) -> int4_format.Int4Weight:
    """One AWQ GEMM layer -> slmkern Int4Weight (exact)."""
    codes, z, s, g = unpack_awq(t, group_size, where, shape)
    K = codes.shape[1]
    if not group_size_ok(K, g, INT4_GROUP_MULTIPLE):
        raise CheckpointError(f"{where}: slmkern int4 needs group_size {group_size_rule(INT4_GROUP_MULTIPLE)}, "
                              f"got K={K} group_size={g}")
    zeros = None if bool((z == 8).all()) else z.to(torch.uint8)
    return int4_format.Int4Weight(int4_format.pack(codes.to(torch.uint8)), s, zeros)


def awq_config(path: str | os.PathLike, config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """{bits, group_size, version} from config.json's quantization_config (quant_method "awq") or
    AutoAWQ's quant_config.json (keys w_bit / q_group_size)."""
    path = os.fspath(path)
    qc = (config or {}).get("quantization_config")
    alt = os.path.join(path, "quant_config.json") if os.path.isdir(path) else None
    if not isinstance(qc, dict) and alt and os.path.exists(alt):
        qc = read_json(alt)
    if not isinstance(qc, dict) or qc.get("quant_method", "awq") != "awq":
        raise CheckpointError(f"{path}: no AWQ quantization_config (config.json) or quant_config.json")
    out = {"bits": qc.get("bits", qc.get("w_bit", 4)), "group_size": qc.get("group_size", qc.get("q_group_size", 128)),
           "version": str(qc.get("version", "gemm")).lower()}
    if out["bits"] != 4 or out["version"] != "gemm":
        raise CheckpointError(f"{path}: only 4-bit AWQ 'gemm' checkpoints are supported, got bits={out['bits']!r} "
                              f"version={out['version']!r}")
    return out


def load_awq(model: nn.Module, path: str | os.PathLike, strict: bool = True,
             activations: str = "float") -> list[str]:
    """Load an AWQ GEMM checkpoint directory into a dense ``model`` of the same architecture (every Linear
    with ``<fqn>.qweight`` becomes an Int4Linear, exact). Returns the swapped fqns."""
    from slmkern.interop.compressed_tensors import load_into
    from slmkern.nn import Int4Linear

    tensors, cfg = read_checkpoint(path)
    qc = awq_config(path, cfg)

    def convert(fqn: str, lin: nn.Linear, t: dict[str, torch.Tensor]) -> nn.Module | None:
        if f"{fqn}.qweight" not in t:
            return None
        layer = {n: t.pop(f"{fqn}.{n}") for n in ("qweight", "qzeros", "scales") if f"{fqn}.{n}" in t}
        q = awq_to_int4(layer, qc["group_size"], fqn, (lin.out_features, lin.in_features))
        return Int4Linear.from_int4(lin, q, activations)

    return load_into(model, tensors, convert, strict)
