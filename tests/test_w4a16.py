"""w4a16_linear (int4 weights, float activations) on CPU: every ISA path vs the float64 spec,
plus the int4 CPU packed layout shared with w4a8_linear."""
from __future__ import annotations

import logging
import threading

import pytest
import torch

import int4_spec as spec
from slmkern._backends import cpu as cpu_backend
from slmkern.formats import int4_cpu

OP = "w4a16_linear"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (K, group_size): the usual group sizes, per-channel (g = K, also as -1), and
# groups that are not whole 8-k blocks (130/130, 130/10: padded inside the layout).
KG = [(32, 32), (64, 64), (96, 32), (130, 130), (130, 10), (256, 64), (384, 128), (384, -1)]
MS = (0, 1, 2, 3, 17, 65)
NS = (1, 19, 33, 100)
ZEROS = ("sym", "u8", "f32")
# output rounding: one ulp of the result dtype, relative
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
    """Rows of different magnitudes with a few outliers, in one of several memory layouts."""
    x = torch.randn(M, K) * torch.exp(torch.randn(M, 1))
    if M * K:
        x.view(-1)[torch.randint(0, M * K, (max(1, M * K // 97),))] *= 20
    x = x.to(dtype)
    if layout == "rowstride":    # row stride > K
        big = torch.zeros(M, K + 6, dtype=dtype)
        big[:, 3:3 + K] = x
        return big[:, 3:3 + K]
    if layout == "colstride":    # last dim not contiguous
        big = torch.zeros(M, 2 * K, dtype=dtype)
        big[:, ::2] = x
        return big[:, ::2]
    if layout == "3d":
        return x.reshape(1, M, K) if M else x.reshape(0, 2, K)
    return x


def abs_weight(w, s, z, g):
    return spec.dequantize(w, s, z, g, torch.float64).abs()


def tolerance(x, w, s, z, g, bias, ref, dtype):
    """fp32-accumulation error bound (relative to sum |x||W|) plus output rounding."""
    K = x.shape[-1]
    mag = x.reshape(-1, K).double().abs() @ abs_weight(w, s, z, g).T
    mag = mag.reshape(ref.shape)
    if bias is not None:
        mag = mag + bias.double().abs()
    return 1e-5 * mag + 2 * ULP[dtype] * ref.abs() + 1e-30


def run_and_check(x, w, s, z, g, bias, packed: bool):
    wp = cpu_backend.prepack_int4(w, s, z, g) if packed else None
    y = torch.ops.slmkern.w4a16_linear(x, w, s, z, g, bias, wp)
    N = w.shape[0]
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], N)
    ref = spec.w4a16_linear_f64(x, w, s, z, g, bias)
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
@pytest.mark.parametrize("M", [1, 7])
def test_zero_nan_inf_rows(cpu_isa, M, dtype):
    """A zero row gives bias; NaN/inf rows give the IEEE result of the fp32 dot product."""
    K, N, g = 64, 40, 32
    w, s, z = rand_weight(N, K, g, "u8")
    x = rand_x(M, K, dtype)
    bias = torch.randn(N)
    x[0] = 0
    if M > 1:
        x[1, 5] = float("nan")
        x[2, 7] = float("inf")
        x[3, 9] = float("-inf")
        x[3, 11] = float("inf")
        x[4] = 1e-35            # tiny but nonzero (below the fixed-point threshold)
    y = torch.ops.slmkern.w4a16_linear(x, w, s, z, g, bias, cpu_backend.prepack_int4(w, s, z, g))
    ref = spec.w4a16_linear_f64(x, w, s, z, g, bias)
    assert torch.equal(y[0], bias.to(dtype))
    if M > 1:
        assert torch.isnan(y[1]).all()
        for r in (2, 3):
            yr, rr = y[r].double(), ref[r]
            assert torch.equal(torch.isnan(yr), torch.isnan(rr))
            fin = ~torch.isnan(rr)
            assert torch.equal(yr[fin], rr[fin])  # +-inf, same signs
        keep = [0, 4, 5, 6]
        tol = tolerance(x[keep], w, s, z, g, bias, ref[keep], dtype)
        assert ((y[keep].double() - ref[keep]).abs() <= tol).all()


def test_tolerance_catches_one_wrong_code(cpu_isa):
    """The comparison above can fail: flip one 4-bit code of the weight the spec sees."""
    M, K, N, g = 3, 256, 19, 64
    w, s, z = rand_weight(N, K, g, "sym")
    x = rand_x(M, K, torch.float32)
    y = torch.ops.slmkern.w4a16_linear(x, w, s, z, g, None, cpu_backend.prepack_int4(w, s, z, g))
    w_bad = w.clone()
    w_bad[7, 40] ^= 0x30  # high nibble of byte 40: k = 81
    ref_bad = spec.w4a16_linear_f64(x, w_bad, s, z, g)
    tol = tolerance(x, w_bad, s, z, g, None, ref_bad, torch.float32)
    bad = (y.double() - ref_bad).abs() > tol
    assert bad[:, 7].all() and not bad[:, :7].any() and not bad[:, 8:].any()


def test_op_isa_follows_forced_isa(cpu_isa):
    expect = {"ref": "ref", "avx2": "avx2", "avx512": "avx512", "avx512vnni": "avx512vnni"}[cpu_isa]
    assert cpu_backend.op_isa(OP) == expect


def test_repack_without_w_packed_logs_once(caplog):
    w, s, z = rand_weight(8, 64, 32, "sym")
    x = rand_x(2, 64, torch.float32)
    from slmkern import _logging
    _logging._seen.discard(f"{OP}-repack")
    with caplog.at_level(logging.INFO, logger="slmkern"):
        y1 = torch.ops.slmkern.w4a16_linear(x, w, s, z, 32)
        y2 = torch.ops.slmkern.w4a16_linear(x, w, s, z, 32)
    assert sum("repacks w on every call" in r.getMessage() for r in caplog.records) == 1
    assert torch.equal(y1, y2)


def test_concurrent_calls_from_python_threads():
    M, K, N, g = 9, 256, 70, 64
    cases = [(rand_x(M, K, torch.float32),) + rand_weight(N, K, g, zk) for zk in ZEROS]
    packed = [cpu_backend.prepack_int4(w, s, z, g) for _, w, s, z in cases]
    expect = [torch.ops.slmkern.w4a16_linear(x, w, s, z, g, None, wp) for (x, w, s, z), wp in zip(cases, packed)]
    errors = []

    def worker(i):
        try:
            for _ in range(20):
                j = i % 3
                x, w, s, z = cases[j]
                if not torch.equal(torch.ops.slmkern.w4a16_linear(x, w, s, z, g, None, packed[j]), expect[j]):
                    errors.append(i)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


@pytest.mark.parametrize("zk", ZEROS)
def test_opcheck(zk):
    M, K, N, g = 5, 128, 24, 64
    w, s, z = rand_weight(N, K, g, zk)
    wp = cpu_backend.prepack_int4(w, s, z, g)
    for x, bias, packed in [(rand_x(M, K, torch.float32), None, wp),
                            (rand_x(M, K, torch.bfloat16).reshape(1, M, K), torch.randn(N), None),
                            (rand_x(M, K, torch.float16), torch.randn(N).half(), wp)]:
        torch.library.opcheck(torch.ops.slmkern.w4a16_linear.default, (x, w, s, z, g, bias, packed))


# ----------------------------------------------------------------------------- errors
def _call(x, w, s, z, g, bias=None, wp=None):
    return torch.ops.slmkern.w4a16_linear(x, w, s, z, g, bias, wp)


def test_errors_name_the_argument():
    K, N, g = 64, 8, 32
    w, s, z = rand_weight(N, K, g, "u8")
    x = torch.randn(3, K)
    wp = cpu_backend.prepack_int4(w, s, z, g)
    with pytest.raises(ValueError, match="K .*must be even"):
        _call(torch.randn(3, 63), torch.zeros(N, 31, dtype=torch.uint8), s, None, 63)
    with pytest.raises(ValueError, match="group_size"):
        _call(x, w, torch.rand(N, 3), None, 24)               # 64 % 24 != 0
    with pytest.raises(ValueError, match="group_size"):
        _call(x, w, torch.rand(N, 64 // 3 + 1), None, 3)      # odd group
    with pytest.raises(TypeError, match="w must be torch.uint8"):
        _call(x, w.to(torch.int8), s, z, g)
    with pytest.raises(ValueError, match=r"w must have shape \(N, K/2\)"):
        _call(x, torch.zeros(N, K, dtype=torch.uint8), s, z, g)
    with pytest.raises(ValueError, match="w must be contiguous"):
        _call(x, torch.zeros(K // 2, N, dtype=torch.uint8).T, s, z, g)
    with pytest.raises(TypeError, match="scales must be torch.float32"):
        _call(x, w, s.half(), z, g)
    with pytest.raises(ValueError, match="scales must have shape"):
        _call(x, w, s[:, :1], z, g)
    with pytest.raises(TypeError, match="zeros must be None, torch.uint8"):
        _call(x, w, s, z.to(torch.int32), g)
    with pytest.raises(ValueError, match="zeros must have shape"):
        _call(x, w, s, z[:, :1].contiguous(), g)
    z_bad = z.clone()
    z_bad[2, 1] = 16
    with pytest.raises(ValueError, match="zeros .*0..15"):
        _call(x, w, s, z_bad, g)
    with pytest.raises(ValueError, match="zeros.*0..15"):
        cpu_backend.prepack_int4(w, s, z_bad, g)
    with pytest.raises(ValueError, match="w_packed must be 1-D with"):
        _call(x, w, s, z, g, None, wp[:-1])
    with pytest.raises(ValueError, match="w_packed must be 1-D with"):
        _call(x, w, s, None, g, None, wp)                      # packed with zeros, called without
    with pytest.raises(TypeError, match="w_packed must be torch.uint8"):
        _call(x, w, s, z, g, None, wp.view(torch.int8))
    with pytest.raises(TypeError, match="bias must be"):
        _call(x, w, s, z, g, torch.zeros(N, dtype=torch.float64))
    with pytest.raises(ValueError, match="bias must have shape"):
        _call(x, w, s, z, g, torch.zeros(N + 1))
    with pytest.raises(TypeError, match="x must be a float32"):
        _call(x.to(torch.int32), w, s, z, g)
    with pytest.raises(ValueError, match="x has|w must have shape"):
        _call(torch.randn(3, K + 2), w, s, z, g)


def test_errors_on_meta_tensors_too():
    """The fake kernel raises the same errors (torch.compile / export see them)."""
    K, N, g = 64, 8, 32
    x = torch.empty(3, K, device="meta")
    w = torch.empty(N, K // 2, dtype=torch.uint8, device="meta")
    s = torch.empty(N, K // g, device="meta")
    assert _call(x, w, s, None, g).shape == (3, N)
    with pytest.raises(ValueError, match="group_size"):
        _call(x, w, s, None, 48)
    with pytest.raises(ValueError, match="scales must have shape"):
        _call(x, w, torch.empty(N, 1, device="meta"), None, g)


# ----------------------------------------------------------------------------- packed layout
@pytest.mark.parametrize("zk", ZEROS)
@pytest.mark.parametrize("N,K,g", [(1, 32, 32), (19, 130, 10), (33, 96, 32), (100, 384, 128), (16, 384, -1),
                                   (17, 130, 130)])
def test_cpp_pack_matches_reference_pack(N, K, g, zk):
    if not cpu_backend.has_cpp():
        pytest.skip("slmkern._C is not built")
    w, s, z = rand_weight(N, K, g, zk)
    packed = cpu_backend.prepack_int4(w, s, z, g)
    assert packed.dtype == torch.uint8 and packed.numel() == int4_cpu.packed_bytes(N, K, g, z is not None)
    assert torch.equal(packed, int4_cpu.pack_reference(w, s, z, g))


@pytest.mark.parametrize("N,K,g,zk", [(19, 130, 10, "u8"), (33, 96, 32, "sym"), (5, 64, 64, "f32")])
def test_pack_layout_is_the_documented_one(N, K, g, zk):
    """Read every code and scale back through the documented index formula."""
    w, s, z = rand_weight(N, K, g, zk)
    blob = int4_cpu.pack_reference(w, s, z, g)
    L = int4_cpu.layout(N, K, g, z is not None)
    u = spec.unpack_codes(w)
    for n in range(-(-N // 16) * 16):
        t, i = divmod(n, 16)
        for q in range(L["G"]):
            base = t * L["tile_bytes"] + q * L["group_bytes"]
            for kk in range(L["gp"]):
                b, j = divmod(kk, 8)
                byte = int(blob[base + b * 64 + 4 * i + (j % 4)])
                code = byte & 0xF if j < 4 else byte >> 4
                expect = int(u[n, q * L["g"] + kk]) if (n < N and kk < L["g"]) else 0
                assert code == expect, (n, q, kk)
            meta = blob[base + L["nblk"] * 64: base + L["group_bytes"]].view(torch.float32)
            assert float(meta[i]) == (float(s[n, q]) if n < N else 0.0)
            if z is not None:
                expect_sz = float(torch.tensor(float(s[n, q])) * z[n, q].float()) if n < N else 0.0
                assert float(meta[16 + i]) == expect_sz
