"""The benchmark engine's arithmetic and bookkeeping: floors, rotation, row schema, peers' agreement.

No timings are asserted: only what the engine computes from them and how it moves weights.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from slmkern import benchmarks as bm
from slmkern.benchmarks import engine, report
from slmkern.formats import int8 as int8_format

MiB = 1 << 20


# ---------------------------------------------------------------- floor

def test_floor_us_is_bytes_over_bandwidth():
    assert engine.floor_us(1_000_000, 10.0) == pytest.approx(100.0)        # 1 MB at 10 GB/s
    assert engine.floor_us(96 * MiB, 32.0) == pytest.approx(96 * MiB / 32e9 * 1e6)
    with pytest.raises(ValueError, match="bandwidth"):
        engine.floor_us(100, 0.0)


def test_percentiles_and_summary():
    vals = [float(v) for v in range(1, 12)]  # 1..11
    assert engine.percentile(vals, 50) == 6.0
    assert engine.percentile(vals, 10) == pytest.approx(2.0)
    assert engine.percentile(vals, 90) == pytest.approx(10.0)
    s = engine.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert s["us"] == 3.0 and s["p10_us"] == pytest.approx(1.4) and s["p90_us"] == pytest.approx(4.6)
    with pytest.raises(ValueError):
        engine.percentile([], 50)


# ---------------------------------------------------------------- rotation count

@pytest.mark.parametrize("wbytes", [1, 4096, 590_000, 2_359_296, 16 * MiB, 64 * MiB])
def test_rotation_spans_three_times_the_cache(wbytes):
    cache = 32 * MiB
    n = engine.copies_for(wbytes, cache, factor=3.0, cap_bytes=512 * MiB, max_copies=10**9)
    assert n >= 2
    assert n * wbytes >= 3 * cache or n * wbytes > 512 * MiB - wbytes  # spans 3x LLC unless capped
    assert (n - 1) * wbytes < 3 * cache or n == 2                        # and no more than needed


def test_rotation_caps():
    cache = 32 * MiB
    assert engine.copies_for(590_000, cache) == math.ceil(3 * cache / 590_000)       # MiniLM int8: 171
    assert engine.copies_for(64 * MiB, cache) == 2                                      # 1B fp32 weight
    assert engine.copies_for(300 * MiB, cache, cap_bytes=512 * MiB) == 1               # one copy over the cap
    assert engine.copies_for(1000, cache, max_copies=16) == 16
    assert engine.copies_for(16 * MiB, cache, cap_bytes=64 * MiB) == 4
    with pytest.raises(ValueError):
        engine.copies_for(0, cache)


class _Spy:
    """A toy linear impl that records which weight copy each call used."""

    def __init__(self):
        self.used: list[int] = []

    def impl(self, name="torch_fp32", wbytes=None):
        def prepare(case, src):
            return src.weight.clone(), src.bias.clone()

        def run(w, x):
            self.used.append(id(w[0]))
            return F.linear(x, w[0], w[1])

        return engine.Impl(name, prepare, run,
                           weight_bytes=wbytes or (lambda c: 4 * c.N * c.K + 4 * c.N), x_dtype=torch.float32)


def _toy_source(case, gen):
    return engine.LinearSource(torch.randn(case.N, case.K, generator=gen), torch.randn(case.N, generator=gen))


def test_run_case_rotates_through_every_copy():
    spy = _Spy()
    bench = engine.BenchOp("w8a8_linear", _toy_source, (spy.impl(wbytes=lambda c: 4 * MiB),))
    cfg = engine.BenchConfig(reps=23, warmup=2, rounds=3, cache_factor=1.0)
    case = engine.Case("w8a8_linear", 32, 48, 3)
    rows, skipped = engine.run_case(bench, case, cfg, bandwidth_gbs=10.0)
    n = engine.copies_for(4 * MiB, engine.machine.cache_bytes("cpu"), 1.0, cfg.max_weight_bytes, cfg.max_copies)
    assert not skipped and rows[0]["copies"] == n and rows[0]["reps"] == 23
    timed = spy.used[1:]                       # the first call is the output check
    assert len(timed) == 2 + 23
    assert len(set(spy.used)) == n             # every copy is distinct memory and gets used
    assert all(a != b for a, b in zip(timed, timed[1:]))  # never the same copy twice in a row
    assert timed[:n] == timed[n:2 * n]         # round-robin order, continued across rounds


# ---------------------------------------------------------------- rows and JSON

def _assert_row_schema(row):
    for key in engine.ROW_KEYS:
        assert key in row, key
    assert row["impl"] in engine.IMPL_NAMES
    assert isinstance(row["K"], int) and isinstance(row["N"], int) and isinstance(row["M"], int)
    assert isinstance(row["us"], float) and row["us"] > 0
    assert isinstance(row["floor_us"], float) and row["floor_us"] > 0
    assert row["p10_us"] <= row["us"] <= row["p90_us"]
    assert row["floor_us"] == pytest.approx(row["bytes"] / (row["bandwidth_gbs"] * 1e3))


def test_w8a8_rows_schema_bytes_and_json(tmp_path):
    ops, errors = bm.registry()
    assert {"w8a8_linear", "w8a16_linear"} <= set(ops), errors
    case = engine.Case("w8a8_linear", 40, 72, 5)
    rows, skipped = engine.run_case(ops["w8a8_linear"], case, engine.BenchConfig(reps=3, warmup=1, rounds=1,
                                                                                max_copies=3), 20.0)
    assert not skipped
    by = {r["impl"]: r for r in rows}
    assert list(by) == ["slmkern", "torch_fp32", "torch_fbgemm_int8"]   # CPU impls, ours first
    for r in rows:
        _assert_row_schema(r)
        assert r["op"] == "w8a8_linear" and r["dtype"] == "float32" and r["device"] == "cpu"
    act = 4 * 5 * 40 + 4 * 5 * 72                                       # fp32 x in + fp32 y out
    assert by["slmkern"]["bytes"] == int8_format.packed_bytes(72, 40) + 8 * 72 + act
    assert by["torch_fp32"]["bytes"] == 4 * 72 * 40 + 4 * 72 + act
    result = {"meta": {"bandwidth_gbs": 20.0}, "rows": rows}
    path = tmp_path / "out" / "bench.json"
    report.write_json(result, path)
    back = json.loads(path.read_text())
    assert set(back) == {"meta", "rows"} and back["rows"][0]["impl"] == "slmkern"


@pytest.mark.parametrize("op", ["w8a8_linear", "w8a16_linear"])
def test_every_impl_computes_the_same_layer(op):
    """Peers are only comparable if they compute our layer: each impl vs the float layer, fresh data."""
    bench = bm.registry()[0][op]
    case = engine.Case(op, 72, 40, 3)
    gen = torch.Generator().manual_seed(1234)
    src = bench.make_source(case, gen)
    x = torch.randn(case.M, case.K, generator=gen)
    ref = F.linear(x, src.weight, src.bias)
    cfg = engine.BenchConfig(max_copies=2)
    tol = 0.03 if op == "w8a8_linear" else 1e-5
    for impl in bench.impls:
        if "cpu" not in impl.devices:
            continue
        p = engine.prepare_impl(impl, case, src, x, ref, 32 * MiB, cfg)
        limit = 0.03 if impl.name == "torch_fbgemm_int8" else tol   # fbgemm quantizes activations too
        assert p.rel_err is not None and p.rel_err < limit, (impl.name, p.rel_err)
    # and the check can fail: a transposed weight is caught
    bad = engine.Impl("torch_fp32", lambda c, s: s.weight.flip(0).contiguous(), lambda w, xx: F.linear(xx, w),
                      weight_bytes=lambda c: 4 * c.N * c.K)
    assert engine.prepare_impl(bad, case, src, x, ref, 32 * MiB, cfg).rel_err > 0.5


def test_impl_names_are_fixed():
    with pytest.raises(ValueError, match="fixed names"):
        engine.Impl("torch_fp32_v2", lambda c, s: None, lambda w, x: x, weight_bytes=lambda c: 1)


def test_failing_peer_is_skipped_not_fatal():
    spy = _Spy()

    def boom(case, src):
        raise RuntimeError("not in this build")

    broken = engine.Impl("torch_csr", boom, lambda w, x: x, weight_bytes=lambda c: 1)
    bench = engine.BenchOp("w8a8_linear", _toy_source, (spy.impl("slmkern"), broken))
    rows, skipped = engine.run_case(bench, engine.Case("w8a8_linear", 16, 16, 1),
                                    engine.BenchConfig(reps=2, warmup=1, max_copies=2), 10.0)
    assert [r["impl"] for r in rows] == ["slmkern"]
    assert skipped[0]["impl"] == "torch_csr" and "not in this build" in skipped[0]["reason"]


def test_ratio_text_and_summary():
    assert report.ratio_text(10.0, 13.5, "torch_fbgemm_int8") == "slmkern is 1.35x faster than torch_fbgemm_int8"
    assert report.ratio_text(20.0, 10.0, "torch_fp32") == "slmkern is 2.00x slower than torch_fp32"
    rows = [{"op": "w8a8_linear", "impl": i, "K": 8, "N": 8, "M": 1, "us": us, "floor_us": 1.0}
            for i, us in (("slmkern", 2.0), ("torch_fp32", 5.0))]
    assert "2.50x" in report.summary(rows)


def test_contended_case_is_retried_and_least_contended_kept(monkeypatch):
    calls = []

    def fake_run_case(bench, case, cfg, bw):
        calls.append(case)
        others = 0.6 if len(calls) == 1 else 0.02
        return [{"op": case.op, "impl": "slmkern", "K": case.K, "N": case.N, "M": case.M, "others_cpu": others}], []

    monkeypatch.setattr(engine, "run_case", fake_run_case)
    monkeypatch.setattr(engine.machine, "measure_bandwidth", lambda *a, **k: {"gbs": 10.0})
    monkeypatch.setattr(engine.time, "sleep", lambda s: None)
    bench = engine.BenchOp("w8a8_linear", _toy_source, (_Spy().impl("slmkern"),))
    res = engine.run([bench], shapes=[(16, 16)], ms=[1], cfg=engine.BenchConfig(retry_contended=1))
    assert len(calls) == 2 and res["rows"][0]["others_cpu"] == 0.02
    calls.clear()
    res = engine.run([bench], shapes=[(16, 16)], ms=[1], cfg=engine.BenchConfig(retry_contended=0))
    assert len(calls) == 1 and res["rows"][0]["others_cpu"] == 0.6
