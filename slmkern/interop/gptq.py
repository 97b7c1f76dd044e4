"""GPTQ checkpoints (AutoGPTQ / GPTQModel, 4-bit) -> slmkern int4.

Bit layout of one Linear ``P`` with in_features K, out_features N, group size g (-1 -> K), G = K / g::

    P.qweight  int32 [K/8, N]   packed along K: word qweight[i, n] holds the unsigned code of
                                input k = 8*i + j in bits 4j..4j+3 (j = 0..7, first k lowest):
                                    code[k, n] = (qweight[k // 8, n] >> (4 * (k % 8))) & 0xF
    P.qzeros   int32 [G, N/8]   packed along N: zero of output n = 8*c + j in bits 4j..4j+3 of qzeros[gi, c]
                                    z_stored[gi, n] = (qzeros[gi, n // 8] >> (4 * (n % 8))) & 0xF
    P.scales   float16 [G, N]
    P.g_idx    int32 [K]        group of input k (optional; absent = k // g)
    P.bias     float16 [N]      (optional)

    v1 ("gptq", AutoGPTQ's historical layout) stores zero - 1:  z = z_stored + 1  (so z in 1..16)
    v2 ("gptq_v2", GPTQModel internal)        stores the zero:   z = z_stored      (z in 0..15)

    dequantization:   W[n, k] = scales[g_idx[k], n] * (code[k, n] - z[g_idx[k], n])

slmkern int4 is ``[N, K]`` with contiguous natural-order groups, so the import transposes the codes,
takes ``scales.T`` (fp16 -> fp32 is exact) and ``z.T`` as uint8 zeros (``None`` when every zero is 8,
i.e. symmetric). Refused, with a CheckpointError naming the layer:

* act-order checkpoints (``desc_act=True``) whose ``g_idx`` is not ``k // g``: their groups are
  scattered over k, which a contiguous group layout cannot hold without permuting the layer's
  *input*, i.e. the previous layer's output. Choice (documented): refuse rather than permute;
  :func:`dequantize_gptq` still decodes them to a float weight, which slmkern's own GPTQ (its act-order
  keeps natural-order groups) can re-quantize.
* v1 zeros of 16 (z_stored = 15): slmkern zero points are 0..15.
* group sizes outside slmkern's rule (``slmkern.formats.common.group_size_ok``: an even g dividing K, or K),
  bits other than 4, K % 8 != 0, N % 8 != 0.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from torch import nn

from slmkern.formats import int4 as int4_format
from slmkern.formats.common import INT4_GROUP_MULTIPLE, group_size_ok, group_size_rule
from slmkern.interop._safetensors_io import CheckpointError, check_int4_groups, read_checkpoint, read_json

__all__ = ["CheckpointError", "unpack_gptq", "dequantize_gptq", "gptq_to_int4", "load_gptq", "gptq_config"]

FORMATS = ("gptq", "gptq_v2")  # v1 (zero - 1) and v2 (real zero)


def _nibbles(words: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 words -> their 8 nibbles (lowest first) laid out along ``dim`` (x8 its size), int16."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    w = words.to(torch.int32)
    if dim == 0:  # [R, C] -> [R*8, C]: element 8r + j from bits 4j of row r
        return ((w.unsqueeze(1) >> shifts.view(1, 8, 1)) & 0xF).reshape(-1, w.shape[1]).to(torch.int16)
    return ((w.unsqueeze(-1) >> shifts) & 0xF).reshape(w.shape[0], -1).to(torch.int16)


def _check_layer(t: Mapping[str, torch.Tensor], where: str, group_size: int, shape=None):
    for name in ("qweight", "qzeros", "scales"):
        if name not in t or not isinstance(t[name], torch.Tensor):
            raise CheckpointError(f"{where}.{name}: missing from the checkpoint (have {sorted(t)})")
    qw, qz, sc = t["qweight"], t["qzeros"], t["scales"]
    if qw.dtype != torch.int32 or qw.dim() != 2 or qw.numel() == 0:
        raise CheckpointError(f"{where}.qweight: expected int32 [K/8, N], got {qw.dtype} {tuple(qw.shape)}")
    K, N = qw.shape[0] * 8, qw.shape[1]
    if shape is not None and (N, K) != tuple(shape):
        raise CheckpointError(f"{where}.qweight: holds a [{N}, {K}] weight (N, K), the model's Linear is {tuple(shape)}")
    if N % 8:
        raise CheckpointError(f"{where}: N={N} must be a multiple of 8")
    g, G = check_int4_groups(where, K, N, group_size, qz, sc)
    gi = t.get("g_idx")
    if gi is None:
        gi = torch.arange(K) // g
    else:
        if gi.dtype not in (torch.int32, torch.int64) or tuple(gi.shape) != (K,):
            raise CheckpointError(f"{where}.g_idx: expected int32 [{K}], got {gi.dtype} {tuple(gi.shape)}")
        gi = gi.to(torch.int64)
        if K and (int(gi.min()) < 0 or int(gi.max()) >= G):
            raise CheckpointError(f"{where}.g_idx: group indices must lie in [0, {G}), found "
                                  f"[{int(gi.min())}, {int(gi.max())}]")
    return N, K, g, gi


def unpack_gptq(t: Mapping[str, torch.Tensor], group_size: int, checkpoint_format: str = "gptq",
                where: str = "layer", shape=None):
    """Validate one GPTQ layer -> (codes int16 [N, K], zeros int16 [N, G], scales fp32 [N, G], g_idx int64 [K], g)."""
    if checkpoint_format not in FORMATS:
        raise CheckpointError(f"{where}: checkpoint_format must be one of {FORMATS}, got {checkpoint_format!r}")
    N, K, g, gi = _check_layer(t, where, group_size, shape)
    codes = _nibbles(t["qweight"], 0).T                   # [K, N] -> [N, K]
    z = _nibbles(t["qzeros"], 1).T                         # [G, N] -> [N, G]
    if checkpoint_format == "gptq":
        z = z + 1
    return codes.contiguous(), z.contiguous(), t["scales"].to(torch.float32).T.contiguous(), gi, g


def dequantize_gptq(t: Mapping[str, torch.Tensor], group_size: int, checkpoint_format: str = "gptq",
                    where: str = "layer") -> torch.Tensor:
    """The reference dequantization of a GPTQ layer (any valid g_idx) -> float32 W [N, K]."""
    codes, z, s, gi, _ = unpack_gptq(t, group_size, checkpoint_format, where)
    return (codes.float() - z.float()[:, gi]) * s[:, gi]


def gptq_to_int4(t: Mapping[str, torch.Tensor], group_size: int, checkpoint_format: str = "gptq",
                 where: str = "layer", shape=None) -> int4_format.Int4Weight:
    """One GPTQ layer -> slmkern Int4Weight, exact (see the module doc for what is refused and why)."""
    codes, z, s, gi, g = unpack_gptq(t, group_size, checkpoint_format, where, shape)
    N, K = codes.shape
    if not torch.equal(gi, torch.arange(K) // g):
        raise CheckpointError(f"{where}.g_idx: act-order (desc_act) group assignment is not k // {g}; slmkern's "
                              "int4 groups are contiguous in k, so this layer cannot be imported exactly. "
                              "Use dequantize_gptq() and re-quantize (e.g. slmkern GPTQ with act_order=True)")
    if not group_size_ok(K, g, INT4_GROUP_MULTIPLE):
        raise CheckpointError(f"{where}: slmkern int4 needs group_size {group_size_rule(INT4_GROUP_MULTIPLE)}, "
                              f"got K={K} group_size={g}")
    if bool((z > 15).any()):
        raise CheckpointError(f"{where}.qzeros: a v1 stored zero of 15 means zero point 16, outside slmkern's 0..15")
    zeros = None if bool((z == 8).all()) else z.to(torch.uint8)
    return int4_format.Int4Weight(int4_format.pack(codes.to(torch.uint8)), s, zeros)


def gptq_config(path: str | os.PathLike, config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """{bits, group_size, desc_act, sym, checkpoint_format} from quantize_config.json or config.json's
    quantization_config (quant_method "gptq")."""
    path = os.fspath(path)
    qc_path = os.path.join(path, "quantize_config.json") if os.path.isdir(path) else None
    if qc_path and os.path.exists(qc_path):
        qc = read_json(qc_path)
    else:
        qc = (config or {}).get("quantization_config")
        if not isinstance(qc, dict) or qc.get("quant_method", "gptq") != "gptq":
            raise CheckpointError(f"{path}: no quantize_config.json and no GPTQ quantization_config in config.json")
    out = {"bits": qc.get("bits", 4), "group_size": qc.get("group_size", 128), "desc_act": qc.get("desc_act", False),
           "sym": qc.get("sym", True), "checkpoint_format": qc.get("checkpoint_format", "gptq")}
    if out["bits"] != 4:
        raise CheckpointError(f"{path}: only 4-bit GPTQ is supported, got bits={out['bits']!r}")
    if out["checkpoint_format"] not in FORMATS:
        raise CheckpointError(f"{path}: checkpoint_format {out['checkpoint_format']!r} is not one of {FORMATS}")
    return out


def load_gptq(model: nn.Module, path: str | os.PathLike, strict: bool = True,
              activations: str = "float") -> list[str]:
    """Load a GPTQ checkpoint directory into a dense ``model`` of the same architecture: every Linear with
    ``<fqn>.qweight`` becomes an Int4Linear (exact), everything else is loaded as is. Returns swapped fqns."""
    from slmkern.interop.compressed_tensors import load_into
    from slmkern.nn import Int4Linear

    tensors, cfg = read_checkpoint(path)
    qc = gptq_config(path, cfg)

    def convert(fqn: str, lin: nn.Linear, t: dict[str, torch.Tensor]) -> nn.Module | None:
        if f"{fqn}.qweight" not in t:
            return None
        layer = {n: t.pop(f"{fqn}.{n}") for n in ("qweight", "qzeros", "scales", "g_idx") if f"{fqn}.{n}" in t}
        q = gptq_to_int4(layer, qc["group_size"], qc["checkpoint_format"], fqn, (lin.out_features, lin.in_features))
        return Int4Linear.from_int4(lin, q, activations)

    return load_into(model, tensors, convert, strict)
