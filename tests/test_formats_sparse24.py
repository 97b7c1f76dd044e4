"""slmkern.formats.sparse24: canonical 2:4 compression, bit layout, validation, CPU packing."""
from __future__ import annotations

import pytest
import torch

from slmkern.formats import sparse24 as s24
from slmkern._backends import cpu as cpu_backend

FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def rand_24(N: int, K: int, dtype=torch.float32, density=(0, 1, 2)) -> torch.Tensor:
    """Random 2:4 weight whose groups hold 0, 1 or 2 nonzeros (all three occur)."""
    w = torch.randn(N, K).to(dtype)
    w[w == 0] = 1
    g = w.reshape(N, K // 4, 4)
    keep = torch.tensor(density)[torch.randint(len(density), (N, K // 4))]
    order = torch.rand(N, K // 4, 4).argsort(-1)
    mask = torch.arange(4).expand(N, K // 4, 4) < keep.unsqueeze(-1)
    mask = torch.zeros_like(mask).scatter_(-1, order, mask)
    return (g * mask).reshape(N, K)


@pytest.mark.parametrize("dtype", FLOATS + (torch.int8,), ids=str)
@pytest.mark.parametrize("K", [4, 12, 20, 36, 132])
def test_roundtrip_is_exact(dtype, K):
    N = 9
    w = rand_24(N, K) if dtype != torch.int8 else rand_24(N, K).mul(40).clamp(-127, 127).to(torch.int8)
    w = w.to(dtype)
    values, meta = s24.compress(w)
    assert values.shape == (N, K // 2) and values.dtype == dtype
    assert meta.shape == (N, (K + 7) // 8) and meta.dtype == torch.uint8
    assert torch.equal(s24.decompress(values, meta), w)
    s24.validate(values, meta, torch.ones(N) if dtype == torch.int8 else None)
    # deterministic: compressing the decompressed weight gives the same tensors
    v2, m2 = s24.compress(s24.decompress(values, meta))
    assert torch.equal(v2, values) and torch.equal(m2, meta)


def test_canonical_padding_and_bit_layout():
    # groups: [0,0,0,5] -> cols (0,3); [0,3,0,0] -> (0,1); all zero -> (0,1); [1,0,2,0] -> (0,2)
    w = torch.tensor([[0., 0, 0, 5, 0, 3, 0, 0, 0, 0, 0, 0, 1, 0, 2, 0]])
    values, meta = s24.compress(w)
    assert values.tolist() == [[0, 5, 0, 3, 0, 0, 1, 2]]
    nib = [0 | 3 << 2, 0 | 1 << 2, 0 | 1 << 2, 0 | 2 << 2]
    assert meta.tolist() == [[nib[0] | nib[1] << 4, nib[2] | nib[3] << 4]]


def test_k_mod_8_is_4_leaves_last_high_nibble_zero():
    w = rand_24(5, 12, density=(2,))
    _, meta = s24.compress(w)
    assert meta.shape == (5, 2)
    assert bool((meta[:, -1] >> 4 == 0).all())


def test_compress_rejects_dense_groups_and_bad_k():
    w = torch.zeros(2, 8)
    w[1, 4:7] = 1.0
    with pytest.raises(ValueError, match="more than 2 nonzeros"):
        s24.compress(w)
    with pytest.raises(ValueError, match=r"\bK\b"):
        s24.compress(torch.zeros(2, 6))


class TestValidate:
    def setup_method(self):
        self.w = rand_24(6, 20)
        self.v, self.m = s24.compress(self.w)

    def test_good(self):
        assert s24.validate(self.v, self.m) == (6, 20)

    def test_c0_not_below_c1(self):
        m = self.m.clone()
        m[2, 1] = (m[2, 1] & 0xF0) | (2 | 2 << 2)   # c0 == c1
        with pytest.raises(ValueError, match="meta.*c0 < c1"):
            s24.validate(self.v, m)
        m[2, 1] = (m[2, 1] & 0x0F) | ((3 | 1 << 2) << 4)  # c0 > c1 in a high nibble
        with pytest.raises(ValueError, match="meta"):
            s24.validate(self.v, m)

    def test_nonzero_padding_bits(self):
        m = self.m.clone()
        m[0, -1] |= 0x40
        with pytest.raises(ValueError, match="meta.*padding"):
            s24.validate(self.v, m)

    def test_k_not_multiple_of_4(self):
        with pytest.raises(ValueError, match=r"\bK\b"):
            s24.validate(torch.randn(3, 5), torch.zeros(3, 2, dtype=torch.uint8))

    def test_shapes_and_dtypes(self):
        with pytest.raises(ValueError, match="meta"):
            s24.validate(self.v, self.m[:, :2].contiguous())
        with pytest.raises(TypeError, match="meta"):
            s24.validate(self.v, self.m.to(torch.int8))
        with pytest.raises(TypeError, match="values"):
            s24.validate(self.v.double(), self.m)

    def test_scales_rules(self):
        q = self.v.mul(10).clamp(-127, 127).to(torch.int8)
        with pytest.raises(ValueError, match="scales"):
            s24.validate(q, self.m)
        with pytest.raises(ValueError, match="scales"):
            s24.validate(self.v, self.m, torch.ones(6))
        with pytest.raises(ValueError, match="scales"):
            s24.validate(q, self.m, torch.ones(5))
        with pytest.raises(TypeError, match="scales"):
            s24.validate(q, self.m, torch.ones(6, dtype=torch.float64))
        q[0, 0] = -128
        with pytest.raises(ValueError, match="values.*-128"):
            s24.validate(q, self.m, torch.ones(6))


@pytest.mark.parametrize("dtype", FLOATS + (torch.int8,), ids=str)
@pytest.mark.parametrize("N,K", [(1, 4), (5, 36), (7, 132), (9, 260), (4, 256), (33, 100)])
def test_cpp_pack_equals_reference_pack(dtype, N, K):
    if not cpu_backend.has_cpp():
        pytest.skip("needs slmkern._C")
    w = rand_24(N, K)
    if dtype == torch.int8:
        v, m, sc = s24.compress_int8(w)
    else:
        (v, m), sc = s24.compress(w.to(dtype)), None
    packed = cpu_backend.prepack_sparse24(v, m, sc)
    assert packed.shape == (s24.packed_bytes(N, K, dtype),)
    assert cpu_backend._C.sparse24_packed_bytes(N, K, s24.value_code(dtype)) == packed.numel()
    assert torch.equal(packed, s24.pack_reference(v, m))


def test_compress_int8_matches_dense_quantization():
    from slmkern.formats import int8 as int8_format

    w = rand_24(11, 36)
    qv, m, sc = s24.compress_int8(w)
    q, s = int8_format.quantize_per_channel(w)
    assert torch.equal(s24.decompress(qv, m), q) and torch.equal(sc, s)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("g", [32, 64, -1])
def test_int4_roundtrip_within_half_a_step(symmetric, g):
    N, K = 6, 128
    w = rand_24(N, K)
    q, m, sc, z = s24.compress_int4(w, g, symmetric=symmetric)
    gg = K if g == -1 else g
    assert q.shape == (N, K // 4) and sc.shape == (N, K // gg)
    assert (z is None) == symmetric
    s24.validate_int4(q, m, sc, z, g)
    wd = s24.decompress_int4(q, m, sc, z, g)
    assert bool((wd[w == 0] == 0).all())                       # pruned and padded stay exactly 0
    step = sc.repeat_interleave(gg, dim=1)
    assert bool(((wd - w).abs() <= step * 0.5 + 1e-6).all())
    # the dense int4 expansion dequantizes to the same weight
    from slmkern.formats import int4 as int4_format
    dense = s24.int4_to_dense_int4(q, m, z, g)
    assert torch.equal(int4_format.dequantize(dense, sc, z, gg), wd)


def test_validate_int4_rejects():
    N, K = 4, 64
    q, m, sc, z = s24.compress_int4(rand_24(N, K), 32)
    with pytest.raises(ValueError, match="group_size"):
        s24.validate_int4(q, m, sc, z, 24)
    with pytest.raises(ValueError, match="zeros"):
        s24.validate_int4(q, m, sc, torch.full_like(z, 16), 32)
    with pytest.raises(ValueError, match="scales"):
        s24.validate_int4(q, m, sc[:, :1].contiguous(), z, 32)
    with pytest.raises(TypeError, match="qvalues"):
        s24.validate_int4(q.to(torch.int8), m, sc, z, 32)


def test_int8_packed_layout_v2_byte_positions():
    """The int8 CPU layout as the module docstring states it: 16-row tiles, 320-byte blocks of
    32 columns, values [w][r][j], meta [r//2][w][r%2], then int32 row sums."""
    N, K = 21, 72                                         # 2 tiles, 3 blocks (K padded to 96)
    v, m, sc = s24.compress_int8(rand_24(N, K))
    p = s24.pack_reference(v, m)
    S, T = 3, 2
    assert p.numel() == T * S * 320 + 4 * 32 == s24.packed_bytes(N, K, torch.int8)
    pv = p.view(torch.int8)
    for n in range(N):
        t, r = divmod(n, 16)
        for i in range(K // 2):
            s, w, j = i // 16, (i // 4) % 4, i % 4
            assert int(pv[(t * S + s) * 320 + 64 * w + 4 * r + j]) == int(v[n, i])
        for b in range(m.shape[1]):
            s, w = divmod(b, 4)
            assert int(p[(t * S + s) * 320 + 256 + 8 * (r // 2) + 2 * w + r % 2]) == int(m[n, b])
    rs = p[T * S * 320:].view(torch.int32)
    assert torch.equal(rs[:N], v.to(torch.int32).sum(1, dtype=torch.int32)) and not rs[N:].any()
    if cpu_backend.has_cpp():
        assert torch.equal(cpu_backend.prepack_sparse24(v, m, sc), p)
