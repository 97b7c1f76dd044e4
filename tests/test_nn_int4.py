"""Int4Linear and quantize_ with Int4Config (RTN, HQQ, GPTQ), overrides and skips."""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from slmkern import Int4Config, Int8Config, quantize_, reference
from slmkern.algorithms.rtn import rtn_quantize
from slmkern.nn import Int4Linear, Int8Linear


@pytest.mark.parametrize("activations", ["float", "int8"])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_from_linear_matches_reference(activations, symmetric, group_size):
    lin = nn.Linear(128, 40)
    mod = Int4Linear.from_linear(lin, group_size, symmetric, activations, method="rtn", clip="minmax")
    q = rtn_quantize(lin.weight.detach(), group_size, symmetric, clip="minmax")
    assert torch.equal(mod.weight, q.packed) and torch.equal(mod.weight_scale, q.scales)
    assert (mod.weight_zero is None) == symmetric
    x = torch.randn(3, 7, 128)
    fn = reference.w4a16_linear if activations == "float" else reference.w4a8_linear
    ref = fn(x, q.packed, q.scales, q.zeros, mod.group_size, lin.bias.detach())
    y = mod(x)
    assert y.shape == (3, 7, 40)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    dense = lin(x)
    assert (y - dense).norm() / dense.norm() < 0.25


def test_state_dict_round_trip_and_dtype_moves():
    mod = Int4Linear.from_linear(nn.Linear(64, 24), group_size=32)
    buf = io.BytesIO()
    torch.save(mod.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert set(sd) == {"weight", "weight_scale", "weight_zero", "bias"}
    fresh = Int4Linear(64, 24, group_size=32)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.w_packed, mod.w_packed)
    x = torch.randn(5, 64)
    assert torch.equal(fresh(x), mod(x))
    half = fresh.to(torch.bfloat16)
    assert half.weight_scale.dtype == torch.float32 and half.bias.dtype == torch.bfloat16
    assert half(x.bfloat16()).dtype == torch.bfloat16


def test_bad_arguments():
    with pytest.raises(ValueError, match="group_size"):
        Int4Linear(100, 8, group_size=64)
    with pytest.raises(ValueError, match="activations"):
        Int4Linear(64, 8, activations="fp8")
    with pytest.raises(ValueError, match="method"):
        Int4Linear.from_linear(nn.Linear(64, 8), method="gptq")
    with pytest.raises(ValueError, match="group_size"):
        Int4Config(group_size=48)


def tiny_bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=32)
    return transformers.BertModel(cfg).eval()


def test_quantize_bert_gptq_beats_rtn():
    torch.manual_seed(1)
    base = tiny_bert()
    calib = [{"input_ids": torch.randint(0, 120, (4, 16))} for _ in range(4)]
    test_ids = torch.randint(0, 120, (8, 16))
    with torch.no_grad():
        ref = base(input_ids=test_ids).last_hidden_state
    errs = {}
    for method in ("rtn", "gptq"):
        model = tiny_bert()
        model.load_state_dict(base.state_dict())
        report = quantize_(model, Int4Config(group_size=32, method=method), calibration=calib, progress=False)
        # 12 encoder Linears; the pooler stays dense (heads and poolers: _prune.head_reason)
        assert len(report.swapped) == 12 and "pooler" in str(report.skipped), report
        assert all(isinstance(m, Int4Linear) for fqn, m in model.named_modules()
                   if fqn.endswith(("query", "dense")) and "pooler" not in fqn)
        with torch.no_grad():
            out = model(input_ids=test_ids).last_hidden_state
        errs[method] = ((out - ref).norm() / ref.norm()).item()
    assert errs["gptq"] < errs["rtn"], errs


def test_overrides_and_int4_skip_reasons():
    model = nn.Sequential()
    model.add_module("a", nn.Linear(64, 64))
    model.add_module("b", nn.Linear(64, 64))
    model.add_module("odd", nn.Linear(50, 64))
    model.add_module("lm_head", nn.Linear(64, 10))
    report = quantize_(model, Int4Config(group_size=32), overrides={"b": Int8Config(), "lm_head": None})
    assert isinstance(model.a, Int4Linear) and isinstance(model.b, Int8Linear)
    assert isinstance(model.odd, nn.Linear) and isinstance(model.lm_head, nn.Linear)
    reasons = dict(report.skipped)
    assert "group_size" in reasons["odd"] and "overrides" in reasons["lm_head"]
    with pytest.raises(ValueError, match="calibration"):
        quantize_(nn.Sequential(nn.Linear(64, 64)), Int4Config(group_size=32, method="gptq"))
    with pytest.raises(TypeError, match=r"overrides\['x'\]"):
        quantize_(nn.Sequential(nn.Linear(64, 64)), Int4Config(), overrides={"x": "int8"})


# ----------------------------------------------------------------------------- CPU fast path
def _module(kind: str, bias_dtype=torch.float32):
    torch.manual_seed(0)
    lin = nn.Linear(128, 48).to(bias_dtype)
    lin.weight.data = lin.weight.data.float()
    if kind == "w4a16":
        return Int4Linear.from_linear(lin, 32, activations="float", clip="minmax")
    if kind == "w4a8":
        return Int4Linear.from_linear(lin, 32, activations="int8", clip="minmax")
    return Int8Linear.from_linear(lin, activations="int8" if kind == "w8a8" else "float")


def _op_of(mod):
    if isinstance(mod, Int4Linear):
        return "w4a16_linear" if mod.activations == "float" else "w4a8_linear"
    return "w8a8_linear" if mod.activations == "int8" else "w8a16_linear"


def _via_op(mod, x):
    from slmkern import ops
    if isinstance(mod, Int4Linear):
        return getattr(ops, _op_of(mod))(x, mod.weight, mod.weight_scale, mod.weight_zero, mod.group_size,
                                         mod.bias, mod.w_packed)
    return getattr(ops, _op_of(mod))(x, mod.weight, mod.weight_scale, mod.bias, mod.w_packed)


def _count_op_calls(monkeypatch, mod):
    from slmkern import ops
    calls = []
    real = getattr(ops, _op_of(mod))
    monkeypatch.setattr(ops, _op_of(mod), lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("kind", ["w4a16", "w4a8", "w8a8", "w8a16"])
def test_fast_path_is_the_op_bit_for_bit(monkeypatch, kind):
    mod = _module(kind)
    xs = [torch.randn(1, 128), torch.randn(2, 3, 128), torch.randn(5, 256)[:, ::2], torch.randn(128),
          torch.randn(4, 128, dtype=torch.bfloat16), torch.randn(0, 128)]
    expected = [_via_op(mod, x) for x in xs]
    calls = _count_op_calls(monkeypatch, mod)
    with torch.inference_mode():
        for x, e in zip(xs, expected):
            y = mod(x)
            assert y.shape == e.shape and y.dtype == e.dtype
            assert torch.equal(y, e)
    with torch.no_grad():
        assert torch.equal(mod(xs[1]), expected[1])
    assert calls == []                                   # every call above took the fast path
    ref = (reference.w4a16_linear(xs[1], mod.weight, mod.weight_scale, mod.weight_zero, 32, mod.bias)
           if kind == "w4a16" else None)
    if ref is not None:
        torch.testing.assert_close(mod(xs[1]), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["w4a16", "w8a8"])
def test_fast_path_leaves_bad_input_and_autograd_to_the_op(monkeypatch, kind):
    mod = _module(kind)
    calls = _count_op_calls(monkeypatch, mod)
    op = _op_of(mod)
    with pytest.raises(ValueError, match=f"{op}: x has K=64|{op}: K|{op}: w must have shape"):
        mod(torch.randn(2, 64))
    with pytest.raises(TypeError, match=f"{op}: x must be a float32/bfloat16/float16 tensor"):
        mod(torch.ones(2, 128, dtype=torch.int32))
    assert len(calls) == 2
    x = torch.randn(3, 128, requires_grad=True)
    y = mod(x)                                           # autograd: the op's backward
    assert len(calls) == 3 and y.requires_grad
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_fast_path_follows_weight_and_bias_changes():
    mod = _module("w4a16", torch.bfloat16)
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    y0 = mod(x)
    with torch.no_grad():
        mod.bias.add_(1.0)                               # in place, bf16 bias: the plan's fp32 copy is stale
    assert torch.equal(mod(x), _via_op(mod, x)) and not torch.equal(mod(x), y0)
    other = Int4Linear.from_linear(nn.Linear(128, 48), 32, clip="minmax")
    mod.load_state_dict({k: v.to(mod.bias.dtype) if k == "bias" else v for k, v in other.state_dict().items()})
    assert torch.equal(mod(x), _via_op(mod, x))          # repacked on load: a new plan
    mod.float()
    xf = x.float()
    assert mod.bias.dtype == torch.float32 and torch.equal(mod(xf), _via_op(mod, xf))


def test_fast_path_bad_module_fails_with_the_op_message():
    mod = _module("w4a16")
    mod.w_packed = mod.w_packed[:-64].clone()          # a blob that does not fit the weight
    with pytest.raises(ValueError, match="w4a16_linear: w_packed must be 1-D with"):
        mod(torch.randn(1, 128))
    mod8 = _module("w8a8")
    mod8.weight_scale = torch.ones(47)
    with pytest.raises(ValueError, match=r"w8a8_linear: w_scale must have shape \(N,\) = \(48,\)"):
        mod8(torch.randn(1, 128))


@pytest.mark.parametrize("kind", ["w4a8", "w8a8"])
def test_fast_path_steps_aside_for_jit_trace_and_vmap(monkeypatch, kind):
    mod = _module(kind)
    calls = _count_op_calls(monkeypatch, mod)
    x = torch.randn(3, 128)
    with torch.no_grad():
        traced = torch.jit.trace(mod, (x,), check_trace=False)  # a direct kernel call: invisible to the trace
    assert len(calls) == 1
    x2 = torch.randn(3, 128)
    assert torch.equal(traced(x2), _via_op(mod, x2))
    xb = torch.randn(4, 3, 128)
    yb = torch.vmap(mod)(xb)                             # functorch wrappers have no data pointer
    assert torch.equal(yb, torch.stack([_via_op(mod, xi) for xi in xb]))
