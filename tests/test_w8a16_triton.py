"""Triton w8a16 kernels (slmkern.kernels.w8a16) against slmkern.reference.w8a16_linear.

Without a GPU the launchers run on CPU tensors under TRITON_INTERPRET=1 (set by conftest) at
small awkward shapes; with one, the same tests run on CUDA (16-bit only, to bound compile
time) and the CUDA-only tests run the registered op at the benchmark shapes.

Tolerance: kernel and reference both accumulate exact products (x * int8 fits fp32) in fp32,
in different orders, then round to x's dtype. So |y - ref| <= 1 ulp of the output dtype
(2u|ref|) + an fp32 summation-order term, bounded here by 2^-14 * sum_k |x w| ws (typical
order error is ~sqrt(K) * 2^-24 of that; one wrong or missing product costs ~1/K of it).
fp32 inputs use tf32x3 on the GPU (~2^-22 relative per product), inside the same bound.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _child_env import child_env
import torch

import slmkern
from conftest import requires_cuda
from slmkern import reference
from slmkern._backends import triton as triton_backend
from slmkern._backends.cpu import prepack_int8

pytestmark = pytest.mark.skipif(not triton_backend.has_triton_kernels(),
                                reason="triton (slmkern.kernels) is not available")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cpu" if INTERPRET else "cuda"
needs_launch = pytest.mark.skipif(not (INTERPRET or HAS_CUDA),
                                  reason="needs a CUDA device or TRITON_INTERPRET=1")
interpret_only = pytest.mark.skipif(not INTERPRET, reason="interpreter-only variant (bounds GPU compile time)")

if triton_backend.has_triton_kernels():
    from slmkern.kernels import w8a16 as k16

DTYPES = [pytest.param(torch.float32, marks=interpret_only, id="f32"),
          pytest.param(torch.bfloat16, id="bf16"),
          pytest.param(torch.float16, marks=interpret_only, id="f16")]
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def assert_close_w8a16(y, x, w, w_scale, bias):
    """y vs reference.w8a16_linear within the bound in the module docstring; NaN where it has NaN."""
    ref = reference.w8a16_linear(x, w, w_scale, bias)
    y = y.cpu()
    assert y.dtype == ref.dtype and y.shape == ref.shape, (y.dtype, y.shape, ref.dtype, ref.shape)
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(y), nan), "NaN positions differ"
    K = x.shape[-1]
    mag = (x.reshape(-1, K).float().abs() @ w.float().abs().T) * w_scale
    mag = mag.reshape(ref.shape).nan_to_num(0.0)
    tol = 2 * UNIT_ROUNDOFF[ref.dtype] * ref.float().abs() + 2.0 ** -14 * mag + 1e-30
    err = (y.float() - ref.float()).abs()
    bad = (err > tol) & ~nan
    assert not bad.any(), (f"{int(bad.sum())} of {ref.numel()} outputs out of tolerance; worst "
                           f"err/tol {(err / tol)[~nan].max().item():.3g}")


def make_case(M, K, N, dtype, bias, special_rows=True, bias_dtype=None):
    """Fresh random CPU data; row 1 zero and row 2 with a NaN when M allows."""
    x = (torch.randn(M, K) * 3).to(dtype)
    if special_rows and M >= 3:
        x[1] = 0
        x[2, K // 2] = float("nan")
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    w_scale = torch.rand(N) * 0.02 + 1e-3
    b = (torch.randn(N) * 2).to(bias_dtype or dtype) if bias else None
    return x, w, w_scale, b


@pytest.fixture(autouse=True)
def _plain_launch():
    """Launch kernels directly, as the registered CUDA op does (wrap_triton's higher-order op is
    for tracing; test_*_launcher_traces_with_make_fx_cuda covers that path)."""
    with triton_backend._set_wrap_triton_enabled(False):
        yield


def to_dev(*ts):
    return [t.to(DEVICE) if t is not None else None for t in ts]


SHAPES = [(1, 37, 19), (2, 37, 19), (3, 130, 33), (17, 64, 40), (65, 130, 33)]


@needs_launch
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N", SHAPES)
def test_w8a16_matches_reference(M, K, N, dtype, bias):
    x, w, ws, b = make_case(M, K, N, dtype, bias)
    y = k16.w8a16_linear(*to_dev(x, w, ws, b))
    assert y.device.type == DEVICE
    assert_close_w8a16(y, x, w, ws, b)


@needs_launch
@pytest.mark.parametrize("M", [1, 3])
def test_w8a16_fp32_bias_with_bf16_x(M):
    x, w, ws, b = make_case(M, 130, 33, torch.bfloat16, True, bias_dtype=torch.float32)
    assert_close_w8a16(k16.w8a16_linear(*to_dev(x, w, ws, b)), x, w, ws, b)


@needs_launch
@pytest.mark.parametrize("M", [1, 2, 3])
def test_w8a16_both_paths_agree_with_reference(M):
    """The GEMV path at M > 1 and the GEMM path at M = 1 are right too."""
    x, w, ws, b = make_case(M, 130, 33, torch.bfloat16, True)
    xd, wd, wsd, bd = to_dev(x, w, ws, b)
    for path in (k16._gemv, k16._gemm):
        y = torch.empty((M, 33), dtype=x.dtype, device=DEVICE)
        path(xd, wd, wsd, bd, y)
        assert_close_w8a16(y, x, w, ws, b)


@needs_launch
@pytest.mark.parametrize("M", [1, 3])
def test_w8a16_strided_rows(M):
    """Rows of x may be padded (row stride > K): read in place, not copied."""
    K, N = 37, 19
    base, w, ws, b = make_case(M, K + 7, N, torch.bfloat16, True)
    w = w[:, :K].contiguous()
    xd, wd, wsd, bd = to_dev(base, w, ws, b)
    assert xd[:, :K].stride(0) == K + 7
    assert_close_w8a16(k16.w8a16_linear(xd[:, :K], wd, wsd, bd), base[:, :K], w, ws, b)


@needs_launch
def test_w8a16_empty_batch():
    x, w, ws, b = make_case(0, 37, 19, torch.float16, False)
    y = k16.w8a16_linear(*to_dev(x, w, ws, b))
    assert y.shape == (0, 19) and y.dtype == torch.float16


@needs_launch
def test_w8a16_backend_entry_reshapes_validates_and_ignores_w_packed():
    x, w, ws, b = make_case(6, 37, 19, torch.bfloat16, True)
    x3 = x.reshape(3, 2, 37)
    xd, wd, wsd, bd = to_dev(x3, w, ws, b)
    y = triton_backend._int8_linear("w8a16_linear", xd, wd, wsd, bd, prepack_int8(w).to(DEVICE))
    assert y.shape == (3, 2, 19)
    assert_close_w8a16(y, x3, w, ws, b)
    with pytest.raises(ValueError, match="bias must have shape"):
        triton_backend._int8_linear("w8a16_linear", xd, wd, wsd, bd[:5], None)
    with pytest.raises(TypeError, match="w must be torch.int8"):
        triton_backend._int8_linear("w8a16_linear", xd, wd.to(torch.int16), wsd, bd, None)


# --------------------------------------------------------------------------------------------
# Hopper code generation, checked without a GPU (ptxas ships with triton's NVIDIA backend)
# --------------------------------------------------------------------------------------------

_PTX_PROBE = r"""
import json, re
import slmkern
from slmkern.kernels import _util, w8a16 as k16
io = {"w_ptr": "*i8", "ws_ptr": "*fp32", "b_ptr": "*bf16", "y_ptr": "*bf16"}
out = {}
for dt, fp32 in (("bf16", False), ("fp32", True)):
    sig = {"x_ptr": "*" + dt, **io, "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_ym": "i32",
           "M_BUCKET": "i32"}
    p = _util.compile_ptx(k16._w8a16_kernel, sig, {"HAS_BIAS": True, "DOT_IN_FP32": fp32, "BLOCK_M": 64, "BLOCK_N": 128,
                          "BLOCK_K": 64, "GROUP_M": 8, "EVEN_K": True})
    out["gemm_" + dt] = {"wgmma": re.findall(r"wgmma\.mma_async\.sync\.aligned\.\w+\.(\w+\.\w+\.\w+)", p)[:1]}
sig = {"x_ptr": "*bf16", **io, "N": "i32", "K": "i32", "stride_xm": "i32", "stride_ym": "i32", "M_BUCKET": "i32"}
p = _util.compile_ptx(k16._w8a16_gemv_kernel, sig, {"HAS_BIAS": False, "BLOCK_N": 32, "BLOCK_K": 256})
out["gemv"] = {"ld_global": len(re.findall(r"ld\.global", p))}
print(json.dumps(out))
"""


def _have_ptxas() -> bool:
    try:
        from triton import knobs
        return Path(knobs.nvidia.ptxas.path).exists()
    except Exception:  # noqa: BLE001 - older triton or no NVIDIA backend
        return False


@pytest.mark.skipif(not triton_backend.has_triton_kernels() or not _have_ptxas(),
                    reason="needs triton with its NVIDIA backend (ptxas)")
def test_w8a16_kernels_compile_for_hopper():
    """sm_90 PTX: bf16 tensor-core wgmma for 16-bit x, tf32 wgmma (tf32x3) for fp32 x."""
    env = child_env(drop=("TRITON_INTERPRET",), TRITON_DEFAULT_FP_FUSION=os.environ.get("TRITON_DEFAULT_FP_FUSION", "1"))
    res = subprocess.run([sys.executable, "-c", _PTX_PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    facts = json.loads(res.stdout.strip().splitlines()[-1])
    assert facts["gemm_bf16"]["wgmma"] == ["f32.bf16.bf16"], facts
    assert facts["gemm_fp32"]["wgmma"] == ["f32.tf32.tf32"], facts
    assert facts["gemv"]["ld_global"] > 0, facts


# --------------------------------------------------------------------------------------------
# CUDA: the registered op at the benchmark shapes
# --------------------------------------------------------------------------------------------

BENCH_KN = [(384, 1536), (576, 1536), (2048, 8192)]


@requires_cuda
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("M", [1, 16, 128])
@pytest.mark.parametrize("K,N", BENCH_KN)
def test_w8a16_op_cuda_bench_shapes(K, N, M, bias):
    x, w, ws, b = make_case(M, K, N, torch.bfloat16, bias)
    y = torch.ops.slmkern.w8a16_linear(x.cuda(), w.cuda(), ws.cuda(), b.cuda() if b is not None else None)
    assert y.is_cuda
    assert_close_w8a16(y, x, w, ws, b)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("M", [1, 16])
def test_w8a16_op_cuda_other_dtypes(dtype, M):
    x, w, ws, b = make_case(M, 576, 1536, dtype, True)
    y = torch.ops.slmkern.w8a16_linear(x.cuda(), w.cuda(), ws.cuda(), b.cuda())
    assert_close_w8a16(y, x, w, ws, b)


@requires_cuda
@pytest.mark.parametrize("M", [1, 5])
def test_w8a16_opcheck_cuda(M):
    x, w, ws, b = make_case(M, 64, 48, torch.bfloat16, True, special_rows=False)
    args = (x.cuda(), w.cuda(), ws.cuda(), b.cuda(), None)
    torch.library.opcheck(torch.ops.slmkern.w8a16_linear.default, args)


@requires_cuda
def test_w8a16_compile_fullgraph_cuda():
    x, w, ws, b = make_case(16, 384, 1536, torch.bfloat16, True, special_rows=False)
    xd, wd, wsd, bd = x.cuda(), w.cuda(), ws.cuda(), b.cuda()
    fn = torch.compile(lambda a: torch.ops.slmkern.w8a16_linear(a, wd, wsd, bd), fullgraph=True)
    eager = torch.ops.slmkern.w8a16_linear(xd, wd, wsd, bd)
    assert torch.equal(fn(xd), eager)


@requires_cuda
@pytest.mark.parametrize("M", [1, 16])
def test_w8a16_launcher_traces_with_make_fx_cuda(M):
    """wrap_triton: make_fx records the kernel launches, and the traced graph computes the same."""
    from torch.fx.experimental.proxy_tensor import make_fx

    x, w, ws, b = make_case(M, 384, 1536, torch.bfloat16, True, special_rows=False)
    wd, wsd, bd = w.cuda(), ws.cuda(), b.cuda()
    with triton_backend._set_wrap_triton_enabled(True):
        gm = make_fx(lambda a: k16.w8a16_linear(a, wd, wsd, bd))(x.cuda())
    assert "triton_kernel_wrapper" in gm.code, gm.code
    y = gm(x.cuda())
    assert_close_w8a16(y, x, w, ws, b)
