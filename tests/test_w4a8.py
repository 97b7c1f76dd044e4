"""w4a8_linear (int4 weights, dynamic per-token int8 activations) on CPU: every ISA path vs the
float64 value of the spec's formula y = sx * sum_g (s*acc_g - (s*z)*asum_g) + bias."""
from __future__ import annotations

import logging

import pytest
import torch

import int4_spec as spec
from slmkern._backends import cpu as cpu_backend

OP = "w4a8_linear"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
KG = [(32, 32), (64, 64), (96, 32), (130, 130), (130, 10), (256, 64), (384, 128), (384, -1)]
MS = (0, 1, 2, 3, 17, 65)
NS = (1, 19, 33, 100)
ZEROS = ("sym", "u8", "f32")
ULP = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


def rand_weight(N: int, K: int, g: int, zk: str):
    G = K // (K if g == -1 else g)
    w = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8)
    s = torch.rand(N, G) * 0.1 + 0.01
    z = {"sym": None,
         "u8": torch.randint(0, 16, (N, G), dtype=torch.uint8),
         "f32": torch.rand(N, G) * 15}[zk]
    return w, s, z


def rand_x(M: int, K: int, dtype: torch.dtype, layout: str = "contig") -> torch.Tensor:
    x = torch.randn(M, K) * torch.exp(torch.randn(M, 1))
    if M * K:
        x.view(-1)[torch.randint(0, M * K, (max(1, M * K // 97),))] *= 20
    x = x.to(dtype)
    if layout == "rowstride":
        big = torch.zeros(M, K + 6, dtype=dtype)
        big[:, 3:3 + K] = x
        return big[:, 3:3 + K]
    if layout == "colstride":
        big = torch.zeros(M, 2 * K, dtype=dtype)
        big[:, ::2] = x
        return big[:, ::2]
    if layout == "3d":
        return x.reshape(1, M, K) if M else x.reshape(0, 2, K)
    return x


def tolerance(x, w, s, z, g, bias, ref, dtype):
    """fp32 epilogue error bound: a few ulps of sx * sum_g (|s*acc_g| + |s*z*asum_g|), plus output rounding."""
    sx, acc, asum, sd, sz = spec._w4a8_terms(x, w, s, z, g)
    mag = sx.double().abs().unsqueeze(1) * ((sd * acc).abs() + (sz * asum).abs()).sum(-1)
    mag = torch.nan_to_num(mag, nan=0.0).reshape(ref.shape)
    if bias is not None:
        mag = mag + bias.double().abs()
    return 4e-6 * mag + 2 * ULP[dtype] * ref.abs() + 1e-30


def run_and_check(x, w, s, z, g, bias, packed: bool):
    wp = cpu_backend.prepack_int4(w, s, z, g) if packed else None
    y = torch.ops.slmkern.w4a8_linear(x, w, s, z, g, bias, wp)
    N = w.shape[0]
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], N)
    ref = spec.w4a8_linear_f64(x, w, s, z, g, bias)
    tol = tolerance(x, w, s, z, g, bias, ref, x.dtype)
    err = (y.double() - ref).abs()
    bad = ~(err <= tol)
    assert not bad.any(), (f"{int(bad.sum())} of {bad.numel()} outputs off; worst err {float(err.max()):.3g} "
                           f"at tol {float(tol.flatten()[int(err.flatten().argmax())]):.3g}")
    return y


@pytest.mark.parametrize("zk", ZEROS)
@pytest.mark.parametrize("K,g", KG)
@pytest.mark.parametrize("M", MS)
def test_matches_spec(cpu_isa, M, K, g, zk):
    layouts = ("contig", "rowstride", "colstride", "3d")
    for i, N in enumerate(NS):
        dtype = DTYPES[(i + M) % 3]
        w, s, z = rand_weight(N, K, g, zk)
        bias = torch.randn(N).to(dtype if i % 2 else torch.float32) if i != 0 else None
        run_and_check(rand_x(M, K, dtype, layouts[(i + K) % 4]), w, s, z, g, bias, packed=(i % 3 != 1))



@pytest.mark.parametrize("M,K,N,g,zk", [(1, 2048, 2000, 128, "sym"), (130, 1024, 100, 64, "u8"),
                                        (40, 1024, 300, 32, "f32"), (13, 768, 1000, -1, "sym")])
def test_shapes_big_enough_to_split_across_threads(cpu_isa, M, K, N, g, zk):
    """Calls large enough to use every thread: tile and row-block splits of the task grid."""
    if cpu_isa == "ref":
        pytest.skip("the scalar spec is covered by the smaller shapes")
    w, s, z = rand_weight(N, K, g, zk)
    run_and_check(rand_x(M, K, torch.bfloat16), w, s, z, g, torch.randn(N), packed=True)

@pytest.mark.parametrize("bias_kind", ["none", "f32", "x"])
@pytest.mark.parametrize("zk", ZEROS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes(cpu_isa, dtype, zk, bias_kind):
    M, K, N, g = 17, 384, 33, 128
    w, s, z = rand_weight(N, K, g, zk)
    bias = {"none": None, "f32": torch.randn(N), "x": torch.randn(N).to(dtype)}[bias_kind]
    run_and_check(rand_x(M, K, dtype), w, s, z, g, bias, packed=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_nan_inf_rows(cpu_isa, dtype):
    """Zero rows give bias (scale 0); rows with NaN or inf give NaN (scale NaN), as in quantize_rows_s8."""
    M, K, N, g = 6, 64, 40, 32
    w, s, z = rand_weight(N, K, g, "f32")
    x = rand_x(M, K, dtype)
    bias = torch.randn(N)
    x[0] = 0
    x[1, 5] = float("nan")
    x[2, 7] = float("-inf")
    x[3] = 1e-35
    y = torch.ops.slmkern.w4a8_linear(x, w, s, z, g, bias, cpu_backend.prepack_int4(w, s, z, g))
    assert torch.equal(y[0], bias.to(dtype)) and torch.equal(y[3], bias.to(dtype))
    assert torch.isnan(y[1]).all() and torch.isnan(y[2]).all()
    keep = [0, 3, 4, 5]
    ref = spec.w4a8_linear_f64(x[keep], w, s, z, g, bias)
    assert ((y[keep].double() - ref).abs() <= tolerance(x[keep], w, s, z, g, bias, ref, dtype)).all()


def test_tolerance_catches_one_activation_off_by_one(cpu_isa):
    """The comparison can fail: the spec is fed qx with one element moved by 1 (a rounding slip)."""
    M, K, N, g = 3, 256, 19, 64
    w, s, z = rand_weight(N, K, g, "u8")
    x = rand_x(M, K, torch.float32)
    y = torch.ops.slmkern.w4a8_linear(x, w, s, z, g, None, cpu_backend.prepack_int4(w, s, z, g))
    sx, acc, asum, sd, sz = spec._w4a8_terms(x, w, s, z, g)
    u = spec.unpack_codes(w).double()
    k = 100
    acc[1, :, k // g] += u[:, k]      # qx[1, k] + 1
    asum[1, :, k // g] += 1
    ref_bad = sx.double().unsqueeze(1) * (sd * acc - sz * asum).sum(-1)
    tol = tolerance(x, w, s, z, g, None, ref_bad, torch.float32)
    bad = (y.double() - ref_bad).abs() > tol
    nz = (u[:, k] - z[:, k // g].double()) != 0      # outputs the slip changes
    assert torch.equal(bad[1], nz) and not bad[0].any() and not bad[2].any()


def test_op_isa_follows_forced_isa(cpu_isa):
    # no avx512-only w4a8: the avx512 level runs the avx2 kernel
    expect = {"ref": "ref", "avx2": "avx2", "avx512": "avx2", "avx512vnni": "avx512vnni"}[cpu_isa]
    assert cpu_backend.op_isa(OP) == expect


def test_repack_without_w_packed_logs_once(caplog):
    w, s, z = rand_weight(8, 64, 32, "u8")
    x = rand_x(2, 64, torch.float32)
    from slmkern import _logging
    _logging._seen.discard(f"{OP}-repack")
    with caplog.at_level(logging.INFO, logger="slmkern"):
        y1 = torch.ops.slmkern.w4a8_linear(x, w, s, z, 32)
        y2 = torch.ops.slmkern.w4a8_linear(x, w, s, z, 32)
    assert sum("repacks w on every call" in r.getMessage() for r in caplog.records) == 1
    assert torch.equal(y1, y2)


def test_simd_matches_cpp_reference_closely():
    """Each SIMD path against the scalar C++ spec on the same packed weight (same qx, same formula)."""
    if not cpu_backend.has_cpp():
        pytest.skip("slmkern._C is not built")
    M, K, N, g = 33, 512, 48, 128
    w, s, z = rand_weight(N, K, g, "u8")
    wp = cpu_backend.prepack_int4(w, s, z, g)
    x = rand_x(M, K, torch.float32)
    cpu_backend._C.set_isa("ref")
    try:
        ref = torch.ops.slmkern.w4a8_linear(x, w, s, z, g, None, wp)
        for isa in cpu_backend._C.available_isas()[1:]:
            cpu_backend._C.set_isa(isa)
            y = torch.ops.slmkern.w4a8_linear(x, w, s, z, g, None, wp)
            torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    finally:
        cpu_backend._C.set_isa("auto")


@pytest.mark.parametrize("zk", ZEROS)
def test_opcheck(zk):
    M, K, N, g = 5, 128, 24, 64
    w, s, z = rand_weight(N, K, g, zk)
    wp = cpu_backend.prepack_int4(w, s, z, g)
    for x, bias, packed in [(rand_x(M, K, torch.float32), None, wp),
                            (rand_x(M, K, torch.bfloat16).reshape(1, M, K), torch.randn(N), None),
                            (rand_x(M, K, torch.float16), torch.randn(N).half(), wp)]:
        torch.library.opcheck(torch.ops.slmkern.w4a8_linear.default, (x, w, s, z, g, bias, packed))


def _call(x, w, s, z, g, bias=None, wp=None):
    return torch.ops.slmkern.w4a8_linear(x, w, s, z, g, bias, wp)


def test_errors_name_the_argument():
    K, N, g = 64, 8, 32
    w, s, z = rand_weight(N, K, g, "u8")
    x = torch.randn(3, K)
    wp = cpu_backend.prepack_int4(w, s, z, g)
    with pytest.raises(ValueError, match="K .*must be even"):
        _call(torch.randn(3, 63), torch.zeros(N, 31, dtype=torch.uint8), s, None, 63)
    with pytest.raises(ValueError, match="group_size"):
        _call(x, w, torch.rand(N, 3), None, 24)
    with pytest.raises(TypeError, match="w must be torch.uint8"):
        _call(x, w.to(torch.int8), s, z, g)
    with pytest.raises(ValueError, match=r"w must have shape \(N, K/2\)"):
        _call(x, torch.zeros(N, K, dtype=torch.uint8), s, z, g)
    with pytest.raises(ValueError, match="w must be contiguous"):
        _call(x, torch.zeros(K // 2, N, dtype=torch.uint8).T, s, z, g)
    with pytest.raises(TypeError, match="scales must be torch.float32"):
        _call(x, w, s.double(), z, g)
    with pytest.raises(ValueError, match="zeros must have shape"):
        _call(x, w, s, z.T.contiguous(), g)
    z_bad = z.clone()
    z_bad[0, 0] = 200
    with pytest.raises(ValueError, match="zeros .*0..15"):
        _call(x, w, s, z_bad, g)
    with pytest.raises(ValueError, match="w_packed must be 1-D with"):
        _call(x, w, s, z, g, None, torch.cat([wp, wp]))
    with pytest.raises(ValueError, match="bias must have shape"):
        _call(x, w, s, z, g, torch.zeros(1, N))
