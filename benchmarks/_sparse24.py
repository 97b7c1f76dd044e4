"""bench_sparse24's layer source and impls: 2:4 float values (fp32, bf16), int8 values, and our dense
w8a8_linear on the same int8 weight (impl "slmkern_w8a8")."""
from __future__ import annotations

import torch

from slmkern._backends import cpu as cpu_backend
from slmkern.formats import int8 as int8_format
from slmkern.formats import sparse24 as s24

from .engine import Case, Impl, LinearSource


def magnitude_24(w: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest |w| of every group of 4 consecutive columns."""
    N, K = w.shape
    g = w.reshape(N, K // 4, 4)
    keep = g.abs().topk(2, dim=-1).indices
    return (g * torch.zeros_like(g, dtype=torch.bool).scatter_(-1, keep, True)).reshape(N, K)


def make_source(case: Case, gen: torch.Generator) -> LinearSource:
    """A random layer pruned 2:4 by magnitude; every impl computes with this weight (int8 ones with
    its per-row int8 quantization)."""
    w = magnitude_24(torch.randn(case.N, case.K, generator=gen) * (case.K ** -0.5))
    bias = torch.randn(case.N, generator=gen) * 0.1
    return LinearSource(weight=w, bias=bias, extra={})


def _bytes_extra(case: Case) -> int:
    return 4 * case.N  # fp32 bias


def slmkern_float(values_dtype: torch.dtype) -> Impl:
    name = str(values_dtype).removeprefix("torch.")

    def prepare(case: Case, src: LinearSource):
        v, m = s24.compress(src.weight.to(values_dtype))
        return v, m, src.bias.clone(), cpu_backend.prepack_sparse24(v, m)

    def run(st, x):
        return torch.ops.slmkern.sparse24_linear(x, st[0], st[1], None, st[2], st[3])

    return Impl("slmkern", prepare, run,
                weight_bytes=lambda c: s24.packed_bytes(c.N, c.K, values_dtype) + _bytes_extra(c),
                devices=("cpu",), fields=(("values", name),))


def slmkern_int8() -> Impl:
    def prepare(case: Case, src: LinearSource):
        v, m, sc = s24.compress_int8(src.weight)
        return v, m, sc, src.bias.clone(), cpu_backend.prepack_sparse24(v, m, sc)

    def run(st, x):
        return torch.ops.slmkern.sparse24_linear(x, st[0], st[1], st[2], st[3], st[4])

    return Impl("slmkern", prepare, run,
                weight_bytes=lambda c: s24.packed_bytes(c.N, c.K, torch.int8) + 4 * c.N + _bytes_extra(c),
                devices=("cpu",), fields=(("values", "int8"),))


def slmkern_w8a8_dense() -> Impl:
    """Our dense w8a8_linear on the same (decompressed) int8 weight: what 2:4 int8 must beat."""
    def prepare(case: Case, src: LinearSource):
        v, m, sc = s24.compress_int8(src.weight)
        q = s24.decompress(v, m)
        return q, sc, src.bias.clone(), cpu_backend.prepack_int8(q)

    def run(st, x):
        return torch.ops.slmkern.w8a8_linear(x, st[0], st[1], st[2], st[3])

    return Impl("slmkern_w8a8", prepare, run,
                weight_bytes=lambda c: int8_format.packed_bytes(c.N, c.K) + 4 * c.N + _bytes_extra(c),
                devices=("cpu",), fields=(("values", "int8"),))


def ratios(rows: list[dict]) -> list[dict]:
    """Per (K, N, M): the ratios the 2:4 work is judged by, from one run's medians (> 1 = 2:4 faster)."""
    out = []
    cases: dict = {}
    for r in rows:
        if r["op"] == "sparse24_linear":
            cases.setdefault((r["K"], r["N"], r["M"]), {})[(r["impl"], r.get("values"))] = r
    for (K, N, M), by in cases.items():
        f32, bf16, i8 = by.get(("slmkern", "float32")), by.get(("slmkern", "bfloat16")), by.get(("slmkern", "int8"))
        fp, w8 = by.get(("torch_fp32", None)), by.get(("slmkern_w8a8", "int8"))
        row = {"K": K, "N": N, "M": M}
        if fp and f32:
            row["fp32_values_vs_torch_fp32"] = fp["us"] / f32["us"]
            row["fp32_values_floor_frac"] = f32["floor_us"] / f32["us"]
        if fp and bf16:
            row["bf16_values_vs_torch_fp32"] = fp["us"] / bf16["us"]
            row["bf16_values_floor_frac"] = bf16["floor_us"] / bf16["us"]
        if w8 and i8:
            row["int8_values_vs_slmkern_w8a8"] = w8["us"] / i8["us"]
            row["int8_values_floor_frac"] = i8["floor_us"] / i8["us"]
        out.append(row)
    return out
