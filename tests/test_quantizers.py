"""int4 quantizers (RTN, MSE clipping, HQQ, GPTQ and its model driver): all emit the canonical format."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from slmkern.algorithms import _calib, gptq, hqq, rtn
from slmkern.formats import int4

GROUP_SIZES = [32, 64, 128, -1]


def heavy_tailed(N, K, df=3.0, scale=0.02):
    return torch.distributions.StudentT(df).sample((N, K)) * scale


def assert_canonical(q: int4.Int4Weight, N: int, K: int, g: int, symmetric: bool):
    gs = K if g == -1 else g
    int4.check(q.packed, q.scales, q.zeros, gs)
    assert tuple(q.packed.shape) == (N, K // 2)
    assert bool(torch.isfinite(q.scales).all()) and bool((q.scales > 0).all())
    assert (q.zeros is None) == symmetric
    assert bool(torch.isfinite(q.dequantize()).all())


def mse(w, q):
    return float((w - q.dequantize()).square().mean())


# ----------------------------------------------------------------------------- RTN
@pytest.mark.parametrize("g", GROUP_SIZES)
@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_minmax_error_bound(g, symmetric):
    N, K = 24, 256
    w = torch.randn(N, K) * 0.05 + torch.rand(N, 1) * 0.02
    q = rtn.rtn_quantize(w, g, symmetric)
    assert_canonical(q, N, K, g, symmetric)
    gs = K if g == -1 else g
    s = q.scales.repeat_interleave(gs, dim=1)
    assert bool(((w - q.dequantize()).abs() <= s / 2 * (1 + 1e-5)).all())
    # and the bound is tight somewhere: a wrong (too large) scale would not reach it
    assert float(((w - q.dequantize()).abs() / s).max()) > 0.4


@pytest.mark.parametrize("g", GROUP_SIZES)
@pytest.mark.parametrize("symmetric", [False, True])
def test_mse_clip_never_worse_than_minmax(g, symmetric):
    N, K = 32, 256
    w = heavy_tailed(N, K)
    gs = K if g == -1 else g
    mm = rtn.rtn_quantize(w, g, symmetric)
    mc = rtn.rtn_quantize(w, g, symmetric, clip="mse")
    assert_canonical(mc, N, K, g, symmetric)
    e_mm = rtn.group_sq_error(w, mm.scales, mm.zeros, gs)
    e_mc = rtn.group_sq_error(w, mc.scales, mc.zeros, gs)
    assert bool((e_mc <= e_mm).all())                      # per group
    assert mse(w, mc) < 0.97 * mse(w, mm)                  # and clipping pays off on heavy tails


def test_rtn_rejects_bad_arguments():
    with pytest.raises(ValueError, match="clip"):
        rtn.rtn_quantize(torch.randn(4, 64), 32, clip="percentile")
    with pytest.raises(ValueError, match="group_size"):
        rtn.rtn_quantize(torch.randn(4, 96), 64)


# ----------------------------------------------------------------------------- HQQ
@pytest.mark.parametrize("g", [32, 128])
@pytest.mark.parametrize("symmetric", [False, True])
def test_hqq_beats_rtn_on_heavy_tailed_weights(g, symmetric):
    N, K = 64, 512
    w = heavy_tailed(N, K)
    base = mse(w, rtn.rtn_quantize(w, g, symmetric))
    clip = mse(w, rtn.rtn_quantize(w, g, symmetric, clip="mse"))
    q = hqq.hqq_quantize(w, g, symmetric, init="minmax")
    assert_canonical(q, N, K, g, symmetric)
    assert mse(w, q) < 0.97 * base
    q2 = hqq.hqq_quantize(w, g, symmetric)                 # default: from the MSE-clip solution
    assert mse(w, q2) < 0.97 * base and mse(w, q2) <= clip


def test_hqq_shrink_is_sparsity_promoting():
    x = torch.tensor([0.05, -0.2, 3.0, -5.0])
    y = hqq.shrink_lp(x, beta=3.0, p=0.7)
    assert y[0] == 0 and y[1] == 0                         # small errors are not "sparse error"
    assert 0 < y[2] < 3.0 and -5.0 < y[3] < 0              # large ones are kept (shrunk)
    with pytest.raises(ValueError, match="p:"):
        hqq.hqq_quantize(torch.randn(4, 64), 32, p=1.5)


# ----------------------------------------------------------------------------- GPTQ, one layer
def correlated_inputs(n, K, seed=0):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(K, K, generator=gen) / K ** 0.5
    return torch.randn(n, K, generator=gen) @ A + 0.1 * torch.randn(n, K, generator=gen)


def hessian(X):
    acc = _calib.HessianAccumulator(X.shape[1], X.device)
    for chunk in X.split(100):
        acc.add(chunk)
    return acc.H


def out_err(X, w, q):
    return float((X @ w.T - X @ q.dequantize().T).norm())


def test_hessian_accumulator_matches_closed_form():
    X = torch.randn(250, 16)
    torch.testing.assert_close(hessian(X), 2 * X.T @ X / 250, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("g,symmetric", [(32, False), (64, True), (128, False), (-1, True)])
@pytest.mark.parametrize("act_order,clip", [(False, "minmax"), (True, "minmax"), (True, "mse")])
def test_gptq_beats_rtn_on_output_error(g, symmetric, act_order, clip):
    N, K = 64, 256
    X = correlated_inputs(1024, K)
    w = torch.randn(N, K) * 0.05
    q, st = gptq.gptq_quantize(w, hessian(X), g, symmetric, act_order=act_order, clip=clip)
    assert_canonical(q, N, K, g, symmetric)
    assert st.retries == 0 and not st.fallback
    assert out_err(X, w, q) < 0.85 * out_err(X, w, rtn.rtn_quantize(w, g, symmetric))
    assert st.rel_err < 0.8 * st.rtn_rel_err


def test_gptq_act_order_uses_static_groups_in_natural_order():
    N, K, g = 32, 256, 64
    X = correlated_inputs(512, K) * torch.linspace(0.1, 3.0, K)   # diag(H) far from sorted
    w = torch.randn(N, K) * 0.05
    H = hessian(X)
    q, _ = gptq.gptq_quantize(w, H, g, symmetric=False, act_order=True, clip="minmax")
    s, z = int4.minmax_params(w, g, symmetric=False)      # fixed before any update, natural order
    assert torch.equal(q.scales, s) and torch.equal(q.zeros, z)
    q_mse, _ = gptq.gptq_quantize(w, H, g, symmetric=False, act_order=True, clip="mse")
    s, z = rtn.mse_clip_params(w, g, symmetric=False)
    assert torch.equal(q_mse.scales, s) and torch.equal(q_mse.zeros, z)
    q_plain, _ = gptq.gptq_quantize(w, H, g, symmetric=False, act_order=False, clip="minmax")
    assert not torch.equal(q.packed, q_plain.packed)      # the column order did change the result


@pytest.mark.parametrize("percdamp", [0.0, 1e-9])
def test_gptq_near_singular_hessian_retries_with_more_damping(caplog, percdamp):
    N, K = 16, 64
    X = torch.randn(4, K)                                 # rank 4 << K: (near-)singular H
    w = torch.randn(N, K) * 0.05
    with caplog.at_level(logging.WARNING, logger="slmkern"):
        q, st = gptq.gptq_quantize(w, hessian(X), 32, percdamp=percdamp, name="layer0")
    assert st.retries >= 1 and st.damp > percdamp and not st.fallback
    assert any("layer0" in r.getMessage() and "retrying" in r.getMessage() for r in caplog.records)
    assert_canonical(q, N, K, 32, False)


def test_gptq_nonfinite_hessian_falls_back_to_rtn(caplog):
    w = torch.randn(8, 64)
    H = hessian(torch.randn(32, 64))
    H[3, 3] = float("nan")
    with caplog.at_level(logging.WARNING, logger="slmkern"):
        q, st = gptq.gptq_quantize(w, H, 32, name="bad")
    assert st.fallback and any("bad" in r.getMessage() for r in caplog.records)
    assert torch.equal(q.packed, rtn.rtn_quantize(w, 32, clip="mse").packed)


def test_gptq_dead_input_columns_keep_their_weights():
    N, K = 8, 64
    X = torch.randn(256, K)
    X[:, 5] = 0
    w = torch.randn(N, K) * 0.05
    q, _ = gptq.gptq_quantize(w, hessian(X), 32, clip="minmax")
    s = q.scales.repeat_interleave(32, dim=1)
    assert bool(((w[:, 5] - q.dequantize()[:, 5]).abs() <= s[:, 5] * (0.5 + 1e-5)).all())


def test_gptq_rejects_bad_arguments():
    w = torch.randn(8, 64)
    with pytest.raises(ValueError, match="H:"):
        gptq.gptq_quantize(w, torch.eye(32), 32)
    with pytest.raises(ValueError, match="w:"):
        gptq.gptq_quantize(torch.full((8, 64), float("inf")), torch.eye(64), 32)
    with pytest.raises(ValueError, match="percdamp"):
        gptq.gptq_quantize(w, torch.eye(64), 32, percdamp=-1)


# ----------------------------------------------------------------------------- GPTQ, model driver
class Twin(nn.Module):
    """Two Linear layers reading one tensor (like q/k/v), then a third on their sum."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 32)
        self.unused = nn.Linear(64, 64)

    def forward(self, x):
        return self.c(input=torch.relu(self.a(x)) + self.b(x))     # c: called by keyword


def _rtn_model(model, g):
    m = copy.deepcopy(model)
    for mod in m.modules():
        if type(mod) is nn.Linear:
            with torch.no_grad():
                mod.weight.copy_(rtn.rtn_quantize(mod.weight, g).dequantize())
    return m


def _rel(model, ref_out, data):
    with torch.no_grad():
        out = torch.cat([model(x) for x in data])
    return float((out - ref_out).norm() / ref_out.norm())


def test_gptq_model_driver_keyword_input_and_empty_batch():
    model = Twin()
    calib = [torch.randn(16, 64) for _ in range(3)] + [torch.randn(0, 64)]
    weights, report = gptq.gptq_quantize_model(model, calib, group_size=32, progress=False)
    assert report.stages == [["a", "b"], ["c"]]
    assert report.layers["c"].nsamples == 48 and not report.layers["c"].fallback


def test_gptq_model_driver_sequential():
    K = 64
    model = nn.Sequential(nn.Linear(K, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 96))
    calib = [correlated_inputs(64, K, seed=s) for s in range(8)]
    with torch.no_grad():
        ref = torch.cat([model(x) for x in calib])
    original = copy.deepcopy(model)
    weights, report = gptq.gptq_quantize_model(model, calib, group_size=32, progress=False)
    assert set(weights) == {"0", "2", "4"} and report.stages == [["0"], ["2"], ["4"]]
    for fqn, q in weights.items():
        mod = model.get_submodule(fqn)
        assert_canonical(q, mod.out_features, mod.in_features, 32, False)
        assert torch.equal(mod.weight, q.dequantize())    # written back: what w4a16 computes with
        assert report.layers[fqn].nsamples == 8 * 64
    assert _rel(model, ref, calib) < 0.8 * _rel(_rtn_model(original, 32), ref, calib)
    assert "quantized 3 layer(s)" in str(report)


def test_gptq_model_driver_stages_skips_and_restore():
    model = Twin()
    calib = [torch.randn(16, 64) for _ in range(4)]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    weights, report = gptq.gptq_quantize_model(
        model, iter(calib), group_size=64, symmetric=True, act_order=True, write_back=False,
        filter_fn=lambda m, fqn: fqn != "c", progress=False)
    assert report.stages == [["a", "b"]]                   # shared input -> one pass (c filtered out)
    assert set(weights) == {"a", "b", "unused"}
    assert "never called" in report.layers["unused"].fallback
    assert ("c", "filter_fn returned False") in report.skipped
    for n, p in model.named_parameters():                  # write_back=False restores the model
        assert torch.equal(p, before[n])


def test_gptq_model_driver_skips_incompatible_in_features():
    model = nn.Sequential(nn.Linear(64, 48), nn.Linear(48, 8))
    weights, report = gptq.gptq_quantize_model(model, [torch.randn(8, 64)], group_size=32, progress=False)
    assert set(weights) == {"0"} and report.skipped and report.skipped[0][0] == "1"
    with pytest.raises(TypeError, match="calibration"):
        gptq.gptq_quantize_model(model, 3, group_size=32)
    with pytest.raises(ValueError, match="calibration"):
        gptq.gptq_quantize_model(model, [], group_size=32)


def test_gptq_model_driver_tiny_bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=128, max_position_embeddings=64)
    model = transformers.BertModel(cfg).eval()

    def batch():
        ids = torch.randint(0, 128, (4, 16))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    calib = [batch() for _ in range(6)]
    original = copy.deepcopy(model)

    def hidden(m):
        with torch.no_grad():
            return torch.cat([m(**b).last_hidden_state for b in calib])

    ref = hidden(model)
    weights, report = gptq.gptq_quantize_model(model, calib, group_size=32, progress=False)
    n_linear = sum(type(m) is nn.Linear for m in model.modules())
    assert len(weights) == n_linear == 13 and not report.skipped
    assert ["encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.key",
            "encoder.layer.0.attention.self.value"] in report.stages
    assert all(not st.fallback for st in report.layers.values())
    rtn_model = original
    for fqn, mod in rtn_model.named_modules():
        if type(mod) is nn.Linear:
            with torch.no_grad():
                mod.weight.copy_(rtn.rtn_quantize(mod.weight, 32).dequantize())
    err_gptq = float((hidden(model) - ref).norm())
    err_rtn = float((hidden(rtn_model) - ref).norm())
    assert err_gptq < 0.8 * err_rtn


# ----------------------------------------------------------------------------- block-by-block driver
class _Block(nn.Module):
    def __init__(self, d=64, h=128):
        super().__init__()
        self.q, self.k, self.o = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x, mask=None, use_cache=False, cache=None):
        assert cache is None and not use_cache      # the replay drops cache arguments
        a = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) / 8 + mask, dim=-1) @ x
        x = x + self.o(a)
        return (x + self.down(torch.relu(self.up(x))),)


class _BlockLM(nn.Module):
    """in_proj -> ModuleList of blocks (kwargs) -> lm_head: targets before, inside and after the stack."""

    def __init__(self, vocab=96, d=64, n=3):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.in_proj = nn.Linear(d, d)
        self.layers = nn.ModuleList(_Block(d) for _ in range(n))
        self.lm_head = nn.Linear(d, vocab)

    def forward(self, input_ids):
        x = self.in_proj(self.embed_tokens(input_ids))
        T = x.shape[-2]
        mask = torch.full((T, T), float("-inf")).triu(1)
        for layer in self.layers:
            x = layer(x, mask=mask, use_cache=False, cache=None)[0]
        return self.lm_head(x)


def _q1_hessian(model, calib):
    """2/n X^T X of layers.1.q's inputs when `model` runs the calibration batches."""
    xs = []
    h = model.layers[1].q.register_forward_pre_hook(lambda mod, args: xs.append(args[0].reshape(-1, 64)))
    with torch.no_grad():
        for c in calib:
            model(c)
    h.remove()
    X = torch.cat(xs)
    return 2.0 / X.shape[0] * X.T @ X


def test_gptq_model_driver_block_by_block_matches_whole_model_replay(monkeypatch):
    torch.manual_seed(0)
    model = _BlockLM()
    calib = [torch.randint(0, 96, (2, 16)) for _ in range(4)]
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    passes = {"a": 0, "b": 0}
    a.register_forward_pre_hook(lambda *_: passes.__setitem__("a", passes["a"] + 1))
    b.register_forward_pre_hook(lambda *_: passes.__setitem__("b", passes["b"] + 1))
    wa, ra = gptq.gptq_quantize_model(a, calib, group_size=32, progress=False)
    monkeypatch.setattr(_calib, "blockwise_hessians", lambda *args: None)
    wb, rb = gptq.gptq_quantize_model(b, calib, group_size=32, progress=False)
    names = ["in_proj"] + [f"layers.{i}.{n}" for i in range(3) for n in ("q", "k", "o", "up", "down")] + ["lm_head"]
    assert list(ra.layers) == list(rb.layers) == names
    assert ra.stages == rb.stages and ra.stages[0] == ["in_proj"] and ra.stages[1] == ["layers.0.q", "layers.0.k"]
    assert ra.stages[-1] == ["lm_head"]
    for fqn in names:
        assert ra.layers[fqn].nsamples == rb.layers[fqn].nsamples == 4 * 2 * 16
        assert not ra.layers[fqn].fallback
        assert torch.equal(wa[fqn].packed, wb[fqn].packed) or \
            float((wa[fqn].dequantize() - wb[fqn].dequantize()).abs().max()) < 1e-4
        torch.testing.assert_close(a.get_submodule(fqn).weight, b.get_submodule(fqn).weight, rtol=1e-4, atol=1e-4)
    # whole-model passes: trace + in_proj's stage + block-0 capture + lm_head's stage (per batch), against
    # one pass per stage for the whole-model replay
    assert passes["a"] <= 3 * len(calib) + 3 and passes["b"] >= len(ra.stages) * len(calib)


def test_gptq_block_driver_quantized_block_output_feeds_the_next_block():
    """Block 1's Hessians come from block 0's *quantized* output."""
    torch.manual_seed(1)
    model = _BlockLM(n=2)
    calib = [torch.randint(0, 96, (2, 16)) for _ in range(2)]
    seen = {}
    orig = _calib.HessianCollector.collect

    def spy(self, m, batches, device):
        accs = orig(self, m, batches, device)
        for fqn, acc in accs.items():
            seen[fqn] = acc.H.clone()
        return accs

    ref = copy.deepcopy(model)
    import unittest.mock as um
    with um.patch.object(_calib.HessianCollector, "collect", spy):
        gptq.gptq_quantize_model(model, calib, group_size=32, filter_fn=lambda m, f: f.startswith("layers"),
                                 progress=False)
    # expected H of layers.1.q: block 1's input in the model whose block 0 is quantized (as it is now)
    torch.testing.assert_close(seen["layers.1.q"], _q1_hessian(model, calib), rtol=1e-4, atol=1e-5)
    assert float((seen["layers.1.q"] - _q1_hessian(ref, calib)).abs().max()) > 1e-4  # not the float model's


# ----------------------------------------------------------------------------- issue 17: hmse clipping, act-order
@pytest.mark.parametrize("g", [32, 64, -1])
@pytest.mark.parametrize("symmetric", [False, True])
def test_hmse_clip_never_worse_than_minmax_or_mse_in_weighted_error(g, symmetric):
    N, K = 32, 256
    w = heavy_tailed(N, K)
    gs = K if g == -1 else g
    cw = torch.rand(K).pow(4) * 100 + 1e-3       # very uneven column importance
    mm = rtn.rtn_quantize(w, g, symmetric)
    mc = rtn.rtn_quantize(w, g, symmetric, clip="mse")
    hc = rtn.rtn_quantize(w, g, symmetric, clip="hmse", col_weight=cw)
    assert_canonical(hc, N, K, g, symmetric)
    e = {k: rtn.group_sq_error(w, q.scales, q.zeros, gs, cw) for k, q in (("mm", mm), ("mc", mc), ("hc", hc))}
    assert bool((e["hc"] <= e["mm"]).all()) and bool((e["hc"] <= e["mc"]).all())   # per group
    assert float(e["hc"].sum()) < float(e["mc"].sum())      # and it does choose differently


def test_hmse_clip_needs_and_checks_col_weight():
    w = torch.randn(8, 64)
    with pytest.raises(ValueError, match="col_weight"):
        rtn.rtn_quantize(w, 32, clip="hmse")
    with pytest.raises(ValueError, match="col_weight"):
        rtn.rtn_quantize(w, 32, clip="hmse", col_weight=torch.ones(63))
    with pytest.raises(ValueError, match="col_weight"):
        rtn.rtn_quantize(w, 32, clip="hmse", col_weight=-torch.ones(64))


def test_gptq_hmse_clip_is_canonical_and_beats_rtn():
    N, K, g = 48, 256, 64
    X = correlated_inputs(1024, K) * torch.linspace(0.2, 4.0, K)
    w = torch.randn(N, K) * 0.05
    q, st = gptq.gptq_quantize(w, hessian(X), g, clip="hmse")
    assert_canonical(q, N, K, g, False)
    assert out_err(X, w, q) < 0.85 * out_err(X, w, rtn.rtn_quantize(w, g, False))


def test_gptq_act_order_beats_natural_order_with_a_few_hot_input_columns():
    # the usual LLM case act-order is for: a few input channels carry most of the energy and sit
    # late in natural order; processing them first lets the other columns absorb their error
    N, K, g = 64, 256, 64
    torch.manual_seed(0)
    X = correlated_inputs(2048, K)
    hot = torch.arange(K - 12, K)
    X[:, hot] *= 20.0
    w = torch.randn(N, K) * 0.05
    H = hessian(X)
    errs = {}
    for ao in (False, True):
        q, st = gptq.gptq_quantize(w, H, g, act_order=ao, clip="minmax")
        errs[ao] = out_err(X, w, q)
    assert errs[True] < 0.8 * errs[False]
