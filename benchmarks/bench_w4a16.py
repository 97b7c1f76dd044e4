"""w4a16_linear: int4 group-quantized weights, float activations, vs the peers a user would pick instead.

CPU peers: torch_fp32 (F.linear fp32, same dequantized weight), torch_fbgemm_int8 (torch.ao dynamic
quantized Linear, per-channel qint8), torch_int4pack_bf16 (aten._weight_int4pack_mm_for_cpu, bf16 x).
CUDA peers: cublas_bf16 (F.linear bf16 on the dequantized weight), tinygemm (aten._weight_int4pack_mm).
Group size 128 (64 where K needs it; SLMKERN_BENCH_GROUP_SIZE overrides), asymmetric (uint8 zeros).
"""
from __future__ import annotations

from . import peers
from ._int4 import extra_fields, make_source, slmkern_impl, tinygemm, torch_int4pack_bf16
from .engine import BenchOp
from .pytest_glue import pytest_benchmark_test

BENCH = BenchOp(
    op="w4a16_linear",
    make_source=make_source,
    impls=(slmkern_impl("w4a16_linear"), peers.torch_fp32(), peers.torch_fbgemm_int8(), torch_int4pack_bf16(),
           peers.cublas_bf16(), tinygemm()),
    extra_fields=extra_fields,
    description="int4 (group-wise) weight x float activation linear",
)

test_w4a16_linear = pytest_benchmark_test(BENCH)
