"""Shared by bench_w8a8 and bench_w8a16: the int8 layer source and our impl (called as Int8Linear calls it)."""
from __future__ import annotations

import torch

from slmkern._backends import cpu as cpu_backend
from slmkern.formats import int8 as int8_format

from .engine import Case, Impl, LinearSource


def make_source(case: Case, gen: torch.Generator) -> LinearSource:
    """A random layer quantized per output channel; peers get the dequantized weight."""
    w = torch.randn(case.N, case.K, generator=gen) * (case.K ** -0.5)
    q, scale = int8_format.quantize_per_channel(w)
    bias = torch.randn(case.N, generator=gen) * 0.1
    return LinearSource(weight=int8_format.dequantize(q, scale), bias=bias, extra={"q": q, "scale": scale})


def slmkern_impl(op_name: str) -> Impl:
    """torch.ops.slmkern.<op>(x, w, w_scale, bias, w_packed) with w_packed = prepack_int8(w) per copy (CPU);
    on CUDA w_packed is None and the Triton kernel reads w directly."""
    def prepare(case: Case, src: LinearSource):
        q, scale = src.extra["q"].clone(), src.extra["scale"].clone()
        if case.device == "cpu":
            return q, scale, src.bias.clone(), cpu_backend.prepack_int8(q)
        bias = src.bias.to("cuda", case.dtype)
        return q.to("cuda"), scale.to("cuda"), bias, None

    def run(st, x):
        return getattr(torch.ops.slmkern, op_name)(x, st[0], st[1], st[2], st[3])

    def weight_bytes(case: Case) -> int:
        if case.device == "cpu":  # packed tiles + colsum, fp32 scale and bias; w itself is not read
            return int8_format.packed_bytes(case.N, case.K) + 4 * case.N + 4 * case.N
        return case.N * case.K + 4 * case.N + case.dtype.itemsize * case.N

    return Impl("slmkern", prepare, run, weight_bytes, devices=("cpu", "cuda"))
