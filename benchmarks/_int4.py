"""Shared by bench_w4a16 and bench_w4a8: the int4 layer source, our impl (called as Int4Linear calls it)
and the int4 peers (torch's int4pack kernels: `_weight_int4pack_mm_for_cpu`, tinygemm on CUDA).

Group size: 128 by default (SLMKERN_BENCH_GROUP_SIZE overrides it); a K that is not a multiple of
it gets the largest of 128/64/32 that divides K (576 -> 64), else per-channel. Each row records
its group_size.
"""
from __future__ import annotations

import os

import torch

from slmkern.formats import int4 as int4_format

from .engine import Case, Impl, LinearSource

DEFAULT_GROUP_SIZE = 128


def group_size_for(K: int) -> int:
    want = int(os.environ.get("SLMKERN_BENCH_GROUP_SIZE", DEFAULT_GROUP_SIZE))
    for g in (want, 128, 64, 32):
        if g <= K and K % g == 0:
            return g
    return K


def extra_fields(case: Case) -> dict:
    return {"group_size": group_size_for(case.K)}


def make_source(case: Case, gen: torch.Generator) -> LinearSource:
    """A random layer quantized to asymmetric int4 (min/max per group); peers get the dequantized
    weight (the exact values our kernels compute with)."""
    g = group_size_for(case.K)
    w = torch.randn(case.N, case.K, generator=gen) * (case.K ** -0.5)
    q = int4_format.quantize(w, group_size=g, symmetric=False)
    bias = torch.randn(case.N, generator=gen) * 0.1
    return LinearSource(weight=q.dequantize(), bias=bias,
                        extra={"packed": q.packed, "scales": q.scales, "zeros": q.zeros, "group_size": g})


def _canonical_bytes(case: Case, g: int, bias_elsize: int) -> int:
    """What the Triton kernels read: K*N/2 codes + fp32 scales + uint8 zeros (+ the bias)."""
    G = case.K // g
    return case.K * case.N // 2 + 4 * case.N * G + case.N * G + bias_elsize * case.N


def slmkern_impl(op_name: str) -> Impl:
    """torch.ops.slmkern.<op>(x, w, scales, zeros, group_size, bias, w_packed): on CPU with
    w_packed = prepack_int4(...) per copy (as Int4Linear holds it); on CUDA the Triton kernels read
    the canonical tensors and w_packed is None."""
    def prepare(case: Case, src: LinearSource):
        e = src.extra
        w, s, z, g = e["packed"].clone(), e["scales"].clone(), e["zeros"].clone(), e["group_size"]
        if case.device == "cpu":
            from slmkern._backends.cpu import prepack_int4
            return w, s, z, g, src.bias.clone(), prepack_int4(w, s, z, g)
        return w.cuda(), s.cuda(), z.cuda(), g, src.bias.to("cuda", case.dtype), None

    def run(st, x):
        return getattr(torch.ops.slmkern, op_name)(x, *st)

    def weight_bytes(case: Case) -> int:
        g = group_size_for(case.K)
        if case.device == "cpu":  # the packed blob (codes + per-group s, s*z) and the fp32 bias
            from slmkern.formats.int4_cpu import packed_bytes
            return packed_bytes(case.N, case.K, g, True) + 4 * case.N
        return _canonical_bytes(case, g, case.dtype.itemsize)

    return Impl("slmkern", prepare, run, weight_bytes, devices=("cpu", "cuda"))


# ---------------------------------------------------------------- peers

def _scales_and_zeros(src: LinearSource) -> torch.Tensor:
    """torch int4pack's qScaleAndZeros, bf16 [K/g, N, 2]: (scale, zero) with W = (code - 8) * scale + zero,
    so zero = (8 - z) * scale reproduces our W = (code - z) * scale (up to the bf16 rounding)."""
    s = src.extra["scales"]
    z = src.extra["zeros"].float()
    return torch.stack((s.T, ((8.0 - z) * s).T), dim=-1).to(torch.bfloat16).contiguous()


def _int4pack_bytes(case: Case) -> int:
    G = case.K // group_size_for(case.K)
    return case.K * case.N // 2 + 4 * case.N * G + 2 * case.N  # codes + bf16 (scale, zero) + bf16 bias


def torch_int4pack_bf16() -> Impl:
    """aten._weight_int4pack_mm_for_cpu (bf16 x) on the weight packed by
    aten._convert_weight_to_int4pack_for_cpu(int32 codes [N, K], innerKTiles=2), + bias."""
    def prepare(case: Case, src: LinearSource):
        codes = int4_format.unpack(src.extra["packed"]).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
        b = src.bias.to(torch.bfloat16).clone() if src.bias is not None else None
        return packed, src.extra["group_size"], _scales_and_zeros(src), b

    def run(st, x):
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, st[0], st[1], st[2])
        return y if st[3] is None else y.add_(st[3])

    def skip(case: Case) -> str | None:
        if case.N % 16:
            return "_convert_weight_to_int4pack_for_cpu needs N a multiple of 16"
        if group_size_for(case.K) not in (32, 64, 128, 256):
            return "_weight_int4pack_mm_for_cpu needs group size 32/64/128/256"
        return None

    return Impl("torch_int4pack_bf16", prepare, run, weight_bytes=_int4pack_bytes, devices=("cpu",),
                x_dtype=torch.bfloat16, skip=skip)


def _inner_k_tiles(K: int) -> int | None:
    for t in (8, 4, 2):
        if K % (16 * t) == 0:
            return t
    return None


def tinygemm() -> Impl:
    """aten._weight_int4pack_mm (CUDA tinygemm, bf16 x): uint8 [N, K/2] with even k in the HIGH nibble
    (our bytes nibble-swapped) packed by aten._convert_weight_to_int4pack(.., innerKTiles=8, or 4/2
    where K needs it), + bias. The engine's rel_err check verifies it computes our layer."""
    def prepare(case: Case, src: LinearSource):
        p = src.extra["packed"]
        swapped = ((p & 0x0F) << 4) | (p >> 4)
        packed = torch.ops.aten._convert_weight_to_int4pack(swapped.cuda().contiguous(), _inner_k_tiles(case.K))
        b = src.bias.to("cuda", torch.bfloat16) if src.bias is not None else None
        return packed, src.extra["group_size"], _scales_and_zeros(src).cuda(), b

    def run(st, x):
        y = torch.ops.aten._weight_int4pack_mm(x, st[0], st[1], st[2])
        return y if st[3] is None else y.add_(st[3])

    def skip(case: Case) -> str | None:
        if _inner_k_tiles(case.K) is None:
            return "tinygemm needs K a multiple of 32"
        if case.N % 8:
            return "tinygemm needs N a multiple of 8"
        if group_size_for(case.K) not in (32, 64, 128, 256):
            return "tinygemm needs group size 32/64/128/256"
        return None

    return Impl("tinygemm", prepare, run, weight_bytes=_int4pack_bytes, devices=("cuda",),
                x_dtype=torch.bfloat16, skip=skip)
