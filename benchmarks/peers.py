"""Peers: what a user would run instead of an slmkern op, built from the same LinearSource.

Each factory returns an :class:`~.engine.Impl` with a fixed impl name. Peers compute with
``source.weight`` (for quantized ops: the dequantized grid), so every impl computes the same
linear layer and the engine's rel_err check compares like with like.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from .engine import Case, Impl, LinearSource
from .machine import quantized_engine


def _bias_bytes(case: Case, elsize: int = 4) -> int:
    return case.N * elsize


# ---------------------------------------------------------------- CPU

def torch_fp32() -> Impl:
    """F.linear in fp32 (MKL/oneDNN) with the same (dequantized) weight."""
    def prepare(case: Case, src: LinearSource):
        b = src.bias.clone() if src.bias is not None else None
        return src.weight.to(case.device, torch.float32).clone().contiguous(), b

    return Impl("torch_fp32", prepare, lambda wb, x: F.linear(x, wb[0], wb[1]),
                weight_bytes=lambda c: 4 * c.N * c.K + _bias_bytes(c), devices=("cpu",),
                x_dtype=torch.float32)


def _per_channel_qint8(weight: torch.Tensor) -> torch.Tensor:
    wf = weight.float()
    amax = wf.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax)).double()
    with warnings.catch_warnings():  # quantized tensor creation is deprecated upstream, still the API
        warnings.simplefilter("ignore")
        return torch.quantize_per_channel(wf, scale, torch.zeros(wf.shape[0], dtype=torch.long), 0, torch.qint8)


def torch_fbgemm_int8() -> Impl:
    """torch.ao.nn.quantized.dynamic.Linear: per-channel qint8 weight, dynamic per-tensor uint8 activations."""
    def prepare(case: Case, src: LinearSource):
        from torch.ao.nn.quantized import dynamic as nnqd

        torch.backends.quantized.engine = quantized_engine()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mod = nnqd.Linear(case.K, case.N, bias_=src.bias is not None, dtype=torch.qint8)
            mod.set_weight_bias(_per_channel_qint8(src.weight), src.bias)
        return mod

    # FBGEMM's packed weight: int8 N*K + per-column offsets (int32) + per-channel scale (fp32)
    # and zero point (int32), + the fp32 bias.
    return Impl("torch_fbgemm_int8", prepare, lambda mod, x: mod(x),
                weight_bytes=lambda c: c.N * c.K + 12 * c.N + _bias_bytes(c), devices=("cpu",),
                x_dtype=torch.float32)


# ---------------------------------------------------------------- CUDA

def cublas_bf16() -> Impl:
    """F.linear in bf16 on CUDA (cuBLAS)."""
    def prepare(case: Case, src: LinearSource):
        b = src.bias.to("cuda", torch.bfloat16) if src.bias is not None else None
        return src.weight.to("cuda", torch.bfloat16).contiguous(), b

    return Impl("cublas_bf16", prepare, lambda wb, x: F.linear(x, wb[0], wb[1]),
                weight_bytes=lambda c: 2 * c.N * c.K + _bias_bytes(c, 2), devices=("cuda",),
                x_dtype=torch.bfloat16)


def _quantize_rows_int8(x: torch.Tensor) -> torch.Tensor:
    amax = x.float().abs().amax(dim=-1, keepdim=True).clamp_min(1e-30)
    return torch.round(x.float() * (127.0 / amax)).clamp_(-127, 127).to(torch.int8)


def torch_int_mm() -> Impl:
    """torch._int_mm(x_int8 (M, K), w_int8.T (K, N)) -> int32: the bare int8 GEMM (cuBLASLt).

    Kernel only: activations are quantized once outside the timed call and there is no dequant
    epilogue, so this peer is a lower bound of what a torch-only w8a8 layer costs.
    """
    def prepare(case: Case, src: LinearSource):
        wf = src.weight.float()
        amax = wf.abs().amax(dim=1, keepdim=True)
        scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        q = torch.round(wf / scale).clamp_(-127, 127).to(torch.int8)
        return q.to("cuda").contiguous()

    def make_x(impl: Impl, case: Case, x: torch.Tensor) -> torch.Tensor:
        return _quantize_rows_int8(x).to("cuda")

    def skip(case: Case) -> str | None:
        if case.M <= 16:
            return "torch._int_mm needs M > 16"
        if case.K % 8 or case.N % 8:
            return "torch._int_mm needs K and N multiples of 8"
        return None

    return Impl("torch_int_mm", prepare, lambda w, x: torch._int_mm(x, w.t()),
                weight_bytes=lambda c: c.N * c.K, devices=("cuda",), x_dtype=torch.int8,
                make_x=make_x, skip=skip, float_output=False)
