"""Triton w4a8 kernels (slmkern.kernels.w4a8) against slmkern.reference.w4a8_linear.

Without a GPU the launchers run on CPU tensors under TRITON_INTERPRET=1 (set by conftest) at
small awkward shapes; with one, the same tests run on CUDA (bf16 only, to bound compile time)
and the CUDA-only tests run the registered op at the benchmark shapes.

The tiled GEMM without split-K is compared bit for bit: the activation quantizer is w8a8's
(bit-exact with reference.quantize_rows_s8), the int8 x int4-code dot and the zero-point term
z * sum(qx) are exact int32, and the groups are added in the reference's order with rounded
products. The GEMV (a tree sum over the groups of a step) and split-K (groups re-associated)
are compared within fp32 rounding of sx * sum_i |s_i * acc_i|, as are fp32 zero points.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from _int4_triton import (BF16, DEVICE, F16, F32, PTX_HELPER, ULP, assert_bits_equal, assert_close, have_ptxas,
                          interpret_only, make_case, needs_kernels, needs_launch, ptx_probe_env, to_dev, w4a8_f64)
from conftest import requires_cuda
from slmkern import reference
from slmkern._backends import triton as triton_backend

pytestmark = needs_kernels

if triton_backend.has_triton_kernels():
    from slmkern.kernels import w4a8 as k4


def check(y, x, w, s, z, g, b, exact: bool):
    """exact: bit-exact vs reference.w4a8_linear; otherwise within fp32 rounding of the float64 value."""
    assert y.dtype == x.dtype and y.device.type == DEVICE
    if exact:
        assert_bits_equal(y, reference.w4a8_linear(x, w, s, z, g, b))
        return
    value, mag = w4a8_f64(x, w, s, z, g, b)
    assert_close(y, value, 4e-6 * mag + ULP[x.dtype] * value.abs() + 1e-30)


def reference_takes(K, g, z) -> bool:
    """Is the tiled kernel bit-exact vs reference.w4a8_linear here? (integer zero points; any group size)"""
    return z is None or z.dtype == torch.uint8


@pytest.fixture(autouse=True)
def _plain_launch():
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
def test_w4a8_matches_reference(M, K, N, g, zeros, bias, dtype):
    x, w, s, z, b = make_case(M, K, N, g, zeros, bias, dtype)
    y = k4.w4a8_linear(*to_dev(x, w, s, z), g, *to_dev(b), split_k=1)
    assert y.shape == (M, N)
    check(y, x, w, s, z, g, b, exact=k4.choose_path(M) == "gemm")
    if k4.choose_path(M) == "gemv":  # within rounding of the reference's own fp32 result as well
        ref = reference.w4a8_linear(x, w, s, z, g, b).double()
        _, mag = w4a8_f64(x, w, s, z, g, b)
        assert_close(y, ref, 8e-6 * mag + 2 * ULP[dtype] * ref.abs() + 1e-30)


@needs_launch
@pytest.mark.parametrize("split_k", [1, pytest.param(2, marks=interpret_only), pytest.param(3, marks=interpret_only)])
@pytest.mark.parametrize("path", ["gemv", "gemm"])
def test_w4a8_every_path_and_split(path, split_k):
    """Each path at M it is not chosen for (GEMV over 3 rows, GEMM at M = 1 and 3), K split into
    whole groups (G = 6 and 4; 3 splits of 4 groups leave one split empty)."""
    for M, K, g in ((3, 192, 32), (1, 128, 32)):
        x, w, s, z, b = make_case(M, K, 33, g, "u8", True, BF16)
        y = k4.w4a8_linear(*to_dev(x, w, s, z), g, *to_dev(b), path=path, split_k=split_k)
        check(y, x, w, s, z, g, b, exact=(path == "gemm" and split_k == 1))


@needs_launch
@interpret_only
@pytest.mark.parametrize("path", ["gemv", "gemm"])
def test_w4a8_zeros_none_is_zero_point_8(path):
    x, w, s, _, b = make_case(3, 128, 33, 32, None, True, BF16)
    z8 = torch.full_like(s, 8, dtype=torch.uint8)
    y_none = k4.w4a8_linear(*to_dev(x, w, s), None, 32, *to_dev(b), path=path)
    y_8 = k4.w4a8_linear(*to_dev(x, w, s, z8), 32, *to_dev(b), path=path)
    assert_bits_equal(y_none, y_8)


@needs_launch
@pytest.mark.parametrize("path", ["gemv", "gemm"])
@pytest.mark.parametrize("K,g,zeros", [(40, 10, "u8")] + [pytest.param(*c, marks=interpret_only) for c in
                                      ((130, -1, "f32"), (96, 32, "f32"), (130, 26, None),
                                                                          (96, 16, "u8"), (96, 48, None))])
def test_w4a8_any_even_group_and_fp32_zeros(path, K, g, zeros):
    """Any even g dividing K (groups that are not whole tiles: masked chunks) and fp32 zero points."""
    for M in (1, 3):
        x, w, s, z, b = make_case(M, K, 19, g, zeros, True, F32)
        y = k4.w4a8_linear(*to_dev(x, w, s, z), g, *to_dev(b), path=path)
        check(y, x, w, s, z, g, b, exact=(path == "gemm" and reference_takes(K, g, z)))


@needs_launch
@pytest.mark.parametrize("M", [1, 3])
def test_w4a8_fp32_bias_with_bf16_x_and_special_rows(M):
    """fp32 bias on bf16 x; rows with NaN (-> NaN), inf (-> NaN), all zeros (-> bias) and tiny
    values (scale 0 -> bias)."""
    x, w, s, z, b = make_case(max(M, 5), 128, 33, 64, "u8", True, BF16, bias_dtype=F32)
    if M >= 3:
        x[3, 7] = float("-inf")
        x[4] = x[4].float().mul(1e-34).to(BF16)
    x = x[:M] if M == 1 else x
    y = k4.w4a8_linear(*to_dev(x, w, s, z), 64, *to_dev(b))
    check(y, x, w, s, z, 64, b, exact=k4.choose_path(x.shape[0]) == "gemm")
    if M >= 3:
        ref = reference.w4a8_linear(x, w, s, z, 64, b)
        assert torch.isnan(ref[2:4]).all() and torch.equal(ref[1], b.to(BF16)) and torch.equal(ref[4], b.to(BF16))


@needs_launch
def test_w4a8_empty_batch():
    x, w, s, z, b = make_case(0, 64, 19, 32, "u8", True, BF16)
    y = k4.w4a8_linear(*to_dev(x, w, s, z), 32, *to_dev(b))
    assert y.shape == (0, 19) and y.dtype == BF16


@needs_launch
def test_w4a8_backend_entry_reshapes_validates_and_ignores_w_packed():
    from slmkern._backends.cpu import prepack_int4

    x, w, s, z, b = make_case(6, 128, 19, 64, "u8", True, BF16, special_rows=False)
    x3 = x.reshape(2, 3, 128)
    xd, wd, sd, zd, bd = to_dev(x3, w, s, z, b)
    wp = prepack_int4(w, s, z, 64).to(DEVICE)
    y = triton_backend._int4_linear("w4a8_linear", xd, wd, sd, zd, 64, bd, wp)
    assert y.shape == (2, 3, 19)
    assert_bits_equal(y, reference.w4a8_linear(x3, w, s, z, 64, b))
    base = torch.randn(3, 140).to(BF16)
    xs = base.to(DEVICE)[:, 5:133]
    ys = triton_backend._int4_linear("w4a8_linear", xs, wd, sd, zd, 64, bd, None)
    assert_bits_equal(ys, reference.w4a8_linear(base[:, 5:133], w, s, z, 64, b))
    with pytest.raises(ValueError, match="even"):
        triton_backend._int4_linear("w4a8_linear", xd[..., :127], wd, sd, zd, 64, bd, None)
    with pytest.raises(ValueError, match="zeros"):
        triton_backend._int4_linear("w4a8_linear", xd, wd, sd, zd[:, :1], 64, bd, None)


# --------------------------------------------------------------------------------------------
# Hopper code generation, checked without a GPU (ptxas ships with triton's NVIDIA backend)
# --------------------------------------------------------------------------------------------

_PTX_PROBE = PTX_HELPER + r'''
from slmkern.kernels import _int4, w4a8 as k4
io = {"q_ptr": "*i8", "sx_ptr": "*fp32", "w_ptr": "*u8", "s_ptr": "*fp32", "z_ptr": "*u8", "b_ptr": "*bf16",
      "y_ptr": "*bf16", "ws_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "stride_wn": "i32",
      "stride_ym": "i32", "M_BUCKET": "i32"}
flags = {"GROUP_SIZE": 128, "HAS_ZEROS": True, "FLOAT_ZEROS": False, "HAS_BIAS": True}
out = {
    "gemv": facts(ptx(k4._w4a8_gemv_kernel, io, {**flags, "SPLIT_K": 1, "BLOCK_N": 32, "BLOCK_K": 512,
                                                  "CHUNK_K": 128, "GROUPS_PER_STEP": 4, "EVEN_CHUNK": True})),
    "gemm": facts(ptx(k4._w4a8_kernel, io, {**flags, "SPLIT_K": 1, "BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128,
                                             "GROUP_M": 8, "CHUNK_K": 128, "EVEN_CHUNK": True})),
    "gemm_sym": facts(ptx(k4._w4a8_kernel, io, {**flags, "HAS_ZEROS": False, "SPLIT_K": 1, "BLOCK_M": 16,
                                                 "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "CHUNK_K": 64,
                                                 "EVEN_CHUNK": True})),
    "reduce": facts(ptx(_int4._splitk_reduce_kernel, {"ws_ptr": "*fp32", "sx_ptr": "*fp32", "b_ptr": "*bf16",
                                                      "y_ptr": "*bf16", "M": "i32", "N": "i32", "stride_ym": "i32"},
                        {"SPLIT_K": 4, "HAS_ROW_SCALE": True, "HAS_BIAS": True, "BLOCK_N": 1024})),
}
print(json.dumps(out))
'''


@pytest.mark.skipif(not have_ptxas(), reason="needs triton with its NVIDIA backend (ptxas)")
def test_w4a8_kernels_compile_for_hopper():
    """sm_90 PTX: int8 tensor-core MMA in the GEMM, 16-byte weight loads in the GEMV, and no fp32 FMA with a
    non-zero addend anywhere (a contracted multiply-add would break bit-exactness with the reference)."""
    res = subprocess.run([sys.executable, "-c", _PTX_PROBE], env=ptx_probe_env(), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    facts = json.loads(res.stdout.strip().splitlines()[-1])
    assert facts["gemm"]["wgmma_s8"] > 0, facts
    assert facts["gemm_sym"]["wgmma_s8"] + facts["gemm_sym"]["mma_s8"] > 0, facts  # BLOCK_M = 16: mma.sync
    assert facts["gemv"]["ld_global_v4"] > 0 and facts["gemv"]["ld_global_b8"] <= 2, facts
    for name in facts:
        assert facts[name]["fma_nonzero_addend"] == 0, facts


# --------------------------------------------------------------------------------------------
# CUDA: the registered op at the benchmark shapes
# --------------------------------------------------------------------------------------------

BENCH_KN = [(384, 1536), (576, 1536), (2048, 8192)]


def _cuda_value_check(y, x, w, s, z, g, b):
    value, mag = w4a8_f64(*to_dev(x, w, s, z, device="cuda"), g, b.cuda() if b is not None else None)
    assert_close(y, value, 4e-6 * mag + ULP[x.dtype] * value.abs() + 1e-30)


@requires_cuda
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("M", [1, 16, 128])
@pytest.mark.parametrize("K,N", BENCH_KN)
def test_w4a8_op_cuda_bench_shapes(K, N, M, bias):
    g = 128 if K % 128 == 0 else 64  # the benchmark's choice: K = 576 has no 128-groups
    x, w, s, z, b = make_case(M, K, N, g, "u8" if bias else None, bias, BF16)
    args = to_dev(x, w, s, z, device="cuda")
    bd = b.cuda() if bias else None
    y = torch.ops.slmkern.w4a8_linear(*args, g, bd)
    assert y.is_cuda
    _cuda_value_check(y, x, w, s, z, g, b)
    if M > 1:  # the tiled kernel without split-K is bit-exact
        ref = reference.w4a8_linear(*args, g, bd)
        assert_bits_equal(k4.w4a8_linear(*args, g, bd, split_k=1), ref)


@requires_cuda
@pytest.mark.parametrize("M", [1, 2048])
def test_w4a8_op_cuda_large(M):
    K, N = (4096, 14336) if M == 1 else (2048, 8192)
    x, w, s, z, b = make_case(M, K, N, 128, "u8", True, BF16)
    y = torch.ops.slmkern.w4a8_linear(*to_dev(x, w, s, z, device="cuda"), 128, b.cuda())
    _cuda_value_check(y, x, w, s, z, 128, b)


@requires_cuda
@pytest.mark.parametrize("M", [1, 16])
def test_w4a8_split_k_is_deterministic_cuda(M):
    x, w, s, z, b = make_case(M, 2048, 1536, 64, "u8", True, BF16, special_rows=False)
    args = to_dev(x, w, s, z, device="cuda")
    ys = [k4.w4a8_linear(*args, 64, b.cuda(), split_k=8) for _ in range(3)]
    assert all(torch.equal(ys[0], y) for y in ys[1:])
    _cuda_value_check(ys[0], x, w, s, z, 64, b)


@requires_cuda
@pytest.mark.parametrize("M", [1, 5])
def test_w4a8_opcheck_cuda(M):
    x, w, s, z, b = make_case(M, 128, 48, 32, "u8", True, BF16, special_rows=False)
    args = (*to_dev(x, w, s, z, device="cuda"), 32, b.cuda(), None)
    torch.library.opcheck(torch.ops.slmkern.w4a8_linear.default, args)


@requires_cuda
def test_w4a8_compile_fullgraph_cuda():
    x, w, s, z, b = make_case(16, 384, 1536, 128, "u8", True, BF16, special_rows=False)
    wd, sd, zd, bd = to_dev(w, s, z, b, device="cuda")
    fn = torch.compile(lambda a: torch.ops.slmkern.w4a8_linear(a, wd, sd, zd, 128, bd) * 2, fullgraph=True)
    eager = torch.ops.slmkern.w4a8_linear(x.cuda(), wd, sd, zd, 128, bd) * 2
    assert_bits_equal(fn(x.cuda()), eager)


@requires_cuda
@pytest.mark.parametrize("M", [1, 16])
def test_w4a8_launcher_traces_with_make_fx_cuda(M):
    from torch.fx.experimental.proxy_tensor import make_fx

    x, w, s, z, b = make_case(M, 384, 1536, 128, "u8", True, BF16, special_rows=False)
    wd, sd, zd, bd = to_dev(w, s, z, b, device="cuda")
    with triton_backend._set_wrap_triton_enabled(True):
        gm = make_fx(lambda a: k4.w4a8_linear(a, wd, sd, zd, 128, bd))(x.cuda())
    assert "triton_kernel_wrapper" in gm.code, gm.code
    assert_bits_equal(gm(x.cuda()), k4.w4a8_linear(x.cuda(), wd, sd, zd, 128, bd))
