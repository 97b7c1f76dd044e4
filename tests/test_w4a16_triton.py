"""Triton w4a16 kernels (slmkern.kernels.w4a16) against slmkern.reference.w4a16_linear.

Without a GPU the launchers run on CPU tensors under TRITON_INTERPRET=1 (set by conftest) at
small awkward shapes, every path (GEMV, tiled GEMM, dequantize + matmul) and split-K; with one,
the same tests run on CUDA (16-bit only, to bound compile time) and the CUDA-only tests run the
registered op at the benchmark shapes.

Tolerances: fp32 accumulation in another order (1e-5 of sum |x||W|) plus one output rounding
each side; bf16/fp16 x in the GEMM and dequantize paths also round every dequantized weight to
x's dtype (the interpreter's fp32 -> bf16 cast truncates: up to 2^-8 relative per weight).
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from _int4_triton import (BF16, DEVICE, F16, F32, PTX_HELPER, ULP, assert_bits_equal, assert_close, have_ptxas,
                          interpret_only, make_case, needs_kernels, needs_launch, ptx_probe_env, to_dev, w4a16_f64)
from conftest import requires_cuda
from slmkern import reference
from slmkern._backends import triton as triton_backend

pytestmark = needs_kernels

if triton_backend.has_triton_kernels():
    from slmkern.kernels import w4a16 as k4

# per-weight rounding of the 16-bit dequantized weights (GEMM and dequant paths)
W_ROUND = {F32: 0.0, BF16: 2.0 ** -8, F16: 2.0 ** -10}


def tolerance(y_dtype, mag, ref, weights_rounded: bool):
    c = 1e-5 + (W_ROUND[y_dtype] if weights_rounded else 0.0)
    return c * mag + ULP[y_dtype] * ref.abs() + 1e-30


def check(y, x, w, s, z, g, b, path):
    """y vs the float64 value, and vs reference.w4a16_linear (which takes every group size the op takes)."""
    assert y.dtype == x.dtype and y.device.type == DEVICE
    exact, mag = w4a16_f64(x, w, s, z, g, b)
    rounded = path in ("gemm", "dequant") and x.dtype != F32
    assert_close(y, exact, tolerance(x.dtype, mag, exact, rounded))
    ref = reference.w4a16_linear(x, w, s, z, g, b).double()
    assert_close(y, ref, tolerance(x.dtype, mag, ref, rounded) + ULP[x.dtype] * ref.abs())


@pytest.fixture(autouse=True)
def _plain_launch():
    """Launch kernels directly, as the registered CUDA op does (wrap_triton's higher-order op is
    for tracing; test_w4a16_launcher_traces_with_make_fx_cuda covers that path)."""
    with triton_backend._set_wrap_triton_enabled(False):
        yield


def _p(M, K, N, g, zeros, bias, dtype):
    marks = (interpret_only,) if dtype != BF16 else ()
    return pytest.param(M, K, N, g, zeros, bias, dtype, marks=marks,
                        id=f"M{M}-K{K}-N{N}-g{g}-{zeros or 'sym'}-{'bias' if bias else 'nobias'}-{str(dtype)[6:]}")


# Every M, K, N, group size, zero kind, bias and dtype appears, in varied combinations.
CASES = [
    _p(1, 64, 19, 32, None, False, F32), _p(1, 128, 33, 64, "u8", True, BF16), _p(1, 192, 19, -1, "u8", True, F32),
    _p(1, 192, 33, 32, None, True, BF16), _p(1, 128, 19, 128, "u8", False, F16),
    _p(2, 64, 33, -1, None, True, BF16), _p(2, 128, 19, 32, "u8", False, F32), _p(2, 192, 33, 64, "u8", True, BF16),
    _p(3, 64, 19, 64, "u8", True, F32), _p(3, 128, 33, -1, "u8", False, BF16), _p(3, 192, 19, 32, None, True, F16),
    _p(17, 64, 33, 32, "u8", True, BF16), _p(17, 128, 19, 64, None, True, F32), _p(17, 192, 33, -1, None, False, BF16),
    _p(65, 64, 19, -1, "u8", False, F32), _p(65, 128, 33, 32, "u8", True, BF16), _p(65, 192, 19, 64, "u8", True, F16),
]


@needs_launch
@pytest.mark.parametrize("M,K,N,g,zeros,bias,dtype", CASES)
def test_w4a16_matches_reference(M, K, N, g, zeros, bias, dtype):
    x, w, s, z, b = make_case(M, K, N, g, zeros, bias, dtype)
    y = k4.w4a16_linear(*to_dev(x, w, s, z), g, *to_dev(b))
    assert y.shape == (M, N)
    check(y, x, w, s, z, g, b, k4.choose_path(M))


@needs_launch
@pytest.mark.parametrize("split_k", [1, pytest.param(2, marks=interpret_only), pytest.param(3, marks=interpret_only)])
@pytest.mark.parametrize("path", ["gemv", "gemm"])
@pytest.mark.parametrize("dtype", [pytest.param(F32, marks=interpret_only, id="f32"), pytest.param(BF16, id="bf16")])
def test_w4a16_every_path_and_split(path, split_k, dtype):
    """Each path at M it is not chosen for (GEMV over 3 rows, GEMM at M = 1 and 3), K split into
    whole groups (G = 6: splits of 2/2/2 and 3/3 groups; 2 of 3 splits also leave one empty at G = 4)."""
    for M, K, g in ((3, 192, 32), (1, 128, 32)):
        x, w, s, z, b = make_case(M, K, 33, g, "u8", True, dtype)
        y = k4.w4a16_linear(*to_dev(x, w, s, z), g, *to_dev(b), path=path, split_k=split_k)
        check(y, x, w, s, z, g, b, path)


@needs_launch
@pytest.mark.parametrize("M", [1, 3, 17])
def test_w4a16_dequant_matmul_path(M):
    """The large-M path (dequantize to x's dtype, then torch.matmul), forced at small M."""
    for dtype, bias in ((BF16, True), (F32, False)):
        x, w, s, z, b = make_case(M, 192, 19, 64, "u8", bias, dtype, bias_dtype=F32)
        y = k4.w4a16_linear(*to_dev(x, w, s, z), 64, *to_dev(b), path="dequant")
        check(y, x, w, s, z, 64, b, "dequant")


@needs_launch
def test_w4a16_dequantize_kernel_is_the_format():
    """_w4_dequant_kernel == slmkern.formats.int4.dequantize (fp32: one rounding, bit-exact), also
    for tiles that straddle groups (g = 32 < the 32-wide interpreter tile is not; g = 10 is)."""
    from slmkern.formats import int4 as int4_format
    from slmkern.kernels import _int4

    for K, g, zk in ((192, 64, "u8"), (128, 32, None), (40, 10, "u8")):
        _, w, s, z, _ = make_case(1, K, 19, g, zk, False, F32)
        got = _int4.dequantize(*to_dev(w, s, z), g, F32)
        if g in (32, 64, 128):
            assert_bits_equal(got, int4_format.dequantize(w, s, z, g))
        assert torch.equal(got.cpu().double(), _exact_weight(w, s, z, g).float().double())


def _exact_weight(w, s, z, g):
    from _int4_triton import weight_f64
    return weight_f64(w, s, z, g)


@needs_launch
@interpret_only
@pytest.mark.parametrize("path", ["gemv", "gemm", "dequant"])
def test_w4a16_zeros_none_is_zero_point_8(path):
    """zeros=None takes the constant z = 8 branch; explicit all-8 zeros must give the same bits."""
    x, w, s, _, b = make_case(3, 128, 33, 32, None, True, BF16)
    z8 = torch.full_like(s, 8, dtype=torch.uint8)
    y_none = k4.w4a16_linear(*to_dev(x, w, s), None, 32, *to_dev(b), path=path)
    y_8 = k4.w4a16_linear(*to_dev(x, w, s, z8), 32, *to_dev(b), path=path)
    assert_bits_equal(y_none, y_8)


@needs_launch
@pytest.mark.parametrize("path", ["gemv", "gemm", "dequant"])
@pytest.mark.parametrize("K,g,zeros", [(40, 10, "u8")] + [pytest.param(*c, marks=interpret_only) for c in
                                      ((130, -1, "f32"), (96, 32, "f32"), (130, 26, None),
                                                                          (96, 16, "u8"), (96, 48, None))])
def test_w4a16_any_even_group_and_fp32_zeros(path, K, g, zeros):
    """The op accepts any even g dividing K and fp32 zero points: groups that are not whole tiles
    (masked chunks) and per-channel K = 130, vs the float64 formula."""
    for M in (1, 3):
        x, w, s, z, b = make_case(M, K, 19, g, zeros, True, F32)
        y = k4.w4a16_linear(*to_dev(x, w, s, z), g, *to_dev(b), path=path, split_k=2)
        check(y, x, w, s, z, g, b, path)


def test_split_k_choice(monkeypatch):
    """Split-K only when the output tiles cannot fill the GPU, in whole groups, with the fp32
    workspace under a quarter of the weight bytes; never off CUDA."""
    from slmkern.kernels import _int4

    cuda = torch.device("cuda", 0)
    assert _int4.choose_split_k(8, 1, 16, 2048, torch.device("cpu")) == 1
    monkeypatch.setattr(_int4, "sm_count", lambda device: 132)
    assert _int4.choose_split_k(128, 1, 16, 2048, cuda) == 3       # (2048, 8192) decode: 3 waves of tiles
    assert _int4.choose_split_k(132, 1, 16, 2048, cuda) == 1       # tiles already fill the GPU
    assert _int4.choose_split_k(24, 1, 3, 384, cuda) == 1          # K = 384: one split's worth of k
    assert _int4.choose_split_k(24, 1, 4, 1024, cuda) == 4         # capped by the 4 groups
    assert _int4.choose_split_k(64, 16, 16, 2048, cuda) == 2       # workspace cap K / (64 M)
    assert _int4.choose_split_k(128, 128, 16, 2048, cuda) == 1


@needs_launch
def test_w4a16_empty_batch():
    x, w, s, z, b = make_case(0, 64, 19, 32, "u8", True, BF16)
    y = k4.w4a16_linear(*to_dev(x, w, s, z), 32, *to_dev(b))
    assert y.shape == (0, 19) and y.dtype == BF16


@needs_launch
def test_w4a16_backend_entry_reshapes_validates_and_ignores_w_packed():
    """The function registered for CUDA: (..., K) batches, strided rows, w_packed ignored, validation first."""
    from slmkern._backends.cpu import prepack_int4

    x, w, s, z, b = make_case(6, 128, 19, 64, "u8", True, BF16, special_rows=False)
    x3 = x.reshape(2, 3, 128)
    xd, wd, sd, zd, bd = to_dev(x3, w, s, z, b)
    wp = prepack_int4(w, s, z, 64).to(DEVICE)
    y = triton_backend._int4_linear("w4a16_linear", xd, wd, sd, zd, 64, bd, wp)
    assert y.shape == (2, 3, 19) and y.dtype == BF16
    check(y.reshape(6, 19), x, w, s, z, 64, b, "gemm")
    # rows padded in memory (row stride > K) are read in place
    base = torch.randn(3, 140).to(BF16)
    xs = base.to(DEVICE)[:, 5:133]
    assert xs.stride(0) == 140
    ys = triton_backend._int4_linear("w4a16_linear", xs, wd, sd, zd, 64, bd, None)
    check(ys, base[:, 5:133], w, s, z, 64, b, "gemm")
    y0 = triton_backend._int4_linear("w4a16_linear", xd[:, :0], wd, sd, zd, 64, bd, None)
    assert y0.shape == (2, 0, 19)
    with pytest.raises(ValueError, match="even"):
        triton_backend._int4_linear("w4a16_linear", xd[..., :127], wd, sd, zd, 64, bd, None)
    with pytest.raises(ValueError, match="group_size"):
        triton_backend._int4_linear("w4a16_linear", xd, wd, sd, zd, 48, bd, None)
    with pytest.raises(TypeError, match="scales"):
        triton_backend._int4_linear("w4a16_linear", xd, wd, sd.double(), zd, 64, bd, None)
    with pytest.raises(ValueError, match="w_packed"):
        triton_backend._int4_linear("w4a16_linear", xd, wd, sd, zd, 64, bd, wp[:-1])


# --------------------------------------------------------------------------------------------
# Hopper code generation, checked without a GPU (ptxas ships with triton's NVIDIA backend)
# --------------------------------------------------------------------------------------------

_PTX_PROBE = PTX_HELPER + r'''
from slmkern.kernels import _int4, w4a16 as k4
io = {"w_ptr": "*u8", "s_ptr": "*fp32", "z_ptr": "*u8", "b_ptr": "*bf16", "y_ptr": "*bf16", "ws_ptr": "*fp32",
      "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_wn": "i32", "stride_ym": "i32",
      "M_BUCKET": "i32"}
flags = {"GROUP_SIZE": 128, "HAS_ZEROS": True, "FLOAT_ZEROS": False, "HAS_BIAS": True}
out = {
    "gemv": facts(ptx(k4._w4a16_gemv_kernel, {"x_ptr": "*bf16", **io},
                      {**flags, "SPLIT_K": 1, "BLOCK_N": 32, "BLOCK_K": 512, "CHUNK_K": 128,
                       "GROUPS_PER_STEP": 4, "EVEN_CHUNK": True})),
    "gemm": facts(ptx(k4._w4a16_kernel, {"x_ptr": "*bf16", **io},
                      {**flags, "SPLIT_K": 2, "DOT_IN_FP32": False, "BLOCK_M": 64, "BLOCK_N": 128,
                       "BLOCK_K": 64, "GROUP_M": 8, "CHUNK_K": 64, "EVEN_CHUNK": True})),
    "dequant": facts(ptx(_int4._w4_dequant_kernel, {"w_ptr": "*u8", "s_ptr": "*fp32", "z_ptr": "*u8",
                                                     "out_ptr": "*bf16", "N": "i32", "K": "i32", "stride_wn": "i32"},
                         {"GROUP_SIZE": 128, "HAS_ZEROS": True, "FLOAT_ZEROS": False, "BLOCK_N": 32,
                          "BLOCK_K": 256, "SCALE_PER_TILE": True})),
    "reduce": facts(ptx(_int4._splitk_reduce_kernel, {"ws_ptr": "*fp32", "sx_ptr": "*fp32", "b_ptr": "*bf16",
                                                      "y_ptr": "*bf16", "M": "i32", "N": "i32", "stride_ym": "i32"},
                        {"SPLIT_K": 4, "HAS_ROW_SCALE": False, "HAS_BIAS": True, "BLOCK_N": 1024})),
}
print(json.dumps(out))
'''


@pytest.mark.skipif(not have_ptxas(), reason="needs triton with its NVIDIA backend (ptxas)")
def test_w4a16_kernels_compile_for_hopper():
    """sm_90 PTX: bf16 wgmma in the GEMM, 16-byte weight loads in the GEMV (aligned rows), and
    codes become floats through the 2^23 bit trick, not per-weight int->float converts."""
    res = subprocess.run([sys.executable, "-c", _PTX_PROBE], env=ptx_probe_env(), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    facts = json.loads(res.stdout.strip().splitlines()[-1])
    assert facts["gemm"]["wgmma_bf16"] > 0, facts
    assert facts["gemv"]["ld_global_v4"] > 0 and facts["gemv"]["ld_global_b8"] <= 2, facts
    for name in ("gemv", "gemm", "dequant"):
        assert facts[name]["int_to_f32"] <= 2, facts


# --------------------------------------------------------------------------------------------
# CUDA: the registered op at the benchmark shapes
# --------------------------------------------------------------------------------------------

BENCH_KN = [(384, 1536), (576, 1536), (2048, 8192)]


def _cuda_check(y, x, w, s, z, g, b):
    """check() with the float64 reference computed on the GPU (large shapes)."""
    exact, mag = w4a16_f64(*to_dev(x, w, s, z, device="cuda"), g, b.cuda() if b is not None else None)
    path = k4.choose_path(x.reshape(-1, x.shape[-1]).shape[0])
    rounded = path in ("gemm", "dequant") and x.dtype != F32
    assert_close(y, exact, tolerance(x.dtype, mag, exact, rounded))


@requires_cuda
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("M", [1, 16, 128])
@pytest.mark.parametrize("K,N", BENCH_KN)
def test_w4a16_op_cuda_bench_shapes(K, N, M, bias):
    g = 128 if K % 128 == 0 else 64  # the benchmark's choice: K = 576 has no 128-groups
    x, w, s, z, b = make_case(M, K, N, g, "u8" if bias else None, bias, BF16)
    y = torch.ops.slmkern.w4a16_linear(*to_dev(x, w, s, z, device="cuda"), g, b.cuda() if bias else None)
    assert y.is_cuda
    _cuda_check(y, x, w, s, z, g, b)


@requires_cuda
@pytest.mark.parametrize("M", [1, 2048])
def test_w4a16_op_cuda_large(M):
    """(4096, 14336) decode and M = 2048 (the dequantize + cuBLAS path)."""
    K, N = (4096, 14336) if M == 1 else (2048, 8192)
    x, w, s, z, b = make_case(M, K, N, 128, "u8", True, BF16)
    y = torch.ops.slmkern.w4a16_linear(*to_dev(x, w, s, z, device="cuda"), 128, b.cuda())
    _cuda_check(y, x, w, s, z, 128, b)


@requires_cuda
@pytest.mark.parametrize("dtype", [F32, F16], ids=["f32", "f16"])
@pytest.mark.parametrize("M", [1, 16])
def test_w4a16_op_cuda_other_dtypes(dtype, M):
    x, w, s, z, b = make_case(M, 576, 1536, 64, "u8", True, dtype)
    y = torch.ops.slmkern.w4a16_linear(*to_dev(x, w, s, z, device="cuda"), 64, b.cuda())
    _cuda_check(y, x, w, s, z, 64, b)


@requires_cuda
@pytest.mark.parametrize("M", [1, 16])
def test_w4a16_split_k_is_deterministic_cuda(M):
    x, w, s, z, b = make_case(M, 2048, 1536, 64, "u8", True, BF16, special_rows=False)
    args = to_dev(x, w, s, z, device="cuda")
    ys = [k4.w4a16_linear(*args, 64, b.cuda(), split_k=8) for _ in range(3)]
    assert all(torch.equal(ys[0], y) for y in ys[1:])
    _cuda_check(ys[0], x, w, s, z, 64, b)


@requires_cuda
@pytest.mark.parametrize("M", [1, 5])
def test_w4a16_opcheck_cuda(M):
    x, w, s, z, b = make_case(M, 128, 48, 32, "u8", True, BF16, special_rows=False)
    args = (*to_dev(x, w, s, z, device="cuda"), 32, b.cuda(), None)
    torch.library.opcheck(torch.ops.slmkern.w4a16_linear.default, args)


@requires_cuda
def test_w4a16_compile_fullgraph_cuda():
    x, w, s, z, b = make_case(16, 384, 1536, 128, "u8", True, BF16, special_rows=False)
    wd, sd, zd, bd = to_dev(w, s, z, b, device="cuda")
    fn = torch.compile(lambda a: torch.ops.slmkern.w4a16_linear(a, wd, sd, zd, 128, bd) * 2, fullgraph=True)
    eager = torch.ops.slmkern.w4a16_linear(x.cuda(), wd, sd, zd, 128, bd) * 2
    assert_bits_equal(fn(x.cuda()), eager)


@requires_cuda
@pytest.mark.parametrize("M", [1, 16])
def test_w4a16_launcher_traces_with_make_fx_cuda(M):
    """wrap_triton: make_fx records the kernel launches, and the traced graph computes the same."""
    from torch.fx.experimental.proxy_tensor import make_fx

    x, w, s, z, b = make_case(M, 384, 1536, 128, "u8", True, BF16, special_rows=False)
    wd, sd, zd, bd = to_dev(w, s, z, b, device="cuda")
    with triton_backend._set_wrap_triton_enabled(True):
        gm = make_fx(lambda a: k4.w4a16_linear(a, wd, sd, zd, 128, bd))(x.cuda())
    assert "triton_kernel_wrapper" in gm.code, gm.code
    assert_bits_equal(gm(x.cuda()), k4.w4a16_linear(x.cuda(), wd, sd, zd, 128, bd))
