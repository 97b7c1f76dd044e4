"""CPU tests of slmkern::w8a16_linear: every ISA path against the float64 / fp32 spec.

y = (x @ float(w).T) * w_scale + bias with fp32 accumulation in any order, so
fp32 outputs are checked against float64 within a bound that scales with
sqrt(K) and with sum |x| |w| (the size of the terms, not of their sum, which
may cancel); bf16/f16 outputs against the fp32 reference rounded, within one
output ulp plus that fp32 bound. Where the fp32 sum is exact (small integers)
every path must match the reference bit for bit, which pins the rounding of
the output dtype down too.
"""
from __future__ import annotations

import ctypes
import mmap
import math
import sys
import threading

import pytest
import torch

from slmkern import reference
from slmkern._backends import cpu as cpu_backend

op = torch.ops.slmkern.w8a16_linear

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10}
KERNEL_OF_ISA = {"ref": "ref", "avx2": "avx2", "avx512": "avx512", "avx512vnni": "avx512"}
FP32_RTOL_PER_SQRT_K = 5e-7  # ~8 fp32 unit roundoffs per sqrt(K), relative to sum |x w s|


def make_weight(N: int, K: int):
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    w_scale = torch.rand(N) * 0.02 + 1e-3
    return w, w_scale


def make_x(shape, K: int, dtype, pad: int = 0) -> torch.Tensor:
    """Random x of shape (*shape, K); with pad > 0 a view whose rows are K + pad apart."""
    full = torch.randn(*shape, K + pad)
    if pad:
        full[..., K:] = float("nan")  # the gap must never be read
    return full.to(dtype)[..., :K]


def exact_f64(x, w, w_scale, bias):
    y = x.double() @ w.double().T * w_scale.double()
    return y + bias.double() if bias is not None else y


def term_size(x, w, w_scale, bias):
    """sum_k |x w| * s + |b|: the scale of fp32 rounding error, immune to cancellation."""
    m = x.double().abs() @ w.double().abs().T * w_scale.double()
    return m + bias.double().abs() if bias is not None else m


def ulp(v: torch.Tensor, dtype) -> torch.Tensor:
    """Spacing of `dtype` values at |v| (the subnormal spacing near zero)."""
    fi = torch.finfo(dtype)
    _, e = torch.frexp(v.double().abs())
    sp = torch.ldexp(torch.ones_like(v, dtype=torch.float64), e - 1 - MANTISSA_BITS[dtype])
    return sp.clamp_min(fi.smallest_normal * fi.eps)


def assert_close_w8a16(y, x, w, w_scale, bias, K):
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], w.shape[0])
    bound = FP32_RTOL_PER_SQRT_K * math.sqrt(K) * term_size(x, w, w_scale, bias) + 1e-30
    if x.dtype == torch.float32:
        want = exact_f64(x, w, w_scale, bias)
        err = (y.double() - want).abs()
        allowed = bound
    else:
        want = reference.w8a16_linear(x, w, w_scale, bias).double()
        err = (y.double() - want).abs()
        allowed = bound + ulp(want, x.dtype)
    bad = err > allowed
    assert not bad.any(), (
        f"{int(bad.sum())} of {bad.numel()} outputs off; worst err {err.max().item():.3g} "
        f"where {allowed.flatten()[err.flatten().argmax()].item():.3g} allowed")


@pytest.fixture
def isa(cpu_isa):
    assert cpu_backend.op_isa("w8a16_linear") == KERNEL_OF_ISA[cpu_isa]
    return cpu_isa


# ---------------------------------------------------------------------------
# values
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [0, 1, 2, 3, 17, 65])
@pytest.mark.parametrize("K", [1, 3, 37, 130, 384])
def test_matches_reference(isa, dtype, M, K):
    for N in (1, 19, 33, 100):
        w, w_scale = make_weight(N, K)
        wp = cpu_backend.prepack_int8(w)
        for bias in (None, torch.randn(N)):
            x = make_x((M,), K, dtype)
            y = op(x, w, w_scale, bias, wp)
            assert_close_w8a16(y, x, w, w_scale, bias, K)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_batch(isa, dtype):
    w, w_scale = make_weight(19, 37)
    for shape in ((0,), (2, 0), (0, 3)):
        x = make_x(shape, 37, dtype)
        y = op(x, w, w_scale, None, cpu_backend.prepack_int8(w))
        assert y.shape == (*shape, 19) and y.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K", [37, 130])
def test_batch_dims_and_row_stride(isa, dtype, K):
    N = 33
    w, w_scale = make_weight(N, K)
    wp = cpu_backend.prepack_int8(w)
    bias = torch.randn(N).to(dtype)  # bias in x's dtype is accepted too
    # rows K + 5 apart with NaN in the gaps: a kernel reading past K poisons its row
    x = make_x((17,), K, dtype, pad=5)
    assert x.stride(0) == K + 5
    assert_close_w8a16(op(x, w, w_scale, bias, wp), x, w, w_scale, bias, K)
    xb = make_x((2, 3, 5), K, dtype, pad=3)
    y = op(xb, w, w_scale, bias, wp)
    assert y.shape == (2, 3, 5, N)
    assert_close_w8a16(y, xb, w, w_scale, bias, K)
    xt = torch.randn(K, 6).to(dtype).T  # inner stride != 1: the backend copies
    assert_close_w8a16(op(xt, w, w_scale, bias, wp), xt, w, w_scale, bias, K)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("scale_exp", [(-12, -4), (-40, -28), (-146, -132)],
                         ids=["normal", "f16-subnormal", "f32-bf16-subnormal"])
def test_exact_sums_are_bit_exact(isa, dtype, with_bias, scale_exp):
    """Small integer x and power-of-two scales: every fp32 partial sum is exact,
    so any summation order gives the reference's bits, output rounding included
    (down to subnormal outputs)."""
    M, K, N = 17, 130, 100
    w, _ = make_weight(N, K)
    lo, hi = scale_exp
    w_scale = torch.ldexp(torch.ones(N), torch.randint(lo, hi, (N,)))
    x = torch.randint(-16, 17, (M, K)).to(dtype)
    bias = torch.randn(N) * 2.0 ** (lo + 12) if with_bias else None
    y = op(x, w, w_scale, bias, cpu_backend.prepack_int8(w))
    want = reference.w8a16_linear(x, w, w_scale, bias)
    torch.testing.assert_close(y, want, rtol=0, atol=0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs mprotect")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K", [1, 3, 37])
def test_x_ending_at_an_unmapped_page(isa, dtype, K):
    """x's last element is the last byte before a PROT_NONE page: reading past a row faults."""
    page = mmap.PAGESIZE
    buf = mmap.mmap(-1, 2 * page)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    assert libc.mprotect(addr + page, page, 0) == 0  # PROT_NONE
    try:
        M, N = 3, 19
        w, w_scale = make_weight(N, K)
        esize = torch.empty((), dtype=dtype).element_size()
        mem = torch.frombuffer(buf, dtype=torch.uint8, count=page)
        x = mem[page - M * K * esize:].view(dtype).view(M, K)
        x.copy_(torch.randn(M, K).to(dtype))
        y = op(x, w, w_scale, None, cpu_backend.prepack_int8(w))
        assert_close_w8a16(y, x, w, w_scale, None, K)
        del x, mem
    finally:
        libc.mprotect(addr + page, page, mmap.PROT_READ | mmap.PROT_WRITE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K", [3, 37, 130])
def test_nonfinite_x_stays_in_its_row(isa, dtype, K):
    M, N = 7, 33
    w, w_scale = make_weight(N, K)
    w[:, K - 1] = torch.where(w[:, K - 1] == 0, 1, w[:, K - 1])  # x[:, K-1] reaches every channel
    x = make_x((M,), K, dtype, pad=2).clone()
    x[1, K - 1] = float("nan")       # the K tail
    x[3, 0] = float("inf")
    x[5, K // 2] = float("-inf")
    y = op(x, w, w_scale, None, cpu_backend.prepack_int8(w)).float()
    assert y[1].isnan().all()
    assert (~y[3].isfinite()).all() and (~y[5].isfinite()).all()
    finite = [0, 2, 4, 6]
    assert y[finite].isfinite().all()
    assert_close_w8a16(y[finite].to(dtype), x[finite], w, w_scale, None, K)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_large_half_input(isa, dtype):
    """> 4 MB of fp32 activations: the kernels convert into a one-off buffer, not the per-thread one."""
    M, K, N = 260, 4099, 17
    w, w_scale = make_weight(N, K)
    x = make_x((M,), K, dtype, pad=1)
    bias = torch.randn(N)
    y = op(x, w, w_scale, bias, cpu_backend.prepack_int8(w))
    assert_close_w8a16(y, x, w, w_scale, bias, K)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_without_w_packed_equals_with(isa, dtype):
    K, N = 130, 33
    w, w_scale = make_weight(N, K)
    x = make_x((5,), K, dtype)
    bias = torch.randn(N)
    torch.testing.assert_close(op(x, w, w_scale, bias), op(x, w, w_scale, bias, cpu_backend.prepack_int8(w)),
                               rtol=0, atol=0)


def test_thread_count_does_not_change_bits(isa):
    """The split over threads (channel blocks, and rows when blocks are few) must not change any sum."""
    for M, K, N in ((65, 130, 19), (3, 384, 1000), (1, 37, 100)):
        w, w_scale = make_weight(N, K)
        wp = cpu_backend.prepack_int8(w)
        x = make_x((M,), K, torch.float32)
        n = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            y1 = op(x, w, w_scale, None, wp)
        finally:
            torch.set_num_threads(n)
        torch.testing.assert_close(op(x, w, w_scale, None, wp), y1, rtol=0, atol=0)
        assert_close_w8a16(y1, x, w, w_scale, None, K)


def test_concurrent_calls(isa):
    """Calls from several Python threads at once (the GIL is released) give the serial answers."""
    cases = []
    for i, dtype in enumerate((torch.bfloat16, torch.float16, torch.float32, torch.bfloat16)):
        K, N = 130 + 4 * i + 1, 200 + 16 * i
        w, w_scale = make_weight(N, K)
        wp = cpu_backend.prepack_int8(w)
        x = make_x((9 + i,), K, dtype)
        cases.append((x, w, w_scale, wp, op(x, w, w_scale, None, wp)))
    errors = []

    def worker(c):
        x, w, w_scale, wp, want = c
        for _ in range(20):
            y = op(x, w, w_scale, None, wp)
            if not torch.equal(y, want):
                errors.append(tuple(x.shape))
                return

    threads = [threading.Thread(target=worker, args=(c,)) for c in cases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, f"concurrent results differ for x shapes {errors}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck(isa, dtype, with_bias):
    K, N = 37, 19
    w, w_scale = make_weight(N, K)
    x = make_x((2, 3), K, dtype)
    bias = torch.randn(N) if with_bias else None
    torch.library.opcheck(op.default, (x, w, w_scale, bias, cpu_backend.prepack_int8(w)))
    torch.library.opcheck(op.default, (x, w, w_scale, bias, None))


# ---------------------------------------------------------------------------
# bad input: named argument, right exception type, before any kernel runs
# ---------------------------------------------------------------------------

def _good(N=19, K=37):
    w, w_scale = make_weight(N, K)
    return torch.randn(3, K), w, w_scale, torch.randn(N), cpu_backend.prepack_int8(w)


@pytest.mark.parametrize("case, exc, match", [
    ("x_int", TypeError, r"x must be a float32/bfloat16/float16"),
    ("x_f64", TypeError, r"x must be a float32/bfloat16/float16"),
    ("w_float", TypeError, r"w must be torch\.int8"),
    ("w_scale_f16", TypeError, r"w_scale must be torch\.float32"),
    ("bias_f64", TypeError, r"bias must be"),
    ("w_packed_int8", TypeError, r"w_packed must be torch\.uint8"),
    ("k_mismatch", ValueError, r"x has K=36 .* w is \(N=19, K=37\)"),
    ("w_noncontig", ValueError, r"w must be contiguous"),
    ("w_expanded", ValueError, r"w must be contiguous"),
    ("w_1d", ValueError, r"w must have shape \(N, K\)"),
    ("w_scale_len", ValueError, r"w_scale must have shape \(N,\)"),
    ("w_scale_2d", ValueError, r"w_scale must have shape \(N,\)"),
    ("bias_len", ValueError, r"bias must have shape \(N,\)"),
    ("w_packed_size", ValueError, r"w_packed must be 1-D with \d+ bytes"),
    ("w_packed_2d", ValueError, r"w_packed must be 1-D"),
])
def test_bad_input_raises(case, exc, match):
    x, w, w_scale, bias, wp = _good()
    if case == "x_int":
        x = torch.randint(-5, 5, x.shape, dtype=torch.int32)
    elif case == "x_f64":
        x = x.double()
    elif case == "w_float":
        w = w.float()
    elif case == "w_scale_f16":
        w_scale = w_scale.half()
    elif case == "bias_f64":
        bias = bias.double()
    elif case == "w_packed_int8":
        wp = wp.view(torch.int8)
    elif case == "k_mismatch":
        x = x[:, :36]
    elif case == "w_noncontig":
        w = make_weight(37, 19)[0].T
    elif case == "w_expanded":
        w = w[:1].expand(19, 37)
    elif case == "w_1d":
        w = w.reshape(-1)
    elif case == "w_scale_len":
        w_scale = torch.rand(20)
    elif case == "w_scale_2d":
        w_scale = w_scale.reshape(19, 1)
    elif case == "bias_len":
        bias = torch.randn(18)
    elif case == "w_packed_size":
        wp = wp[:-4]
    elif case == "w_packed_2d":
        wp = wp.reshape(1, -1)
    with pytest.raises(exc, match=match):
        op(x, w, w_scale, bias, wp)
