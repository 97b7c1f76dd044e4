"""Triton bitmask kernels (slmkern.kernels.sparse) against the contract.

Without a GPU the launcher runs on CPU tensors under TRITON_INTERPRET=1 (set by conftest) at small
awkward shapes; with one, the same tests run on CUDA (bf16 only, to bound compile time).

The format is built and decompressed here from the contract (briefs/SPARSE_CONTRACT.md),
independently of slmkern/formats/bitmask.py: bit i (LSB first) of byte b of row n marks column
8b + i, values are the nonzeros row by row in column order, row_offsets (N + 1) their row starts.
int8 values must be bit-exact with slmkern.reference.w8a8_linear on the dense int8 weight; float
values are compared with the float64 x @ W.T + bias within a dtype-tied tolerance.
"""
from __future__ import annotations

import pytest
import torch

from _int4_triton import (DEVICE, INTERPRET, ULP, assert_bits_equal, assert_close, interpret_only, needs_kernels,
                          needs_launch, to_dev)
from slmkern import reference
from slmkern._backends import triton as triton_backend

pytestmark = needs_kernels

if triton_backend.has_triton_kernels():
    from slmkern.kernels import sparse as ksp

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


@pytest.fixture(autouse=True)
def _plain_launch():
    with triton_backend._set_wrap_triton_enabled(False):
        yield


def compress(W: torch.Tensor):
    """Dense (N, K) -> (values (nnz,), bitmask uint8 (N, ceil(K/8)), row_offsets int64 (N + 1,))."""
    N, K = W.shape
    nz = W != 0
    values = W[nz].contiguous()  # row-major boolean indexing: row by row, increasing column
    KB = (K + 7) // 8
    bits = torch.zeros(N, KB * 8, dtype=torch.int64)
    bits[:, :K] = nz.to(torch.int64)
    bitmask = (bits.reshape(N, KB, 8) << torch.arange(8)).sum(-1).to(torch.uint8)
    row_offsets = torch.zeros(N + 1, dtype=torch.int64)
    row_offsets[1:] = nz.sum(1).cumsum(0)
    return values, bitmask.contiguous(), row_offsets


def decompress(values, bitmask, row_offsets, K):
    """The inverse, read bit by bit from the contract (checks popcounts against row_offsets)."""
    N = bitmask.shape[0]
    W = torch.zeros(N, K, dtype=values.dtype)
    for n in range(N):
        p = int(row_offsets[n])
        for k in range(K):
            if (int(bitmask[n, k // 8]) >> (k % 8)) & 1:
                W[n, k] = values[p]
                p += 1
        assert p == int(row_offsets[n + 1])
    return W


def random_sparse(N, K, dtype, sparsity):
    """Dense (N, K) weight with about `sparsity` zeros; row 1 all zero and row 2 dense when N allows."""
    if dtype == torch.int8:
        W = torch.randint(-127, 128, (N, K), dtype=torch.int8)
        W[W == 0] = 1
    else:
        W = torch.randn(N, K).to(dtype)
    W[torch.rand(N, K) < sparsity] = 0
    if N >= 3:
        W[1] = 0
        W[2] = W[2] if sparsity == 0 else (torch.randint(1, 100, (K,)).to(dtype))
    return W


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
    xd, Wd = x.double(), W.double()
    exact = xd @ Wd.T
    mag = xd.abs() @ Wd.abs().T
    if bias is not None:
        exact = exact + bias.double()
        mag = mag + bias.double().abs()
    rel = 2.0 ** -18
    if x.dtype != F32 and values_dtype != x.dtype:
        rel += 2.0 ** -7  # weights rounded to a 16-bit x's dtype (truncated in the interpreter)
    assert y.dtype == x.dtype
    assert_close(y, exact, rel * mag + ULP[x.dtype] * exact.abs() + 1e-30)


def test_compress_is_the_contract():
    W = torch.tensor([[0, 2.0, 0, 0, 0, 0, 0, 0, 3.0, 0], [0] * 10, [1.0] * 10])
    v, bm, ro = compress(W)
    assert v.tolist() == [2.0, 3.0] + [1.0] * 10
    assert bm.tolist() == [[0b10, 0b1], [0, 0], [0xFF, 0b11]]
    assert ro.tolist() == [0, 2, 2, 12]
    assert torch.equal(decompress(v, bm, ro, 10), W)


# (M, K, N, sparsity): every M with 90%, 50% and 0% (plus the all-zero row 1 of random_sparse)
SHAPES = [(1, 37, 19, 0.9), (1, 130, 33, 0.0), (2, 37, 19, 0.5), (3, 130, 33, 0.9), (17, 64, 40, 0.5),
          (17, 64, 40, 0.0), (65, 130, 33, 0.9), (2, 5, 3, 0.5)]
FLOAT_COMBOS = [pytest.param(BF16, BF16, id="bf16-bf16"),
                pytest.param(F32, F32, marks=interpret_only, id="f32-f32"),
                pytest.param(F16, F16, marks=interpret_only, id="f16-f16"),
                pytest.param(BF16, F32, marks=interpret_only, id="bf16-f32"),
                pytest.param(F32, F16, marks=interpret_only, id="f32-f16")]


@needs_launch
@pytest.mark.parametrize("xdt,vdt", FLOAT_COMBOS)
@pytest.mark.parametrize("M,K,N,sparsity", SHAPES)
def test_sparse_float_matches_dense(M, K, N, xdt, vdt, sparsity):
    x = make_x(M, K, xdt)
    W = random_sparse(N, K, vdt, sparsity)
    v, bm, ro = compress(W)
    b = (torch.randn(N) * 2).to(xdt) if M % 2 else None
    y = ksp.sparse_linear(*to_dev(x, v, bm, ro, None, b))
    assert y.shape == (M, N) and y.device.type == DEVICE
    float_check(y, x, W, b, vdt)


INT8_DTYPES = [pytest.param(BF16, id="bf16"), pytest.param(F32, marks=interpret_only, id="f32"),
               pytest.param(F16, marks=interpret_only, id="f16")]


@needs_launch
@pytest.mark.parametrize("dtype", INT8_DTYPES)
@pytest.mark.parametrize("M,K,N,sparsity", SHAPES)
def test_sparse_int8_bit_exact(M, K, N, dtype, sparsity):
    x = make_x(M, K, dtype, special_rows=True)
    W = random_sparse(N, K, torch.int8, sparsity)
    v, bm, ro = compress(W)
    s = torch.rand(N) * 0.02 + 1e-3
    b = (torch.randn(N) * 2).to(dtype) if M % 2 else None
    y = ksp.sparse_linear(*to_dev(x, v, bm, ro, s, b))
    assert_bits_equal(y, reference.w8a8_linear(x, W, s, b))


@needs_launch
@pytest.mark.parametrize("path", ["gemv", "gemm"])
def test_sparse_both_paths(path):
    """Each path also at M it is not chosen for; fp32 bias with bf16 x; a weight read through the
    test's own bit-by-bit decompression."""
    for M in (1, 3):
        x = make_x(M, 130, BF16, special_rows=True)
        W = random_sparse(33, 130, torch.int8, 0.8)
        v, bm, ro = compress(W)
        assert torch.equal(decompress(v, bm, ro, 130), W)
        s = torch.rand(33) + 0.5
        b = torch.randn(33)
        assert_bits_equal(ksp.sparse_linear(*to_dev(x, v, bm, ro, s, b), path=path),
                          reference.w8a8_linear(x, W, s, b))
        xf = make_x(M, 130, BF16)
        Wf = random_sparse(33, 130, BF16, 0.8)
        vf, bmf, rof = compress(Wf)
        float_check(ksp.sparse_linear(*to_dev(xf, vf, bmf, rof, None, b), path=path), xf, Wf, b, BF16)


@needs_launch
@pytest.mark.parametrize("path", ["gemv", "gemm"])
def test_sparse_all_zero_weight_gives_bias(path):
    """100% sparse: nnz = 0 (an empty values tensor) gives y = bias (int8: NaN rows stay NaN)."""
    M, K, N = 3, 37, 19
    x = make_x(M, K, BF16, special_rows=True)
    W = torch.zeros(N, K, dtype=torch.int8)
    v, bm, ro = compress(W)
    assert v.numel() == 0
    s = torch.rand(N) + 0.5
    b = torch.randn(N).to(BF16)
    assert_bits_equal(ksp.sparse_linear(*to_dev(x, v, bm, ro, s, b), path=path), reference.w8a8_linear(x, W, s, b))
    xf = make_x(M, K, BF16)
    vf, bmf, rof = compress(torch.zeros(N, K, dtype=BF16))
    y = ksp.sparse_linear(*to_dev(xf, vf, bmf, rof, None, b), path=path)
    assert_bits_equal(y, b.expand(M, N).contiguous())


@needs_launch
def test_sparse_bad_row_offsets_never_read_out_of_bounds():
    """row_offsets pointing before 0 or past nnz (the op rejects them; the kernel masks them anyway):
    the out-of-range values read as 0, so the result is the dense product with those entries zeroed."""
    M, K, N = 3, 37, 4
    x = make_x(M, K, F32)
    W = random_sparse(N, K, F32, 0.5)
    v, bm, ro = compress(W)
    bad = ro.clone()
    bad[0] = -5             # row 0's first 5 set bits point before values[0]
    bad[3] = v.numel() - 2  # row 3's set bits after its second point past nnz
    for path in ("gemv", "gemm"):
        y = ksp.sparse_linear(*to_dev(x, v, bm, bad, None, None), path=path)
        assert torch.isfinite(y.cpu()).all()
        # rows 1, 2 are untouched
        ref = x.double() @ W.double().T
        assert_close(y[:, 1:3], ref[:, 1:3], 2.0 ** -18 * (x.double().abs() @ W.double().abs().T)[:, 1:3] + 1e-30)


@needs_launch
def test_sparse_strided_rows_and_empty_batch():
    base = make_x(3, 140, BF16)
    x = base[:, 3:133]
    W = random_sparse(19, 130, torch.int8, 0.9)
    v, bm, ro = compress(W)
    s = torch.rand(19) + 0.5
    xd = base.to(DEVICE)[:, 3:133]
    for path in ("gemv", "gemm"):
        assert_bits_equal(ksp.sparse_linear(xd, *to_dev(v, bm, ro, s), None, path=path),
                          reference.w8a8_linear(x, W, s))
    y0 = ksp.sparse_linear(*to_dev(x[:0], v, bm, ro, s), None)
    assert y0.shape == (0, 19)


requires_cuda = pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs a CUDA device")


@requires_cuda
@pytest.mark.parametrize("M", [1, 16, 128])
def test_sparse_cuda_bench_shapes(M):
    K, N = 2048, 8192
    x = make_x(M, K, BF16, special_rows=True)
    W = random_sparse(N, K, torch.int8, 0.9)
    s = torch.rand(N) * 0.02 + 1e-3
    b = torch.randn(N).to(BF16)
    y = ksp.sparse_linear(*to_dev(x, *compress(W), s, b, device="cuda"))
    assert_bits_equal(y, reference.w8a8_linear(x, W, s, b))
    xf = make_x(M, K, BF16)
    Wf = random_sparse(N, K, BF16, 0.9)
    y = ksp.sparse_linear(*to_dev(xf, *compress(Wf), None, b, device="cuda"))
    float_check(y.cpu(), xf, Wf, b, BF16)


@needs_launch
def test_sparse_backend_entry_reshapes_and_validates():
    from slmkern._backends import triton_sparse as ts

    x = make_x(6, 37, BF16, special_rows=True)
    W = random_sparse(19, 37, torch.int8, 0.9)
    v, bm, ro = compress(W)
    s = torch.rand(19) + 0.5
    xd, vd, bmd, rod, sd = to_dev(x.reshape(3, 2, 37), v, bm, ro, s)
    y = ts.sparse_linear_cuda(xd, vd, bmd, rod, sd, None, torch.zeros(3, dtype=torch.uint8))
    assert y.shape == (3, 2, 19)
    assert_bits_equal(y.reshape(6, 19), reference.w8a8_linear(x, W, s))
    with pytest.raises(ValueError, match="bitmask"):
        ts.sparse_linear_cuda(xd, vd, bmd[:, :4], rod, sd)
    with pytest.raises(ValueError, match="row_offsets"):
        ts.sparse_linear_cuda(xd, vd, bmd, rod[:-1], sd)
    with pytest.raises(TypeError, match="row_offsets"):
        ts.sparse_linear_cuda(xd, vd, bmd, rod.int(), sd)
    with pytest.raises(ValueError, match="scales"):
        ts.sparse_linear_cuda(xd, vd, bmd, rod, None)
    with pytest.raises(TypeError, match="values"):
        ts.sparse_linear_cuda(xd, vd.to(torch.int16), bmd, rod, sd)
    with pytest.raises(TypeError, match="values"):
        ts.sparse_linear_cuda(xd, vd.reshape(1, -1), bmd, rod, sd)
