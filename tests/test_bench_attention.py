"""benchmarks/bench_attention.py: rows, the correctness gate, the CLI (tiny cases, no timing claims)."""
from __future__ import annotations

import json

import pytest

from slmkern.benchmarks import bench_attention as ba


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(ba, "CASES", {"tiny": (2, 4, 2, 9, 8, True), "tiny_mha": (1, 3, 3, 7, 16, False)})


def test_rows_cover_every_impl_and_case(tiny, tmp_path):
    out = tmp_path / "a.json"
    assert ba.main(["--threads", "1", "--rounds", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert {(r["case"], r["impl"]) for r in rows} == {(c, i) for c in ("tiny", "tiny_mha")
                                                     for i in ("slmkern", "torch_sdpa", "torch_sdpa_math")}
    for r in rows:
        assert r["bench"] == "attention" and r["ms"] > 0 and r["gflops"] > 0 and r["threads"] == 1
        assert (r["slmkern_speedup"] == 1.0) == (r["impl"] == "slmkern")


def test_a_wrong_impl_is_refused(tiny, monkeypatch):
    real = ba.impls

    def broken(causal, gqa):
        fns = real(causal, gqa)
        fns["slmkern"] = lambda q, k, v: fns["torch_sdpa"](q, k, v) + 1e-2
        return fns

    monkeypatch.setattr(ba, "impls", broken)
    with pytest.raises(AssertionError, match="differs from torch sdpa"):
        ba.run(("tiny",), threads=1, rounds=1)
