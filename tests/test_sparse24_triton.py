"""Triton 2:4 kernels (slmkern.kernels.sparse24, sparse24_w4a16) against the contract.

Without a GPU the launchers run on CPU tensors under TRITON_INTERPRET=1 (set by conftest) at small
awkward shapes; with one, the same tests run on CUDA (bf16 only, to bound compile time).

The dense weight is rebuilt here from the contract (briefs/SPARSE_CONTRACT.md), independently of
slmkern/formats/sparse24.py: meta byte b holds group 2b in its low nibble, a nibble holds c0 in
bits 0-1 and c1 in bits 2-3, values[n, 2g + j] sits at column 4g + c_j. int8 values must be
bit-exact with slmkern.reference.w8a8_linear on that dense int8 weight; float values and int4
values are compared with the float64 value of x @ W.T + bias within a dtype-tied tolerance.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from _int4_triton import (DEVICE, INTERPRET, PTX_HELPER, ULP, assert_bits_equal, assert_close, have_ptxas,
                          interpret_only, needs_kernels, needs_launch, ptx_probe_env, to_dev)
from slmkern import reference
from slmkern._backends import triton as triton_backend

pytestmark = needs_kernels

if triton_backend.has_triton_kernels():
    from slmkern.kernels import sparse24 as k24
    from slmkern.kernels import sparse24_w4a16 as k24q

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
PAIRS = torch.tensor([(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)])


@pytest.fixture(autouse=True)
def _plain_launch():
    """Launch kernels directly, as the registered CUDA op does."""
    with triton_backend._set_wrap_triton_enabled(False):
        yield


# --------------------------------------------------------------------------------------------
# the format, from the contract
# --------------------------------------------------------------------------------------------

def random_indices(N: int, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random in-group columns c0 < c1, each (N, K/4) int64."""
    sel = PAIRS[torch.randint(0, 6, (N, K // 4))]
    return sel[..., 0], sel[..., 1]


def pack_meta(c0: torch.Tensor, c1: torch.Tensor) -> torch.Tensor:
    """(N, K/4) column pairs -> meta uint8 (N, ceil(K/8)); a missing last group's nibble is 0."""
    nib = (c0 | (c1 << 2)).to(torch.uint8)
    if nib.shape[1] % 2:
        nib = torch.cat([nib, torch.zeros(nib.shape[0], 1, dtype=torch.uint8)], dim=1)
    return (nib[:, 0::2] | (nib[:, 1::2] << 4)).contiguous()


def dense_from_24(values: torch.Tensor, meta: torch.Tensor, K: int) -> torch.Tensor:
    """Contract decompression: values (N, K/2) any dtype + meta -> W (N, K) in values' dtype."""
    N = values.shape[0]
    m = meta.to(torch.int64)
    nib = torch.stack((m & 0xF, m >> 4), dim=-1).reshape(N, -1)[:, : K // 4]
    c = torch.stack((nib & 3, (nib >> 2) & 3), dim=-1)                   # (N, K/4, 2)
    assert bool((c[..., 0] < c[..., 1]).all()), "meta must have c0 < c1"
    cols = (4 * torch.arange(K // 4).reshape(1, -1, 1) + c).reshape(N, K // 2)
    W = torch.zeros(N, K, dtype=values.dtype)
    W.scatter_(1, cols, values)
    return W


def make_24(N: int, K: int, values_dtype: torch.dtype, zero_frac: float = 0.1):
    """Random canonical-looking 2:4 weight: (values, meta). Some kept values are 0 (groups with
    fewer than 2 nonzeros, stored as padding)."""
    c0, c1 = random_indices(N, K)
    if values_dtype == torch.int8:
        v = torch.randint(-127, 128, (N, K // 2), dtype=torch.int8)
    else:
        v = torch.randn(N, K // 2).to(values_dtype)
    v[torch.rand(N, K // 2) < zero_frac] = 0
    return v.contiguous(), pack_meta(c0, c1)


def make_x(M, K, dtype, special_rows=False):
    x = (torch.randn(M, K) * torch.exp(torch.randn(M, 1))).to(dtype)
    if special_rows:
        if M >= 3:
            x[1] = 0
            x[2, K // 2] = float("nan")
        if M >= 17:
            x[4, K - 1] = float("-inf")
            x[16] = x[16].float().mul(1e-34).to(dtype)
    return x


def float_check(y, x, W, bias, values_dtype):
    """|y - x @ W.T - bias| within: fp32 accumulation (tf32x3 ~ fp32), rounding of the weights to a
    16-bit x's dtype when values are of another dtype (truncation in the interpreter: 2^-7), and
    rounding of the output."""
    xd = x.double()
    Wd = W.double()
    exact = xd @ Wd.T
    mag = xd.abs() @ Wd.abs().T
    if bias is not None:
        exact = exact + bias.double()
        mag = mag + bias.double().abs()
    rel = 2.0 ** -18
    if x.dtype != F32 and values_dtype != x.dtype:
        rel += 2.0 ** -7
    tol = rel * mag + ULP[x.dtype] * exact.abs() + 1e-30
    assert y.dtype == x.dtype and y.shape == exact.shape
    assert_close(y, exact, tol)


def _p(*args, marks=()):
    return pytest.param(*args, marks=marks)


# --------------------------------------------------------------------------------------------
# sparse24_linear, float values
# --------------------------------------------------------------------------------------------

# K % 8 == 4 (36, 44, 132) leaves an unused last high nibble; K = 4 is one group.
SHAPES = [(1, 36, 19), (2, 44, 19), (3, 132, 33), (17, 64, 40), (65, 132, 33), (2, 4, 5)]
# (x dtype, values dtype): every x dtype, same and different value dtypes
FLOAT_COMBOS = [_p(BF16, BF16), _p(F32, F32, marks=interpret_only), _p(F16, F16, marks=interpret_only),
                _p(BF16, F32, marks=interpret_only), _p(F32, BF16, marks=interpret_only),
                _p(F16, BF16, marks=interpret_only)]


@needs_launch
@pytest.mark.parametrize("xdt,vdt", FLOAT_COMBOS)
@pytest.mark.parametrize("M,K,N", SHAPES)
def test_sparse24_float_matches_dense(M, K, N, xdt, vdt):
    x = make_x(M, K, xdt)
    v, meta = make_24(N, K, vdt)
    b = (torch.randn(N) * 2).to(xdt) if M % 2 else None  # bias at odd M (M = 1, 3, 17, 65)
    y = k24.sparse24_linear(*to_dev(x, v, meta, None, b))
    assert y.device.type == DEVICE
    float_check(y, x, dense_from_24(v, meta, K), b, vdt)


@needs_launch
@pytest.mark.parametrize("path", ["gemv", "gemm"])
@pytest.mark.parametrize("dtype", [BF16, pytest.param(F32, marks=interpret_only)], ids=["bf16", "f32"])
def test_sparse24_float_both_paths(path, dtype):
    """Each path also at M it is not chosen for; fp32 bias with 16-bit x."""
    for M in (1, 3):
        x = make_x(M, 132, dtype)
        v, meta = make_24(33, 132, dtype)
        b = torch.randn(33)
        y = k24.sparse24_linear(*to_dev(x, v, meta, None, b), path=path)
        float_check(y, x, dense_from_24(v, meta, 132), b, dtype)


# --------------------------------------------------------------------------------------------
# sparse24_linear, int8 values: bit-exact with w8a8 on the dense weight
# --------------------------------------------------------------------------------------------

INT8_DTYPES = [pytest.param(BF16, id="bf16"), pytest.param(F32, marks=interpret_only, id="f32"),
               pytest.param(F16, marks=interpret_only, id="f16")]


@needs_launch
@pytest.mark.parametrize("dtype", INT8_DTYPES)
@pytest.mark.parametrize("M,K,N", SHAPES)
def test_sparse24_int8_bit_exact(M, K, N, dtype):
    x = make_x(M, K, dtype, special_rows=True)
    v, meta = make_24(N, K, torch.int8)
    s = torch.rand(N) * 0.02 + 1e-3
    b = (torch.randn(N) * 2).to(dtype) if M % 2 else None
    y = k24.sparse24_linear(*to_dev(x, v, meta, s, b))
    assert_bits_equal(y, reference.w8a8_linear(x, dense_from_24(v, meta, K), s, b))


@needs_launch
@pytest.mark.parametrize("path", ["gemv", "gemm"])
def test_sparse24_int8_both_paths_fp32_bias(path):
    for M in (1, 3, 17):
        x = make_x(M, 132, BF16, special_rows=True)
        v, meta = make_24(33, 132, torch.int8)
        s = torch.rand(33) * 0.02 + 1e-3
        b = torch.randn(33)
        y = k24.sparse24_linear(*to_dev(x, v, meta, s, b), path=path)
        assert_bits_equal(y, reference.w8a8_linear(x, dense_from_24(v, meta, 132), s, b))


@needs_launch
def test_sparse24_dense_decompression_is_the_contract():
    """The test's own decompression: a hand-made row (guards against a mirrored misreading)."""
    # groups: (c0, c1) = (0, 1), (2, 3), (1, 3) -> nibbles 0x4, 0xE, 0xD; K = 12, meta bytes 0xE4, 0x0D
    meta = torch.tensor([[0xE4, 0x0D]], dtype=torch.uint8)
    v = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    W = dense_from_24(v, meta, 12)
    assert W.tolist() == [[1.0, 2.0, 0, 0, 0, 0, 3.0, 4.0, 0, 5.0, 0, 6.0]]
    x = torch.arange(1.0, 13.0).reshape(1, 12)
    for path in ("gemv", "gemm"):
        y = k24.sparse24_linear(*to_dev(x, v, meta, None, None), path=path)
        assert y.cpu().item() == 1 * 1 + 2 * 2 + 3 * 7 + 4 * 8 + 5 * 10 + 6 * 12


@needs_launch
def test_sparse24_strided_rows_and_empty_batch():
    base = make_x(3, 140, BF16)
    x = base[:, 4:136]
    v, meta = make_24(19, 132, torch.int8)
    s = torch.rand(19) + 0.5
    xd = base.to(DEVICE)[:, 4:136]
    assert xd.stride(0) == 140
    for path in ("gemv", "gemm"):
        y = k24.sparse24_linear(xd, *to_dev(v, meta, s), None, path=path)
        assert_bits_equal(y, reference.w8a8_linear(x, dense_from_24(v, meta, 132), s))
    y0 = k24.sparse24_linear(*to_dev(x[:0], v, meta, s), None)
    assert y0.shape == (0, 19) and y0.dtype == BF16


# --------------------------------------------------------------------------------------------
# sparse24_w4a16_linear
# --------------------------------------------------------------------------------------------

def make_w4(N: int, K: int, g: int, zeros: bool):
    """(qvalues uint8 (N, K/4), meta, scales (N, K/g), zeros uint8 (N, K/g) or None)."""
    _, meta = make_24(N, K, F32)
    q = torch.randint(0, 256, (N, K // 4), dtype=torch.uint8)
    G = K // g
    s = torch.rand(N, G) * 0.1 + 0.01
    z = torch.randint(0, 16, (N, G), dtype=torch.uint8) if zeros else None
    return q, meta, s, z


def w4_dense(q, meta, s, z, g, K) -> torch.Tensor:
    """W (N, K) float64 from the contract: kept value j = nibble j of q (low first), dense group
    (4 * (j // 2)) // g, W = (code - zero) * scale at the kept positions."""
    N = q.shape[0]
    qi = q.to(torch.int64)
    codes = torch.stack((qi & 0xF, qi >> 4), dim=-1).reshape(N, K // 2).double()
    grp = (4 * (torch.arange(K // 2) // 2)) // g
    zz = torch.full_like(s, 8.0, dtype=torch.float64) if z is None else z.double()
    kept = (codes - zz[:, grp]) * s.double()[:, grp]
    return dense_from_24(kept, meta, K)


def w4_check(y, x, q, meta, s, z, g, b, K, path):
    W = w4_dense(q, meta, s, z, g, K)
    xd = x.double()
    exact = xd @ W.T
    mag = xd.abs() @ W.abs().T
    if b is not None:
        exact = exact + b.double()
        mag = mag + b.double().abs()
    rel = 2.0 ** -18
    if path == "gemm" and x.dtype != F32:
        rel += 2.0 ** -7  # each dequantized weight rounded to x's dtype before the 16-bit dot
    assert_close(y, exact, rel * mag + ULP[x.dtype] * exact.abs() + 1e-30)


# g: 32 / 64 / 128 (one scale per tile or whole groups per tile depending on the path's BLOCK_K),
# g = K (per channel, K not a power of two: per-kept-value scales), g = 16 (whole groups in the
# GEMM's tile; below the op's minimum, but the kernel takes it).
W4_CASES = [
    _p(1, 64, 19, 32, True, BF16), _p(1, 128, 33, 64, False, BF16), _p(1, 132, 19, 132, True, BF16),
    _p(1, 256, 19, 128, True, F32, marks=interpret_only),
    _p(2, 64, 19, 16, True, BF16), _p(3, 132, 33, 132, False, F32, marks=interpret_only),
    _p(3, 128, 19, 32, True, F16, marks=interpret_only), _p(17, 192, 33, 64, True, BF16),
    _p(65, 96, 19, 32, False, BF16), _p(5, 256, 33, 128, True, BF16),
]


@needs_launch
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("M,K,N,g,zeros,dtype", W4_CASES)
def test_sparse24_w4a16_matches_dense(M, K, N, g, zeros, dtype, bias):
    x = make_x(M, K, dtype)
    q, meta, s, z = make_w4(N, K, g, zeros)
    b = (torch.randn(N) * 2).to(dtype) if bias else None
    y = k24q.sparse24_w4a16_linear(*to_dev(x, q, meta, s, z), g, *to_dev(b))
    assert y.shape == (M, N) and y.device.type == DEVICE
    w4_check(y, x, q, meta, s, z, g, b, K, k24q.choose_path(M))


@needs_launch
@pytest.mark.parametrize("path", ["gemv", "gemm"])
@pytest.mark.parametrize("g", [16, 32, 64, 128, -1])
def test_sparse24_w4a16_every_scale_layout(path, g):
    """Each group size on each path (per-tile, whole-groups and per-value scale loads), K = 384
    (several tiles, g = K = 384 not a power of two), M = 1 and 3, fp32 bias with bf16 x."""
    K = 384
    for M in (1, 3):
        x = make_x(M, K, BF16)
        q, meta, s, z = make_w4(19, K, K if g == -1 else g, True)
        b = torch.randn(19)
        y = k24q.sparse24_w4a16_linear(*to_dev(x, q, meta, s, z), g, *to_dev(b), path=path)
        w4_check(y, x, q, meta, s, z, K if g == -1 else g, b, K, path)


@needs_launch
def test_sparse24_w4a16_zeros_none_is_8_and_empty_batch():
    x = make_x(3, 128, BF16)
    q, meta, s, _ = make_w4(19, 128, 32, False)
    z8 = torch.full_like(s, 8, dtype=torch.uint8)
    for path in ("gemv", "gemm"):
        a = k24q.sparse24_w4a16_linear(*to_dev(x, q, meta, s), None, 32, path=path)
        c = k24q.sparse24_w4a16_linear(*to_dev(x, q, meta, s, z8), 32, path=path)
        assert_bits_equal(a, c)
    y0 = k24q.sparse24_w4a16_linear(*to_dev(x[:0], q, meta, s), None, 32)
    assert y0.shape == (0, 19)


# --------------------------------------------------------------------------------------------
# Hopper code generation, checked without a GPU (ptxas ships with triton's NVIDIA backend)
# --------------------------------------------------------------------------------------------

_PTX_PROBE = PTX_HELPER + r'''
from slmkern.kernels import sparse24 as k24, sparse24_w4a16 as k24q, sparse as ksp
io24 = {"meta_ptr": "*u8", "ws_ptr": "*fp32", "b_ptr": "*bf16", "y_ptr": "*bf16", "M": "i32", "N": "i32",
        "K": "i32", "stride_am": "i32", "stride_vn": "i32", "stride_mn": "i32", "stride_ym": "i32", "M_BUCKET": "i32"}
tile = {"HAS_BIAS": True, "BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}
iosp = {"mask_ptr": "*u8", "off_ptr": "*i64", "ws_ptr": "*fp32", "b_ptr": "*bf16", "y_ptr": "*bf16", "M": "i32",
        "N": "i32", "K": "i32", "NNZ": "i64", "stride_am": "i32", "stride_bn": "i32", "stride_ym": "i32",
        "M_BUCKET": "i32"}
out = {
    "s24_int8": facts(ptx(k24._sparse24_kernel, {"a_ptr": "*i8", "sx_ptr": "*fp32", "v_ptr": "*i8", **io24},
                          {**tile, "INT8_VALUES": True, "DOT_IN_FP32": False})),
    "s24_bf16": facts(ptx(k24._sparse24_kernel, {"a_ptr": "*bf16", "sx_ptr": "*fp32", "v_ptr": "*bf16", **io24},
                          {**tile, "INT8_VALUES": False, "DOT_IN_FP32": False})),
    "s24_gemv_int8": facts(ptx(k24._sparse24_gemv_kernel, {"x_ptr": "*bf16", "v_ptr": "*i8", "meta_ptr": "*u8",
                               "ws_ptr": "*fp32", "b_ptr": "*bf16", "y_ptr": "*bf16", "N": "i32", "K": "i32",
                               "stride_xm": "i32", "stride_vn": "i32", "stride_mn": "i32", "stride_ym": "i32",
                               "M_BUCKET": "i32"},
                               {"INT8_VALUES": True, "HAS_BIAS": True, "X_BLOCK": 2048, "BLOCK_N": 32,
                                "BLOCK_K": 512})),
    "s24_w4": facts(ptx(k24q._sparse24_w4a16_kernel, {"x_ptr": "*bf16", "q_ptr": "*u8", "meta_ptr": "*u8",
                        "s_ptr": "*fp32", "z_ptr": "*u8", "b_ptr": "*bf16", "y_ptr": "*bf16", "M": "i32", "N": "i32",
                        "K": "i32", "stride_xm": "i32", "stride_qn": "i32", "stride_mn": "i32", "stride_ym": "i32",
                        "M_BUCKET": "i32"},
                        {"GROUP_SIZE": 128, "HAS_ZEROS": True, "HAS_BIAS": True, "DOT_IN_FP32": False,
                         "BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "SCALE_PER_TILE": True,
                         "WHOLE_GROUPS": False})),
    "sp_int8": facts(ptx(ksp._sparse_kernel, {"a_ptr": "*i8", "sx_ptr": "*fp32", "v_ptr": "*i8", **iosp},
                         {**tile, "INT8_VALUES": True, "DOT_IN_FP32": False})),
}
print(json.dumps(out))
'''


@pytest.mark.skipif(not have_ptxas(), reason="needs triton with its NVIDIA backend (ptxas)")
def test_sparse_kernels_compile_for_hopper():
    """sm_90 PTX of the tiled 2:4 / bitmask kernels: the expanded tiles feed int8 / bf16 wgmma, and
    the int8 epilogues have no contracted FMA (bit-exactness with w8a8)."""
    res = subprocess.run([sys.executable, "-c", _PTX_PROBE], env=ptx_probe_env(), capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    facts = json.loads(res.stdout.strip().splitlines()[-1])
    assert facts["s24_int8"]["wgmma_s8"] > 0 and facts["sp_int8"]["wgmma_s8"] > 0, facts
    assert facts["s24_bf16"]["wgmma_bf16"] > 0 and facts["s24_w4"]["wgmma_bf16"] > 0, facts
    for name in ("s24_int8", "s24_gemv_int8", "sp_int8"):
        assert facts[name]["fma_nonzero_addend"] == 0, facts


# --------------------------------------------------------------------------------------------
# CUDA: benchmark shapes
# --------------------------------------------------------------------------------------------

requires_cuda = pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs a CUDA device")


@requires_cuda
@pytest.mark.parametrize("M", [1, 16, 128])
def test_sparse24_cuda_bench_shapes(M):
    K, N = 2048, 8192
    x = make_x(M, K, BF16, special_rows=True)
    v8, meta8 = make_24(N, K, torch.int8)
    s = torch.rand(N) * 0.02 + 1e-3
    b = torch.randn(N).to(BF16)
    y = k24.sparse24_linear(*to_dev(x, v8, meta8, s, b, device="cuda"))
    assert_bits_equal(y, reference.w8a8_linear(x, dense_from_24(v8, meta8, K), s, b))
    x = make_x(M, K, BF16)
    vb, metab = make_24(N, K, BF16)
    y = k24.sparse24_linear(*to_dev(x, vb, metab, None, b, device="cuda"))
    float_check(y.cpu(), x, dense_from_24(vb, metab, K), b, BF16)
    q, metaq, sq, zq = make_w4(N, K, 128, True)
    y = k24q.sparse24_w4a16_linear(*to_dev(x, q, metaq, sq, zq, device="cuda"), 128, b.cuda())
    w4_check(y.cpu(), x, q, metaq, sq, zq, 128, b, K, k24q.choose_path(M))


# --------------------------------------------------------------------------------------------
# the CUDA registration (slmkern/_backends/triton_sparse.py), called directly
# --------------------------------------------------------------------------------------------

@needs_launch
def test_sparse24_backend_entries_reshape_validate_and_ignore_w_packed():
    from slmkern._backends import triton_sparse as ts

    x, K, N = make_x(6, 132, BF16, special_rows=True), 132, 19
    v, meta = make_24(N, K, torch.int8)
    s = torch.rand(N) + 0.5
    b = torch.randn(N).to(BF16)
    xd, vd, md, sd, bd = to_dev(x.reshape(2, 3, K), v, meta, s, b)
    y = ts.sparse24_linear_cuda(xd, vd, md, sd, bd, torch.zeros(3, dtype=torch.uint8))
    assert y.shape == (2, 3, N)
    assert_bits_equal(y.reshape(6, N), reference.w8a8_linear(x, dense_from_24(v, meta, K), s, b))
    assert ts.sparse24_linear_cuda(xd[:, :0], vd, md, sd, bd).shape == (2, 0, N)
    with pytest.raises(ValueError, match="K % 4"):
        ts.sparse24_linear_cuda(xd[..., :130], vd[:, :65], md[:, :17], sd, bd)
    with pytest.raises(ValueError, match="values"):
        ts.sparse24_linear_cuda(xd, vd[:, :64], md, sd, bd)
    with pytest.raises(ValueError, match="meta"):
        ts.sparse24_linear_cuda(xd, vd, md[:, :16], sd, bd)
    with pytest.raises(ValueError, match="scales"):
        ts.sparse24_linear_cuda(xd, vd, md, None, bd)
    with pytest.raises(ValueError, match="scales"):
        ts.sparse24_linear_cuda(xd, vd.to(BF16), md, sd, bd)
    with pytest.raises(TypeError, match="meta"):
        ts.sparse24_linear_cuda(xd, vd, md.to(torch.int8), sd, bd)
    with pytest.raises(TypeError, match="bias"):
        ts.sparse24_linear_cuda(xd, vd, md, sd, bd.to(F16))

    q, mq, sq, zq = make_w4(N, 128, 32, True)
    xq = make_x(3, 128, BF16)
    yq = ts.sparse24_w4a16_linear_cuda(*to_dev(xq, q, mq, sq, zq), 32, None)
    w4_check(yq, xq, q, mq, sq, zq, 32, None, 128, "gemm")
    yk = ts.sparse24_w4a16_linear_cuda(*to_dev(xq, q, mq, sq[:, :1].contiguous(), zq[:, :1].contiguous()), -1)
    w4_check(yk, xq, q, mq, sq[:, :1], zq[:, :1], 128, None, 128, "gemm")
    # any multiple of 4 dividing K (the op's rule, slmkern.formats.common), e.g. g = 16
    q16, m16, s16, z16 = make_w4(N, 128, 16, True)
    y16 = ts.sparse24_w4a16_linear_cuda(*to_dev(xq, q16, m16, s16, z16), 16, None)
    w4_check(y16, xq, q16, m16, s16, z16, 16, None, 128, "gemm")
    for bad_g in (6, 24):  # not a multiple of 4; does not divide K = 128
        with pytest.raises(ValueError, match="group_size"):
            ts.sparse24_w4a16_linear_cuda(*to_dev(xq, q, mq, sq[:, :1].contiguous(), zq[:, :1].contiguous()), bad_g)
    with pytest.raises(ValueError, match="zeros"):
        ts.sparse24_w4a16_linear_cuda(*to_dev(xq, q, mq, sq, zq[:, :2]), 32, None)


def test_sparse_register_puts_cuda_kernels_on_a_library():
    """register(lib) on a scratch namespace with the contract's schemas: a CUDA kernel for each op."""
    from slmkern._backends import triton_sparse as ts

    lib = torch.library.Library("slmkern_striton_test", "DEF")
    lib.define("sparse24_linear(Tensor x, Tensor values, Tensor meta, Tensor? scales=None, Tensor? bias=None, "
               "Tensor? w_packed=None) -> Tensor")
    lib.define("sparse24_w4a16_linear(Tensor x, Tensor qvalues, Tensor meta, Tensor scales, Tensor? zeros, "
               "int group_size, Tensor? bias=None, Tensor? w_packed=None) -> Tensor")
    lib.define("sparse_linear(Tensor x, Tensor values, Tensor bitmask, Tensor row_offsets, Tensor? scales=None, "
               "Tensor? bias=None, Tensor? w_packed=None) -> Tensor")
    ts.register(lib)
    for name in ("sparse24_linear", "sparse24_w4a16_linear", "sparse_linear"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"slmkern_striton_test::{name}", "CUDA"), name
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"slmkern_striton_test::{name}", "CPU"), name
