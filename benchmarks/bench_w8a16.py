"""w8a16_linear: int8 weight-only linear (float activations), vs the peers a user would pick instead.

CPU peers: torch_fp32 (F.linear fp32, same dequantized weight) and torch_fbgemm_int8 (the closest
int8 alternative torch offers on CPU). CUDA peer: cublas_bf16.
"""
from __future__ import annotations

from . import peers
from ._int8 import make_source, slmkern_impl
from .engine import BenchOp
from .pytest_glue import pytest_benchmark_test

BENCH = BenchOp(
    op="w8a16_linear",
    make_source=make_source,
    impls=(slmkern_impl("w8a16_linear"), peers.torch_fp32(), peers.torch_fbgemm_int8(),
           peers.cublas_bf16()),
    description="int8 weight-only linear, float activations",
)

test_w8a16_linear = pytest_benchmark_test(BENCH)
