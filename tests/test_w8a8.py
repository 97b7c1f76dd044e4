"""torch.ops.slmkern.w8a8_linear on CPU: every ISA path bit-exact with slmkern.reference.

Every test runs under both activation schemes ("int8" symmetric, "int7" asymmetric 7-bit): the
autouse ``activations`` fixture sets ACT, which ``op`` and ``ref`` pass on.

Integer accumulation is exact and the fp32 epilogue has a fixed operation
order, so every comparison here is exact equality (torch.equal), never a tolerance.
"""
from __future__ import annotations

import ctypes
import mmap
import threading

import pytest
import torch

from slmkern import reference
from slmkern._backends import cpu as cpu_backend
from slmkern._backends.cpu import prepack_int8

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The w8a8 variant each forced ISA cap runs (no AVX-512-without-VNNI variant: avx2 runs there).
EXPECTED_VARIANT = {"ref": "ref", "avx2": "avx2", "avx512": "avx2", "avx512vnni": "avx512vnni"}


def rand_w(N: int, K: int) -> torch.Tensor:
    return torch.randint(-127, 128, (N, K), dtype=torch.int8)


def rand_scale(N: int) -> torch.Tensor:
    return torch.rand(N) * 0.02 + 1e-3


ACT = "int8"


@pytest.fixture(autouse=True, params=["int8", "int7"])
def activations(request):
    global ACT
    ACT = request.param
    yield request.param
    ACT = "int8"


def op(x, w, s, b=None, wp=None):
    return torch.ops.slmkern.w8a8_linear(x, w, s, b, wp, ACT)


def ref(x, w, s, b=None):
    return reference.w8a8_linear(x, w, s, b, activations=ACT)


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern of a float tensor, so NaNs compare too."""
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype])


def make_bias(kind: str, N: int, dtype: torch.dtype):
    if kind == "none":
        return None
    return torch.randn(N, dtype=torch.float32 if kind == "fp32" else dtype)


def test_forced_isa_is_the_variant_that_runs(cpu_isa):
    assert cpu_backend.op_isa("w8a8_linear") == EXPECTED_VARIANT[cpu_isa]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K", [1, 3, 37, 130, 384])
@pytest.mark.parametrize("M", [1, 2, 3, 17, 65])
def test_matches_reference(cpu_isa, M, K, dtype):
    x = torch.randn(M, K).to(dtype)
    for N in (1, 19, 33, 100):
        w, s = rand_w(N, K), rand_scale(N)
        wp = prepack_int8(w)
        for kind in ("none", "fp32", "xdtype"):
            b = make_bias(kind, N, dtype)
            y = op(x, w, s, b, wp)
            assert y.dtype == dtype and y.shape == (M, N)
            assert torch.equal(y, ref(x, w, s, b)), (N, kind)


@pytest.mark.parametrize("M", [1, 5, 16, 128])
def test_larger_shapes_match_reference(cpu_isa, M):
    # several full 64-channel panels plus a ragged one, K a multiple of 64 and not
    K_N = [(1024, 200), (576, 1536 + 48)] if M <= 16 else [(384, 330)]
    for K, N in K_N:
        x = torch.randn(M, K)
        w, s, b = rand_w(N, K), rand_scale(N), torch.randn(N)
        assert torch.equal(op(x, w, s, b, prepack_int8(w)), ref(x, w, s, b))


@pytest.mark.parametrize("M", [257, 300])
def test_large_m_row_chunks_match_reference(cpu_isa, M):
    """M >= 256 takes the AVX2 GEMM's L2 row chunks and 16-tile tasks: every chunk size (0 = none, a ragged
    7, the default 64) gives the reference's bits, across chunk, row-block and tile-group tails."""
    K, N = 200, 16 * 18 + 5
    x = torch.randn(M, K)
    w, s, b = rand_w(N, K), rand_scale(N), torch.randn(N)
    wp, want = prepack_int8(w), ref(x, w, s, b)
    try:
        for chunk in (0, 7, 64):
            cpu_backend._C._set_w8a8_row_chunk(chunk)
            assert torch.equal(op(x, w, s, b, wp), want), chunk
    finally:
        cpu_backend._C._set_w8a8_row_chunk(64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bitwise_equal_to_cpp_reference(cpu_isa, dtype):
    """Same bits as the scalar C++ spec, NaN payloads included."""
    M, K, N = 9, 70, 45
    x = torch.randn(M, K).to(dtype)
    x[2, 5] = float("nan")
    x[6, 0] = float("-inf")
    w, s, b = rand_w(N, K), rand_scale(N), torch.randn(N)
    b[3] = float("nan")
    wp = prepack_int8(w)
    y = op(x, w, s, b, wp)
    cpu_backend._C.set_isa("ref")
    try:
        y_ref = op(x, w, s, b, wp)
    finally:
        cpu_backend._C.set_isa(cpu_isa)
    assert torch.equal(bits(y), bits(y_ref))


def test_empty_batch(cpu_isa):
    w, s = rand_w(19, 37), rand_scale(19)
    for shape in [(0, 37), (2, 0, 37)]:
        y = op(torch.randn(shape), w, s, torch.randn(19), prepack_int8(w))
        assert y.shape == (*shape[:-1], 19)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_leading_batch_dims(cpu_isa, dtype):
    K, N = 130, 33
    x = torch.randn(2, 3, K).to(dtype)
    w, s, b = rand_w(N, K), rand_scale(N), torch.randn(N)
    y = op(x, w, s, b, prepack_int8(w))
    assert y.shape == (2, 3, N)
    assert torch.equal(y, ref(x, w, s, b))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_x(cpu_isa, dtype):
    K, N = 37, 100
    w, s, b = rand_w(N, K), rand_scale(N), torch.randn(N)
    wp = prepack_int8(w)
    base = torch.randn(17, K + 13).to(dtype)
    x = base[:, 5:5 + K]  # row stride K + 13: read in place with ldx > K
    assert x.stride() == (K + 13, 1)
    assert torch.equal(op(x, w, s, b, wp), ref(x, w, s, b))
    x3 = torch.randn(2, 3, K + 7).to(dtype)[..., :K]  # batch dims over a strided slice
    assert torch.equal(op(x3, w, s, b, wp), ref(x3, w, s, b))
    xt = torch.randn(K, 6).to(dtype).t()  # column-major rows: copied first
    assert torch.equal(op(xt, w, s, b, wp), ref(xt, w, s, b))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_inf_rows(cpu_isa, dtype):
    M, K, N = 7, 130, 33
    x = torch.randn(M, K).to(dtype)
    x[1, 17] = float("nan")
    x[3, K - 1] = float("inf")
    x[5, 0] = float("-inf")
    w, s, b = rand_w(N, K), rand_scale(N), torch.randn(N)
    y = op(x, w, s, b, prepack_int8(w))
    bad = torch.tensor([1, 3, 5])
    good = torch.tensor([0, 2, 4, 6])
    assert torch.isnan(y[bad]).all()
    assert torch.equal(y[good], ref(x[good], w, s, b))
    assert torch.equal(y[good], ref(x, w, s, b)[good])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_and_tiny_rows_give_bias(cpu_isa, dtype):
    M, K, N = 5, 37, 19
    x = torch.randn(M, K).to(dtype)
    x[1] = 0
    x[3] = -0.0
    if dtype != torch.float16:  # 2^-110 is representable in fp32/bf16: below the 2^-100 threshold
        x[4] = torch.randn(K).sign() * 2.0 ** -110
    w, s = rand_w(N, K), rand_scale(N)
    b = torch.randn(N, dtype=dtype)
    y = op(x, w, s, b, prepack_int8(w))
    zero_rows = [1, 3] + ([4] if dtype != torch.float16 else [])
    for r in zero_rows:
        assert torch.equal(y[r], b), r
    assert torch.equal(y, ref(x, w, s, b))
    y0 = op(x, w, s, None, prepack_int8(w))
    for r in zero_rows:
        assert torch.equal(y0[r], torch.zeros(N, dtype=dtype)), r


def test_rounding_is_half_to_even(cpu_isa):
    # amax = 127 makes 127 / amax = 1, so x * inv = x: exact .5 ties reach rint.
    K, N = 12, 19
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 126.5, -126.5, 0.25, -0.75]])
    w, s, b = rand_w(N, K), rand_scale(N), torch.randn(N)
    if ACT == "int8":
        q, _ = reference.quantize_rows_s8(x)
        assert q.tolist()[0][:10] == [127, 0, 2, 2, 0, -2, -2, 4, 126, -126]
    else:  # range = 127 - (-126.5) = 253.5: inv = 127 / 253.5, ties are rarer; the kernel must still agree
        xs = torch.tensor([[63.5, -63.5, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 62.5, -62.5, 0.25, -0.75]])
        q, scale, zero = reference.quantize_rows_u7(xs)   # range 127: inv = 1, zero = rint(63.5) = 64
        assert zero.item() == 64 and scale.item() == 1.0
        assert q.tolist()[0][:10] == [127, 0, 64, 66, 66, 64, 62, 62, 126, 2]
        assert torch.equal(op(xs, w, s, b, prepack_int8(w)), ref(xs, w, s, b))
    y = op(x, w, s, b, prepack_int8(w))
    assert torch.equal(y, ref(x, w, s, b))
    # the same check through a single weight that isolates each activation
    for k in range(1, K):
        wk = torch.zeros(1, K, dtype=torch.int8)
        wk[0, k] = 1
        yk = op(x, wk, torch.ones(1), None, prepack_int8(wk))
        assert torch.equal(yk, ref(x, wk, torch.ones(1))), k


def test_f16_output_overflow_and_subnormal_inputs(cpu_isa):
    K, N = 64, 40
    x = torch.randn(3, K).half()
    x[1] = torch.randn(K).half() * 1e-6  # f16 subnormals
    w = rand_w(N, K)
    s = torch.full((N,), 60.0)  # |y| far beyond 65504 for most channels: inf after rounding
    b = torch.randn(N)
    y = op(x, w, s, b, prepack_int8(w))
    assert torch.isinf(y).any()
    assert torch.equal(y, ref(x, w, s, b))


def test_int32_accumulator_wraps_exactly(cpu_isa):
    # u8 = q + 128 in the VNNI path overflows int32 before the colsum correction;
    # the true sums (127 * 127 * K < 2^31) must still come out exact.
    K, N = 70000, 3
    x = torch.full((2, K), 1.0)
    x[1, ::2] = -1.0
    w = torch.full((N, K), 127, dtype=torch.int8)
    w[1] = -127
    w[2, ::3] = -5
    s, b = rand_scale(N), torch.randn(N)
    y = op(x, w, s, b, prepack_int8(w))
    assert torch.equal(y, ref(x, w, s, b))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_without_w_packed_equals_with(cpu_isa, dtype):
    K, N = 130, 33
    x = torch.randn(17, K).to(dtype)
    w, s, b = rand_w(N, K), rand_scale(N), torch.randn(N)
    assert torch.equal(op(x, w, s, b), op(x, w, s, b, prepack_int8(w)))


class GuardedBuffer:
    """A tensor whose last byte is followed by an inaccessible page: reading past it crashes."""

    def __init__(self, t: torch.Tensor):
        page = mmap.PAGESIZE
        nbytes = t.numel() * t.element_size()
        n = -(-nbytes // page) * page
        self._map = mmap.mmap(-1, n + page)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        if libc.mprotect(addr + n, page, 0) != 0:  # PROT_NONE
            raise OSError(ctypes.get_errno(), "mprotect failed")
        raw = torch.frombuffer(self._map, dtype=torch.uint8, count=n)[n - nbytes:]
        self.tensor = raw.view(t.dtype).view(t.shape)
        self.tensor.copy_(t)


@pytest.mark.skipif(not hasattr(mmap, "PAGESIZE") or not hasattr(ctypes, "CDLL"), reason="needs mmap/mprotect")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_never_reads_past_inputs(cpu_isa, dtype):
    # x, w_scale, bias and w_packed each end right before a PROT_NONE page.
    for M, K, N in [(1, 1, 1), (3, 3, 19), (5, 37, 33), (7, 130, 100), (2, 71, 16)]:
        x = GuardedBuffer(torch.randn(M, K).to(dtype))
        w = rand_w(N, K)
        s = GuardedBuffer(rand_scale(N))
        b = GuardedBuffer(torch.randn(N))
        wp = GuardedBuffer(prepack_int8(w))
        y = op(x.tensor, w, s.tensor, b.tensor, wp.tensor)
        assert torch.equal(y, ref(x.tensor, w, s.tensor, b.tensor)), (M, K, N)


def test_calls_from_several_threads(cpu_isa):
    shapes = [(1, 384, 100), (17, 37, 19), (65, 130, 33), (3, 576, 200)]
    cases = []
    for M, K, N in shapes:
        x, w, s, b = torch.randn(M, K), rand_w(N, K), rand_scale(N), torch.randn(N)
        cases.append((x, w, s, b, prepack_int8(w), ref(x, w, s, b)))
    errors = []

    def work(i):
        try:
            for j in range(20):
                x, w, s, b, wp, want = cases[(i + j) % len(cases)]
                if not torch.equal(op(x, w, s, b, wp), want):
                    errors.append((i, j))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_opcheck():
    K, N = 37, 19
    w, s = rand_w(N, K), rand_scale(N)
    wp = prepack_int8(w)
    for args in [(torch.randn(3, K), w, s, torch.randn(N), wp),
                 (torch.randn(2, 3, K).bfloat16(), w, s, None, None),
                 (torch.randn(4, K).half(), w, s, torch.randn(N).half(), wp)]:
        torch.library.opcheck(torch.ops.slmkern.w8a8_linear.default, (*args, ACT))


class TestBadInputs:
    K, N = 37, 19

    def setup_method(self):
        self.x = torch.randn(3, self.K)
        self.w = rand_w(self.N, self.K)
        self.s = rand_scale(self.N)

    def test_x_dtype(self):
        with pytest.raises(TypeError, match=r"\bx\b"):
            op(self.x.double(), self.w, self.s)
        with pytest.raises(TypeError, match=r"\bx\b"):
            op(torch.randint(0, 5, (3, self.K)), self.w, self.s)

    def test_k_mismatch_names_x(self):
        with pytest.raises(ValueError, match=r"\bx\b.*K"):
            op(torch.randn(3, self.K + 1), self.w, self.s)

    def test_w_dtype(self):
        with pytest.raises(TypeError, match=r"\bw\b"):
            op(self.x, self.w.float(), self.s)

    def test_non_contiguous_or_expanded_w(self):
        wt = rand_w(self.K, self.N).t()  # (N, K) view with strides (1, N)
        with pytest.raises(ValueError, match=r"\bw\b.*contiguous"):
            op(self.x, wt, self.s)
        we = rand_w(1, self.K).expand(self.N, self.K)
        with pytest.raises(ValueError, match=r"\bw\b.*contiguous"):
            op(self.x, we, self.s)

    def test_w_scale_shape_and_dtype(self):
        with pytest.raises(ValueError, match="w_scale"):
            op(self.x, self.w, rand_scale(self.N + 1))
        with pytest.raises(ValueError, match="w_scale"):
            op(self.x, self.w, rand_scale(self.N).reshape(1, self.N))
        with pytest.raises(TypeError, match="w_scale"):
            op(self.x, self.w, rand_scale(self.N).double())

    def test_bias_shape_and_dtype(self):
        with pytest.raises(ValueError, match="bias"):
            op(self.x, self.w, self.s, torch.randn(self.N + 2))
        with pytest.raises(TypeError, match="bias"):
            op(self.x.half(), self.w, self.s, torch.randn(self.N).bfloat16())

    def test_w_packed_size_and_dtype(self):
        wp = prepack_int8(self.w)
        with pytest.raises(ValueError, match="w_packed"):
            op(self.x, self.w, self.s, None, wp[:-4])
        with pytest.raises(ValueError, match="w_packed"):
            op(self.x, self.w, self.s, None, prepack_int8(rand_w(self.N + 16, self.K)))
        with pytest.raises(TypeError, match="w_packed"):
            op(self.x, self.w, self.s, None, wp.view(torch.int8))

    def test_device_mismatch(self):
        with pytest.raises(ValueError, match="device"):
            op(self.x.to("meta"), self.w, self.s)
        with pytest.raises(ValueError, match="device"):
            op(self.x, self.w, self.s.to("meta"))


def test_activations_argument_is_checked():
    x, w, s = torch.randn(2, 8), rand_w(4, 8), rand_scale(4)
    with pytest.raises(ValueError, match="activations"):
        torch.ops.slmkern.w8a8_linear(x, w, s, None, None, "int4")
    with pytest.raises(ValueError, match="activations"):
        torch.ops.slmkern.w8a8_linear(x.to("meta"), w.to("meta"), s.to("meta"), None, None, "uint8")


def test_int7_codes_and_zero_point():
    """quantize_rows_u7: codes in [0, 127], q - zero in [-127, 127], zero exact for 0, one-sided rows."""
    x = torch.randn(64, 300) * torch.rand(64, 1) * 10
    x[0] = x[0].abs()          # all >= 0: zero = 0
    x[1] = -x[1].abs()         # all <= 0: zero = 127
    x[2, :5] = 0.0
    q, scale, zero = reference.quantize_rows_u7(x)
    assert q.dtype == torch.uint8 and int(q.max()) <= 127
    assert zero[0].item() == 0 and zero[1].item() == 127
    d = q.to(torch.int32) - zero.unsqueeze(1)
    assert int(d.abs().max()) <= 127
    assert torch.equal(d[2, :5], torch.zeros(5, dtype=torch.int32))   # zero is exact
    err = (d.float() * scale.unsqueeze(1) - x).abs()
    assert bool((err <= scale.unsqueeze(1) * 0.5001).all())          # half a step at most


def test_int7_outputs_close_to_float():
    """int7 is a different (coarser) scheme than int8, not a bug: both stay close to the float matmul."""
    torch.manual_seed(0)
    x, w = torch.randn(32, 256), rand_w(64, 256)
    s = rand_scale(64)
    exact = x @ (w.float() * s.unsqueeze(1)).T
    for act in ("int8", "int7"):
        y = torch.ops.slmkern.w8a8_linear(x, w, s, None, prepack_int8(w), act)
        rel = (y - exact).norm() / exact.norm()
        assert rel < (0.01 if act == "int8" else 0.02), (act, rel)


# ----------------------------------------------------------------------------- the gelu epilogue
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (3, 37, 19), (17, 130, 100), (65, 384, 33), (300, 64, 40)])
def test_gelu_epilogue_matches_reference(cpu_isa, M, K, N, dtype):
    x = (torch.randn(M, K) * 2).to(dtype)
    w, s = rand_w(N, K), rand_scale(N) * 3
    for kind in ("none", "fp32", "xdtype"):
        b = make_bias(kind, N, dtype)
        y = torch.ops.slmkern.w8a8_linear(x, w, s, b, prepack_int8(w), ACT, "gelu")
        r = reference.w8a8_linear(x, w, s, b, activations=ACT, epilogue="gelu")
        assert torch.equal(bits(y), bits(r)), kind
        assert torch.equal(y, torch.ops.slmkern.w8a8_linear(x, w, s, b, None, ACT, "gelu"))   # repack path


def test_gelu_epilogue_special_values(cpu_isa):
    """Every fp32 value class through the epilogue (x = 0, so y = bias): NaN, +-inf, +-0, subnormals,
    huge, and a dense sweep of [-20, 20]; bits equal the reference's (NaN positions equal)."""
    v = torch.cat([torch.linspace(-20, 20, 20011), torch.tensor(
        [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-40, -1e-40, 3e38, -3e38, 9.3, -9.3, 87.0])])
    N = v.numel()
    w, s = torch.ones(N, 1, dtype=torch.int8), torch.ones(N)
    x = torch.zeros(2, 1)
    y = torch.ops.slmkern.w8a8_linear(x, w, s, v, prepack_int8(w), ACT, "gelu")
    r = reference.w8a8_linear(x, w, s, v, activations=ACT, epilogue="gelu")
    nan = torch.isnan(r)
    assert torch.equal(torch.isnan(y), nan)
    assert torch.equal(bits(y)[~nan], bits(r)[~nan])


def test_gelu_epilogue_close_to_torch():
    """reference.gelu_epilogue (A&S 7.1.26 erf) stays within 2e-7 |v| + 1e-7 of the exact (erf) GELU."""
    v = torch.cat([torch.linspace(-30, 30, 400001), torch.randn(100000) * 3])
    got = reference.gelu_epilogue(v).double()
    want = torch.nn.functional.gelu(v.double())
    assert bool(((got - want).abs() <= 2e-7 * v.double().abs() + 1e-7).all())
    assert torch.equal(reference.gelu_epilogue(torch.tensor([float("inf")])), torch.tensor([float("inf")]))


def test_gelu_epilogue_gradient():
    """Backward through the epilogue: gelu'(u) at the pre-activation u, then the linear's straight-through
    gradient (grad @ W_dequantized); the bias gets the same gelu'-weighted sum."""
    torch.manual_seed(0)
    K, N = 24, 10
    w, s = rand_w(N, K), rand_scale(N) * 5
    b = torch.randn(N, requires_grad=True)
    x = torch.randn(4, K, requires_grad=True)
    y = torch.ops.slmkern.w8a8_linear(x, w, s, b, prepack_int8(w), ACT, "gelu")
    g = torch.randn_like(y)
    y.backward(g)
    u = reference.w8a8_linear(x.detach(), w, s, b.detach(), activations=ACT).double()
    dgelu = 0.5 * (1 + torch.erf(u / 2 ** 0.5)) + u * torch.exp(-0.5 * u * u) / (2 * torch.pi) ** 0.5
    gu = g.double() * dgelu
    torch.testing.assert_close(x.grad, (gu @ (w.double() * s.double().unsqueeze(1))).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.grad, gu.sum(0).float(), rtol=1e-5, atol=1e-6)


def test_gelu_epilogue_opcheck_and_bad_argument():
    K, N = 37, 19
    w, s = rand_w(N, K), rand_scale(N)
    torch.library.opcheck(torch.ops.slmkern.w8a8_linear.default,
                          (torch.randn(3, K), w, s, torch.randn(N), prepack_int8(w), ACT, "gelu"))
    with pytest.raises(ValueError, match="epilogue"):
        torch.ops.slmkern.w8a8_linear(torch.randn(3, K), w, s, None, None, ACT, "relu")
