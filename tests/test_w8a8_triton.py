"""Triton w8a8 kernels (slmkern.kernels.w8a8) against slmkern.reference.w8a8_linear.

Without a GPU the launchers run on CPU tensors under TRITON_INTERPRET=1 (set by conftest) at
small awkward shapes; with one, the same tests run on CUDA (16-bit only, to bound compile
time) and the CUDA-only tests run the registered op at the benchmark shapes.

Comparisons are bit-exact, not tolerance-based: the integer part is exact (int8 x int8 -> int32
tl.dot, |acc| < 2^31), the quantizer performs the reference's fp32 operations (IEEE division,
round half to even), the epilogue rounds float(acc) * (sx * ws) and then adds the bias in the
reference's order, and the output cast rounds to nearest even, so every output bit must agree.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
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
# fp32/fp16 add compiles on a GPU without adding coverage of the kernels' logic there.
interpret_only = pytest.mark.skipif(not INTERPRET, reason="interpreter-only variant (bounds GPU compile time)")

if triton_backend.has_triton_kernels():
    from slmkern.kernels import w8a8 as k8

DTYPES = [pytest.param(torch.float32, marks=interpret_only, id="f32"),
          pytest.param(torch.bfloat16, id="bf16"),
          pytest.param(torch.float16, marks=interpret_only, id="f16")]
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def assert_bits_equal(y: torch.Tensor, r: torch.Tensor) -> None:
    """Same dtype, shape, NaN positions and bit patterns everywhere else."""
    y = y.cpu()
    assert y.dtype == r.dtype and y.shape == r.shape, (y.dtype, y.shape, r.dtype, r.shape)
    nan = torch.isnan(r)
    assert torch.equal(torch.isnan(y), nan), "NaN positions differ"
    yb, rb = y.view(INT_VIEW[y.dtype])[~nan], r.view(INT_VIEW[r.dtype])[~nan]
    bad = (yb != rb).nonzero()
    assert bad.numel() == 0, (f"{bad.numel()} of {yb.numel()} outputs differ, first at flat index "
                              f"{bad[0].item()}: {y[~nan][bad[0]].item()} vs {r[~nan][bad[0]].item()}")


def make_case(M, K, N, dtype, bias, special_rows=True, bias_dtype=None):
    """Fresh random CPU data; rows 1/2/4 become zero/NaN/inf and row 16 tiny when M allows."""
    x = (torch.randn(M, K) * 3).to(dtype)
    if special_rows:
        if M >= 3:
            x[1] = 0
            x[2, K // 2] = float("nan")
        if M >= 17:
            x[4, K - 1] = float("-inf")
            x[16] = x[16].float().mul(1e-34).to(dtype)  # amax < 2^-100 (or 0 in fp16): scale 0
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
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_rows_s8_matches_reference(dtype):
    K = 37
    rows = [torch.randn(K) * 5 for _ in range(3)]
    ties = torch.zeros(K)
    ties[:9] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -125.5])  # inv = 1: exact halves
    ties2 = ties * 2  # amax 254 -> inv 0.5
    special = [torch.zeros(K), torch.full((K,), 1e-34), ties, ties2]
    nan_row = torch.randn(K)
    nan_row[3] = float("nan")
    inf_row = torch.randn(K)
    inf_row[K - 1] = float("inf")
    x = torch.stack(rows + special + [nan_row, inf_row]).to(dtype)
    q, s = k8.quantize_rows_s8(*to_dev(x))
    rq, rs = reference.quantize_rows_s8(x)
    assert torch.equal(q.cpu(), rq)
    assert_bits_equal(s, rs)
    assert rq[5, 1:7].tolist() == [0, 2, 2, 0, -2, -2]  # the tie row really exercises half-to-even


@needs_launch
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_rows_u7_matches_reference(dtype):
    """activations="int7": the Triton quantizer writes q - zero and the scale of reference.quantize_rows_u7."""
    K = 37
    rows = [torch.randn(K) * 5 + 2, torch.rand(K) * 3, -torch.rand(K) * 3]
    ties = torch.zeros(K)
    ties[:8] = torch.tensor([63.5, -63.5, 0.5, 1.5, 2.5, -0.5, -1.5, 62.5])  # range 127: inv = 1, zero = 64
    special = [torch.zeros(K), torch.full((K,), 1e-34), ties]
    nan_row = torch.randn(K)
    nan_row[3] = float("nan")
    inf_row = torch.randn(K)
    inf_row[K - 1] = float("-inf")
    x = torch.stack(rows + special + [nan_row, inf_row]).to(dtype)
    d, s = k8.quantize_rows_u7(*to_dev(x))
    rd, rs = reference.quantize_activations(x, "int7")
    assert torch.equal(d.cpu(), rd)
    assert_bits_equal(s, rs)


@needs_launch
@pytest.mark.parametrize("M", [1, 3, 17])
def test_w8a8_int7_matches_reference(M):
    x, w, ws, b = make_case(M, 130, 33, torch.bfloat16, True)
    y = k8.w8a8_linear(*to_dev(x, w, ws, b), activations="int7")
    assert_bits_equal(y, reference.w8a8_linear(x, w, ws, b, activations="int7"))


@needs_launch
@pytest.mark.parametrize("act", ["int8", "int7"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_w8a8_gelu_epilogue_matches_reference(act, dtype):
    """The CUDA registration's gelu epilogue (GEMM in fp32, then reference.gelu_epilogue, then the cast)."""
    x, w, ws, b = make_case(5, 130, 33, dtype, True)
    y = triton_backend._int8_linear("w8a8_linear", *to_dev(x, w, ws, b), None, act, "gelu")
    assert_bits_equal(y, reference.w8a8_linear(x, w, ws, b, activations=act, epilogue="gelu"))


@needs_launch
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N", SHAPES)
def test_w8a8_matches_reference(M, K, N, dtype, bias):
    x, w, ws, b = make_case(M, K, N, dtype, bias)
    y = k8.w8a8_linear(*to_dev(x, w, ws, b))
    assert y.device.type == DEVICE
    assert_bits_equal(y, reference.w8a8_linear(x, w, ws, b))


@needs_launch
@pytest.mark.parametrize("M", [1, 3])
def test_w8a8_fp32_bias_with_bf16_x(M):
    x, w, ws, b = make_case(M, 130, 33, torch.bfloat16, True, bias_dtype=torch.float32)
    assert_bits_equal(k8.w8a8_linear(*to_dev(x, w, ws, b)), reference.w8a8_linear(x, w, ws, b))


@needs_launch
@pytest.mark.parametrize("M", [1, 2, 3])
def test_w8a8_both_paths_agree_with_reference(M):
    """The GEMV path at M > 1 and the quantize+GEMM path at M = 1 are exact too."""
    x, w, ws, b = make_case(M, 130, 33, torch.bfloat16, True)
    xd, wd, wsd, bd = to_dev(x, w, ws, b)
    ref = reference.w8a8_linear(x, w, ws, b)
    y_gemv = torch.empty((M, 33), dtype=x.dtype, device=DEVICE)
    k8._gemv(xd, wd, wsd, bd, y_gemv)
    assert_bits_equal(y_gemv, ref)
    q, sx = k8.quantize_rows_s8(xd)
    y_gemm = torch.empty((M, 33), dtype=x.dtype, device=DEVICE)
    k8._gemm(q, sx, wd, wsd, bd, y_gemm)
    assert_bits_equal(y_gemm, ref)


@needs_launch
@pytest.mark.parametrize("M", [1, 2])
def test_w8a8_rounds_ties_to_even(M):
    """Rows whose scaled values are exact halves: half-away-from-zero rounding changes acc."""
    K, N = 37, 19
    x = torch.zeros(M, K)
    x[:, :9] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -125.5])
    x[:, 9:] = torch.randint(-126, 127, (M, K - 9)).float()
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    w[:, 1:9] = 100  # weigh the tie columns heavily
    ws = torch.rand(N) + 0.5
    assert_bits_equal(k8.w8a8_linear(*to_dev(x, w, ws)), reference.w8a8_linear(x, w, ws))


@needs_launch
@pytest.mark.parametrize("M", [1, 3])
def test_w8a8_strided_rows(M):
    """Rows of x may be padded (row stride > K): read in place, not copied."""
    K, N = 37, 19
    base, w, ws, b = make_case(M, K + 7, N, torch.bfloat16, True)
    x = base[:, :K]
    w = w[:, :K].contiguous()
    assert x.stride(0) == K + 7
    xd, wd, wsd, bd = to_dev(base, w, ws, b)
    assert_bits_equal(k8.w8a8_linear(xd[:, :K], wd, wsd, bd), reference.w8a8_linear(x, w, ws, b))


@needs_launch
def test_w8a8_empty_batch():
    x, w, ws, b = make_case(0, 37, 19, torch.bfloat16, True)
    y = k8.w8a8_linear(*to_dev(x, w, ws, b))
    assert y.shape == (0, 19) and y.dtype == torch.bfloat16


@needs_launch
def test_w8a8_backend_entry_reshapes_validates_and_ignores_w_packed():
    """The function registered for CUDA: (..., K) batches, w_packed ignored, validation first."""
    x, w, ws, b = make_case(6, 37, 19, torch.bfloat16, True)
    x3 = x.reshape(2, 3, 37)
    xd, wd, wsd, bd = to_dev(x3, w, ws, b)
    y = triton_backend._int8_linear("w8a8_linear", xd, wd, wsd, bd, prepack_int8(w).to(DEVICE))
    assert y.shape == (2, 3, 19)
    assert_bits_equal(y, reference.w8a8_linear(x3, w, ws, b))
    y0 = triton_backend._int8_linear("w8a8_linear", xd[:, :0], wd, wsd, bd, None)
    assert y0.shape == (2, 0, 19)
    with pytest.raises(ValueError, match="K=36"):
        triton_backend._int8_linear("w8a8_linear", xd[..., :36], wd, wsd, bd, None)
    with pytest.raises(TypeError, match="w_scale"):
        triton_backend._int8_linear("w8a8_linear", xd, wd, wsd.double(), bd, None)


# --------------------------------------------------------------------------------------------
# Hopper code generation, checked without a GPU (ptxas ships with triton's NVIDIA backend)
# --------------------------------------------------------------------------------------------

_PTX_PROBE = r"""
import json, re, sys
import slmkern
from slmkern.kernels import _util, w8a8 as k8
sig_io = {"w_ptr": "*i8", "ws_ptr": "*fp32", "b_ptr": "*bf16", "y_ptr": "*bf16"}
ptx = {
    "gemm": _util.compile_ptx(k8._w8a8_kernel, {"q_ptr": "*i8", "sx_ptr": "*fp32", **sig_io, "M": "i32", "N": "i32",
                              "K": "i32", "stride_ym": "i32", "M_BUCKET": "i32"},
                              {"HAS_BIAS": True, "BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8,
                               "EVEN_K": False}),
    "gemv": _util.compile_ptx(k8._w8a8_gemv_kernel, {"x_ptr": "*bf16", **sig_io, "N": "i32", "K": "i32",
                              "stride_xm": "i32", "stride_ym": "i32", "M_BUCKET": "i32"},
                              {"HAS_BIAS": True, "X_BLOCK": 2048, "BLOCK_N": 32, "BLOCK_K": 256}),
    "quant": _util.compile_ptx(k8._quantize_rows_s8_kernel, {"x_ptr": "*bf16", "q_ptr": "*i8", "s_ptr": "*fp32",
                               "K": "i32", "stride_xm": "i32"}, {"BLOCK_K": 1024}),
}
out = {}
for name, p in ptx.items():
    fmas = re.findall(r"fma\.rn\.f32\s+[^;]*;", p)
    out[name] = {"int8_wgmma": len(re.findall(r"wgmma\.mma_async[^ ]*\.s32\.s8\.s8", p)),
                 "div_rn": len(re.findall(r"div\.rn\.f32", p)),
                 "div_approx": len(re.findall(r"div\.(full|approx)\.f32", p)),
                 "fma_nonzero_addend": sum(not f.rstrip(";").rstrip().endswith("0f00000000") for f in fmas)}
print(json.dumps(out))
"""


def _ptx_probe_env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the worst case for exactness: contraction allowed
    root = str(Path(slmkern.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    return env


def _have_ptxas() -> bool:
    try:
        from triton import knobs
        return Path(knobs.nvidia.ptxas.path).exists()
    except Exception:  # noqa: BLE001 - older triton or no NVIDIA backend
        return False


@pytest.mark.skipif(not triton_backend.has_triton_kernels() or not _have_ptxas(),
                    reason="needs triton with its NVIDIA backend (ptxas)")
def test_w8a8_kernels_compile_for_hopper():
    """sm_90 PTX: int8 wgmma in the GEMM, IEEE division in the quantizer, no contracted FMA."""
    res = subprocess.run([sys.executable, "-c", _PTX_PROBE], env=_ptx_probe_env(), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    facts = json.loads(res.stdout.strip().splitlines()[-1])
    assert facts["gemm"]["int8_wgmma"] > 0, facts
    for name in ("gemv", "quant"):
        assert facts[name]["div_rn"] >= 2 and facts[name]["div_approx"] == 0, facts
    for name in ("gemm", "gemv", "quant"):
        assert facts[name]["fma_nonzero_addend"] == 0, facts


# --------------------------------------------------------------------------------------------
# CUDA: the registered op at the benchmark shapes
# --------------------------------------------------------------------------------------------

BENCH_KN = [(384, 1536), (576, 1536), (2048, 8192)]


@requires_cuda
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("M", [1, 16, 128])
@pytest.mark.parametrize("K,N", BENCH_KN)
def test_w8a8_op_cuda_bench_shapes(K, N, M, bias):
    x, w, ws, b = make_case(M, K, N, torch.bfloat16, bias)
    xd, wd, wsd, bd = (t.cuda() if t is not None else None for t in (x, w, ws, b))
    y = torch.ops.slmkern.w8a8_linear(xd, wd, wsd, bd)
    assert y.is_cuda
    assert_bits_equal(y, reference.w8a8_linear(x, w, ws, b))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("M", [1, 16])
def test_w8a8_op_cuda_other_dtypes(dtype, M):
    x, w, ws, b = make_case(M, 576, 1536, dtype, True)
    y = torch.ops.slmkern.w8a8_linear(x.cuda(), w.cuda(), ws.cuda(), b.cuda())
    assert_bits_equal(y, reference.w8a8_linear(x, w, ws, b))


@requires_cuda
@pytest.mark.parametrize("M", [1, 5])
def test_w8a8_opcheck_cuda(M):
    x, w, ws, b = make_case(M, 64, 48, torch.bfloat16, True, special_rows=False)
    args = (x.cuda(), w.cuda(), ws.cuda(), b.cuda(), None)
    torch.library.opcheck(torch.ops.slmkern.w8a8_linear.default, args)


@requires_cuda
def test_w8a8_compile_fullgraph_cuda():
    x, w, ws, b = make_case(16, 384, 1536, torch.bfloat16, True, special_rows=False)
    xd, wd, wsd, bd = x.cuda(), w.cuda(), ws.cuda(), b.cuda()
    fn = torch.compile(lambda a: torch.ops.slmkern.w8a8_linear(a, wd, wsd, bd) * 2, fullgraph=True)
    assert_bits_equal(fn(xd), reference.w8a8_linear(x, w, ws, b) * 2)


@requires_cuda
@pytest.mark.parametrize("M", [1, 16])
def test_w8a8_launcher_traces_with_make_fx_cuda(M):
    """wrap_triton: make_fx records the kernel launches, and the traced graph computes the same."""
    from torch.fx.experimental.proxy_tensor import make_fx

    x, w, ws, b = make_case(M, 384, 1536, torch.bfloat16, True, special_rows=False)
    wd, wsd, bd = w.cuda(), ws.cuda(), b.cuda()
    with triton_backend._set_wrap_triton_enabled(True):
        gm = make_fx(lambda a: k8.w8a8_linear(a, wd, wsd, bd))(x.cuda())
    assert "triton_kernel_wrapper" in gm.code, gm.code
    y = gm(x.cuda())
    assert_bits_equal(y, reference.w8a8_linear(x, w, ws, b))
