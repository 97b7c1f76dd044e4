"""int4 canonical format: bit layout, round trips, compressed-tensors view, w4a16/w4a8 specs, errors."""
from __future__ import annotations

import sys

import pytest
import torch

from slmkern import reference
from slmkern.formats import int4

SHAPES = [(1, 2), (3, 6), (7, 34), (17, 130), (65, 256)]
GROUPED = [(5, 32), (3, 64), (9, 128), (4, 256), (2, 384)]  # (N, K)
GROUP_SIZES = [32, 64, 128, -1]


def _codes(N, K):
    return torch.randint(0, 16, (N, K), dtype=torch.uint8)


@pytest.mark.parametrize("N,K", SHAPES)
def test_pack_unpack_round_trip(N, K):
    c = _codes(N, K)
    p = int4.pack(c)
    assert p.dtype == torch.uint8 and tuple(p.shape) == (N, K // 2)
    assert torch.equal(int4.unpack(p), c)
    s = c.to(torch.int8) - 8
    assert torch.equal(int4.pack(s), p)                       # int8 signed values are stored +8
    assert torch.equal(int4.unpack(p, signed=True), s)


def test_pack_bit_layout_low_nibble_first():
    c = _codes(3, 10)
    p = int4.pack(c)
    for n in range(3):
        for j in range(5):
            assert int(p[n, j]) == int(c[n, 2 * j]) | (int(c[n, 2 * j + 1]) << 4)
    assert int(int4.pack(torch.tensor([[1, 2]], dtype=torch.uint8))[0, 0]) == 0x21


@pytest.mark.parametrize("N,K,g", [(N, K, g) for N, K in GROUPED for g in GROUP_SIZES if g == -1 or K % g == 0])
@pytest.mark.parametrize("symmetric", [False, True])
def test_quantize_dequantize(N, K, g, symmetric):
    w = torch.randn(N, K) * 0.1 + (0.0 if symmetric else 0.03)
    q = int4.quantize(w, g, symmetric)
    gs = K if g == -1 else g
    assert tuple(q.packed.shape) == (N, K // 2) and q.scales.dtype == torch.float32
    assert tuple(q.scales.shape) == (N, K // gs) and q.group_size == gs
    if symmetric:
        assert q.zeros is None
    else:
        assert q.zeros.dtype == torch.uint8 and int(q.zeros.max()) <= 15
    deq = int4.dequantize(*q)
    # the format's formula, written out element by element
    codes = int4.unpack(q.packed).float()
    z = q.zeros.float() if q.zeros is not None else torch.full_like(q.scales, 8.0)
    idx = torch.arange(K) // gs
    assert torch.equal(deq, (codes - z[:, idx]) * q.scales[:, idx])
    assert bool(((w - deq).abs() <= q.scales[:, idx] / 2 * (1 + 1e-5)).all())
    assert torch.equal(q.dequantize(torch.bfloat16), deq.to(torch.bfloat16))


def test_minmax_parameters_follow_the_documented_convention():
    w = torch.randn(6, 128)
    wg = w.reshape(6, 4, 32)
    s, z = int4.minmax_params(w, 32, symmetric=True)
    assert z is None and torch.equal(s, wg.abs().amax(-1) / 7.5)   # [-amax, amax] -> [-7.5, 7.5]
    s, z = int4.minmax_params(w, 32, symmetric=False)
    lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
    assert torch.equal(s, (hi - lo) / 15)
    assert torch.equal(z, torch.round(-lo / s).clamp(0, 15).to(torch.uint8))


def test_all_zero_group_is_exact():
    w = torch.randn(4, 64)
    w[1, :32] = 0
    for sym in (False, True):
        q = int4.quantize(w, 32, sym)
        assert float(q.scales[1, 0]) == 1.0
        assert torch.equal(int4.dequantize(*q)[1, :32], torch.zeros(32))


def _ct_pack_to_int32(values_s8: torch.Tensor) -> torch.Tensor:
    """compressed-tensors pack_to_int32 semantics (num_bits=4, packed_dim=1), scalar Python."""
    rows, cols = values_s8.shape
    words = (cols + 7) // 8
    out = torch.zeros(rows, words, dtype=torch.int32)
    for r in range(rows):
        for w in range(words):
            acc = 0
            for i in range(8):
                k = 8 * w + i
                u = int(values_s8[r, k]) + 8 if k < cols else 0
                acc |= u << (4 * i)
            out[r, w] = acc - (1 << 32) if acc >= 1 << 31 else acc
    return out


@pytest.mark.skipif(sys.byteorder != "little", reason="the int32 view is a little-endian fact")
@pytest.mark.parametrize("symmetric", [False, True])
def test_compressed_tensors_int32_view(symmetric):
    N, K = 11, 128
    w = torch.randn(N, K)
    q = int4.quantize(w, 32, symmetric)
    signed = int4.unpack(q.packed, signed=True)
    expected = _ct_pack_to_int32(signed)
    assert torch.equal(q.packed.view(torch.int32), expected)           # [N, K/2] u8 -> [N, K/8] i32
    ct = int4.to_compressed_tensors(*q)
    assert torch.equal(ct["weight_packed"], expected)
    assert ct["weight_packed"].data_ptr() == q.packed.data_ptr()       # a reinterpretation, no copy
    assert ct["weight_shape"].tolist() == [N, K]
    if symmetric:
        assert "weight_zero_point" not in ct
    else:
        zp_signed = q.zeros.to(torch.int8) - 8                         # compressed-tensors' zero point
        expected_zp = _ct_pack_to_int32(zp_signed.T.contiguous()).T    # packed along N
        assert tuple(ct["weight_zero_point"].shape) == ((N + 7) // 8, K // 32)
        assert torch.equal(ct["weight_zero_point"], expected_zp)


def test_compressed_tensors_padding_when_k_not_multiple_of_8():
    w = torch.randn(3, 36)
    q = int4.quantize(w, -1, True)  # per-channel, K=36
    ct = int4.to_compressed_tensors(*q)
    assert torch.equal(ct["weight_packed"], _ct_pack_to_int32(int4.unpack(q.packed, signed=True)))


# ----------------------------------------------------------------------------- errors name the argument
def test_errors_name_the_argument():
    w = torch.randn(8, 128)
    with pytest.raises(ValueError, match="K must be even"):
        int4.quantize(torch.randn(4, 33), -1)
    with pytest.raises(ValueError, match="group_size"):
        int4.quantize(torch.randn(4, 96), 64)                 # K % group_size != 0
    with pytest.raises(ValueError, match="group_size"):
        int4.quantize(w, 48)                                  # unsupported group size
    with pytest.raises(TypeError, match="w:"):
        int4.quantize(torch.randint(0, 3, (4, 64)), 32)
    with pytest.raises(ValueError, match="w:.*NaN"):
        int4.quantize(torch.full((4, 64), float("nan")), 32)
    q = int4.quantize(w, 32, symmetric=False)
    with pytest.raises(ValueError, match="scales:"):
        int4.dequantize(q.packed, q.scales[:, :3], q.zeros)
    with pytest.raises(ValueError, match="scales:"):
        int4.dequantize(q.packed, q.scales[:5], q.zeros)
    with pytest.raises(TypeError, match="scales:"):
        int4.dequantize(q.packed, q.scales.half(), q.zeros)
    with pytest.raises(ValueError, match="scales:"):
        int4.dequantize(q.packed, q.scales, q.zeros, group_size=64)
    with pytest.raises(ValueError, match="zeros:.*0..15"):
        int4.dequantize(q.packed, q.scales, torch.full_like(q.zeros, 16))
    with pytest.raises(ValueError, match="zeros:"):
        int4.dequantize(q.packed, q.scales, q.zeros[:, :2])
    with pytest.raises(TypeError, match="zeros:"):
        int4.dequantize(q.packed, q.scales, q.zeros.to(torch.int32))
    with pytest.raises(ValueError, match="packed:"):
        int4.dequantize(q.packed[:, :-1], q.scales, q.zeros, group_size=32)   # wrong length
    with pytest.raises(TypeError, match="packed:"):
        int4.dequantize(q.packed.to(torch.int8), q.scales, q.zeros)
    with pytest.raises(ValueError, match="q:.*even"):
        int4.pack(torch.zeros(2, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="q:.*0..15"):
        int4.pack(torch.full((2, 4), 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="q:.*-8..7"):
        int4.pack(torch.full((2, 4), 8, dtype=torch.int8))
    with pytest.raises(TypeError, match="q:"):
        int4.pack(torch.zeros(2, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match="packed:"):
        int4.unpack(torch.zeros(2, 4, dtype=torch.int8))


# ----------------------------------------------------------------------------- reference specs
M_VALUES = [0, 1, 3, 17, 65]


def _w4a8_by_formula(x, q, g, bias):
    """Independent statement of w4a8: qx @ (code - z) per group, scaled, summed in group order."""
    K = x.shape[-1]
    qx, sx = reference.quantize_rows_s8(x.reshape(-1, K))
    codes = int4.unpack(q.packed).to(torch.int64)
    z = q.zeros.to(torch.int64) if q.zeros is not None else torch.full(q.scales.shape, 8, dtype=torch.int64)
    y = torch.zeros(qx.shape[0], codes.shape[0])
    for i in range(K // g):
        sl = slice(i * g, (i + 1) * g)
        acc = qx[:, sl].to(torch.int64) @ (codes[:, sl] - z[:, i:i + 1]).T
        y = y + acc.to(torch.int32).float() * q.scales[:, i]
    y = y * sx.unsqueeze(1)
    if bias is not None:
        y = y + bias.float()
    return y


@pytest.mark.parametrize("M", M_VALUES)
@pytest.mark.parametrize("g,symmetric", [(32, False), (64, True), (128, False), (-1, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w4a16_and_w4a8_reference(M, g, symmetric, dtype):
    N, K = 19, 256
    w = torch.randn(N, K)
    q = int4.quantize(w, g, symmetric)
    gs = K if g == -1 else g
    x = torch.randn(M, K).to(dtype)
    bias = torch.randn(N)
    y16 = reference.w4a16_linear(x, *q, g, bias)
    assert y16.dtype == dtype and tuple(y16.shape) == (M, N)
    expected = (x.float() @ q.dequantize().T + bias).to(dtype)
    torch.testing.assert_close(y16, expected, rtol=1e-5 if dtype == torch.float32 else 1e-2,
                               atol=1e-4 if dtype == torch.float32 else 1e-2)
    y8 = reference.w4a8_linear(x, *q, g, bias)
    assert y8.dtype == dtype and tuple(y8.shape) == (M, N)
    assert torch.equal(y8, _w4a8_by_formula(x, q, gs, bias).to(dtype))       # bit-exact spec
    if M:  # and it is a W4A8 approximation of the float product
        ref = x.float() @ q.dequantize().T + bias
        rel = (y8.float() - ref).norm() / ref.norm()
        assert rel < 0.03


def test_w4a8_batched_shape_and_nan_row():
    q = int4.quantize(torch.randn(8, 64), 32, False)
    x = torch.randn(2, 3, 64)
    x[1, 2, 5] = float("nan")
    y = reference.w4a8_linear(x, *q, 32)
    assert tuple(y.shape) == (2, 3, 8)
    assert bool(torch.isnan(y[1, 2]).all()) and bool(torch.isfinite(y[0]).all())


def test_reference_int4_errors_name_the_argument():
    q = int4.quantize(torch.randn(8, 64), 32, False)
    with pytest.raises(ValueError, match=r"\bw must have shape"):   # the canonical codes, named w as in the op
        reference.w4a16_linear(torch.randn(2, 66), *q, 32)
    with pytest.raises(ValueError, match="bias"):
        reference.w4a8_linear(torch.randn(2, 64), *q, 32, bias=torch.zeros(7))
    with pytest.raises(TypeError, match="x"):
        reference.w4a16_linear(torch.randn(2, 64).double(), *q, 32)
    with pytest.raises(ValueError, match="scales"):
        reference.w4a16_linear(torch.randn(2, 64), *q, 64)
