"""GPTQ (v1 / v2) and AWQ-GEMM import, checked against tensors packed by hand in this file.

Every packed word is built here from known codes with explicit shifts, following the layouts
documented in slmkern/interop/{gptq,awq}.py; the expected weight is the documented
dequantization formula evaluated element by element. The import must reproduce it exactly.
"""
from __future__ import annotations

import json
import random
import zlib

import pytest
import torch
from torch import nn

from slmkern.formats import int4
from slmkern.interop import awq, gptq
from slmkern.interop._safetensors_io import CheckpointError, write_safetensors
from slmkern.nn import Int4Linear

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble slot i of a word holds column 8c + AWQ_ORDER[i]


def _s32(u: int) -> int:
    return u - (1 << 32) if u >= (1 << 31) else u


def _word(nibbles: list[int]) -> int:
    """8 values -> one int32, nibbles[i] in bits 4i..4i+3."""
    w = 0
    for i, v in enumerate(nibbles):
        assert 0 <= v <= 15
        w |= v << (4 * i)
    return _s32(w)


def _random_layer(N, K, g, rng, symmetric):
    G = K // g
    codes = [[rng.randrange(16) for _ in range(K)] for _ in range(N)]           # codes[n][k]
    zeros = [[8 if symmetric else rng.randrange(16) for _ in range(G)] for _ in range(N)]
    scales = (torch.rand(G, N, generator=torch.Generator().manual_seed(rng.randrange(1 << 30))) * 0.1 + 0.01
              ).to(torch.float16)                                                # [G, N] like the checkpoints
    return codes, zeros, scales


def _formula(codes, zeros, scales, group_of):
    """W[n, k] = float32(scale[group, n]) * (code - zero), evaluated per element in fp32."""
    N, K = len(codes), len(codes[0])
    s = scales.float()
    w = torch.empty(N, K)
    for n in range(N):
        for k in range(K):
            gi = group_of(k)
            w[n, k] = torch.tensor(float(codes[n][k] - zeros[n][gi])) * s[gi, n]
    return w


def _gptq_tensors(codes, zeros, scales, g, version, g_idx=None):
    N, K = len(codes), len(codes[0])
    G = K // g
    qweight = torch.tensor([[_word([codes[n][8 * i + j] for j in range(8)]) for n in range(N)]
                            for i in range(K // 8)], dtype=torch.int32)               # [K/8, N]
    off = 1 if version == "gptq" else 0
    qzeros = torch.tensor([[_word([(zeros[8 * c + j][gi] - off) & 0xF for j in range(8)]) for c in range(N // 8)]
                           for gi in range(G)], dtype=torch.int32)                     # [G, N/8]
    t = {"qweight": qweight, "qzeros": qzeros, "scales": scales}
    if g_idx is not None:
        t["g_idx"] = torch.tensor(g_idx, dtype=torch.int32)
    return t


def _awq_tensors(codes, zeros, scales):
    N, K = len(codes), len(codes[0])
    G = len(zeros[0])
    qweight = torch.tensor([[_word([codes[8 * c + AWQ_ORDER[i]][k] for i in range(8)]) for c in range(N // 8)]
                            for k in range(K)], dtype=torch.int32)                     # [K, N/8]
    qzeros = torch.tensor([[_word([zeros[8 * c + AWQ_ORDER[i]][gi] for i in range(8)]) for c in range(N // 8)]
                           for gi in range(G)], dtype=torch.int32)                     # [G, N/8]
    return {"qweight": qweight, "qzeros": qzeros, "scales": scales}


# (8, 48, 16), (16, 96, 24): any even g dividing K is slmkern int4 (slmkern.formats.common.group_size_ok)
CASES = [(8, 64, 32), (16, 128, 64), (24, 128, 128), (8, 48, -1), (8, 48, 16), (16, 96, 24)]


@pytest.mark.parametrize("version", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("N,K,group_size", CASES)
def test_gptq_import_matches_hand_packed(version, symmetric, N, K, group_size):
    rng = random.Random(zlib.crc32(repr((version, symmetric, N, K, group_size)).encode()))
    g = K if group_size == -1 else group_size
    codes, zeros, scales = _random_layer(N, K, g, rng, symmetric)
    if version == "gptq":  # v1 cannot store zero 0 (it would be -1); AutoGPTQ never writes it
        zeros = [[max(z, 1) for z in row] for row in zeros]
    with_gidx = (N + K) % 2 == 0
    t = _gptq_tensors(codes, zeros, scales, g, version, [k // g for k in range(K)] if with_gidx else None)
    expected = _formula(codes, zeros, scales, lambda k: k // g)

    q = gptq.gptq_to_int4(t, group_size, version)
    assert q.shape == (N, K) and q.group_size == g
    assert (q.zeros is None) == symmetric
    assert torch.equal(q.dequantize(), expected)
    assert torch.equal(gptq.dequantize_gptq(t, group_size, version), expected)
    # the other version's reading differs by exactly one zero step: the test can tell them apart
    other = "gptq_v2" if version == "gptq" else "gptq"
    assert not torch.equal(gptq.dequantize_gptq(t, group_size, other), expected)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("N,K,group_size", CASES)
def test_awq_import_matches_hand_packed(symmetric, N, K, group_size):
    rng = random.Random(zlib.crc32(repr(("awq", symmetric, N, K, group_size)).encode()))
    g = K if group_size == -1 else group_size
    codes, zeros, scales = _random_layer(N, K, g, rng, symmetric)
    t = _awq_tensors(codes, zeros, scales)
    expected = _formula(codes, zeros, scales, lambda k: k // g)
    q = awq.awq_to_int4(t, group_size)
    assert (q.zeros is None) == symmetric
    assert torch.equal(q.dequantize(), expected)
    assert torch.equal(awq.dequantize_awq(t, group_size), expected)


def test_odd_group_size_is_refused_with_the_rule():
    from slmkern.formats.common import INT4_GROUP_MULTIPLE, group_size_rule
    codes, zeros, scales = _random_layer(8, 24, 3, random.Random(5), False)
    zeros = [[max(z, 1) for z in r] for r in zeros]
    want = (f"layers.0.q_proj: slmkern int4 needs group_size {group_size_rule(INT4_GROUP_MULTIPLE)}, "
            "got K=24 group_size=3")
    for convert in (lambda: gptq.gptq_to_int4(_gptq_tensors(codes, zeros, scales, 3, "gptq_v2"), 3, "gptq_v2",
                                              where="layers.0.q_proj"),
                    lambda: awq.awq_to_int4(_awq_tensors(codes, zeros, scales), 3, where="layers.0.q_proj")):
        with pytest.raises(CheckpointError) as err:
            convert()
        assert str(err.value) == want


def test_awq_order_is_interleaved():
    """W[n, k] = n packs to the word 0x75316420 (slots hold columns 0,2,4,6,1,3,5,7) and reads back as n."""
    codes2 = [[n for _ in range(32)] for n in range(8)]                  # W[n, k] = n
    t2 = _awq_tensors(codes2, [[0] for _ in range(8)], torch.ones(1, 8, dtype=torch.float16))
    assert int(t2["qweight"][0, 0]) & 0xFFFFFFFF == 0x75316420          # slots hold 0,2,4,6,1,3,5,7
    q = awq.awq_to_int4(t2, -1)
    assert torch.equal(int4.unpack(q.packed)[:, 0], torch.arange(8, dtype=torch.uint8))


def test_imported_weight_runs_in_int4linear():
    rng = random.Random(7)
    N, K, g = 16, 128, 64
    codes, zeros, scales = _random_layer(N, K, g, rng, False)
    t = _gptq_tensors(codes, [[max(z, 1) for z in r] for r in zeros], scales, g, "gptq")
    q = gptq.gptq_to_int4(t, g, "gptq")
    lin = nn.Linear(K, N)
    mod = Int4Linear.from_int4(lin, q)
    x = torch.randn(3, K)
    ref = nn.functional.linear(x, gptq.dequantize_gptq(t, g, "gptq"), lin.bias)
    torch.testing.assert_close(mod(x), ref, rtol=1e-4, atol=1e-4)


def test_act_order_is_refused_but_dequantizes():
    rng = random.Random(3)
    N, K, g = 8, 64, 32
    codes, zeros, scales = _random_layer(N, K, g, rng, False)
    zeros = [[max(z, 1) for z in r] for r in zeros]
    perm = list(range(K))
    rng.shuffle(perm)
    g_idx = [0] * K
    for pos, k in enumerate(perm):  # desc_act: the pos-th column in activation order goes to group pos // g
        g_idx[k] = pos // g
    t = _gptq_tensors(codes, zeros, scales, g, "gptq", g_idx)
    with pytest.raises(CheckpointError, match="act-order"):
        gptq.gptq_to_int4(t, g, "gptq")
    assert torch.equal(gptq.dequantize_gptq(t, g, "gptq"), _formula(codes, zeros, scales, lambda k: g_idx[k]))


def _small_gptq(version="gptq_v2"):
    rng = random.Random(11)
    codes, zeros, scales = _random_layer(8, 64, 32, rng, False)
    zeros = [[max(z, 1) for z in r] for r in zeros]
    return _gptq_tensors(codes, zeros, scales, 32, version)


@pytest.mark.parametrize("mutate,match", [
    (lambda t: t.pop("qzeros"), "qzeros: missing"),
    (lambda t: t.__setitem__("qweight", t["qweight"].to(torch.int64)), "qweight: expected int32"),
    (lambda t: t.__setitem__("qzeros", t["qzeros"][:1]), "qzeros: expected int32"),
    (lambda t: t.__setitem__("scales", t["scales"][:, :4]), "scales: expected float"),
    (lambda t: t.__setitem__("scales", t["scales"].clone().fill_(float("nan"))), "NaN"),
    (lambda t: t.__setitem__("g_idx", torch.full((64,), 2, dtype=torch.int32)), r"g_idx: group indices"),
    (lambda t: t.__setitem__("g_idx", torch.full((63,), 0, dtype=torch.int32)), r"g_idx: expected"),
])
def test_gptq_bad_layers_raise_clearly(mutate, match):
    t = _small_gptq()
    mutate(t)
    with pytest.raises(CheckpointError, match=match):
        gptq.gptq_to_int4(t, 32, "gptq_v2", where="layers.0.q_proj")


def test_gptq_refusals():
    t = _small_gptq()
    with pytest.raises(CheckpointError, match="group_size"):
        gptq.gptq_to_int4(t, 24, "gptq_v2")
    with pytest.raises(CheckpointError, match="checkpoint_format"):
        gptq.gptq_to_int4(t, 32, "gptq_v3")
    with pytest.raises(CheckpointError, match="model's Linear"):
        gptq.gptq_to_int4(t, 32, "gptq_v2", shape=(8, 128))
    v1 = dict(t)
    v1["qzeros"] = torch.full_like(t["qzeros"], -1)                     # every stored nibble 15 -> zero 16
    with pytest.raises(CheckpointError, match="zero point 16"):
        gptq.gptq_to_int4(v1, 32, "gptq")


def test_awq_bad_layers_raise_clearly():
    rng = random.Random(5)
    codes, zeros, scales = _random_layer(8, 64, 32, rng, False)
    t = _awq_tensors(codes, zeros, scales)
    with pytest.raises(CheckpointError, match="qzeros: expected"):
        awq.awq_to_int4({**t, "qzeros": t["qzeros"].T.contiguous().repeat(1, 2)}, 32)
    with pytest.raises(CheckpointError, match="not a multiple"):
        awq.awq_to_int4(t, 48)
    with pytest.raises(CheckpointError, match="scales: missing"):
        awq.awq_to_int4({k: v for k, v in t.items() if k != "scales"}, 32)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 32)
        self.down = nn.Linear(32, 8, bias=False)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(self.down(torch.relu(self.up(x))))


def _write_gptq_dir(path, version="gptq"):
    rng = random.Random(21)
    tensors = {}
    expected = {}
    for name, (N, K) in {"up": (32, 64), "down": (8, 32)}.items():
        codes, zeros, scales = _random_layer(N, K, 32, rng, False)
        zeros = [[max(z, 1) for z in r] for r in zeros]
        for k, v in _gptq_tensors(codes, zeros, scales, 32, version, [k // 32 for k in range(K)]).items():
            tensors[f"{name}.{k}"] = v
        expected[name] = _formula(codes, zeros, scales, lambda k: k // 32)
    tensors["up.bias"] = torch.randn(32).half()
    tensors["norm.weight"] = torch.rand(8) + 0.5
    tensors["norm.bias"] = torch.randn(8)
    write_safetensors(path / "model.safetensors", tensors, {"format": "pt"})
    (path / "quantize_config.json").write_text(json.dumps(
        {"bits": 4, "group_size": 32, "desc_act": False, "sym": False, "checkpoint_format": version}))
    return tensors, expected


def _write_awq_dir(path):
    rng = random.Random(22)
    tensors, expected = {}, {}
    for name, (N, K) in {"up": (32, 64), "down": (8, 32)}.items():
        codes, zeros, scales = _random_layer(N, K, 32, rng, False)
        for k, v in _awq_tensors(codes, zeros, scales).items():
            tensors[f"{name}.{k}"] = v
        expected[name] = _formula(codes, zeros, scales, lambda k: k // 32)
    tensors["up.bias"] = torch.randn(32).half()
    tensors["norm.weight"] = torch.rand(8) + 0.5
    tensors["norm.bias"] = torch.randn(8)
    write_safetensors(path / "model.safetensors", tensors, {"format": "pt"})
    (path / "config.json").write_text(json.dumps(
        {"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm",
                                 "zero_point": True}}))
    return tensors, expected


@pytest.mark.parametrize("kind", ["gptq", "gptq_v2", "awq"])
def test_load_checkpoint_directory(tmp_path, kind):
    if kind == "awq":
        tensors, expected = _write_awq_dir(tmp_path)
        loader = awq.load_awq
    else:
        tensors, expected = _write_gptq_dir(tmp_path, kind)
        loader = gptq.load_gptq
    model = _Tiny()
    assert sorted(loader(model, tmp_path)) == ["down", "up"]
    assert isinstance(model.up, Int4Linear) and isinstance(model.down, Int4Linear)
    assert model.down.bias is None
    for name in ("up", "down"):
        assert torch.equal(getattr(model, name).dequantized_weight(), expected[name])
    assert torch.equal(model.up.bias, tensors["up.bias"].float())
    assert torch.equal(model.norm.weight, tensors["norm.weight"])
    x = torch.randn(5, 64)
    ref = nn.functional.layer_norm(
        nn.functional.linear(torch.relu(nn.functional.linear(x, expected["up"], tensors["up.bias"].float())),
                             expected["down"]), (8,), tensors["norm.weight"], tensors["norm.bias"])
    torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)


def test_load_checkpoint_mismatches(tmp_path):
    _write_gptq_dir(tmp_path, "gptq")

    class Wider(_Tiny):
        def __init__(self):
            super().__init__()
            self.up = nn.Linear(128, 32)

    with pytest.raises(CheckpointError, match="model's Linear"):
        gptq.load_gptq(Wider(), tmp_path)

    class Renamed(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Linear(64, 32)
            self.down = nn.Linear(32, 8, bias=False)
            self.ln = nn.LayerNorm(8)

    with pytest.raises(CheckpointError, match="missing .*ln.weight.*unexpected .*norm"):
        gptq.load_gptq(Renamed(), tmp_path)
    (tmp_path / "quantize_config.json").write_text(json.dumps({"bits": 3, "group_size": 32}))
    with pytest.raises(CheckpointError, match="4-bit"):
        gptq.load_gptq(_Tiny(), tmp_path)
    (tmp_path / "quantize_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="JSON"):
        gptq.load_gptq(_Tiny(), tmp_path)
