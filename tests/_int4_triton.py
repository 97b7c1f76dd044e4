"""Shared by test_w4a16_triton.py and test_w4a8_triton.py: random int4 cases, the float64 value of
each op (also for group sizes slmkern.reference rejects: any even g dividing K), tolerances."""
from __future__ import annotations

import os

import pytest
import torch

from slmkern._backends import triton as triton_backend

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cpu" if INTERPRET else "cuda"
needs_launch = pytest.mark.skipif(not (INTERPRET or HAS_CUDA), reason="needs a CUDA device or TRITON_INTERPRET=1")
needs_kernels = pytest.mark.skipif(not triton_backend.has_triton_kernels(),
                                   reason="triton (slmkern.kernels) is not available")
# fp32/fp16 add compiles on a GPU without adding coverage of the kernels' logic there.
interpret_only = pytest.mark.skipif(not INTERPRET, reason="interpreter-only variant (bounds GPU compile time)")

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# relative spacing of the output dtype (two roundings, ours and the reference's, differ by <= 1)
ULP = {F32: 2.0 ** -23, BF16: 2.0 ** -7, F16: 2.0 ** -10}
INT_VIEW = {F32: torch.int32, BF16: torch.int16, F16: torch.int16}


def make_case(M: int, K: int, N: int, g: int, zeros: str | None, bias: bool, dtype: torch.dtype,
              special_rows: bool = True, bias_dtype: torch.dtype | None = None):
    """Fresh random CPU tensors. g = -1 means per-channel. zeros: None | "u8" | "f32".
    Rows 1 / 2 become all-zero / contain a NaN when M >= 3 (special_rows)."""
    G = K // (K if g == -1 else g)
    x = (torch.randn(M, K) * torch.exp(torch.randn(M, 1))).to(dtype)
    if special_rows and M >= 3:
        x[1] = 0
        x[2, K // 3] = float("nan")
    w = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8)
    s = torch.rand(N, G) * 0.1 + 0.01
    z = {None: None, "u8": torch.randint(0, 16, (N, G), dtype=torch.uint8),
         "f32": torch.rand(N, G) * 15}[zeros]
    b = (torch.randn(N) * 2).to(bias_dtype or dtype) if bias else None
    return x, w, s, z, b


def to_dev(*ts, device: str = DEVICE):
    return [t.to(device) if t is not None else None for t in ts]


def codes(w: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> int64 codes [N, K], low nibble = even k."""
    w = w.to(torch.int64)
    return torch.stack((w & 0xF, w >> 4), dim=-1).reshape(w.shape[0], -1)


def zero_points(s: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
    return torch.full(s.shape, 8.0, dtype=torch.float64, device=s.device) if z is None else z.double()


def weight_f64(w, s, z, g) -> torch.Tensor:
    """W [N, K] in float64: (code - z) * s (the fp32 zero of an fp32 zero point is exact in float64)."""
    u = codes(w).double()
    g = u.shape[1] if g == -1 else g
    return (u - zero_points(s, z).repeat_interleave(g, dim=1)) * s.double().repeat_interleave(g, dim=1)


def w4a16_f64(x, w, s, z, g, bias):
    """(exact value of x @ W.T + bias, sum |x| |W| + |bias|), both float64 (M, N)."""
    W = weight_f64(w, s, z, g)
    xd = x.reshape(-1, x.shape[-1]).double()
    y = xd @ W.T
    mag = xd.abs() @ W.abs().T
    if bias is not None:
        y = y + bias.double()
        mag = mag + bias.double().abs()
    return y, mag


def w4a8_f64(x, w, s, z, g, bias):
    """(float64 value of sx * sum_i (s_i * dot_i - s_i * z_i * asum_i) + bias, the matching magnitude)."""
    from slmkern.reference import quantize_rows_s8

    K = x.shape[-1]
    g = K if g == -1 else g
    G = K // g
    q, sx = quantize_rows_s8(x.reshape(-1, K))
    qd = q.double().reshape(-1, G, g)
    u = codes(w).double().reshape(-1, G, g)
    dots = torch.einsum("mgk,ngk->mng", qd, u)
    asum = qd.sum(-1).unsqueeze(1)
    sd = s.double().unsqueeze(0)
    szd = (s.double() * zero_points(s, z)).unsqueeze(0)
    terms = sd * dots - szd * asum
    sxd = sx.double().unsqueeze(1)
    y = sxd * terms.sum(-1)
    mag = torch.nan_to_num(sxd.abs() * ((sd * dots).abs() + (szd * asum).abs()).sum(-1), nan=0.0)
    if bias is not None:
        y = y + bias.double()
        mag = mag + bias.double().abs()
    return y, mag


def assert_close(y: torch.Tensor, ref: torch.Tensor, tol: torch.Tensor) -> None:
    """Same NaN positions; |y - ref| <= tol elsewhere (ref, tol float64)."""
    y = y.detach().cpu().double().reshape(ref.shape)
    ref, tol = ref.cpu(), tol.cpu()
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(y), nan), "NaN positions differ"
    err = (y - ref).abs()[~nan]
    t = tol.expand_as(ref)[~nan]
    bad = ~(err <= t)
    assert not bad.any(), (f"{int(bad.sum())} of {err.numel()} outputs off; worst err "
                           f"{float(err.max()):.3g} at tol {float(t[int((err - t).argmax())]):.3g}")


def assert_bits_equal(y: torch.Tensor, r: torch.Tensor) -> None:
    """Same dtype, shape, NaN positions and bit patterns everywhere else."""
    y, r = y.cpu(), r.cpu()
    assert y.dtype == r.dtype and y.shape == r.shape, (y.dtype, y.shape, r.dtype, r.shape)
    nan = torch.isnan(r)
    assert torch.equal(torch.isnan(y), nan), "NaN positions differ"
    yb, rb = y.view(INT_VIEW[y.dtype])[~nan], r.view(INT_VIEW[r.dtype])[~nan]
    bad = (yb != rb).nonzero()
    assert bad.numel() == 0, (f"{bad.numel()} of {yb.numel()} outputs differ, first at flat index "
                              f"{bad[0].item()}: {y[~nan][bad[0]].item()} vs {r[~nan][bad[0]].item()}")


def have_ptxas() -> bool:
    try:
        from pathlib import Path

        from triton import knobs
        return Path(knobs.nvidia.ptxas.path).exists()
    except Exception:  # noqa: BLE001 - older triton or no NVIDIA backend
        return False


# PTX of a kernel for sm_90 with the run-time specialization a launch at benchmark shapes gets
# (16-byte aligned pointers, K / N / strides multiples of 16): needs only triton's bundled ptxas.
PTX_HELPER = r'''
import json, re, sys
import triton
import slmkern
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ALIGNED_INTS = ("N", "K", "stride_xm", "stride_wn", "stride_ym")

def ptx(kernel, signature, constexprs, num_warps=4, num_stages=3):
    fn = kernel
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = fn.fn
    sig = {**signature, **{n: "constexpr" for n in constexprs}}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in signature.items()
             if t.startswith("*") or n in ALIGNED_INTS}
    src = ASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
    out = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": num_warps, "num_stages": num_stages})
    return out.asm["ptx"]

def facts(p):
    fmas = re.findall(r"fma\.rn\.f32\s+[^;]*;", p)
    return {"wgmma_s8": len(re.findall(r"wgmma\.mma_async[^ ]*\.s32\.s8\.s8", p)),
            "mma_s8": len(re.findall(r"\bmma\.sync[^ ]*\.s32\.s8\.s8", p)),
            "wgmma_bf16": len(re.findall(r"wgmma\.mma_async[^ ]*\.bf16\.bf16", p)),
            "ld_global_v4": len(re.findall(r"ld\.global(\.[a-z]+)*\.v4\.b32", p)),
            "ld_global_b8": len(re.findall(r"ld\.global(\.[a-z]+)*\.b8", p)),
            "int_to_f32": len(re.findall(r"cvt\.rn\.f32\.[us](8|16|32)", p)),
            "fma_nonzero_addend": sum(not f.rstrip(";").rstrip().endswith("0f00000000") for f in fmas)}
'''


def ptx_probe_env() -> dict:
    from _child_env import child_env
    # TRITON_DEFAULT_FP_FUSION=1: the worst case for exactness (contraction allowed)
    return child_env(drop=("TRITON_INTERPRET",), TRITON_DEFAULT_FP_FUSION="1")
