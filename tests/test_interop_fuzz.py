"""Loaders never crash: random byte flips and truncations of saved checkpoints give either a clean
ValueError/TypeError (CheckpointError is a ValueError) or a model whose slmkern layers hold valid
canonical weights and run. 300 seeds per format by default; HYPOTHESIS_PROFILE=nightly runs 3000."""
from __future__ import annotations

import os
import random
import shutil
import traceback

import pytest
import torch
from torch import nn

import slmkern
from slmkern.config import Int4Config, Int8Config
from slmkern.formats import int4, int8
from slmkern.interop import awq, gptq
from slmkern.interop import compressed_tensors as ct
from slmkern.interop._safetensors_io import CheckpointError, read_safetensors, write_safetensors
from slmkern.nn import Int4Linear, Int8Linear

SEEDS = 3000 if os.environ.get("HYPOTHESIS_PROFILE") == "nightly" else 300


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 32)
        self.down = nn.Linear(32, 16, bias=False)
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        return self.norm(self.down(torch.relu(self.up(x))))


def _write_ct(path):
    torch.manual_seed(1)
    m = _Tiny()
    slmkern.quantize_(m, Int4Config(group_size=32, symmetric=False), overrides={"down": Int8Config()},
                      progress=False)
    ct.save_compressed(m, path)
    return m


def _gptq_awq_tensors(kind):
    g = torch.Generator().manual_seed(2)
    t = {}
    for name, (N, K) in {"up": (32, 64), "down": (16, 32)}.items():
        G = K // 32
        if kind == "gptq":
            t[f"{name}.qweight"] = torch.randint(-2 ** 31, 2 ** 31 - 1, (K // 8, N), generator=g, dtype=torch.int32)
            t[f"{name}.g_idx"] = (torch.arange(K) // 32).to(torch.int32)
        else:
            t[f"{name}.qweight"] = torch.randint(-2 ** 31, 2 ** 31 - 1, (K, N // 8), generator=g, dtype=torch.int32)
        t[f"{name}.qzeros"] = torch.full((G, N // 8), 0x66666666, dtype=torch.int32)
        t[f"{name}.scales"] = (torch.rand(G, N, generator=g) * 0.1 + 0.01).half()
    t["up.bias"] = torch.randn(32, generator=g).half()
    t["norm.weight"] = torch.rand(16, generator=g) + 0.5
    t["norm.bias"] = torch.randn(16, generator=g)
    return t


def _write_gptq(path):
    write_safetensors(path / "model.safetensors", _gptq_awq_tensors("gptq"), {"format": "pt"})
    (path / "quantize_config.json").write_text(
        '{"bits": 4, "group_size": 32, "desc_act": false, "sym": false, "checkpoint_format": "gptq_v2"}')


def _write_awq(path):
    write_safetensors(path / "model.safetensors", _gptq_awq_tensors("awq"), {"format": "pt"})
    (path / "config.json").write_text(
        '{"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm"}}')


FORMATS = {
    "compressed-tensors": (_write_ct, ct.load_compressed, ["config.json", "model.safetensors"]),
    "gptq": (_write_gptq, gptq.load_gptq, ["quantize_config.json", "model.safetensors"]),
    "awq": (_write_awq, awq.load_awq, ["config.json", "model.safetensors"]),
}


def _valid(model: nn.Module) -> None:
    """A successful load must hold canonical weights that the kernels accept."""
    n = 0
    for mod in model.modules():
        if isinstance(mod, Int4Linear):
            int4.check(mod.weight, mod.weight_scale, mod.weight_zero, mod.group_size)
            n += 1
        elif isinstance(mod, Int8Linear):
            int8.check_weight(mod.weight)
            n += 1
    assert n == 2
    with torch.no_grad():
        y = model(torch.randn(3, 64))
    assert y.shape == (3, 16)


def _mutate(data: bytes, rng: random.Random, safetensors: bool) -> bytes:
    """One corruption: a truncation, digits changed inside the JSON (shapes, offsets, group sizes:
    a well-formed header that lies), byte flips in the tensor data, or byte flips anywhere."""
    b = bytearray(data)
    hdr_end = min(len(b), 8 + int.from_bytes(b[:8], "little")) if safetensors else len(b)
    hdr_start = 8 if safetensors else 0
    r = rng.random()
    if r < 0.1:
        return bytes(b[:rng.randrange(len(b))])
    if r < 0.4:
        digits = [i for i in range(hdr_start, hdr_end) if 48 <= b[i] <= 57]
        for _ in range(rng.randint(1, 2)):
            b[rng.choice(digits)] = rng.randrange(48, 58)
        return bytes(b)
    lo = hdr_end if (safetensors and r < 0.7 and hdr_end < len(b)) else 0
    for _ in range(rng.randint(1, 4)):
        b[rng.randrange(lo, len(b))] ^= rng.randrange(1, 256)
    return bytes(b)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_loaders_survive_byte_flips(tmp_path, fmt):
    write, load, files = FORMATS[fmt]
    src = tmp_path / "src"
    src.mkdir()
    write(src)
    baseline = _Tiny()
    assert sorted(load(baseline, src)) == ["down", "up"]
    _valid(baseline)
    originals = {f: (src / f).read_bytes() for f in files}

    work = tmp_path / "work"
    outcomes = {"error": 0, "loaded": 0}
    for seed in range(SEEDS):
        rng = random.Random(seed)
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(src, work)
        target = files[1] if rng.random() < 0.8 else files[0]
        (work / target).write_bytes(_mutate(originals[target], rng, target.endswith(".safetensors")))
        model = _Tiny()
        try:
            load(model, work)
        except (ValueError, TypeError) as e:    # CheckpointError is a ValueError
            assert str(e), f"seed {seed}: empty error message"
            outcomes["error"] += 1
            continue
        except Exception:                       # noqa: BLE001 - anything else is a loader bug
            pytest.fail(f"{fmt} seed {seed} ({target}): unclean exception\n{traceback.format_exc()}")
        _valid(model)
        outcomes["loaded"] += 1
    # both outcomes must occur, or the test is not exercising the loader
    assert outcomes["error"] > SEEDS // 10 and outcomes["loaded"] > SEEDS // 10, outcomes


def test_safetensors_reader_rejects_garbage(tmp_path):
    p = tmp_path / "x.safetensors"
    write_safetensors(p, {"a": torch.arange(6, dtype=torch.int32).reshape(2, 3), "b": torch.ones(2)})
    t, _ = read_safetensors(p)
    assert torch.equal(t["a"], torch.arange(6, dtype=torch.int32).reshape(2, 3))
    data = p.read_bytes()
    cases = {
        "short": data[:5],
        "huge header": (2 ** 60).to_bytes(8, "little") + data[8:],
        "truncated data": data[:-3],
        "not json": data[:8] + b"\xff" * (len(data) - 8),
    }
    for name, blob in cases.items():
        p.write_bytes(blob)
        with pytest.raises(CheckpointError):
            read_safetensors(p)
    H = int.from_bytes(data[:8], "little")
    header = data[8:8 + H].replace(b'"I32"', b'"I64"')
    p.write_bytes(data[:8] + header + data[8 + H:])
    with pytest.raises(CheckpointError, match="data_offsets"):
        read_safetensors(p)
    with pytest.raises(CheckpointError, match="cannot read"):
        read_safetensors(tmp_path / "missing.safetensors")
