"""pytest-benchmark view of a BenchOp: one test per (impl, shape, M), grouped per (op, shape, M).

`pytest benchmarks --benchmark-only` runs them (benchmarks/conftest.py collects bench_*.py).
The cases come from the same BenchOp declarations as `slmkern bench`; environment overrides:

    SLMKERN_BENCH_SHAPES=384x1536,576x1536   SLMKERN_BENCH_M=1,16   SLMKERN_BENCH_DEVICE=cuda
    SLMKERN_BENCH_BUDGET=0.2   (seconds of timed calls per test; rounds are clamped to [5, 200])

Timing is pytest-benchmark's (wall clock around each call; on CUDA the call includes a
synchronize). Each round gets the next weight copy from `setup`, untimed, so weights rotate
out of cache exactly as in `slmkern bench`.
"""
from __future__ import annotations

import functools
import itertools
import os
import time

import torch

from . import engine, machine


@functools.lru_cache(maxsize=None)
def _bandwidth(device: str) -> float:
    return machine.measure_bandwidth(device)["gbs"]


_last_case: dict = {}


def _case_data(bench: engine.BenchOp, case: engine.Case):
    """Source, activations and reference of the last case, shared by its impls' tests."""
    if _last_case.get("key") != (bench.op, case):
        _last_case.clear()
        gen = torch.Generator().manual_seed(0)
        src = bench.make_source(case, gen)
        x = torch.randn(case.M, case.K, generator=gen)
        _last_case.update(key=(bench.op, case), src=src, x=x,
                          ref=torch.nn.functional.linear(x, src.weight, src.bias))
    return _last_case["src"], _last_case["x"], _last_case["ref"]


def pytest_benchmark_test(bench: engine.BenchOp):
    """A parametrized pytest-benchmark test function for `bench`, or None without pytest."""
    try:
        import pytest
    except ImportError:
        return None
    device = os.environ.get("SLMKERN_BENCH_DEVICE", "cpu")
    shapes = engine.parse_shapes(os.environ["SLMKERN_BENCH_SHAPES"]) if os.environ.get("SLMKERN_BENCH_SHAPES") \
        else list(engine.DEFAULT_SHAPES)
    ms = engine.parse_ms(os.environ["SLMKERN_BENCH_M"]) if os.environ.get("SLMKERN_BENCH_M") \
        else list(engine.DEFAULT_MS)
    budget = float(os.environ.get("SLMKERN_BENCH_BUDGET", "0.2"))
    impls = [i for i in bench.impls if device in i.devices]
    params = [pytest.param(impl, K, N, M, id=f"{K}x{N}-M{M}-{impl.name}")
              for (K, N), M, impl in itertools.product(shapes, ms, impls)]

    @pytest.mark.parametrize("impl,K,N,M", params)
    def test(benchmark, impl, K, N, M):
        if device == "cuda" and not torch.cuda.is_available():
            pytest.skip("SLMKERN_BENCH_DEVICE=cuda but no CUDA device")
        case = engine.Case(bench.op, K, N, M, device, engine.DEFAULT_DTYPE[device])
        reason = impl.skip(case)
        if reason:
            pytest.skip(reason)
        src, x, ref = _case_data(bench, case)
        bw = _bandwidth(device)
        p = engine.prepare_impl(impl, case, src, x, ref, machine.cache_bytes(device), engine.BenchConfig())
        copies = itertools.cycle(p.copies)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

        def target(w, xx):
            impl.run(w, xx)
            sync()

        with torch.inference_mode():
            t0 = time.perf_counter()
            for _ in range(3):
                target(next(copies), p.x)
            est = max((time.perf_counter() - t0) / 3, 1e-7)
            rounds = int(min(200, max(5, budget / est)))
            benchmark.group = case.label
            benchmark.extra_info.update(op=bench.op, impl=impl.name, K=K, N=N, M=M,
                                        dtype=engine.dtype_name(p.x.dtype), bytes=p.bytes,
                                        floor_us=engine.floor_us(p.bytes, bw), bandwidth_gbs=bw,
                                        copies=len(p.copies), rel_err=p.rel_err)
            benchmark.pedantic(target, setup=lambda: ((next(copies), p.x), {}), rounds=rounds,
                               warmup_rounds=1, iterations=1)

    test.__name__ = f"test_{bench.op}"
    return test
