"""SparseLinear, SparseConfig and sparsify_: formats chosen, numerics vs the dense weight, state_dict, compile."""
from __future__ import annotations

import copy
import io
import logging

import pytest
import torch
from torch import nn

from slmkern import reference
from slmkern.api import sparsify_
from slmkern.config import SparseConfig, config_from_dict
from slmkern.nn.sparse_linear import AUTO_UNSTRUCTURED_MIN_SPARSITY, SparseLinear, is_24_sparse


def pruned_linear(K, N, pattern, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(K, N, bias=bias)
    with torch.no_grad():
        w = torch.randn(N, K, generator=g) * K ** -0.5
        if pattern == "2:4":
            grp = w.reshape(N, K // 4, 4)
            keep = torch.zeros_like(grp, dtype=torch.bool).scatter_(-1, grp.abs().topk(2, dim=-1).indices, True)
            w = (grp * keep).reshape(N, K)
        else:
            thr = w.abs().flatten().kthvalue(max(1, int(pattern * w.numel()))).values
            w = torch.where(w.abs() > thr, w, torch.zeros(()))
        lin.weight.copy_(w)
        if bias:
            lin.bias.copy_(torch.randn(N, generator=g) * 0.1)
    return lin


CASES = [("2:4", "float"), ("2:4", "int8"), ("2:4", "int4"), ("unstructured", "float"),
         ("unstructured", "int8"), ("dense", "float"), ("dense", "int8")]


@pytest.mark.parametrize("fmt,values", CASES)
@pytest.mark.parametrize("K,N", [(68, 37), (256, 96)])
def test_forward_matches_its_dense_weight(fmt, values, K, N):
    lin = pruned_linear(K, N, "2:4" if fmt == "2:4" else 0.6)
    mod = SparseLinear.from_linear(lin, fmt, values, group_size=4 if K == 68 else 32)
    assert mod.format == fmt and mod.value_kind == values
    x = torch.randn(7, K)
    y = mod(x)
    wd = mod.dense_weight()
    if values == "int8":
        # int8 values compute exactly w8a8_linear on the dense int8 weight (dynamic int8 activations)
        q = torch.round(wd / mod.scales.unsqueeze(1)).to(torch.int8)
        assert torch.equal(y, reference.w8a8_linear(x, q, mod.scales, lin.bias.detach()))
    else:
        torch.testing.assert_close(y, nn.functional.linear(x, wd, lin.bias), rtol=1e-5, atol=1e-5)
    # the kept pattern is the pruned weight's (int8 rounding may only drop more entries)
    assert not ((wd != 0) & (lin.weight == 0)).any()


def test_auto_picks_by_pattern_and_threshold(caplog):
    lin24 = pruned_linear(128, 64, "2:4")
    assert is_24_sparse(lin24.weight)
    assert SparseLinear.from_linear(lin24, "auto", "float").format == "2:4"
    assert SparseLinear.from_linear(lin24, "auto", "int4", group_size=32).format == "2:4"
    hi = pruned_linear(128, 64, 0.95)
    assert SparseLinear.from_linear(hi, "auto", "float").format == "unstructured"
    assert SparseLinear.from_linear(hi, "auto", "int8").format == "unstructured"
    lo = pruned_linear(128, 64, 0.3)
    with caplog.at_level(logging.INFO, logger="slmkern"):
        m = SparseLinear.from_linear(lo, "auto", "int8")
    assert m.format == "dense" and m.value_kind == "int8"
    assert 0.3 < AUTO_UNSTRUCTURED_MIN_SPARSITY["int8"] <= 0.95


def test_bad_input_is_named():
    lin = pruned_linear(64, 32, 0.6)
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        SparseLinear.from_linear(lin, "2:4", "float")
    with pytest.raises(ValueError, match="int4"):
        SparseLinear.from_linear(lin, "unstructured", "int4")
    with pytest.raises(ValueError, match="format"):
        SparseLinear.from_linear(lin, "csr", "float")
    with pytest.raises(ValueError, match="values"):
        SparseLinear.from_linear(lin, "auto", "fp8")
    with pytest.raises(TypeError, match="linear"):
        SparseLinear.from_linear(nn.Conv1d(4, 4, 1))
    with pytest.raises(ValueError, match="in_features"):
        SparseLinear(66, 8, format="2:4")
    with pytest.raises(ValueError, match="format"):
        SparseConfig(format="csr")
    with pytest.raises(ValueError, match="int4"):
        SparseConfig(format="unstructured", values="int4")


@pytest.mark.parametrize("fmt,values", CASES)
def test_state_dict_round_trip_is_bit_exact(fmt, values):
    lin = pruned_linear(96, 40, "2:4" if fmt == "2:4" else 0.8)
    mod = SparseLinear.from_linear(lin, fmt, values, group_size=32)
    fresh = SparseLinear(96, 40, True, fmt, values, nnz=mod.nnz, group_size=32)
    fresh.load_state_dict(mod.state_dict())
    x = torch.randn(5, 96)
    assert torch.equal(fresh(x), mod(x))
    assert "w_packed" not in mod.state_dict()


@pytest.mark.parametrize("fmt,values", CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_pickle_and_deepcopy_give_the_same_module(fmt, values, bias):
    mod = SparseLinear.from_linear(pruned_linear(96, 40, "2:4" if fmt == "2:4" else 0.8, bias=bias), fmt, values,
                                   group_size=32)
    x = torch.randn(5, 96)
    want = mod(x)                       # the original's kernel call is planned (and cached) now
    buf = io.BytesIO()
    torch.save(mod, buf)
    buf.seek(0)
    copied = {"deepcopy": copy.deepcopy(mod), "pickle": torch.load(buf, weights_only=False)}
    for how, c in copied.items():
        assert torch.equal(c(x), want), how
        assert (c.w_packed is None) == (mod.w_packed is None), how
        assert c.extra_repr() == mod.extra_repr() and all(torch.equal(v, mod.state_dict()[k])
                                                          for k, v in c.state_dict().items())
    if mod.w_packed is None:            # dense float: F.linear, nothing packed
        return
    # the copies share nothing with the original, not even its cached kernel call (raw pointers into its tensors)
    with torch.no_grad():
        mod.w_packed.zero_()
    for how, c in copied.items():
        assert torch.equal(c(x), want), how
        assert c.__dict__["_plan"].fn is not None, how    # on the fast path


def test_half_keeps_scales_fp32_and_runs():
    mod = SparseLinear.from_linear(pruned_linear(64, 32, "2:4"), "2:4", "int8").half()
    assert mod.scales.dtype == torch.float32 and mod.values.dtype == torch.int8
    y = mod(torch.randn(3, 64, dtype=torch.float16))
    assert y.dtype == torch.float16 and torch.isfinite(y).all()


def test_sparsify_swaps_and_reports():
    model = nn.Sequential(pruned_linear(64, 64, "2:4"), nn.ReLU(), pruned_linear(64, 64, 0.3),
                          nn.ReLU(), pruned_linear(64, 16, 0.95))
    x = torch.randn(4, 64)
    want = model(x)
    report = sparsify_(model, SparseConfig(format="auto", values="float"))
    kinds = [m.format for m in model if isinstance(m, SparseLinear)]
    assert kinds == ["2:4", "dense", "unstructured"]
    assert len(report.swapped) == 3 and "auto" in report.swapped[1][1]
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    # forcing 2:4 on a layer without the pattern skips it, with the reason
    model2 = nn.Sequential(pruned_linear(64, 64, 0.3))
    rep2 = sparsify_(model2, SparseConfig(format="2:4"))
    assert not rep2.swapped and "2:4" in rep2.skipped[0][1]
    assert config_from_dict(SparseConfig(values="int8").to_dict()) == SparseConfig(values="int8")


def test_compile_fullgraph_with_sparse_modules():
    model = nn.Sequential(SparseLinear.from_linear(pruned_linear(64, 64, "2:4"), "2:4", "int8"), nn.ReLU(),
                          SparseLinear.from_linear(pruned_linear(64, 32, 0.9), "unstructured", "float"),
                          nn.ReLU(),
                          SparseLinear.from_linear(pruned_linear(32, 16, "2:4"), "2:4", "int4", group_size=32))
    x = torch.randn(5, 64)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True)
    assert torch.equal(compiled(x), eager)


def test_save_load_round_trip_every_kind(tmp_path):
    """slmkern.save / slmkern.load rebuild every SparseLinear kind bit-exactly (canonical tensors only)."""
    import slmkern

    def skeleton():
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 48),
                             nn.ReLU(), nn.Linear(48, 16), nn.Linear(16, 16))

    model = nn.Sequential(
        SparseLinear.from_linear(pruned_linear(64, 64, "2:4"), "2:4", "int8"), nn.ReLU(),
        SparseLinear.from_linear(pruned_linear(64, 64, 0.9), "unstructured", "float"), nn.ReLU(),
        SparseLinear.from_linear(pruned_linear(64, 48, "2:4"), "2:4", "int4", group_size=32), nn.ReLU(),
        SparseLinear.from_linear(pruned_linear(48, 16, 0.3), "dense", "int8"),
        SparseLinear.from_linear(pruned_linear(16, 16, "2:4"), "2:4", "float", value_dtype=torch.bfloat16))
    x = torch.randn(3, 64)
    slmkern.save(model, tmp_path / "m")
    loaded = slmkern.load(tmp_path / "m", skeleton())
    assert [m.extra_repr() for m in loaded if isinstance(m, SparseLinear)] == \
        [m.extra_repr() for m in model if isinstance(m, SparseLinear)]
    assert torch.equal(loaded(x), model(x))


def _via_op(mod, x):
    """The module's op, called through the torch.library dispatcher (the path the fast path skips)."""
    if mod.format == "2:4" and mod.value_kind == "int4":
        return torch.ops.slmkern.sparse24_w4a16_linear(x, mod.qvalues, mod.meta, mod.scales, mod.zeros,
                                                       mod.group_size, mod.bias, mod.w_packed)
    if mod.format == "2:4":
        return torch.ops.slmkern.sparse24_linear(x, mod.values, mod.meta, mod.scales, mod.bias, mod.w_packed)
    if mod.format == "unstructured":
        return torch.ops.slmkern.sparse_linear(x, mod.values, mod.bitmask, mod.row_offsets, mod.scales, mod.bias,
                                               mod.w_packed)
    return torch.ops.slmkern.w8a8_linear(x, mod.weight, mod.scales, mod.bias, mod.w_packed)


@pytest.mark.parametrize("fmt,values", [c for c in CASES if c != ("dense", "float")])
def test_fast_path_is_the_op_bit_for_bit(fmt, values):
    lin = pruned_linear(132, 40, "2:4" if fmt == "2:4" else 0.85, seed=3)
    mod = SparseLinear.from_linear(lin, fmt, values, group_size=4)
    xs = [torch.randn(1, 132), torch.randn(2, 3, 132), torch.randn(5, 264)[:, ::2], torch.randn(132),
          torch.randn(4, 132, dtype=torch.bfloat16), torch.randn(0, 132)]
    with torch.inference_mode():
        for x in xs:
            e = _via_op(mod, x)
            y = mod(x)
            assert y.shape == e.shape and y.dtype == e.dtype and torch.equal(y, e)
    assert mod.__dict__["_plan"].fn is not None          # the calls above ran the planned kernel call
    with torch.no_grad():
        mod.bias.add_(0.5)                               # an in-place edit: the plan's fp32 bias copy is stale
        x = torch.randn(3, 132)
        assert torch.equal(mod(x), _via_op(mod, x))
    bad = torch.randn(2, 64)
    with pytest.raises(ValueError, match="K"):           # a wrong K goes through the op and its message
        mod(bad)


def test_fast_path_steps_aside_for_autograd_and_jit_trace():
    mod = SparseLinear.from_linear(pruned_linear(64, 24, "2:4"), "2:4", "int8")
    x = torch.randn(3, 64, requires_grad=True)
    y = mod(x)
    assert y.requires_grad
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    with torch.no_grad():
        traced = torch.jit.trace(mod, (torch.randn(3, 64),), check_trace=False)
    x2 = torch.randn(3, 64)
    assert torch.equal(traced(x2), _via_op(mod, x2))
