"""compressed-tensors (vLLM / llm-compressor) checkpoints: export and import.

Two formats of that stack, per Linear layer with prefix ``P`` (e.g. ``encoder.layer.0.attention.self.query``):

``pack-quantized`` (int weights, ``num_bits`` b in {4, 8}), quantization args
``{"num_bits": b, "type": "int", "symmetric": ..., "strategy": "group"|"channel", "group_size": g}``::

    P.weight_packed      int32 [N, ceil(K*b/32)]  signed values q (int4: [-8, 7]; int8: [-128, 127]) stored as
                         the unsigned ``q + 2**(b-1)``, element k at bit position (k*b) % 32 of word
                         (k*b) // 32, little-endian words; the last word's unused bits are 0.
                         b=4: 8 values per word, the first in the lowest nibble == slmkern int4 ``packed``
                         viewed as int32 (``code = q + 8``). b=8: 4 bytes ``q + 128`` per word.
    P.weight_scale       float [N, K/g] (group) or [N, 1] (channel); any float dtype, exported as float32
    P.weight_zero_point  int32 [ceil(N*b/32), K/g or 1]  (asymmetric only) signed zero points zp packed the
                         same way but along N (dim 0): word [r, c] holds zp[8r + i, c] (b=4) in nibble i
    P.weight_shape       int64 [2] = (N, K)
    dequantization (fp32 scales):  W[n, k] = (q[n, k] - zp[n, k // g]) * scale[n, k // g]   (zp = 0 if symmetric)

slmkern int4 (``slmkern.formats.int4``): code = q + 8, zeros = zp + 8 (symmetric: zeros None == 8), so
``(code - zeros) == (q - zp)`` and the dequantized weights agree bit for bit. slmkern int8
(``slmkern.formats.int8``) is the channel/symmetric int8 case with q in [-127, 127]; int8 group or
asymmetric checkpoints, int4 groups outside slmkern's group-size rule (``slmkern.formats.common.group_size_ok``:
an even g dividing K, or K) and q == -128 cannot be represented and are refused with a :class:`CheckpointError`
(``dequantize_pack_quantized`` still decodes them to float).

``sparse-24-bitmask`` (2:4 sparse float weights; the compressor was dropped from compressed-tensors > 0.14,
whose ``utils.unpack_bitmasks`` still reads the mask; the layout is frozen)::

    P.shape        int [2, 1] (or [2]) = (N, K)
    P.compressed   [N, K/2] the kept values of each row in increasing column order (2 per group of 4)
    P.bitmask      uint8 [N, ceil(K/8)]  bit i (LSB first) of byte b <-> column 8b + i is kept
    dense = zeros(N, K); dense[unpack(bitmask)] = compressed.flatten()

It carries exactly the slmkern 2:4 ``values [N, K/2]`` (same order); ``meta`` and ``bitmask`` are two
spellings of the kept columns. See :func:`sparse24_from_dense`, :func:`sparse24_from_values_meta`.

Model level: :func:`save_compressed` writes a Hugging Face checkpoint directory (``config.json`` with a
``quantization_config`` of ``quant_method: "compressed-tensors"``, ``model.safetensors``) from a model whose
Linears were swapped for Int4Linear / Int8Linear; :func:`load_compressed` swaps a dense model's Linears
for slmkern modules from such a directory (ours or llm-compressor's).
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Mapping

import torch
from torch import nn

from slmkern.formats import int4 as int4_format
from slmkern.formats import int8 as int8_format
from slmkern.formats.common import INT4_GROUP_MULTIPLE, group_size_ok, group_size_rule
from slmkern.interop._safetensors_io import CheckpointError, read_checkpoint, write_safetensors

__all__ = [
    "CheckpointError", "int4_to_pack_quantized", "int8_to_pack_quantized", "pack_quantized_to_int4",
    "pack_quantized_to_int8", "unpack_pack_quantized", "dequantize_pack_quantized", "weight_args",
    "sparse24_from_dense", "sparse24_to_dense", "sparse24_from_values_meta", "sparse24_to_values_meta",
    "save_compressed", "load_compressed", "quantization_config",
]

QUANT_METHOD = "compressed-tensors"
FORMAT_PACKED = "pack-quantized"
FORMAT_SPARSE24 = "sparse-24-bitmask"
_INT8_TOKEN = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True,
               "group_size": None, "block_structure": None, "observer": None, "actorder": None}
# Int8Linear(activations="int7"): dynamic per-token asymmetric 7-bit
_INT7_TOKEN = {**_INT8_TOKEN, "num_bits": 7, "symmetric": False}
_INPUT_ACTIVATIONS = {"int8": _INT8_TOKEN, "int7": _INT7_TOKEN}


# ----------------------------------------------------------------------------- bit packing
def _pack_int32(u: torch.Tensor, bits: int) -> torch.Tensor:
    """unsigned values [R, C] (< 2**bits, bits in {4, 8}) -> int32 [R, ceil(C*bits/32)], first value lowest."""
    per = 32 // bits
    R, C = u.shape
    u = nn.functional.pad(u.to(torch.int64), (0, (-C) % per))
    shifts = torch.arange(per, dtype=torch.int64, device=u.device) * bits
    w = (u.reshape(R, -1, per) << shifts).sum(-1)
    return torch.where(w >= 2 ** 31, w - 2 ** 32, w).to(torch.int32)


def _unpack_int32(w: torch.Tensor, bits: int, C: int) -> torch.Tensor:
    """int32 [R, W] -> unsigned values int16 [R, C] (the inverse of _pack_int32)."""
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int64, device=w.device) * bits
    u = (w.to(torch.int64).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return u.reshape(w.shape[0], -1)[:, :C].to(torch.int16)


def weight_args(num_bits: int, symmetric: bool, group_size: int | None) -> dict[str, Any]:
    """compressed-tensors QuantizationArgs (as a dict) of a weight; group_size None -> channel strategy."""
    return {"num_bits": num_bits, "type": "int", "symmetric": bool(symmetric), "dynamic": False,
            "strategy": "channel" if group_size is None else "group", "group_size": group_size,
            "block_structure": None, "observer": "minmax", "actorder": None}


def int4_to_pack_quantized(q: int4_format.Int4Weight) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """slmkern int4 -> (pack-quantized tensors of one layer, weight args). Exact (a bit reinterpretation)."""
    packed, scales, zeros = q
    N, K, g = int4_format.check(packed, scales, zeros)
    t = int4_format.to_compressed_tensors(packed, scales, zeros)
    return t, weight_args(4, zeros is None, None if g == K else g)


def int8_to_pack_quantized(w: torch.Tensor, scale: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """slmkern int8 (int8 [N, K] in [-127, 127], fp32 [N]) -> (pack-quantized num_bits=8 channel tensors, args)."""
    int8_format.check_weight(w)
    if scale.dtype != torch.float32 or tuple(scale.shape) != (w.shape[0],):
        raise ValueError(f"scale: expected float32 [{w.shape[0]}], got {scale.dtype} {tuple(scale.shape)}")
    N, K = w.shape
    t = {"weight_packed": _pack_int32((w.to(torch.int16) + 128).cpu(), 8),
         "weight_scale": scale.detach().cpu().reshape(N, 1).clone(),
         "weight_shape": torch.tensor([N, K], dtype=torch.int64)}
    return t, weight_args(8, True, None)


# ----------------------------------------------------------------------------- import (validation first)
def _args(args: Mapping[str, Any], where: str) -> tuple[int, bool, str, int | None]:
    if not isinstance(args, Mapping):
        raise CheckpointError(f"{where}: weight quantization args must be a mapping, got {type(args).__name__}")
    bits, sym = args.get("num_bits"), args.get("symmetric", True)
    strategy, g = args.get("strategy"), args.get("group_size")
    if args.get("type", "int") != "int" or type(bits) is not int or bits not in (4, 8):
        raise CheckpointError(f"{where}: only int weights with num_bits 4 or 8 are supported, "
                              f"got type={args.get('type')!r} num_bits={bits!r}")
    if strategy not in ("group", "channel") or not isinstance(sym, bool):
        raise CheckpointError(f"{where}: strategy must be 'group' or 'channel' and symmetric a bool, "
                              f"got strategy={strategy!r} symmetric={sym!r}")
    if strategy == "group" and (type(g) is not int or g <= 0):
        raise CheckpointError(f"{where}: group strategy needs a positive int group_size, got {g!r}")
    return bits, sym, strategy, (g if strategy == "group" else None)


def _get(t: Mapping[str, torch.Tensor], name: str, where: str) -> torch.Tensor:
    if name not in t:
        raise CheckpointError(f"{where}: missing tensor {name!r} (have {sorted(t)})")
    v = t[name]
    if not isinstance(v, torch.Tensor):
        raise CheckpointError(f"{where}.{name}: expected a tensor, got {type(v).__name__}")
    return v


def _decode(t: Mapping[str, torch.Tensor], args: Mapping[str, Any], where: str, shape=None):
    """Validate one pack-quantized layer -> (q int16 [N, K], scale fp32 [N, G], zp int16 [N, G] | None, bits, g)."""
    bits, sym, strategy, g = _args(args, where)
    wp, sc = _get(t, "weight_packed", where), _get(t, "weight_scale", where)
    ws = _get(t, "weight_shape", where)
    if ws.dtype not in (torch.int64, torch.int32, torch.int16) or ws.numel() != 2:
        raise CheckpointError(f"{where}.weight_shape: expected 2 integers (N, K), got {ws.dtype} {tuple(ws.shape)}")
    N, K = (int(v) for v in ws.flatten())
    if N <= 0 or K <= 0 or N * K > 2 ** 40:
        raise CheckpointError(f"{where}.weight_shape: impossible shape ({N}, {K})")
    if shape is not None and (N, K) != tuple(shape):
        raise CheckpointError(f"{where}.weight_shape: ({N}, {K}) does not match the model's Linear "
                              f"(out_features, in_features) = {tuple(shape)}")
    if wp.dtype != torch.int32 or tuple(wp.shape) != (N, math.ceil(K * bits / 32)):
        raise CheckpointError(f"{where}.weight_packed: expected int32 [{N}, {math.ceil(K * bits / 32)}] for "
                              f"weight_shape ({N}, {K}) and num_bits {bits}, got {wp.dtype} {tuple(wp.shape)}")
    gs = K if g is None else g
    if K % gs:
        raise CheckpointError(f"{where}: in_features K={K} is not a multiple of group_size={gs}")
    G = K // gs
    if not sc.is_floating_point() or tuple(sc.shape) not in ((N, G),) + (((N,),) if G == 1 else ()):
        raise CheckpointError(f"{where}.weight_scale: expected float [{N}, {G}], got {sc.dtype} {tuple(sc.shape)}")
    scale = sc.detach().cpu().to(torch.float32).reshape(N, G)
    if not bool(torch.isfinite(scale).all()):
        raise CheckpointError(f"{where}.weight_scale: contains NaN or inf")
    zp = None
    if not sym:
        z = _get(t, "weight_zero_point", where)
        rows = math.ceil(N * bits / 32)
        if z.dtype != torch.int32 or tuple(z.shape) != (rows, G):
            raise CheckpointError(f"{where}.weight_zero_point: expected packed int32 [{rows}, {G}], "
                                  f"got {z.dtype} {tuple(z.shape)}")
        zp = _unpack_int32(z.cpu().T.contiguous(), bits, N).T.contiguous() - (1 << (bits - 1))
    q = _unpack_int32(wp.cpu(), bits, K) - (1 << (bits - 1))
    return q, scale, zp, bits, gs


def unpack_pack_quantized(weight_packed: torch.Tensor, N: int, K: int, num_bits: int) -> torch.Tensor:
    """int32 [N, ceil(K*b/32)] -> signed int8 values q [N, K] (b in {4, 8})."""
    t = {"weight_packed": weight_packed, "weight_scale": torch.ones(N, 1),
         "weight_shape": torch.tensor([N, K])}
    return _decode(t, weight_args(num_bits, True, None), "weight_packed")[0].to(torch.int8)


def dequantize_pack_quantized(tensors: Mapping[str, torch.Tensor], args: Mapping[str, Any],
                              where: str = "layer") -> torch.Tensor:
    """Any int4/int8 group/channel, sym/asym pack-quantized layer -> float32 W [N, K] (fp32 math)."""
    q, scale, zp, _, g = _decode(tensors, args, where)
    N, K = q.shape
    qf = q.float().reshape(N, K // g, g)
    if zp is not None:
        qf = qf - zp.float().unsqueeze(-1)
    return (qf * scale.unsqueeze(-1)).reshape(N, K)


def pack_quantized_to_int4(tensors: Mapping[str, torch.Tensor], args: Mapping[str, Any],
                           where: str = "layer", shape=None) -> int4_format.Int4Weight:
    """A 4-bit pack-quantized layer -> slmkern int4 canonical (exact; refuses what int4 cannot hold)."""
    q, scale, zp, bits, g = _decode(tensors, args, where, shape)
    N, K = q.shape
    if bits != 4:
        raise CheckpointError(f"{where}: num_bits={bits}, expected 4 for an int4 import")
    if not group_size_ok(K, g, INT4_GROUP_MULTIPLE):
        raise CheckpointError(f"{where}: slmkern int4 needs group_size {group_size_rule(INT4_GROUP_MULTIPLE)}, "
                              f"got K={K} group_size={g}")
    codes = (q + 8).to(torch.uint8)
    zeros = None if zp is None else (zp + 8).to(torch.uint8)
    return int4_format.Int4Weight(int4_format.pack(codes), scale.contiguous(), zeros)


def pack_quantized_to_int8(tensors: Mapping[str, torch.Tensor], args: Mapping[str, Any],
                           where: str = "layer", shape=None) -> tuple[torch.Tensor, torch.Tensor]:
    """An 8-bit channel-symmetric pack-quantized layer -> slmkern int8 (weight int8 [N, K], scale fp32 [N])."""
    q, scale, zp, bits, g = _decode(tensors, args, where, shape)
    N, K = q.shape
    if bits != 8 or zp is not None or g != K:
        raise CheckpointError(f"{where}: slmkern int8 holds symmetric per-channel 8-bit weights only, got "
                              f"num_bits={bits} symmetric={zp is None} group_size={g if g != K else None}")
    if bool((q == -128).any()):
        raise CheckpointError(f"{where}.weight_packed: holds -128; slmkern int8 weights lie in [-127, 127]")
    return q.to(torch.int8).contiguous(), scale.reshape(N).contiguous()


# ----------------------------------------------------------------------------- 2:4 (sparse-24-bitmask)
def _mask_from_meta(meta: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """slmkern 2:4 meta uint8 [N, ceil(K/8)] -> bool kept-mask [N, K] (contract layout, validated)."""
    if meta.dtype != torch.uint8 or tuple(meta.shape) != (N, (K + 7) // 8):
        raise ValueError(f"meta: expected uint8 [{N}, {(K + 7) // 8}], got {meta.dtype} {tuple(meta.shape)}")
    nib = torch.stack((meta & 0xF, meta >> 4), -1).reshape(N, -1)[:, :K // 4].long()
    if K % 8 == 4 and bool((meta[:, -1] >> 4).any()):
        raise ValueError("meta: the unused last high nibble must be 0 (K % 8 == 4)")
    c0, c1 = nib & 3, nib >> 2
    if bool((c0 >= c1).any()):
        raise ValueError("meta: every group needs c0 < c1")
    mask = torch.zeros(N, K // 4, 4, dtype=torch.bool)
    mask.scatter_(-1, c0.unsqueeze(-1), True)
    mask.scatter_(-1, c1.unsqueeze(-1), True)
    return mask.reshape(N, K)


def _kept_mask(w: torch.Tensor) -> torch.Tensor:
    """dense [N, K] (2:4) -> bool mask with exactly 2 per group: the nonzeros, then the lowest unused columns."""
    N, K = w.shape
    nz = (w != 0).reshape(N, K // 4, 4)
    if bool((nz.sum(-1) > 2).any()):
        raise ValueError("w: not 2:4 sparse (a group of 4 consecutive columns holds more than 2 nonzeros)")
    # rank columns: nonzeros first, then by column index; keep the first two
    key = (~nz).to(torch.int64) * 4 + torch.arange(4)
    keep = torch.zeros_like(nz)
    keep.scatter_(-1, key.argsort(-1)[..., :2], True)
    return keep.reshape(N, K)


def _pack_mask(mask: torch.Tensor) -> torch.Tensor:
    N, K = mask.shape
    m = nn.functional.pad(mask.to(torch.int32), (0, (-K) % 8)).reshape(N, -1, 8)
    return (m << torch.arange(8, dtype=torch.int32)).sum(-1).to(torch.uint8)


def _bitmask_tensors(values: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    N, K = mask.shape
    return {"shape": torch.tensor([[N], [K]], dtype=torch.int64), "compressed": values.contiguous(),
            "bitmask": _pack_mask(mask)}


def _check_k(K: int) -> None:
    if K % 4:
        raise ValueError(f"K: 2:4 sparsity needs K % 4 == 0, got K={K}")


def sparse24_from_dense(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """dense 2:4 float weight [N, K] -> sparse-24-bitmask tensors {shape, compressed, bitmask} (exact)."""
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dim() != 2:
        raise TypeError(f"w: expected a 2-D float tensor, got {getattr(w, 'dtype', type(w))}")
    _check_k(w.shape[1])
    mask = _kept_mask(w.detach().cpu())
    return _bitmask_tensors(w.detach().cpu()[mask].reshape(w.shape[0], -1), mask)


def sparse24_from_values_meta(values: torch.Tensor, meta: torch.Tensor) -> dict[str, torch.Tensor]:
    """slmkern 2:4 (values [N, K/2] float, meta uint8) -> sparse-24-bitmask tensors (adapter; exact)."""
    if not isinstance(values, torch.Tensor) or not values.is_floating_point() or values.dim() != 2:
        raise TypeError(f"values: expected 2-D float [N, K/2], got {getattr(values, 'dtype', type(values))}")
    N, K = values.shape[0], values.shape[1] * 2
    _check_k(K)
    return _bitmask_tensors(values.detach().cpu(), _mask_from_meta(meta.cpu(), N, K))


def _read_sparse24(t: Mapping[str, torch.Tensor], where: str, shape=None) -> tuple[torch.Tensor, torch.Tensor]:
    sh, vals, bm = _get(t, "shape", where), _get(t, "compressed", where), _get(t, "bitmask", where)
    if sh.dtype not in (torch.int64, torch.int32) or sh.numel() != 2:
        raise CheckpointError(f"{where}.shape: expected 2 integers (N, K), got {sh.dtype} {tuple(sh.shape)}")
    N, K = (int(v) for v in sh.flatten())
    if N <= 0 or K <= 0 or K % 4 or N * K > 2 ** 40:
        raise CheckpointError(f"{where}.shape: ({N}, {K}) is not a 2:4 weight shape (K % 4 == 0)")
    if shape is not None and (N, K) != tuple(shape):
        raise CheckpointError(f"{where}.shape: ({N}, {K}) does not match the model's Linear {tuple(shape)}")
    if not vals.is_floating_point() or tuple(vals.shape) != (N, K // 2):
        raise CheckpointError(f"{where}.compressed: expected float [{N}, {K // 2}], got {vals.dtype} {tuple(vals.shape)}")
    if bm.dtype != torch.uint8 or tuple(bm.shape) != (N, (K + 7) // 8):
        raise CheckpointError(f"{where}.bitmask: expected uint8 [{N}, {(K + 7) // 8}], got {bm.dtype} {tuple(bm.shape)}")
    bits = (bm.cpu().unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1
    mask = bits.reshape(N, -1)[:, :K].bool()
    if K % 8 and bool(bits.reshape(N, -1)[:, K:].any()):
        raise CheckpointError(f"{where}.bitmask: bits set past column K={K}")
    if bool((mask.reshape(N, K // 4, 4).sum(-1) != 2).any()):
        raise CheckpointError(f"{where}.bitmask: every group of 4 columns must keep exactly 2 (2:4)")
    return vals.cpu(), mask


def sparse24_to_dense(tensors: Mapping[str, torch.Tensor], where: str = "layer", shape=None) -> torch.Tensor:
    """sparse-24-bitmask tensors -> dense [N, K] in the values' dtype (exact)."""
    vals, mask = _read_sparse24(tensors, where, shape)
    dense = torch.zeros(mask.shape, dtype=vals.dtype)
    dense[mask] = vals.reshape(-1)
    return dense


def sparse24_to_values_meta(tensors: Mapping[str, torch.Tensor], where: str = "layer"
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """sparse-24-bitmask tensors -> slmkern 2:4 (values [N, K/2], meta uint8 [N, ceil(K/8)]) (adapter)."""
    vals, mask = _read_sparse24(tensors, where)
    N, K = mask.shape
    cols = mask.reshape(N, K // 4, 4).to(torch.int64).argsort(dim=-1, descending=True, stable=True)[..., :2]
    cols = cols.sort(-1).values  # c0 < c1
    nib = (cols[..., 0] | (cols[..., 1] << 2)).to(torch.uint8)
    nib = nn.functional.pad(nib, (0, nib.shape[1] % 2))
    return vals.contiguous(), (nib[:, 0::2] | (nib[:, 1::2] << 4)).contiguous()



# ----------------------------------------------------------------------------- model level
def _quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    from slmkern.nn import Int4Linear, Int8Linear
    return {fqn: m for fqn, m in model.named_modules() if isinstance(m, (Int4Linear, Int8Linear))}


def _layer_tensors(mod: nn.Module, fqn: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from slmkern.nn import Int4Linear
    if isinstance(mod, Int4Linear):
        if mod.offsets:
            raise ValueError(f"module {fqn!r}: an Int4Linear in the offset form (offsets=True, "
                             "W = code * scale + offset, e.g. from GGUF Q4_1) cannot be exported to "
                             "compressed-tensors: pack-quantized stores integer zero points, "
                             "W = (q - zero_point) * scale, which do not hold a float offset exactly. Save it with "
                             "slmkern.save (it keeps the offset form), or re-quantize the layer")
        return int4_to_pack_quantized(int4_format.Int4Weight(mod.weight, mod.weight_scale, mod.weight_zero))
    return int8_to_pack_quantized(mod.weight, mod.weight_scale)


def quantization_config(model: nn.Module) -> dict[str, Any]:
    """The ``quantization_config`` (compressed-tensors, pack-quantized) describing model's slmkern layers.

    One config group per distinct (weights, activations) scheme, targeting the layers by exact name;
    dense nn.Linear layers are listed in ``ignore``. int8 activations (w8a8 / w4a8) are declared as
    dynamic per-token symmetric int8 input activations.
    """
    groups: dict[tuple, list[str]] = {}
    schemes: dict[tuple, dict] = {}
    for fqn, mod in _quantized_modules(model).items():
        _, wargs = _layer_tensors(mod, fqn)
        key = (json.dumps(wargs, sort_keys=True), mod.activations)
        groups.setdefault(key, []).append(fqn)
        schemes[key] = {"weights": wargs, "input_activations": (dict(_INPUT_ACTIVATIONS[mod.activations])
                                                                    if mod.activations in _INPUT_ACTIVATIONS else None),
                        "output_activations": None, "format": FORMAT_PACKED}
    if not groups:
        raise ValueError("model: has no Int4Linear/Int8Linear layers to describe (run slmkern.quantize_ first)")
    config_groups = {f"group_{i}": {"targets": names, **schemes[key]} for i, (key, names) in enumerate(groups.items())}
    ignore = [fqn for fqn, m in model.named_modules() if type(m) is nn.Linear]
    return {"quant_method": QUANT_METHOD, "format": FORMAT_PACKED, "quantization_status": "compressed",
            "config_groups": config_groups, "ignore": ignore, "kv_cache_scheme": None,
            "global_compression_ratio": None, "sparsity_config": {}, "transform_config": {},
            "version": "slmkern"}


def save_compressed(model: nn.Module, save_dir: str | os.PathLike) -> dict[str, Any]:
    """Write ``save_dir/{config.json, model.safetensors}``: a Hugging Face checkpoint in compressed-tensors
    pack-quantized format that transformers / compressed-tensors / vLLM load. Returns the quantization_config.

    config.json is the model's Hugging Face config (``model.config``) when it has one, plus
    ``quantization_config``; every Int4Linear/Int8Linear is written as ``weight_packed``,
    ``weight_scale``, ``weight_shape`` (+ ``weight_zero_point``) and every other state tensor as is.
    An Int4Linear in the offset form (GGUF Q4_1 imports) has no exact pack-quantized spelling: ValueError naming it.
    """
    qc = quantization_config(model)
    quantized = _quantized_modules(model)
    tensors: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        owner, _, leaf = name.rpartition(".")
        if owner in quantized and leaf in ("weight", "weight_scale", "weight_zero"):
            continue
        tensors[name] = t
    for fqn, mod in quantized.items():
        for leaf, t in _layer_tensors(mod, fqn)[0].items():
            tensors[f"{fqn}.{leaf}"] = t
    from slmkern.nn import Int8Embedding
    for fqn, mod in model.named_modules():
        if isinstance(mod, Int8Embedding):   # reads the int8 head's table: the format gets the embedding's own rows
            tensors[f"{fqn}.weight"] = mod.dequantized_table().contiguous()
    cfg: dict[str, Any] = {}
    hf_config = getattr(model, "config", None)
    if hf_config is not None and hasattr(hf_config, "to_dict"):
        cfg = hf_config.to_dict()
        if not cfg.get("architectures"):
            cfg["architectures"] = [type(model).__name__]
    cfg["quantization_config"] = qc
    os.makedirs(save_dir, exist_ok=True)
    with open(os.path.join(save_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True, default=str)
    write_safetensors(os.path.join(save_dir, "model.safetensors"), tensors, {"format": "pt"})
    return qc


def _matches(fqn: str, mod: nn.Module, targets) -> bool:
    for t in targets if isinstance(targets, (list, tuple)) else [targets]:
        if not isinstance(t, str):
            raise CheckpointError(f"quantization_config: targets must be strings, got {t!r}")
        if t.startswith("re:"):
            try:
                if re.match(t[3:], fqn):
                    return True
            except re.error as e:
                raise CheckpointError(f"quantization_config: bad target regex {t!r}: {e}") from None
        elif t == fqn or t == type(mod).__name__:
            return True
    return False


def load_into(model: nn.Module, tensors: dict[str, torch.Tensor], convert, strict: bool = True) -> list[str]:
    """Swap model's nn.Linear layers chosen by ``convert(fqn, linear, tensors) -> nn.Module | None`` and load
    every other state tensor from ``tensors``. convert consumes its own keys (pops them). strict: every
    remaining model tensor must be in the checkpoint and every checkpoint tensor must be used.
    Returns the swapped fqns. Errors are CheckpointError naming the tensor."""
    tensors = dict(tensors)
    swapped = []
    for fqn, mod in list(model.named_modules()):
        if type(mod) is not nn.Linear:
            continue
        new = convert(fqn, mod, tensors)
        if new is None:
            continue
        if mod.bias is not None:
            b = tensors.pop(f"{fqn}.bias", None)
            if b is None:
                raise CheckpointError(f"{fqn}.bias: missing from the checkpoint (the model's Linear has a bias)")
            if tuple(b.shape) != (mod.out_features,) or not b.is_floating_point():
                raise CheckpointError(f"{fqn}.bias: expected float [{mod.out_features}], got {b.dtype} {tuple(b.shape)}")
            new.bias.copy_(b)
        parent, _, child = fqn.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        swapped.append(fqn)
    done = tuple(f"{fqn}." for fqn in swapped)
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(done)}
    rest = {k: v for k, v in tensors.items() if k in own}
    for k, v in rest.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(f"{k}: checkpoint shape {tuple(v.shape)} does not match the model's {tuple(own[k].shape)}")
        if own[k].is_floating_point() != v.is_floating_point():
            raise CheckpointError(f"{k}: checkpoint dtype {v.dtype} does not fit the model's {own[k].dtype}")
    if strict:
        missing = sorted(set(own) - set(rest))
        unexpected = sorted(set(tensors) - set(rest))
        if missing or unexpected:
            raise CheckpointError(f"checkpoint does not match the model: missing {missing[:8]}"
                                  f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                                  f"{' ...' if len(unexpected) > 8 else ''}")
    model.load_state_dict(rest, strict=False)
    return swapped


def load_compressed(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> list[str]:
    """Load a compressed-tensors pack-quantized checkpoint (directory or safetensors file + ``config``) into
    a dense ``model`` of the same architecture: targeted nn.Linear layers become Int4Linear (4-bit) or
    Int8Linear (8-bit, channel, symmetric), everything else is loaded as is. Returns the swapped fqns.
    Layers that slmkern cannot represent raise CheckpointError (never a silent approximation)."""
    from slmkern.nn import Int4Linear, Int8Linear

    tensors, cfg = read_checkpoint(path)
    qc = cfg.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{os.fspath(path)}: config.json has no quantization_config with "
                              f"quant_method {QUANT_METHOD!r}")
    groups, ignore = qc.get("config_groups"), qc.get("ignore") or []
    if not isinstance(groups, dict) or not groups or not all(isinstance(g, dict) for g in groups.values()):
        raise CheckpointError("quantization_config.config_groups: expected a non-empty mapping of schemes")
    if not isinstance(ignore, list):
        raise CheckpointError("quantization_config.ignore: expected a list")

    def convert(fqn: str, lin: nn.Linear, t: dict[str, torch.Tensor]) -> nn.Module | None:
        if _matches(fqn, lin, ignore):
            return None
        scheme = next((g for g in groups.values() if _matches(fqn, lin, g.get("targets") or [])), None)
        if scheme is None:
            return None
        fmt = scheme.get("format") or qc.get("format")
        if fmt != FORMAT_PACKED:
            raise CheckpointError(f"{fqn}: format {fmt!r} is not supported (only {FORMAT_PACKED!r})")
        wargs = scheme.get("weights")
        if not isinstance(wargs, dict):
            raise CheckpointError(f"{fqn}: scheme has no weights args")
        ia = scheme.get("input_activations")
        activations = "float"
        if isinstance(ia, dict) and ia.get("dynamic"):
            if ia.get("num_bits") == 8:
                activations = "int8"
            elif ia.get("num_bits") == 7 and ia.get("symmetric") is False:   # only our asymmetric int7
                activations = "int7"
        names = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")
        layer = {n: t.pop(f"{fqn}.{n}") for n in names if f"{fqn}.{n}" in t}
        shape = (lin.out_features, lin.in_features)
        if wargs.get("num_bits") == 8:
            w, s = pack_quantized_to_int8(layer, wargs, fqn, shape)
            return Int8Linear.from_int8(lin, w, s, activations)
        q = pack_quantized_to_int4(layer, wargs, fqn, shape)
        return Int4Linear.from_int4(lin, q, activations)

    return load_into(model, tensors, convert, strict)
