"""int4 weight format (group-wise, symmetric or asymmetric).

Canonical (what is saved), for a Linear weight W of shape ``[N, K]``:

``packed``  uint8 ``[N, K/2]``  two 4-bit *codes* per byte along K, low nibble first::

        byte j of row n:   bits 0-3 = code[n, 2j]      bits 4-7 = code[n, 2j+1]
        packed[n, j] = code[n, 2j] | (code[n, 2j+1] << 4)

    Codes are always unsigned, 0..15. K must be even (K odd is rejected, never padded).

``scales``  float32 ``[N, K/g]``  one scale per group of ``g`` consecutive k.
    g is any even number dividing K, or g = K (per-channel; ``-1`` is accepted as shorthand
    where a group size is passed in): the rule is stated once, in
    :mod:`slmkern.formats.common` (``INT4_GROUP_MULTIPLE``); slmkern's quantizer configs
    produce g in {32, 64, 128} or per-channel (``QUANT_GROUP_SIZES``). Group ``i`` covers
    k in ``[i*g, (i+1)*g)``, natural order: act-order quantizers never permute the groups.

``zeros``   uint8 ``[N, K/g]`` or ``None``  one zero point per group, unsigned 0..15,
    stored one per byte (not packed: it is 1/g of the weight bytes; the
    compressed-tensors export below packs it along N).

Dequantization (the value every w4a16 kernel computes with), in fp32::

        W[n, k] = (float(code[n, k]) - float(z[n, k // g])) * scales[n, k // g]

    with ``z = zeros`` (asymmetric) or ``z = 8`` for every group when ``zeros is None``
    (symmetric: the signed value ``code - 8`` lies in [-8, 7], i.e. symmetric values
    are stored with a +8 offset). ``code - z`` is an exact small integer, so the
    only rounding is the one fp32 multiply.

Offset ("min") form, for imported weights whose zero is not an integer (GGUF Q4_1,
``w = d*q + m``): ``offsets`` float32 ``[N, K/g]`` instead of ``zeros``, and::

        W[n, k] = float(code[n, k]) * scales[n, k // g] + offsets[n, k // g]

    in fp32, one multiply then one add (for an fp16 ``d`` the product is exact, so
    this is GGUF's own fp32 dequantization bit for bit). An integer zero point cannot
    hold ``-m/d``, and a float zero point ``zf`` cannot either: ``(code - zf) * s``
    rounds ``code - zf`` first and misses ``d*q + m`` by an ulp in about 1 group in 10.
    The CPU packed layout already keeps one additive term per group (``sz``, the
    kernels compute ``code*s - sz``), so :mod:`slmkern.formats.int4_cpu` stores
    ``sz = -offsets`` and the kernels run the offset form exactly. At op level (which
    takes ``zeros``) the same weight is passed as the float zero point
    :func:`offset_zero_points` ``= -offsets / scales``, which the pure-torch reference
    and non-CPU kernels evaluate as ``(code - zf) * s``: within an ulp of the weight.

Quantization rounds half to even: ``code = clamp(round(W / s) + z, 0, 15)``. Min/max
parameters (:func:`minmax_params`, used by :func:`quantize`):

* symmetric: ``s = amax / 7.5`` (amax = max|W| of the group; the GPTQ and
  compressed-tensors convention), so [-amax, amax] maps to [-7.5, 7.5]: the clamp to
  [-8, 7] costs at most s/2, and every element is within s/2 of its grid point.
* asymmetric: range ``[min(wmin, 0), max(wmax, 0)]``, ``s = range / 15``,
  ``z = clamp(round(-lo / s), 0, 15)``; again every element is within s/2.
* an all-zero group gets ``s = 1`` (any scale reproduces zeros exactly).

compressed-tensors ``pack-quantized`` (num_bits=4) is a reinterpretation, not a
repack, whenever K % 8 == 0 (true for g in {32, 64, 128}): it stores
``weight_packed`` int32 ``[N, K/8]`` with 8 consecutive values per word, the first
in the lowest nibble, each value being ``signed + 8``, which is exactly our code.
On a little-endian machine::

        weight_packed = packed.view(torch.int32)            # [N, K/2] uint8 -> [N, K/8] int32
        weight_scale  = scales                              # cast to the model dtype if wanted
        weight_zero_point (asymmetric) = nibbles of ``zeros`` packed 8 per int32 along N
                                         (compressed-tensors' zp is ``zeros - 8`` as int8,
                                         and it packs with the same +8 offset)

See :func:`to_compressed_tensors`. For tinygemm (``aten._weight_int4pack_mm``),
``(code - z) * s == (code - 8) * s + (8 - z) * s``: its zero is ``(8 - z) * s``, and
its uint8 input holds k=2j in the *high* nibble, so a nibble swap is needed there.
"""
from __future__ import annotations

import sys
from typing import NamedTuple

import torch

from slmkern.formats.common import INT4_GROUP_MULTIPLE, QUANT_GROUP_SIZES
from slmkern.formats.common import resolve_group_size as _resolve_group_size

# The group sizes the quantizer configs and checkpoint importers offer (a policy, see
# slmkern.formats.common); the format itself takes any even g dividing K.
SUPPORTED_GROUP_SIZES = QUANT_GROUP_SIZES
SYMMETRIC_ZERO = 8  # implicit zero point (code offset) of symmetric weights
QMAX = 15


class Int4Weight(NamedTuple):
    """The canonical int4 tensors of one Linear weight (a tuple: ``packed, scales, zeros = ...``)."""

    packed: torch.Tensor            # uint8 [N, K/2]
    scales: torch.Tensor            # float32 [N, K/g]
    zeros: torch.Tensor | None      # uint8 [N, K/g] in 0..15, or None (symmetric)

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * 2

    @property
    def group_size(self) -> int:
        return self.shape[1] // self.scales.shape[1]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.packed, self.scales, self.zeros, dtype=dtype)


# ----------------------------------------------------------------------------- checks
def resolve_group_size(K: int, group_size: int, name: str = "group_size") -> int:
    """Validate (K, group_size) for the int4 format; returns g (``-1`` -> K)."""
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"{name}: expected an int, got {type(group_size).__name__}")
    if K % 2 != 0:
        raise ValueError(f"K: int4 packs two values per byte, so K must be even, got K={K}")
    if K <= 0:
        raise ValueError(f"K: must be positive, got K={K}")
    return _resolve_group_size(K, group_size, INT4_GROUP_MULTIPLE, name)


def check(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None,
          group_size: int | None = None, check_values: bool = True) -> tuple[int, int, int]:
    """Raise unless (packed, scales, zeros) is a canonical int4 weight; returns (N, K, g).

    group_size, when given, must agree with scales' shape. check_values also checks that
    zero points lie in 0..15 (one pass over a tensor 1/g the size of the weight).
    """
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise TypeError(f"packed: expected torch.uint8 [N, K/2], got {getattr(packed, 'dtype', type(packed))}")
    if packed.dim() != 2 or packed.shape[0] == 0 or packed.shape[1] == 0:
        raise ValueError(f"packed: expected a non-empty 2-D tensor [N, K/2], got {tuple(packed.shape)}")
    N, K = packed.shape[0], packed.shape[1] * 2
    if not isinstance(scales, torch.Tensor) or scales.dtype != torch.float32:
        raise TypeError(f"scales: expected torch.float32 [N, K/g], got {getattr(scales, 'dtype', type(scales))}")
    if group_size is not None:
        if isinstance(group_size, int) and group_size > 0 and K % group_size != 0:
            raise ValueError(f"packed: shape {tuple(packed.shape)} holds K={K} values per row, "
                             f"which is not a multiple of group_size={group_size}")
        g = resolve_group_size(K, group_size)
        if tuple(scales.shape) != (N, K // g):
            raise ValueError(f"scales: expected shape [N, K/g] = [{N}, {K // g}] for packed "
                             f"{tuple(packed.shape)} and group_size={group_size}, got {tuple(scales.shape)}")
    else:
        if scales.dim() != 2 or scales.shape[0] != N or scales.shape[1] == 0 or K % scales.shape[1] != 0:
            raise ValueError(f"scales: expected shape [N, K/g] with N={N} and K/g dividing K={K} "
                             f"(from packed {tuple(packed.shape)}), got {tuple(scales.shape)}")
        g = K // scales.shape[1]
        if g % INT4_GROUP_MULTIPLE:
            raise ValueError(f"scales: shape {tuple(scales.shape)} implies group_size={g} for K={K} "
                             f"(from packed {tuple(packed.shape)}); int4 groups must be even")
    if scales.device != packed.device:
        raise ValueError(f"scales: is on {scales.device} but packed is on {packed.device}")
    if zeros is not None:
        if not isinstance(zeros, torch.Tensor) or zeros.dtype != torch.uint8:
            raise TypeError(f"zeros: expected torch.uint8 [N, K/g] in 0..15 or None, "
                            f"got {getattr(zeros, 'dtype', type(zeros))}")
        if tuple(zeros.shape) != tuple(scales.shape):
            raise ValueError(f"zeros: expected shape {tuple(scales.shape)} (same as scales), got {tuple(zeros.shape)}")
        if zeros.device != packed.device:
            raise ValueError(f"zeros: is on {zeros.device} but packed is on {packed.device}")
        if check_values and zeros.numel() and int(zeros.max()) > QMAX:
            raise ValueError(f"zeros: zero points must lie in 0..15, found {int(zeros.max())}")
    return N, K, g


# ----------------------------------------------------------------------------- bit packing
def pack(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] uint8 codes in 0..15, or int8 signed values in [-8, 7] (stored +8) -> uint8 [N, K/2].

    Low nibble first: ``out[n, j] = c[n, 2j] | c[n, 2j+1] << 4``.
    """
    if not isinstance(q, torch.Tensor) or q.dtype not in (torch.uint8, torch.int8):
        raise TypeError(f"q: expected torch.uint8 codes (0..15) or torch.int8 values (-8..7), "
                        f"got {getattr(q, 'dtype', type(q))}")
    if q.dim() != 2:
        raise ValueError(f"q: expected shape [N, K], got {tuple(q.shape)}")
    if q.shape[1] % 2 != 0:
        raise ValueError(f"q: K must be even to pack two values per byte, got K={q.shape[1]}")
    if q.numel():
        lo, hi = int(q.min()), int(q.max())
        ok = (0 <= lo and hi <= QMAX) if q.dtype == torch.uint8 else (-8 <= lo and hi <= 7)
        if not ok:
            rng = "0..15 (uint8 codes)" if q.dtype == torch.uint8 else "-8..7 (int8 signed values)"
            raise ValueError(f"q: values must lie in {rng}, found [{lo}, {hi}]")
    c = q if q.dtype == torch.uint8 else (q.to(torch.int16) + SYMMETRIC_ZERO).to(torch.uint8)
    return (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()


def unpack(packed: torch.Tensor, signed: bool = False) -> torch.Tensor:
    """packed uint8 [N, K/2] -> codes uint8 [N, K] in 0..15 (signed=True: int8 ``code - 8``)."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise TypeError(f"packed: expected torch.uint8 [N, K/2], got {getattr(packed, 'dtype', type(packed))}")
    if packed.dim() != 2:
        raise ValueError(f"packed: expected shape [N, K/2], got {tuple(packed.shape)}")
    N, half = packed.shape
    out = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(N, 2 * half)
    if signed:
        return (out.to(torch.int16) - SYMMETRIC_ZERO).to(torch.int8)
    return out


# ----------------------------------------------------------------------------- quantization
def _as_float_weight(w: torch.Tensor, name: str = "w") -> torch.Tensor:
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise TypeError(f"{name}: expected a float tensor [N, K], got {getattr(w, 'dtype', type(w))}")
    if w.dim() != 2 or w.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty 2-D tensor [N, K], got {tuple(w.shape)}")
    wf = w.detach().float()
    if not bool(torch.isfinite(wf).all()):
        raise ValueError(f"{name}: contains NaN or inf; int4 quantization needs finite weights")
    return wf


def _grouped(x: torch.Tensor, g: int) -> torch.Tensor:
    """[N, K] -> [N, K/g, g] view."""
    return x.reshape(x.shape[0], x.shape[1] // g, g)


def _safe_scale(s: torch.Tensor) -> torch.Tensor:
    """All-zero (or fully underflowed) groups get scale 1: zeros are reproduced exactly."""
    return torch.where(s > 0, s, torch.ones_like(s))


def params_from_range(lo: torch.Tensor, hi: torch.Tensor, symmetric: bool
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-group (scales fp32, zeros uint8 | None) covering [lo, hi] (lo <= 0 <= hi assumed for asym)."""
    if symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        return _safe_scale(amax / 7.5), None
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    s = _safe_scale((hi - lo) / QMAX)
    z = torch.clamp(torch.round(-lo / s), 0, QMAX).to(torch.uint8)
    return s, z


def minmax_params(w: torch.Tensor, group_size: int = 128, symmetric: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """w [N, K] float -> (scales f32 [N, K/g], zeros uint8 [N, K/g] | None): min/max of each group."""
    wf = _as_float_weight(w)
    g = resolve_group_size(wf.shape[1], group_size)
    wg = _grouped(wf, g)
    return params_from_range(wg.amin(dim=-1), wg.amax(dim=-1), symmetric)


def zero_tensor(scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
    """Zero points as float [N, K/g] (8 everywhere when symmetric)."""
    if zeros is None:
        return torch.full_like(scales, float(SYMMETRIC_ZERO), dtype=torch.float32)
    return zeros.float()


def quantize_codes(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                   group_size: int | None = None) -> torch.Tensor:
    """w [N, K] float with given group params -> codes uint8 [N, K]: clamp(round(w / s) + z, 0, 15)."""
    wf = _as_float_weight(w)
    N, K = wf.shape
    if not isinstance(scales, torch.Tensor) or scales.dtype != torch.float32:
        raise TypeError(f"scales: expected torch.float32 [N, K/g], got {getattr(scales, 'dtype', type(scales))}")
    g = resolve_group_size(K, group_size if group_size is not None else K // max(1, scales.shape[-1]))
    if tuple(scales.shape) != (N, K // g):
        raise ValueError(f"scales: expected shape [N, K/g] = [{N}, {K // g}], got {tuple(scales.shape)}")
    if zeros is not None and (zeros.dtype != torch.uint8 or tuple(zeros.shape) != (N, K // g)):
        raise ValueError(f"zeros: expected torch.uint8 of shape [{N}, {K // g}], "
                         f"got {zeros.dtype} {tuple(zeros.shape)}")
    s = _safe_scale(scales).unsqueeze(-1)
    z = zero_tensor(scales, zeros).unsqueeze(-1)
    q = torch.clamp(torch.round(_grouped(wf, g) / s) + z, 0, QMAX)
    return q.reshape(N, K).to(torch.uint8)


def quantize(w: torch.Tensor, group_size: int = 128, symmetric: bool = False) -> Int4Weight:
    """w [N, K] float -> Int4Weight(packed uint8 [N, K/2], scales f32 [N, K/g], zeros uint8 [N, K/g] | None).

    Plain min/max round-to-nearest; see slmkern.algorithms for better quantizers
    (MSE clipping, HQQ, GPTQ) that emit the same format.
    """
    scales, zeros = minmax_params(w, group_size, symmetric)
    return Int4Weight(pack(quantize_codes(w, scales, zeros, group_size)), scales.contiguous(),
                      None if zeros is None else zeros.contiguous())


def dequantize(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None,
               group_size: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """packed uint8 [N, K/2], scales f32 [N, K/g], zeros uint8 [N, K/g] | None -> W [N, K] (fp32 math)."""
    N, K, g = check(packed, scales, zeros, group_size)
    codes = _grouped(unpack(packed), g).float()
    w = (codes - zero_tensor(scales, zeros).unsqueeze(-1)) * scales.unsqueeze(-1)
    return w.reshape(N, K).to(dtype)


def check_offsets(scales: torch.Tensor, offsets: torch.Tensor, name: str = "offsets") -> None:
    """Raise unless offsets is a float32 [N, K/g] tensor on scales' device with finite values."""
    if not isinstance(offsets, torch.Tensor) or offsets.dtype != torch.float32:
        raise TypeError(f"{name}: expected torch.float32 [N, K/g], got {getattr(offsets, 'dtype', type(offsets))}")
    if tuple(offsets.shape) != tuple(scales.shape):
        raise ValueError(f"{name}: expected shape {tuple(scales.shape)} (same as scales), got {tuple(offsets.shape)}")
    if offsets.device != scales.device:
        raise ValueError(f"{name}: is on {offsets.device} but scales is on {scales.device}")
    if offsets.numel() and offsets.device.type != "meta" and not bool(torch.isfinite(offsets).all()):
        raise ValueError(f"{name}: contains NaN or inf")


def dequantize_offset(packed: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                      group_size: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """packed uint8 [N, K/2], scales f32 [N, K/g], offsets f32 [N, K/g] -> W = code * s + offset [N, K] (fp32)."""
    N, K, g = check(packed, scales, None, group_size)
    check_offsets(scales, offsets)
    codes = _grouped(unpack(packed), g).float()
    w = codes * scales.unsqueeze(-1) + offsets.unsqueeze(-1)
    return w.reshape(N, K).to(dtype)


def offset_zero_points(scales: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The float zero points (HQQ-style, op level) of an offset-form weight: ``-offsets / scales``
    (0 where the scale is 0: such a group is ``offsets`` only, which no zero point can express)."""
    check_offsets(scales, offsets)
    return torch.where(scales != 0, -offsets / torch.where(scales != 0, scales, torch.ones_like(scales)),
                       torch.zeros_like(offsets))


# ----------------------------------------------------------------------------- export
def _pack_nibbles_int32(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [R, C] -> int32 [R, ceil(C/8)], 8 per word, first in the lowest nibble (pad 0)."""
    R, C = codes.shape
    pad = (-C) % 8
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    words = codes.reshape(R, -1, 8).to(torch.int64)
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * 4
    packed = (words << shifts).sum(dim=-1)
    return torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed).to(torch.int32)


def to_compressed_tensors(packed: torch.Tensor, scales: torch.Tensor,
                          zeros: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Canonical int4 -> compressed-tensors ``pack-quantized`` tensors of one Linear.

    Returns ``weight_packed`` int32 [N, ceil(K/8)] (for K % 8 == 0 on a little-endian
    host this is just ``packed.view(torch.int32)``, no copy of the bit layout),
    ``weight_scale`` fp32 [N, K/g], ``weight_shape`` int64 [2] and, when asymmetric,
    ``weight_zero_point`` int32 [ceil(N/8), K/g] (zero points packed along N).
    """
    N, K, _ = check(packed, scales, zeros)
    if K % 8 == 0 and sys.byteorder == "little":
        weight_packed = packed.contiguous().view(torch.int32)
    else:  # compressed-tensors pads the last word with zero nibbles
        weight_packed = _pack_nibbles_int32(unpack(packed))
    out = {"weight_packed": weight_packed, "weight_scale": scales,
           "weight_shape": torch.tensor([N, K], dtype=torch.int64)}
    if zeros is not None:
        out["weight_zero_point"] = _pack_nibbles_int32(zeros.T.contiguous()).T.contiguous()
    return out
