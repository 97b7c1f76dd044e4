"""torch.ops.slmkern.sparse_linear (unstructured bitmask weights) on CPU, every ISA path.

int8 values: bit-exact with reference.w8a8_linear on the decompressed int8 weight (torch.equal).
float values: within fp32 accumulation-order tolerance of reference.sparse_linear.
"""
from __future__ import annotations

import ctypes
import mmap
import threading

import pytest
import torch
from torch import nn

from slmkern import reference
from slmkern._backends import cpu as cpu_backend
from slmkern.formats import bitmask as bf

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SPARSITIES = (0.0, 0.5, 0.9, 0.99, 1.0)


def _vbmi2() -> bool:
    try:
        return "avx512_vbmi2" in open("/proc/cpuinfo").read()
    except OSError:
        return False


# avx512 without VNNI has no variant of its own; a VNNI CPU without VBMI2 runs avx2 too.
EXPECTED_VARIANT = {"ref": "ref", "avx2": "avx2", "avx512": "avx2",
                    "avx512vnni": "avx512vnni" if _vbmi2() else "avx2"}


def op(x, v, b, r, s=None, bias=None, wp=None):
    return torch.ops.slmkern.sparse_linear(x, v, b, r, s, bias, wp)


def sparse_weight(N, K, sp):
    return torch.randn(N, K) * (torch.rand(N, K) >= sp)


def float_case(N, K, sp, vdtype=torch.float32):
    v, b, r = bf.compress(sparse_weight(N, K, sp).to(vdtype))
    return v, b, r, None


def int8_case(N, K, sp):
    v, b, r, s = bf.compress_int8(sparse_weight(N, K, sp))
    return v, b, r, s


def bits(t):
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype])


def make_bias(kind, N, dtype):
    if kind == "none":
        return None
    return torch.randn(N, dtype=torch.float32 if kind == "fp32" else dtype)


def tol(dtype):
    return {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
            torch.float16: dict(rtol=2e-3, atol=2e-3)}[dtype]


def test_forced_isa_is_the_variant_that_runs(cpu_isa):
    assert cpu_backend.op_isa("sparse_linear") == EXPECTED_VARIANT[cpu_isa]


@pytest.mark.parametrize("sp", SPARSITIES)
@pytest.mark.parametrize("M", [0, 1, 2, 3, 17, 65])
def test_int8_values_bit_exact(cpu_isa, M, sp):
    for K, N in [(1, 3), (7, 13), (67, 29), (131, 37), (257, 5)]:
        x = torch.randn(M, K)
        v, b, r, s = int8_case(N, K, sp)
        wp = cpu_backend.prepack_bitmask(v, b, r, K, s)
        W8 = bf.decompress(v, b, r, K)
        for kind in ("none", "fp32"):
            bias = make_bias(kind, N, torch.float32)
            y = op(x, v, b, r, s, bias, wp)
            assert y.shape == (M, N) and y.dtype == torch.float32
            assert torch.equal(y, reference.w8a8_linear(x, W8, s, bias)), (K, N, kind)
            assert torch.equal(y, reference.sparse_linear(x, v, b, r, s, bias)), (K, N, kind)


@pytest.mark.parametrize("sp", SPARSITIES)
@pytest.mark.parametrize("M", [0, 1, 2, 3, 17, 65])
def test_float_values_match_reference(cpu_isa, M, sp):
    for K, N in [(1, 3), (7, 13), (67, 29), (131, 37), (257, 5)]:
        x = torch.randn(M, K)
        v, b, r, _ = float_case(N, K, sp)
        wp = cpu_backend.prepack_bitmask(v, b, r, K)
        for kind in ("none", "fp32"):
            bias = make_bias(kind, N, torch.float32)
            y = op(x, v, b, r, None, bias, wp)
            assert y.shape == (M, N) and y.dtype == torch.float32
            torch.testing.assert_close(y, reference.sparse_linear(x, v, b, r, None, bias), **tol(torch.float32))


@pytest.mark.parametrize("vdtype", DTYPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_half_activations_and_values(cpu_isa, dtype, vdtype):
    for M, K, N in [(1, 131, 37), (5, 67, 29), (70, 64, 9)]:
        x = torch.randn(M, K).to(dtype)
        v, b, r, _ = float_case(N, K, 0.7, vdtype)
        wp = cpu_backend.prepack_bitmask(v, b, r, K)
        for kind in ("none", "fp32", "xdtype"):
            bias = make_bias(kind, N, dtype)
            y = op(x, v, b, r, None, bias, wp)
            assert y.dtype == dtype
            torch.testing.assert_close(y, reference.sparse_linear(x, v, b, r, None, bias), **tol(dtype))
        v8, b8, r8, s8 = int8_case(N, K, 0.7)
        bias = make_bias("xdtype", N, dtype)
        y8 = op(x, v8, b8, r8, s8, bias, cpu_backend.prepack_bitmask(v8, b8, r8, K, s8))
        assert torch.equal(bits(y8), bits(reference.w8a8_linear(x, bf.decompress(v8, b8, r8, K), s8, bias)))


@pytest.mark.parametrize("M", [1, 4, 16, 128])
def test_larger_shapes(cpu_isa, M):
    K, N = (576, 300) if M <= 16 else (384, 130)
    x = torch.randn(M, K)
    bias = torch.randn(N)
    for sp in (0.5, 0.9):
        v, b, r, _ = float_case(N, K, sp)
        torch.testing.assert_close(op(x, v, b, r, None, bias, cpu_backend.prepack_bitmask(v, b, r, K)),
                                   reference.sparse_linear(x, v, b, r, None, bias), rtol=1e-4, atol=1e-4)
        v, b, r, s = int8_case(N, K, sp)
        assert torch.equal(op(x, v, b, r, s, bias, cpu_backend.prepack_bitmask(v, b, r, K, s)),
                           reference.w8a8_linear(x, bf.decompress(v, b, r, K), s, bias))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bitwise_equal_to_cpp_reference(cpu_isa, dtype):
    x = torch.randn(9, 70).to(dtype)
    x[4, 3] = float("nan")
    v, b, r, s = int8_case(45, 70, 0.8)
    wp = cpu_backend.prepack_bitmask(v, b, r, 70, s)
    torch.manual_seed(1)
    bias = torch.randn(45)
    y = op(x, v, b, r, s, bias, wp)
    cpu_backend._C.set_isa("ref")
    try:
        want = op(x, v, b, r, s, bias, wp)
    finally:
        cpu_backend._C.set_isa(cpu_isa)
    assert torch.equal(bits(y), bits(want))


def test_leading_dims_and_strided_x(cpu_isa):
    K, N = 67, 29
    v, b, r, s = int8_case(N, K, 0.8)
    wp = cpu_backend.prepack_bitmask(v, b, r, K, s)
    x3 = torch.randn(2, 3, K + 5)[..., :K]
    y = op(x3, v, b, r, s, None, wp)
    assert y.shape == (2, 3, N)
    assert torch.equal(y, reference.sparse_linear(x3, v, b, r, s, None))
    xt = torch.randn(K, 6).t()
    assert torch.equal(op(xt, v, b, r, s, None, wp), reference.sparse_linear(xt, v, b, r, s, None))
    fv, fb, fr, _ = float_case(N, K, 0.8)
    torch.testing.assert_close(op(x3, fv, fb, fr, None, None, cpu_backend.prepack_bitmask(fv, fb, fr, K)),
                               reference.sparse_linear(x3, fv, fb, fr))


@pytest.mark.parametrize("M", [2, 9])  # below and above the float broadcast path's M threshold
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_inf_like_dense(cpu_isa, M, dtype):
    K, N = 130, 33
    x = torch.randn(M, K).to(dtype)
    x[0, 17] = float("nan")
    x[M - 1, K - 1] = float("inf")
    W = sparse_weight(N, K, 0.5)
    W[:5, K - 1] = 0.0   # inf * 0 -> NaN, as in a dense matmul
    W[5:, K - 1] = 1.0
    v, b, r = bf.compress(W)
    y = op(x, v, b, r, None, None, cpu_backend.prepack_bitmask(v, b, r, K))
    want = reference.sparse_linear(x, v, b, r)
    assert torch.isnan(y[0]).all() and torch.isnan(y[M - 1, :5]).all() and torch.isinf(y[M - 1, 5:]).all()
    torch.testing.assert_close(y, want, equal_nan=True, **tol(dtype))
    v8, b8, r8, s8 = bf.compress_int8(W)
    y8 = op(x, v8, b8, r8, s8, None, cpu_backend.prepack_bitmask(v8, b8, r8, K, s8))
    assert torch.isnan(y8[0]).all() and torch.isnan(y8[M - 1]).all()
    # NaN payloads differ between torch's conversions and the kernels' spec: compare the rest exactly
    want8 = reference.w8a8_linear(x, bf.decompress(v8, b8, r8, K), s8)
    assert torch.equal(torch.isnan(y8), torch.isnan(want8))
    assert torch.equal(y8[1:M - 1], want8[1:M - 1])


def test_all_zero_weight_gives_bias(cpu_isa):
    K, N = 77, 10
    W = torch.zeros(N, K)
    bias = torch.randn(N)
    x = torch.randn(4, K)
    v, b, r = bf.compress(W)
    assert v.numel() == 0
    assert torch.equal(op(x, v, b, r, None, bias, cpu_backend.prepack_bitmask(v, b, r, K)), bias.expand(4, N))
    v8, b8, r8, s8 = bf.compress_int8(W)
    assert torch.equal(op(x, v8, b8, r8, s8, bias, cpu_backend.prepack_bitmask(v8, b8, r8, K, s8)), bias.expand(4, N))


def test_without_w_packed_equals_with(cpu_isa):
    K, N = 131, 33
    x = torch.randn(17, K)
    v, b, r, s = int8_case(N, K, 0.9)
    assert torch.equal(op(x, v, b, r, s), op(x, v, b, r, s, None, cpu_backend.prepack_bitmask(v, b, r, K, s)))
    v, b, r, _ = float_case(N, K, 0.9)
    assert torch.equal(op(x, v, b, r), op(x, v, b, r, None, None, cpu_backend.prepack_bitmask(v, b, r, K)))


class GuardedBuffer:
    """A tensor whose last byte is followed by a PROT_NONE page: reading past it crashes."""

    def __init__(self, t: torch.Tensor):
        page = mmap.PAGESIZE
        nbytes = t.numel() * t.element_size()
        n = max(page, -(-nbytes // page) * page)
        self._map = mmap.mmap(-1, n + page)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        if libc.mprotect(addr + n, page, 0) != 0:
            raise OSError(ctypes.get_errno(), "mprotect failed")
        raw = torch.frombuffer(self._map, dtype=torch.uint8, count=n)[n - nbytes:]
        self.tensor = raw.view(t.dtype).view(t.shape)
        self.tensor.copy_(t)


@pytest.mark.skipif(not hasattr(mmap, "PAGESIZE") or not hasattr(ctypes, "CDLL"), reason="needs mmap/mprotect")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_never_reads_past_inputs(cpu_isa, dtype):
    for M, K, N, sp in [(1, 1, 1, 0.0), (3, 3, 19, 0.5), (5, 37, 33, 0.99), (7, 130, 100, 0.0), (2, 71, 16, 1.0),
                        (66, 65, 7, 0.3)]:
        x = GuardedBuffer(torch.randn(M, K).to(dtype))
        bias = GuardedBuffer(torch.randn(N))
        v, b, r, s = int8_case(N, K, sp)
        sg = GuardedBuffer(s)
        wp = GuardedBuffer(cpu_backend.prepack_bitmask(v, b, r, K, s))
        y = op(x.tensor, v, b, r, sg.tensor, bias.tensor, wp.tensor)
        assert torch.equal(y, reference.sparse_linear(x.tensor, v, b, r, s, bias.tensor)), (M, K, N)
        fv, fb, fr, _ = float_case(N, K, sp)
        fwp = GuardedBuffer(cpu_backend.prepack_bitmask(fv, fb, fr, K))
        y = op(x.tensor, fv, fb, fr, None, bias.tensor, fwp.tensor)
        torch.testing.assert_close(y, reference.sparse_linear(x.tensor, fv, fb, fr, None, bias.tensor),
                                   **tol(dtype))


def test_calls_from_several_threads(cpu_isa):
    cases = []
    for M, K, N in [(1, 384, 100), (17, 37, 19), (65, 130, 33), (3, 576, 200)]:
        x, bias = torch.randn(M, K), torch.randn(N)
        v, b, r, s = int8_case(N, K, 0.8)
        cases.append((x, v, b, r, s, bias, cpu_backend.prepack_bitmask(v, b, r, K, s),
                      reference.sparse_linear(x, v, b, r, s, bias)))
    errors = []

    def work(i):
        try:
            for j in range(15):
                x, v, b, r, s, bias, wp, want = cases[(i + j) % len(cases)]
                if not torch.equal(op(x, v, b, r, s, bias, wp), want):
                    errors.append((i, j))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_autograd_through_decompressed_weight():
    K, N = 37, 19
    for v, b, r, s in (float_case(N, K, 0.6), int8_case(N, K, 0.6)):
        x = torch.randn(4, K, requires_grad=True)
        bias = torch.randn(N, requires_grad=True)
        y = op(x, v, b, r, s, bias)
        g = torch.randn_like(y)
        y.backward(g)
        W = bf.dequantize(v, b, r, K, s)
        torch.testing.assert_close(x.grad, g @ W)
        torch.testing.assert_close(bias.grad, g.sum(0))


def test_opcheck():
    K, N = 37, 19
    v, b, r, s = int8_case(N, K, 0.7)
    wp = cpu_backend.prepack_bitmask(v, b, r, K, s)
    fv, fb, fr, _ = float_case(N, K, 0.7)
    fwp = cpu_backend.prepack_bitmask(fv, fb, fr, K)
    for args in [(torch.randn(3, K), v, b, r, s, torch.randn(N), wp),
                 (torch.randn(2, 3, K).bfloat16(), v, b, r, s, None, None),
                 (torch.randn(4, K), fv, fb, fr, None, torch.randn(N), fwp),
                 (torch.randn(4, K).half(), fv, fb, fr, None, torch.randn(N).half(), None)]:
        torch.library.opcheck(torch.ops.slmkern.sparse_linear.default, args)


class SparseMLP(nn.Module):
    def __init__(self, K=40, N=24):
        super().__init__()
        W = sparse_weight(N, K, 0.8)
        v, b, r, s = bf.compress_int8(W)
        self.K = K
        for name, t in zip(("v", "b", "r", "s"), (v, b, r, s)):
            self.register_buffer(name, t)
        self.register_buffer("wp", cpu_backend.prepack_bitmask(v, b, r, K, s))
        fv, fb, fr = bf.compress(sparse_weight(8, N, 0.5))
        for name, t in zip(("fv", "fb", "fr"), (fv, fb, fr)):
            self.register_buffer(name, t)
        self.register_buffer("fwp", cpu_backend.prepack_bitmask(fv, fb, fr, N))
        self.bias = nn.Parameter(torch.randn(N))

    def forward(self, x):
        h = torch.ops.slmkern.sparse_linear(x, self.v, self.b, self.r, self.s, self.bias, self.wp)
        h = torch.nn.functional.gelu(h)
        return torch.ops.slmkern.sparse_linear(h, self.fv, self.fb, self.fr, None, None, self.fwp)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    model = SparseMLP().eval()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    with torch.no_grad():
        for x in (torch.randn(5, 40), torch.randn(3, 7, 40)):
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


class TestBadInputs:
    K, N = 21, 6

    def setup_method(self):
        W = sparse_weight(self.N, self.K, 0.5)
        W[0, 0] = 1.0
        self.x = torch.randn(3, self.K)
        self.v, self.b, self.r, self.s = bf.compress_int8(W)
        self.fv, self.fb, self.fr = bf.compress(W)

    def call(self, exc, match, **kw):
        a = dict(x=self.x, v=self.v, b=self.b, r=self.r, s=self.s, bias=None, wp=None)
        a.update(kw)
        with pytest.raises(exc, match=match):
            op(a["x"], a["v"], a["b"], a["r"], a["s"], a["bias"], a["wp"])

    def test_x(self):
        self.call(TypeError, r"\bx\b", x=self.x.double())
        self.call(ValueError, r"bitmask.*K=29", x=torch.randn(3, self.K + 8))

    def test_values_row_offsets_length_mismatch(self):
        self.call(ValueError, r"values.*length|length mismatch", v=self.v[:-1])
        self.call(ValueError, r"row_offsets", r=self.r[:-1])

    def test_non_monotone_offsets(self):
        r = self.r.clone()
        r[2], r[3] = int(r[3]) + 1, int(r[2])
        self.call(ValueError, r"row_offsets.*non-decreasing", r=r)

    def test_popcount_mismatch(self):
        b = self.b.clone()
        b[1, 1] ^= 2
        self.call(ValueError, r"popcount", b=b)

    def test_padding_bits(self):
        b = self.b.clone()
        b[3, -1] |= 0x40
        r = self.r.clone()
        r[4:] += 1
        v = torch.cat([self.v, torch.ones(1, dtype=torch.int8)])
        self.call(ValueError, r"past column|padding", b=b, r=r, v=v)

    def test_dtypes(self):
        self.call(TypeError, r"bitmask", b=self.b.to(torch.int16))
        self.call(TypeError, r"row_offsets", r=self.r.int())
        self.call(TypeError, r"values", v=self.v.to(torch.int16))
        self.call(TypeError, r"scales", s=None)                       # int8 values without scales
        self.call(TypeError, r"scales", v=self.fv, b=self.fb, r=self.fr)  # float values with scales
        self.call(TypeError, r"scales", s=self.s.double())
        self.call(ValueError, r"scales", s=self.s[:-1])
        self.call(TypeError, r"bias", bias=torch.randn(self.N).double())
        self.call(ValueError, r"bias", bias=torch.randn(self.N + 1))

    def test_int8_minus_128(self):
        v = self.v.clone()
        v[0] = -128
        self.call(ValueError, r"-128", v=v)

    def test_w_packed_shape_and_dtype(self):
        wp = cpu_backend.prepack_bitmask(self.v, self.b, self.r, self.K, self.s)
        self.call(ValueError, r"w_packed", wp=wp[:-1])
        self.call(TypeError, r"w_packed", wp=wp.view(torch.int8))
        # a w_packed built for float values does not fit int8 values of the same mask
        fwp = cpu_backend.prepack_bitmask(self.fv, self.fb, self.fr, self.K)
        self.call(ValueError, r"w_packed", wp=fwp)

    def test_fast_check_agrees_with_full_check(self):
        """ops.sparse_linear_ok (the per-call fast pass) accepts exactly what check_sparse_linear accepts."""
        from slmkern import ops
        wp = cpu_backend.prepack_bitmask(self.v, self.b, self.r, self.K, self.s)
        fwp = cpu_backend.prepack_bitmask(self.fv, self.fb, self.fr, self.K)
        base = dict(x=self.x, v=self.v, b=self.b, r=self.r, s=self.s, bias=None, wp=wp)
        cases = [{}, dict(bias=torch.randn(self.N)), dict(bias=torch.randn(self.N).double()),
                 dict(bias=torch.randn(self.N + 1)), dict(x=self.x.double()), dict(x=self.x.bfloat16()),
                 dict(x=torch.randn(3, self.K + 8)), dict(v=self.v[:-1]), dict(r=self.r[:-1]),
                 dict(b=self.b.to(torch.int16)), dict(r=self.r.int()), dict(v=self.v.to(torch.int16)),
                 dict(s=None), dict(s=self.s.double()), dict(s=self.s[:-1]), dict(wp=None), dict(wp=wp[:-1]),
                 dict(wp=wp.view(torch.int8)), dict(wp=fwp), dict(v=self.fv, b=self.fb, r=self.fr, s=None, wp=fwp),
                 dict(v=self.fv, b=self.fb, r=self.fr, wp=fwp), dict(b=self.b[:, :-1])]
        for kw in cases:
            a = dict(base, **kw)
            args = (a["x"], a["v"], a["b"], a["r"], a["s"], a["bias"], a["wp"])
            try:
                ops.check_sparse_linear(*args)
                full = a["wp"] is not None
            except (TypeError, ValueError):
                full = False
            assert ops.sparse_linear_ok(*args) == full, sorted(kw)


@pytest.mark.parametrize("path", [1, 2, 3, 4], ids=["expand", "broadcast", "dense", "blocks"])
def test_avx512_paths_forced(path):
    """The avx512vnni variant picks its path by cost (int8: expand, broadcast, dense w8a8, 4-blocks;
    float: expand, broadcast); force each on every shape."""
    if not cpu_backend.has_cpp() or cpu_backend.op_isa("sparse_linear") != "avx512vnni":
        pytest.skip("the avx512vnni sparse variant does not run on this CPU")
    cpu_backend._C.sparse_force_path(path)
    try:
        for M, K, N, sp in [(1, 131, 17, 0.9), (3, 67, 5, 0.5), (16, 1, 3, 0.0), (17, 200, 33, 0.0),
                            (65, 129, 7, 0.99), (130, 77, 9, 0.7), (5, 64, 3, 1.0)]:
            x, bias = torch.randn(M, K), torch.randn(N)
            x[M // 2, K // 2] = float("inf")  # broadcast skips zero weights: the dense-semantics fixup must run
            v, b, r, _ = float_case(N, K, sp)
            torch.testing.assert_close(op(x, v, b, r, None, bias, cpu_backend.prepack_bitmask(v, b, r, K)),
                                       reference.sparse_linear(x, v, b, r, None, bias), equal_nan=True)
            v, b, r, s = int8_case(N, K, sp)
            y = op(x, v, b, r, s, bias, cpu_backend.prepack_bitmask(v, b, r, K, s))
            want = reference.w8a8_linear(x, bf.decompress(v, b, r, K), s, bias)
            assert torch.equal(torch.isnan(y), torch.isnan(want)), (M, K, N, sp)
            assert torch.equal(y.nan_to_num(), want.nan_to_num()), (M, K, N, sp)
    finally:
        cpu_backend._C.sparse_force_path(0)


@pytest.mark.parametrize("path", [1, 2, 3, 4], ids=["expand", "broadcast", "dense", "blocks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_avx512_int8_paths_bit_exact(path, dtype):
    """Every forced int8 path of the avx512vnni variant equals w8a8_linear's reference bit for bit, in
    every activation dtype, with and without bias; the dense path's several expansion groups
    (K = 8200 -> 256-row groups, N = 300: a partial last group and a partial 16-row tile), 100%
    sparse rows, M across tile borders (8 / 16 / 64 rows)."""
    if not cpu_backend.has_cpp() or cpu_backend.op_isa("sparse_linear") != "avx512vnni":
        pytest.skip("the avx512vnni sparse variant does not run on this CPU")
    gen = torch.Generator().manual_seed(path)
    cpu_backend._C.sparse_force_path(path)
    try:
        for M, K, N, sp in [(2, 8200, 300, 0.9), (9, 100, 33, 0.5), (17, 257, 31, 0.95), (65, 64, 17, 0.0),
                            (1, 70, 40, 0.8), (8, 130, 24, 1.0)]:
            v, b, r, s = int8_case(N, K, sp)
            keep = torch.ones(N, dtype=torch.bool)
            keep[::7] = False  # some 100% sparse rows
            w = bf.decompress(v, b, r, K) * keep.unsqueeze(1).to(torch.int8)
            v, b, r = bf.compress(w)
            x = torch.randn(M, K, generator=gen).to(dtype)
            wp = cpu_backend.prepack_bitmask(v, b, r, K, s)
            for bias in (None, torch.randn(N, generator=gen)):
                y = op(x, v, b, r, s, bias, wp)
                want = reference.w8a8_linear(x, w, s, bias)
                assert y.dtype == dtype
                assert torch.equal(y, want), (path, dtype, M, K, N, sp)
    finally:
        cpu_backend._C.sparse_force_path(0)
