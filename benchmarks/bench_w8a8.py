"""w8a8_linear: int8 weights, dynamic per-token int8 activations, vs the peers a user would pick instead.

CPU peers: torch_fp32 (F.linear fp32, same dequantized weight), torch_fbgemm_int8
(torch.ao dynamic quantized Linear, per-channel qint8). CUDA peers: cublas_bf16, torch_int_mm (M > 16).
"""
from __future__ import annotations

from . import peers
from ._int8 import make_source, slmkern_impl
from .engine import BenchOp
from .pytest_glue import pytest_benchmark_test

BENCH = BenchOp(
    op="w8a8_linear",
    make_source=make_source,
    impls=(slmkern_impl("w8a8_linear"), peers.torch_fp32(), peers.torch_fbgemm_int8(),
           peers.cublas_bf16(), peers.torch_int_mm()),
    description="int8 weight x dynamic int8 activation linear",
)

test_w8a8_linear = pytest_benchmark_test(BENCH)
