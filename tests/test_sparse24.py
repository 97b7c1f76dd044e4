"""torch.ops.slmkern.sparse24_linear / sparse24_w4a16_linear on CPU, every ISA path vs slmkern.reference.

Float values: fp32 accumulation, tolerance tied to the output dtype. int8 values: bit-exact with
reference.w8a8_linear on the decompressed weight (and with our w8a8_linear kernel).
"""
from __future__ import annotations

import ctypes
import mmap

import pytest
import torch
from torch import nn

from slmkern import reference
from slmkern._backends import cpu as cpu_backend
from slmkern.formats import sparse24 as s24

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
F_VARIANT = {"ref": "ref", "avx2": "avx2", "avx512": "avx512", "avx512vnni": "avx512"}


def rand_24(N: int, K: int, density=(0, 1, 2)) -> torch.Tensor:
    w = torch.randn(N, K)
    w[w == 0] = 1
    g = w.reshape(N, K // 4, 4)
    keep = torch.tensor(density)[torch.randint(len(density), (N, K // 4))]
    mask = torch.arange(4).expand(N, K // 4, 4) < keep.unsqueeze(-1)
    mask = torch.zeros_like(mask).scatter_(-1, torch.rand(N, K // 4, 4).argsort(-1), mask)
    return (g * mask).reshape(N, K)


def op(x, v, m, s=None, b=None, wp=None):
    return torch.ops.slmkern.sparse24_linear(x, v, m, s, b, wp)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype])


def make_bias(kind: str, N: int, dtype: torch.dtype):
    if kind == "none":
        return None
    return torch.randn(N, dtype=torch.float32 if kind == "fp32" else dtype)


def close(y, want, K):
    tol = {torch.float32: (1e-5, 1e-5 * K ** 0.5), torch.bfloat16: (1.6e-2, 1e-2), torch.float16: (2e-3, 2e-3)}
    rtol, atol = tol[y.dtype]
    torch.testing.assert_close(y.float(), want.float(), rtol=rtol, atol=atol, equal_nan=True)


def vbmi_int8_variant() -> str:
    cpu_backend._C.set_isa("auto")
    return cpu_backend._C.op_isa("sparse24_linear[int8]")


def test_forced_isa_is_the_variant_that_runs(cpu_isa):
    assert cpu_backend.op_isa("sparse24_linear") == F_VARIANT[cpu_isa]
    got = cpu_backend.op_isa("sparse24_linear[int8]")
    assert got == {"ref": "ref", "avx2": "avx2", "avx512": "avx2"}.get(cpu_isa, got)
    if cpu_isa == "avx512vnni":
        assert got in ("avx512vnni", "avx2")  # avx2 only on a VNNI CPU without VBMI


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K", [4, 12, 20, 36, 132, 260])
@pytest.mark.parametrize("M", [0, 1, 2, 3, 17, 65])
def test_float_values_match_reference(cpu_isa, M, K, dtype):
    x = torch.randn(M, K).to(dtype)
    # every N, value dtype and bias kind occurs, not every combination (the suite stays fast)
    for N, vdt, kind in [(1, torch.float32, "none"), (7, torch.bfloat16, "fp32"), (33, torch.float16, "xdtype"),
                         (33, torch.float32, "fp32"), (7, torch.float16, "none"), (1, torch.bfloat16, "xdtype")]:
        v, m = s24.compress(rand_24(N, K).to(vdt))
        b = make_bias(kind, N, dtype)
        y = op(x, v, m, None, b, cpu_backend.prepack_sparse24(v, m))
        assert y.shape == (M, N) and y.dtype == dtype
        close(y, reference.sparse24_linear(x, v, m, None, b), K)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K", [4, 12, 20, 36, 132, 260])
@pytest.mark.parametrize("M", [0, 1, 2, 3, 17, 65])
def test_int8_values_bit_exact(cpu_isa, M, K, dtype):
    x = torch.randn(M, K).to(dtype)
    for N, kind in [(1, "none"), (7, "fp32"), (33, "xdtype"), (33, "none")]:
        v, m, sc = s24.compress_int8(rand_24(N, K))
        wp = cpu_backend.prepack_sparse24(v, m, sc)
        dense = s24.decompress(v, m)
        if True:
            b = make_bias(kind, N, dtype)
            y = op(x, v, m, sc, b, wp)
            assert torch.equal(bits(y), bits(reference.w8a8_linear(x, dense, sc, b)))
            assert torch.equal(bits(y), bits(reference.sparse24_linear(x, v, m, sc, b)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_int8_equals_our_dense_w8a8_kernel(cpu_isa, dtype):
    x = torch.randn(5, 2048).to(dtype)
    v, m, sc = s24.compress_int8(rand_24(70, 2048, density=(2,)))
    b = torch.randn(70)
    y = op(x, v, m, sc, b, cpu_backend.prepack_sparse24(v, m, sc))
    assert torch.equal(bits(y), bits(torch.ops.slmkern.w8a8_linear(x, s24.decompress(v, m), sc, b)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_int8_many_rows_and_strided_x(cpu_isa, dtype):
    # many row tiles and register blocks of 8 rows (with a 2-row tail) on the AVX-512 path
    K, N = 132, 1100
    v, m, sc = s24.compress_int8(rand_24(N, K))
    wp, b = cpu_backend.prepack_sparse24(v, m, sc), torch.randn(N).to(dtype)
    x = torch.randn(50, 2 * K).to(dtype)[:, :K]          # row stride > K
    y = op(x, v, m, sc, b, wp)
    assert torch.equal(bits(y), bits(reference.w8a8_linear(x, s24.decompress(v, m), sc, b)))


@pytest.mark.parametrize("M", [1, 4, 5, 8, 9, 16, 17])
def test_int8_register_blocks_and_panel_tails(cpu_isa, M):
    # N = 200: 13 tiles of 16 rows (panels of 4 and of 2 tiles both end short, last tile 8 rows);
    # K = 100: K % 32 == 4 and K % 8 == 4 (a padded window inside the last 32-column block)
    K, N = 100, 200
    v, m, sc = s24.compress_int8(rand_24(N, K))
    b = torch.randn(N)
    x = torch.randn(M, K)
    y = op(x, v, m, sc, b, cpu_backend.prepack_sparse24(v, m, sc))
    assert torch.equal(bits(y), bits(reference.w8a8_linear(x, s24.decompress(v, m), sc, b)))


def test_int8_extreme_values_exact(cpu_isa):
    # |q| = 127 everywhere: the largest int32 sums and the +128 shift of u8 activations must stay exact
    K, N = 4096, 40
    w = rand_24(N, K, density=(2,))
    w = torch.where(w > 0, 1.0, torch.where(w < 0, -1.0, 0.0))
    w[::2] = w[::2].abs()
    v, m, sc = s24.compress_int8(w)
    assert int(v.abs().min()) == 127
    x = torch.ones(3, K)
    x[1] = -1
    x[2, ::2] = -1
    y = op(x, v, m, sc, None, cpu_backend.prepack_sparse24(v, m, sc))
    assert torch.equal(bits(y), bits(reference.w8a8_linear(x, s24.decompress(v, m), sc, None)))


@pytest.mark.parametrize("M", [1, 4, 9])
def test_larger_float_shape(cpu_isa, M):
    K, N = 1024, 67
    x = torch.randn(M, K)
    for vdt in DTYPES:
        v, m = s24.compress(rand_24(N, K, density=(2,)).to(vdt))
        close(op(x, v, m, None, None, cpu_backend.prepack_sparse24(v, m)), reference.sparse24_linear(x, v, m), K)


def test_all_zero_rows_give_bias(cpu_isa):
    K, N = 36, 9
    w = rand_24(N, K)
    w[[0, 4, 8]] = 0
    x = torch.randn(3, K)
    x[1] = 0
    b = torch.randn(N)
    v, m = s24.compress(w)
    y = op(x, v, m, None, b, cpu_backend.prepack_sparse24(v, m))
    assert torch.equal(y[:, [0, 4, 8]], b[[0, 4, 8]].expand(3, 3))
    assert torch.equal(y[1], b)
    q, m8, sc = s24.compress_int8(w)
    y8 = op(x, q, m8, sc, b, cpu_backend.prepack_sparse24(q, m8, sc))
    assert torch.equal(y8[:, [0, 4, 8]], b[[0, 4, 8]].expand(3, 3))
    assert torch.equal(y8[1], b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_inf_in_x_propagate_like_dense(cpu_isa, dtype):
    K, N = 132, 13
    w = rand_24(N, K)
    x = torch.randn(5, K)
    x[1, 7] = float("nan")
    x[2, 50] = float("inf")
    x[3, 3] = -float("inf")
    x = x.to(dtype)
    v, m = s24.compress(w.to(dtype))
    y = op(x, v, m, None, None, cpu_backend.prepack_sparse24(v, m))
    want = reference.sparse24_linear(x, v, m)
    dense = torch.nn.functional.linear(x.float(), s24.decompress(v, m).float()).to(dtype)
    assert torch.equal(torch.isnan(y), torch.isnan(want)) and torch.equal(torch.isnan(y), torch.isnan(dense))
    assert torch.equal(torch.isinf(y), torch.isinf(dense))
    assert bool(torch.isnan(y[1:4]).any())
    close(y[[0, 4]], want[[0, 4]], K)
    q, m8, sc = s24.compress_int8(w)
    y8 = op(x, q, m8, sc, None, cpu_backend.prepack_sparse24(q, m8, sc))
    want8 = reference.w8a8_linear(x, s24.decompress(q, m8), sc)
    assert torch.equal(torch.isnan(y8), torch.isnan(want8)) and bool(torch.isnan(y8[1:4]).all())
    ok = ~torch.isnan(want8)   # NaN payload/sign after the bf16/f16 cast is not specified
    assert torch.equal(bits(y8)[ok], bits(want8)[ok])
    assert torch.equal(bits(y8), bits(torch.ops.slmkern.w8a8_linear(x, s24.decompress(q, m8), sc)))


def test_without_w_packed_equals_with(cpu_isa):
    K, N = 36, 11
    x, w, b = torch.randn(4, K), rand_24(N, K), torch.randn(N)
    v, m = s24.compress(w)
    assert torch.equal(op(x, v, m, None, b), op(x, v, m, None, b, cpu_backend.prepack_sparse24(v, m)))
    q, m8, sc = s24.compress_int8(w)
    assert torch.equal(op(x, q, m8, sc, b), op(x, q, m8, sc, b, cpu_backend.prepack_sparse24(q, m8, sc)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_leading_dims_and_non_contiguous_x(cpu_isa, dtype):
    K, N = 20, 9
    v, m = s24.compress(rand_24(N, K))
    wp = cpu_backend.prepack_sparse24(v, m)
    x = torch.randn(2, 3, K).to(dtype)
    y = op(x, v, m, None, None, wp)
    assert y.shape == (2, 3, N)
    close(y, reference.sparse24_linear(x, v, m), K)
    xs = torch.randn(K, 6).to(dtype).t()      # stride(1) != 1
    close(op(xs, v, m, None, None, wp), reference.sparse24_linear(xs, v, m), K)
    xr = torch.randn(5, 2 * K).to(dtype)[:, :K]  # row stride > K
    close(op(xr, v, m, None, None, wp), reference.sparse24_linear(xr, v, m), K)


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
        if libc.mprotect(addr + n, page, 0) != 0:
            raise OSError(ctypes.get_errno(), "mprotect failed")
        raw = torch.frombuffer(self._map, dtype=torch.uint8, count=n)[n - nbytes:]
        self.tensor = raw.view(t.dtype).view(t.shape)
        self.tensor.copy_(t)


@pytest.mark.skipif(not hasattr(mmap, "PAGESIZE"), reason="needs mmap/mprotect")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_never_reads_past_inputs(cpu_isa, dtype):
    for M, K, N in [(1, 4, 1), (3, 12, 5), (5, 36, 33), (2, 132, 7)]:
        x = GuardedBuffer(torch.randn(M, K).to(dtype))
        w = rand_24(N, K)
        b = GuardedBuffer(torch.randn(N))
        v, m = s24.compress(w.to(dtype))
        wp = GuardedBuffer(cpu_backend.prepack_sparse24(v, m))
        close(op(x.tensor, v, m, None, b.tensor, wp.tensor), reference.sparse24_linear(x.tensor, v, m, None, b.tensor), K)
        q, m8, sc = s24.compress_int8(w)
        s = GuardedBuffer(sc)
        wp8 = GuardedBuffer(cpu_backend.prepack_sparse24(q, m8, sc))
        y = op(x.tensor, q, m8, s.tensor, b.tensor, wp8.tensor)
        assert torch.equal(bits(y), bits(reference.w8a8_linear(x.tensor, s24.decompress(q, m8), sc, b.tensor)))


# ----------------------------------------------------------------------------- int4 values
@pytest.mark.parametrize("g", [32, 64, 128, -1])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_w4a16_matches_reference(cpu_isa, g, symmetric, dtype):
    K, N = 256, 19
    q, m, sc, z = s24.compress_int4(rand_24(N, K), g, symmetric=symmetric)
    wp = cpu_backend.prepack_sparse24_int4(q, m, sc, z, g)
    for M in (0, 1, 3, 17):
        x = torch.randn(M, K).to(dtype)
        b = torch.randn(N)
        y = torch.ops.slmkern.sparse24_w4a16_linear(x, q, m, sc, z, g, b, wp)
        close(y, reference.sparse24_w4a16_linear(x, q, m, sc, z, g, b), K)
        y2 = torch.ops.slmkern.sparse24_w4a16_linear(x, q, m, sc, z, g, b, None)
        assert torch.equal(y, y2)


# ----------------------------------------------------------------------------- torch integration
def test_opcheck():
    K, N = 36, 9
    w = rand_24(N, K)
    v, m = s24.compress(w)
    q, m8, sc = s24.compress_int8(w)
    for args in [(torch.randn(3, K), v, m, None, torch.randn(N), cpu_backend.prepack_sparse24(v, m)),
                 (torch.randn(2, 3, K).bfloat16(), v.bfloat16(), m, None, None, None),
                 (torch.randn(4, K).half(), q, m8, sc, torch.randn(N).half(), cpu_backend.prepack_sparse24(q, m8, sc)),
                 (torch.randn(4, K), q, m8, sc, None, None)]:
        torch.library.opcheck(torch.ops.slmkern.sparse24_linear.default, args)
    K = 64
    q4, m4, s4, z4 = s24.compress_int4(rand_24(N, K), 32)
    for args in [(torch.randn(3, K), q4, m4, s4, z4, 32, torch.randn(N),
                  cpu_backend.prepack_sparse24_int4(q4, m4, s4, z4, 32)),
                 (torch.randn(2, K).bfloat16(), q4, m4, s4, None, 32, None, None)]:
        torch.library.opcheck(torch.ops.slmkern.sparse24_w4a16_linear.default, args)


class S24Linear(nn.Module):
    def __init__(self, w, b, int8):
        super().__init__()
        if int8:
            v, m, sc = s24.compress_int8(w)
        else:
            (v, m), sc = s24.compress(w), None
        self.register_buffer("v", v)
        self.register_buffer("m", m)
        self.register_buffer("sc", sc)
        self.register_buffer("b", b)
        self.register_buffer("wp", cpu_backend.prepack_sparse24(v, m, sc))

    def forward(self, x):
        return torch.relu(torch.ops.slmkern.sparse24_linear(x, self.v, self.m, self.sc, self.b, self.wp)) + 1


@pytest.mark.parametrize("int8", [False, True])
def test_compile_fullgraph(int8):
    torch._dynamo.reset()
    mod = S24Linear(rand_24(24, 40), torch.randn(24), int8)
    x = torch.randn(5, 40)
    compiled = torch.compile(mod, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(x), mod(x), rtol=1e-5, atol=1e-5)
    x2 = torch.randn(3, 7, 40)
    torch.testing.assert_close(compiled(x2), mod(x2), rtol=1e-5, atol=1e-5)


def test_autograd_to_x_and_bias():
    K, N = 36, 10
    w = rand_24(N, K)
    v, m = s24.compress(w)
    x = torch.randn(4, K, requires_grad=True)
    b = torch.randn(N, requires_grad=True)
    gy = torch.randn(4, N)
    op(x, v, m, None, b).backward(gy)
    x2, b2 = x.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    torch.nn.functional.linear(x2, w, b2).backward(gy)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(b.grad, b2.grad)
    q, m8, sc = s24.compress_int8(w)
    x.grad = None
    op(x, q, m8, sc).backward(gy)
    torch.testing.assert_close(x.grad, gy @ (s24.decompress(q, m8).float() * sc[:, None]))


# ----------------------------------------------------------------------------- bad inputs
class TestBadInputs:
    K, N = 20, 7

    def setup_method(self):
        self.x = torch.randn(3, self.K)
        self.v, self.m = s24.compress(rand_24(self.N, self.K))
        self.q, self.m8, self.sc = s24.compress_int8(rand_24(self.N, self.K))

    def test_x_dtype_and_k(self):
        with pytest.raises(TypeError, match=r"\bx\b"):
            op(self.x.double(), self.v, self.m)
        with pytest.raises(ValueError, match=r"\bK\b.*multiple of 4"):
            op(torch.randn(3, 6), torch.randn(self.N, 3), torch.zeros(self.N, 1, dtype=torch.uint8))
        with pytest.raises(ValueError, match=r"values.*K/2"):
            op(torch.randn(3, self.K + 4), self.v, self.m)

    def test_values_dtype_and_layout(self):
        with pytest.raises(TypeError, match="values"):
            op(self.x, self.v.double(), self.m)
        with pytest.raises(ValueError, match="values"):
            op(self.x, torch.randn(self.K // 2, self.N).t(), self.m)

    def test_meta_shape_dtype_and_content(self):
        with pytest.raises(TypeError, match="meta"):
            op(self.x, self.v, self.m.to(torch.int8))
        with pytest.raises(ValueError, match="meta"):
            op(self.x, self.v, self.m[:, :2].contiguous())
        bad = self.m.clone()
        bad[1, 0] = (bad[1, 0] & 0xF0) | (3 | 3 << 2)
        with pytest.raises(ValueError, match="meta.*c0 < c1"):
            op(self.x, self.v, bad)
        bad = self.m.clone()
        bad[0, -1] |= 0x10          # K = 20: K % 8 == 4, the last high nibble is padding
        with pytest.raises(ValueError, match="meta.*padding"):
            op(self.x, self.v, bad)

    def test_scales_rules(self):
        with pytest.raises(ValueError, match="scales.*required"):
            op(self.x, self.q, self.m8)
        with pytest.raises(ValueError, match="scales.*None"):
            op(self.x, self.v, self.m, torch.ones(self.N))
        with pytest.raises(ValueError, match="scales"):
            op(self.x, self.q, self.m8, torch.ones(self.N + 1))
        with pytest.raises(TypeError, match="scales"):
            op(self.x, self.q, self.m8, torch.ones(self.N, dtype=torch.float64))
        q = self.q.clone()
        q[0, 0] = -128
        with pytest.raises(ValueError, match="values.*-128"):
            op(self.x, q, self.m8, self.sc)

    def test_bias(self):
        with pytest.raises(ValueError, match="bias"):
            op(self.x, self.v, self.m, None, torch.randn(self.N + 1))
        with pytest.raises(TypeError, match="bias"):
            op(self.x, self.v, self.m, None, torch.randn(self.N).double())

    def test_w_packed(self):
        wp = cpu_backend.prepack_sparse24(self.v, self.m)
        with pytest.raises(ValueError, match="w_packed"):
            op(self.x, self.v, self.m, None, None, wp[:-1])
        with pytest.raises(TypeError, match="w_packed"):
            op(self.x, self.v, self.m, None, None, wp.to(torch.int8))
        with pytest.raises(ValueError, match="w_packed"):   # an int8-values blob for float values
            op(self.x, self.v, self.m, None, None, cpu_backend.prepack_sparse24(self.q, self.m8, self.sc))

    def test_w4a16(self):
        K = 64
        q, m, sc, z = s24.compress_int4(rand_24(self.N, K), 32)
        x = torch.randn(2, K)
        f = torch.ops.slmkern.sparse24_w4a16_linear
        with pytest.raises(ValueError, match="group_size"):
            f(x, q, m, sc, z, 24)
        with pytest.raises(ValueError, match="scales"):
            f(x, q, m, sc[:, :1].contiguous(), z, 32)
        with pytest.raises(ValueError, match="zeros"):
            f(x, q, m, sc, torch.full_like(z, 16), 32)
        with pytest.raises(TypeError, match="qvalues"):
            f(x, q.to(torch.int8), m, sc, z, 32)
        bad = m.clone()
        bad[0, 0] = 0xFF
        with pytest.raises(ValueError, match="meta"):
            f(x, q, bad, sc, z, 32)
        with pytest.raises(ValueError, match="w_packed"):
            f(x, q, m, sc, z, 32, None, torch.zeros(3, dtype=torch.uint8))
