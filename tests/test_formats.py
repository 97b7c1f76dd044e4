"""int8 canonical format and the CPU packed layout."""
from __future__ import annotations

import pytest
import torch

from slmkern._backends import cpu as cpu_backend
from slmkern.formats import int8 as int8_format


def rand_int8(N: int, K: int) -> torch.Tensor:
    return torch.randint(-127, 128, (N, K), dtype=torch.int8)


@pytest.mark.parametrize("N,K", [(1, 1), (3, 5), (16, 4), (19, 37), (33, 130), (100, 384)])
def test_cpp_pack_matches_reference_pack(N, K):
    if not cpu_backend.has_cpp():
        pytest.skip("slmkern._C is not built")
    w = rand_int8(N, K)
    packed = cpu_backend.prepack_int8(w)
    assert packed.dtype == torch.uint8 and packed.numel() == int8_format.packed_bytes(N, K)
    assert torch.equal(packed, int8_format.pack_reference(w))


@pytest.mark.parametrize("N,K", [(3, 5), (19, 37), (33, 130)])
def test_pack_layout_is_the_documented_one(N, K):
    """Read every element back through the documented index formula."""
    w = rand_int8(N, K)
    packed = int8_format.pack_reference(w)
    Np, Kp = -(-N // 16) * 16, -(-K // 4) * 4
    tiles = packed[: Np * Kp].view(torch.int8).reshape(Np // 16, Kp // 4, 16, 4)
    colsum = packed[Np * Kp:].view(torch.int32)
    for n in range(Np):
        for k in range(Kp):
            expect = int(w[n, k]) if (n < N and k < K) else 0
            assert int(tiles[n // 16, k // 4, n % 16, k % 4]) == expect
    assert torch.equal(colsum[:N], w.to(torch.int32).sum(1, dtype=torch.int32))
    assert torch.all(colsum[N:] == 0)


def test_quantize_per_channel_round_trip_error_is_half_a_step():
    w = torch.randn(50, 70) * torch.rand(50, 1) * 3
    q, s = int8_format.quantize_per_channel(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (50,)
    assert int(q.min()) >= -127
    err = (int8_format.dequantize(q, s) - w).abs()
    assert torch.all(err <= s.unsqueeze(1) / 2 * (1 + 1e-5))
    # the row's largest magnitude maps to +-127 exactly
    assert torch.all(q.abs().amax(1) == 127)


def test_quantize_per_channel_zero_row():
    w = torch.randn(4, 9)
    w[2] = 0
    q, s = int8_format.quantize_per_channel(w)
    assert torch.all(q[2] == 0) and torch.isfinite(s).all()


def test_check_weight_rejects_bad_weights():
    with pytest.raises(TypeError, match="w: expected torch.int8"):
        int8_format.check_weight(torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"w: expected shape \(N, K\)"):
        int8_format.check_weight(torch.zeros(4, dtype=torch.int8))
    w = rand_int8(3, 3)
    w[1, 1] = -128
    with pytest.raises(ValueError, match="-128"):
        int8_format.check_weight(w)
    with pytest.raises(ValueError, match="weight: expected a 2-D float"):
        int8_format.quantize_per_channel(torch.zeros(3, dtype=torch.float32))
