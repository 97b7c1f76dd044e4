"""slmkern.formats.bitmask: the canonical unstructured format, its checks and the CPU packing."""
from __future__ import annotations

import pytest
import torch

from slmkern._backends import cpu as cpu_backend
from slmkern.formats import bitmask as bf
from slmkern.formats.int8 import quantize_per_channel


def sparse(N, K, sp, dtype=torch.float32):
    return (torch.randn(N, K) * (torch.rand(N, K) >= sp)).to(dtype)


def test_documented_bit_layout():
    # K = 10, row 0 keeps columns 0, 2 and 9: bytes 0b101 and 0b10; row 1 keeps nothing
    W = torch.zeros(2, 10)
    W[0, 0], W[0, 2], W[0, 9] = 1.5, -2.0, 3.0
    values, bitmask, row_offsets = bf.compress(W)
    assert bitmask.dtype == torch.uint8 and bitmask.tolist() == [[0b101, 0b10], [0, 0]]
    assert values.tolist() == [1.5, -2.0, 3.0]
    assert row_offsets.dtype == torch.int64 and row_offsets.tolist() == [0, 3, 3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8], ids=str)
@pytest.mark.parametrize("K", [1, 7, 8, 9, 64, 131])
@pytest.mark.parametrize("sp", [0.0, 0.5, 0.9, 1.0])
def test_roundtrip_is_exact(dtype, K, sp):
    N = 13
    if dtype == torch.int8:
        W = torch.randint(-127, 128, (N, K), dtype=torch.int8) * (torch.rand(N, K) >= sp)
    else:
        W = sparse(N, K, sp, dtype)
    values, bitmask, row_offsets = bf.compress(W)
    assert values.dtype == dtype and values.shape == ((W != 0).sum(),)
    assert bitmask.shape == (N, (K + 7) // 8)
    bf.validate(values, bitmask, row_offsets, K, torch.ones(N) if dtype == torch.int8 else None)
    assert torch.equal(bf.decompress(values, bitmask, row_offsets, K), W)
    # row-major order: row by row, increasing column
    assert torch.equal(values, W[W != 0])


def test_compress_int8_matches_per_channel_quantization():
    W = sparse(19, 70, 0.7)
    W[3] = 0  # an all-zero row
    values, bitmask, row_offsets, scales = bf.compress_int8(W)
    q, s = quantize_per_channel(W)
    assert values.dtype == torch.int8 and torch.equal(scales, s)
    assert torch.equal(bf.decompress(values, bitmask, row_offsets, 70), q)
    assert int(row_offsets[4] - row_offsets[3]) == 0
    torch.testing.assert_close(bf.dequantize(values, bitmask, row_offsets, 70, scales), q.float() * s[:, None])


def test_compressed_tensors_start_offsets_convert():
    W = sparse(5, 20, 0.5)
    _, _, row_offsets = bf.compress(W)
    starts = row_offsets[:-1]  # compressed-tensors keeps [N] start offsets
    assert torch.equal(torch.cat([starts, row_offsets[-1:]]), row_offsets)


@pytest.mark.parametrize("int8v", [False, True])
@pytest.mark.parametrize("K", [1, 63, 64, 65, 200])
def test_cpp_pack_matches_reference_pack(int8v, K):
    if not cpu_backend.has_cpp():
        pytest.skip("slmkern._C is not built")
    N = 11
    W = sparse(N, K, 0.6)
    if int8v:
        values, bitmask, row_offsets, scales = bf.compress_int8(W)
    else:
        (values, bitmask, row_offsets), scales = bf.compress(W), None
    packed = cpu_backend.prepack_bitmask(values, bitmask, row_offsets, K, scales)
    want = bf.pack_reference(values, bitmask, row_offsets, K)
    assert packed.shape == (bf.packed_bytes(N, K, values.shape[0], int8v),)
    assert cpu_backend._C.sparse_packed_bytes(N, K, values.shape[0], int(int8v)) == packed.shape[0]
    assert torch.equal(packed, want)


def test_pack_widens_half_values_exactly():
    if not cpu_backend.has_cpp():
        pytest.skip("slmkern._C is not built")
    for dtype in (torch.bfloat16, torch.float16):
        W = sparse(7, 33, 0.5, dtype)
        v, b, r = bf.compress(W)
        assert torch.equal(cpu_backend.prepack_bitmask(v, b, r, 33), bf.pack_reference(v, b, r, 33))


class TestValidate:
    K, N = 21, 6

    def setup_method(self):
        W = sparse(self.N, self.K, 0.5)
        W[0, 0] = 1.0
        self.v, self.b, self.r = bf.compress(W)

    def check(self, exc, match, v=None, b=None, r=None, K=None, s=None):
        with pytest.raises(exc, match=match):
            bf.validate(self.v if v is None else v, self.b if b is None else b, self.r if r is None else r,
                        self.K if K is None else K, s)

    def test_ok(self):
        assert bf.validate(self.v, self.b, self.r, self.K) == self.N

    def test_length_mismatch(self):
        self.check(ValueError, r"values.*length|length.*values", v=self.v[:-1])
        self.check(ValueError, r"row_offsets", r=self.r[:-1])

    def test_non_monotone(self):
        r = self.r.clone()
        r[2], r[3] = int(r[3]) + 1, int(r[2])
        self.check(ValueError, r"row_offsets.*non-decreasing", r=r)

    def test_first_offset(self):
        self.check(ValueError, r"row_offsets\[0\]", r=self.r + 1)

    def test_popcount_mismatch(self):
        b = self.b.clone()
        b[1, 0] ^= 1  # flips one bit in row 1 only
        self.check(ValueError, r"popcount", b=b)

    def test_padding_bits(self):
        b = self.b.clone()
        b[2, -1] |= 0x80  # column 23 >= K = 21
        self.check(ValueError, r"bitmask.*padding|padding.*bitmask|past column", b=b)

    def test_dtypes(self):
        self.check(TypeError, r"bitmask", b=self.b.to(torch.int32))
        self.check(TypeError, r"row_offsets", r=self.r.to(torch.int32))
        self.check(TypeError, r"values", v=self.v.double())
        self.check(ValueError, r"bitmask", K=self.K + 8)

    def test_int8_needs_scales_and_range(self):
        v8 = torch.ones(self.v.shape, dtype=torch.int8)
        self.check(TypeError, r"scales", v=v8)
        self.check(ValueError, r"scales", v=v8, s=torch.ones(self.N + 1))
        bad = v8.clone()
        bad[0] = -128
        self.check(ValueError, r"-128", v=bad, s=torch.ones(self.N))
        self.check(TypeError, r"scales", s=torch.ones(self.N))  # float values take none

    def test_prepack_validates(self):
        r = self.r.clone()
        r[-1] += 1
        with pytest.raises(ValueError, match="row_offsets"):
            cpu_backend.prepack_bitmask(self.v, self.b, r, self.K)
