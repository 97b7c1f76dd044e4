"""sparse_linear (unstructured bitmask) for the bench engine: the layer source, our impl and its peers.

One BenchOp per (sparsity, values) pair: :func:`make_bench`. The weight is pruned at random to the
requested sparsity (magnitude pruning of a random matrix gives the same pattern statistics), then
compressed with slmkern.formats.bitmask; every impl computes with the same weights:

- ``slmkern``       torch.ops.slmkern.sparse_linear with w_packed (float values, or int8 values + scales)
- ``torch_fp32``    F.linear on the dense fp32 weight (zeros included)
- ``torch_csr``     W an fp32 CSR tensor; M = 1: torch.mv(W_csr, x[0]) + bias, else
                    torch.addmm(bias[:, None], W_csr, x.T).T: of the CSR forms torch 2.13 offers on CPU
                    (sparse.mm, addmm, mv, F.linear(x, W_csr), x @ W.T_csr) the fastest here
- ``slmkern_w8a8``  int8 values only: torch.ops.slmkern.w8a8_linear on the dense int8 weight
                    (what the same int8 layer costs without exploiting sparsity)
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from slmkern._backends import cpu as cpu_backend
from slmkern.formats import bitmask as bf
from slmkern.formats import int8 as int8_format

from . import peers
from .engine import BenchOp, Case, Impl, LinearSource

VALUES = ("int8", "float")


def make_source_for(sparsity: float, values: str):
    def make_source(case: Case, gen: torch.Generator) -> LinearSource:
        w = torch.randn(case.N, case.K, generator=gen) * (case.K ** -0.5)
        keep = torch.rand(case.N, case.K, generator=gen) >= sparsity
        w = w * keep
        bias = torch.randn(case.N, generator=gen) * 0.1
        if values == "int8":
            v, b, r, s = bf.compress_int8(w)
            q = bf.decompress(v, b, r, case.K)
            dense = q.float() * s.unsqueeze(1)
            extra = {"values": v, "bitmask": b, "row_offsets": r, "scales": s, "q": q}
        else:
            v, b, r = bf.compress(w)
            dense = w
            extra = {"values": v, "bitmask": b, "row_offsets": r, "scales": None}
        return LinearSource(weight=dense, bias=bias, extra=extra)
    return make_source


def _nnz(case: Case, sparsity: float) -> int:
    return round(case.N * case.K * (1.0 - sparsity))


def slmkern_impl(sparsity: float, values: str) -> Impl:
    def prepare(case: Case, src: LinearSource):
        e = src.extra
        v, b, r = e["values"].clone(), e["bitmask"].clone(), e["row_offsets"].clone()
        s = e["scales"].clone() if e["scales"] is not None else None
        return v, b, r, s, src.bias.clone(), cpu_backend.prepack_bitmask(v, b, r, case.K, s)

    def run(st, x):
        return torch.ops.slmkern.sparse_linear(x, st[0], st[1], st[2], st[3], st[4], st[5])

    def weight_bytes(case: Case) -> int:  # the packed buffer (what the kernel reads), scales, bias
        int8v = values == "int8"
        return bf.packed_bytes(case.N, case.K, _nnz(case, sparsity), int8v) + (8 if int8v else 4) * case.N

    return Impl("slmkern", prepare, run, weight_bytes, devices=("cpu",))


def torch_csr(sparsity: float) -> Impl:
    def prepare(case: Case, src: LinearSource):
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore")
            w = src.weight.float().clone().to_sparse_csr()
        b = src.bias.clone()
        return w, b.unsqueeze(1), b

    def run(st, x):
        if x.shape[0] == 1:
            return (torch.mv(st[0], x[0]) + st[2]).unsqueeze(0)
        return torch.addmm(st[1], st[0], x.t()).t()

    def weight_bytes(case: Case) -> int:  # fp32 values + int64 column indices + int64 row pointers + bias
        return _nnz(case, sparsity) * 12 + (case.N + 1) * 8 + 4 * case.N

    return Impl("torch_csr", prepare, run, weight_bytes, devices=("cpu",), x_dtype=torch.float32)


def slmkern_w8a8() -> Impl:
    def prepare(case: Case, src: LinearSource):
        q = src.extra["q"].clone()
        return q, src.extra["scales"].clone(), src.bias.clone(), cpu_backend.prepack_int8(q)

    def run(st, x):
        return torch.ops.slmkern.w8a8_linear(x, st[0], st[1], st[2], st[3])

    return Impl("slmkern_w8a8", prepare, run,
                weight_bytes=lambda c: int8_format.packed_bytes(c.N, c.K) + 8 * c.N, devices=("cpu",))


def make_bench(sparsity: float = 0.9, values: str = "int8") -> BenchOp:
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if values not in VALUES:
        raise ValueError(f"values must be one of {VALUES}, got {values!r}")
    impls = [slmkern_impl(sparsity, values), peers.torch_fp32(), torch_csr(sparsity)]
    if values == "int8":
        impls.append(slmkern_w8a8())
    return BenchOp(
        op="sparse_linear",
        make_source=make_source_for(sparsity, values),
        impls=tuple(impls),
        devices=("cpu",),
        extra_fields=lambda case: {"sparsity": sparsity, "values": values},
        description=f"unstructured {sparsity:.0%} sparse linear, {values} values (bitmask format)",
    )
