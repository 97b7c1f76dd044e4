"""Sensitivity-driven mixed precision (slmkern.algorithms.mixed): byte accounting, chooser, sensitivity."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from slmkern.algorithms import mixed, rtn


def test_byte_accounting_matches_the_canonical_tensors():
    N, K, g = 96, 576, 64
    q = rtn.rtn_quantize(torch.randn(N, K), g, False)
    real = q.packed.numel() + q.scales.numel() * 4 + q.zeros.numel()
    assert mixed.int4_bytes(N, K, g) == real
    qs = rtn.rtn_quantize(torch.randn(N, K), g, True)
    assert mixed.int4_bytes(N, K, g, True) == qs.packed.numel() + qs.scales.numel() * 4
    assert mixed.int8_bytes(N, K) == N * K + 4 * N
    # g64 asymmetric: 4 + 32/64 + 8/64 bits as stored; 4 + 16/64 + 4/64 packed-equivalent
    assert mixed.bits_per_weight({"a": (N, K)}, [], g) == pytest.approx(4.625)
    assert mixed.bits_per_weight({"a": (N, K)}, [], g, scale_bytes=2, zero_bits=4) == pytest.approx(4.3125)
    assert mixed.bits_per_weight({"a": (N, K), "b": (N, K)}, ["b"], g) == pytest.approx((4.625 + 8 + 32 / K) / 2)


def test_chooser_respects_the_budget_and_is_optimal_on_small_cases():
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        n = 7
        gains = {f"u{i}": float(torch.rand(1, generator=g)) - 0.1 for i in range(n)}
        cost = {f"u{i}": float(torch.randint(1, 20, (1,), generator=g)) for i in range(n)}
        budget = float(torch.randint(0, 40, (1,), generator=g))
        chosen = mixed.choose_int8_units(gains, cost, budget)
        assert sum(cost[u] for u in chosen) <= budget
        assert all(gains[u] > 0 for u in chosen)
        assert len(set(chosen)) == len(chosen)
        # greedy by density is within the best single item of the optimum (knapsack bound)
        best = 0.0
        for r in range(n + 1):
            for sub in itertools.combinations(gains, r):
                if sum(cost[u] for u in sub) <= budget:
                    best = max(best, sum(max(gains[u], 0) for u in sub))
        got = sum(gains[u] for u in chosen)
        top_single = max([gains[u] for u in gains if cost[u] <= budget and gains[u] > 0], default=0.0)
        assert got >= best - top_single - 1e-9


def test_chooser_prefers_gain_per_byte_and_rejects_bad_input():
    gains = {"big": 1.0, "small": 0.6, "useless": -0.2}
    cost = {"big": 10.0, "small": 2.0, "useless": 1.0}
    assert mixed.choose_int8_units(gains, cost, 11.0) == ["small"]        # big no longer fits
    assert mixed.choose_int8_units(gains, cost, 12.0) == ["small", "big"]
    assert mixed.choose_int8_units(gains, cost, 0.0) == []
    with pytest.raises(ValueError, match="budget_bytes"):
        mixed.choose_int8_units(gains, cost, -1.0)
    with pytest.raises(ValueError, match="extra_bytes"):
        mixed.choose_int8_units(gains, {"big": 1.0}, 5.0)


class _TinyLM(nn.Module):
    def __init__(self, V=50, D=32):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.a = nn.Linear(D, D)
        self.b = nn.Linear(D, D)
        self.head = nn.Linear(D, V)

    def forward(self, input_ids):
        h = self.emb(input_ids)
        h = h + torch.tanh(self.a(h))
        h = h + torch.tanh(self.b(h))

        class Out:
            pass
        o = Out()
        o.logits = self.head(h)
        return o


def test_int8_sensitivity_measures_each_unit_alone_and_restores_the_model():
    torch.manual_seed(0)
    m = _TinyLM().eval()
    fw = {f: getattr(m, f).weight.detach().clone() for f in ("a", "b")}
    with torch.no_grad():   # the "int4 model": a is coarsely quantized, b barely
        m.a.weight.copy_(rtn.rtn_quantize(fw["a"], -1, True).dequantize() * 1.3)
        m.b.weight.copy_(fw["b"] + 1e-4)
    before = {f: getattr(m, f).weight.detach().clone() for f in ("a", "b")}
    wins = [torch.randint(0, 50, (24,)) for _ in range(3)]
    gains, base = mixed.int8_sensitivity(m, fw, {"ua": ["a"], "ub": ["b"]}, wins)
    for f in ("a", "b"):
        torch.testing.assert_close(getattr(m, f).weight, before[f], rtol=0, atol=0)
    assert base == pytest.approx(mixed.mean_nll(m, wins))
    with torch.no_grad():
        m.a.weight.copy_(mixed.fake_int8(fw["a"]))
    assert gains["ua"] == pytest.approx(base - mixed.mean_nll(m, wins), abs=1e-6)
    assert gains["ua"] > abs(gains["ub"])
    with pytest.raises(ValueError, match="units"):
        mixed.int8_sensitivity(m, fw, {"u": ["head"]}, wins)
