"""Int8Linear: construction, forward against the reference, state_dict, dtype/device moves."""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from slmkern import reference
from slmkern.formats import int8 as int8_format
from slmkern.nn import Int8Linear

OPS = {"int8": reference.w8a8_linear, "float": reference.w8a16_linear,
       "int7": lambda *a: reference.w8a8_linear(*a, activations="int7")}


@pytest.mark.parametrize("activations", ["int8", "int7", "float"])
@pytest.mark.parametrize("bias", [True, False])
def test_from_linear_matches_reference(activations, bias):
    lin = nn.Linear(37, 19, bias=bias)
    mod = Int8Linear.from_linear(lin, activations=activations)
    q, s = int8_format.quantize_per_channel(lin.weight)
    assert torch.equal(mod.weight, q) and torch.equal(mod.weight_scale, s)
    x = torch.randn(2, 5, 37)
    y = mod(x)
    ref = OPS[activations](x, q, s, lin.bias.detach() if bias else None)
    assert y.shape == (2, 5, 19) and y.dtype == torch.float32
    if activations != "float":
        assert torch.equal(y, ref)
    else:
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    # and it approximates the float layer
    dense = lin(x)
    assert (y - dense).norm() / dense.norm() < 0.05


@pytest.mark.parametrize("activations", ["int8", "int7", "float"])
def test_state_dict_round_trip_is_bit_exact(activations):
    mod = Int8Linear.from_linear(nn.Linear(64, 48), activations=activations)
    buf = io.BytesIO()
    torch.save(mod.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert set(sd) == {"weight", "weight_scale", "bias"}  # packed layout is never saved
    fresh = Int8Linear(64, 48, activations=activations)
    fresh.load_state_dict(sd)
    for name in ("weight", "weight_scale", "bias"):
        assert torch.equal(getattr(fresh, name), getattr(mod, name))
    assert torch.equal(fresh.w_packed, mod.w_packed)  # rebuilt by the load hook
    x = torch.randn(7, 64)
    assert torch.equal(fresh(x), mod(x))


def test_load_state_dict_rejects_minus_128():
    mod = Int8Linear(8, 4)
    sd = mod.state_dict()
    sd["weight"] = torch.full((4, 8), -128, dtype=torch.int8)
    with pytest.raises(ValueError, match="-128"):
        mod.load_state_dict(sd)


def test_half_precision_model_keeps_fp32_scales():
    lin = nn.Linear(32, 16)
    mod = Int8Linear.from_linear(lin)
    scale = mod.weight_scale.clone()
    mod = mod.to(torch.bfloat16)
    assert mod.weight_scale.dtype == torch.float32 and torch.equal(mod.weight_scale, scale)
    assert mod.bias.dtype == torch.bfloat16 and mod.weight.dtype == torch.int8
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    y = mod(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, reference.w8a8_linear(x, mod.weight, mod.weight_scale, mod.bias))


def test_extra_repr_and_bad_arguments():
    mod = Int8Linear.from_linear(nn.Linear(10, 6, bias=False), activations="float")
    r = repr(mod)
    assert "in_features=10" in r and "out_features=6" in r and "activations=float" in r and "w8a16_linear" in r
    with pytest.raises(ValueError, match="activations"):
        Int8Linear(4, 4, activations="int4")
    with pytest.raises(TypeError, match="linear: expected torch.nn.Linear"):
        Int8Linear.from_linear(nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="K=5"):
        mod(torch.randn(2, 5))


def test_meta_device_forward_gives_shapes():
    mod = Int8Linear.from_linear(nn.Linear(12, 5)).to("meta")
    assert mod.w_packed is None
    y = mod(torch.randn(3, 12, device="meta"))
    assert y.shape == (3, 5) and y.device.type == "meta"


def test_int7_checkpoint_compile_and_export(tmp_path):
    """activations="int7" survives slmkern.save/load, and torch.compile / torch.export see the op's argument."""
    import slmkern
    model = nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 8))
    for i in (0, 2):
        model[i] = Int8Linear.from_linear(model[i], activations="int7")
    x = torch.randn(5, 40)
    want = model(x)
    slmkern.save(model, tmp_path / "m")
    back = slmkern.load(tmp_path / "m", nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 8)))
    assert back[0].activations == "int7" and "activations=int7" in repr(back[0])
    assert torch.equal(back(x), want)
    assert torch.equal(torch.compile(model, fullgraph=True)(x), want)
    ep = torch.export.export(model, (x,))
    calls = [n for n in ep.graph.nodes if n.target is torch.ops.slmkern.w8a8_linear.default]
    assert len(calls) == 2 and all("int7" in n.args for n in calls)
    assert torch.equal(ep.module()(x), want)
