"""sparse_linear (unstructured bitmask weights) vs torch_fp32, torch_csr and our dense w8a8_linear.

`slmkern bench --op sparse` runs one sparsity and value kind, from SLMKERN_BENCH_SPARSITY (default 0.9)
and SLMKERN_BENCH_SPARSE_VALUES (int8 | float, default int8). For several in one run:

    python -m benchmarks.bench_sparse --sparsity 0.5,0.9 --values int8,float --shape 2048x8192 --m 1,16 \\
        [--quick] [--json FILE]

Rows carry the op-specific fields "sparsity" and "values".
"""
from __future__ import annotations

import argparse
import os

from ._bitmask import VALUES, make_bench
from .pytest_glue import pytest_benchmark_test

BENCH = make_bench(float(os.environ.get("SLMKERN_BENCH_SPARSITY", "0.9")),
                   os.environ.get("SLMKERN_BENCH_SPARSE_VALUES", "int8"))

test_sparse_linear = pytest_benchmark_test(BENCH)


def crossover(sparsities=(0.5, 0.7, 0.8, 0.9, 0.95), ms=(1, 16, 128), K=2048, N=8192, rounds=5,
              reps=3, rotate_bytes=96 << 20, cpu_time=False, log=print) -> list[dict]:
    """Where unstructured sparsity starts to pay: sparse_linear (float and int8 values) vs dense fp32
    F.linear and our dense w8a8_linear, at each sparsity and M, interleaved in rounds (medians of one
    run). Only the packed buffers rotate (the kernels read nothing else), so copies are cheap.
    cpu_time: one thread, each call timed by the calling thread's CPU time (time.thread_time_ns),
    which a machine shared with other processes disturbs far less than wall time.
    Returns rows {sparsity, M, impl, us}."""
    import statistics
    import time

    import torch
    import torch.nn.functional as F

    from slmkern._backends import cpu as cpu_backend
    from slmkern.formats import bitmask as bf
    from slmkern.formats import int8 as int8_format

    clock = time.thread_time_ns if cpu_time else time.perf_counter_ns
    threads = torch.get_num_threads()
    if cpu_time:
        torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    dense = torch.randn(N, K, generator=gen) * K ** -0.5
    fp32 = [dense.clone() for _ in range(max(2, -(-rotate_bytes // (4 * N * K))))]
    rows = []
    for sp in sparsities:
        w = dense * (torch.rand(N, K, generator=gen) >= sp)
        v, b, r = bf.compress(w)
        fp = cpu_backend.prepack_bitmask(v, b, r, K)
        qv, qb, qr, qs = bf.compress_int8(w)
        qp = cpu_backend.prepack_bitmask(qv, qb, qr, K, qs)
        q8 = bf.decompress(qv, qb, qr, K)
        dp = cpu_backend.prepack_int8(q8)
        cp = lambda t: [t.clone() for _ in range(max(2, -(-rotate_bytes // t.numel())))]  # noqa: E731
        fps, qps, dps = cp(fp), cp(qp), cp(dp)
        for M in ms:
            x = torch.randn(M, K, generator=gen)
            impls = {
                "sparse_f32": (fps, lambda p: torch.ops.slmkern.sparse_linear(x, v, b, r, None, None, p)),
                "sparse_i8": (qps, lambda p: torch.ops.slmkern.sparse_linear(x, qv, qb, qr, qs, None, p)),
                "torch_fp32": (fp32, lambda p: F.linear(x, p)),
                "slmkern_w8a8": (dps, lambda p: torch.ops.slmkern.w8a8_linear(x, q8, qs, None, p)),
            }
            times = {k: [] for k in impls}
            i = 0
            with torch.inference_mode():
                for _ in range(rounds):
                    for k, (copies, fn) in impls.items():
                        for _ in range(reps):
                            p = copies[i % len(copies)]
                            i += 1
                            t0 = clock()
                            fn(p)
                            times[k].append((clock() - t0) * 1e-3)
            med = {k: statistics.median(t) for k, t in times.items()}
            for k, us in med.items():
                rows.append({"sparsity": sp, "M": M, "impl": k, "us": us})
            log(f"sparsity {sp:.2f} M={M:<4d} " + "  ".join(f"{k} {us:9.0f}us" for k, us in med.items())
                + f"  | f32/fp32 {med['torch_fp32'] / med['sparse_f32']:5.2f}x"
                f"  i8/fp32 {med['torch_fp32'] / med['sparse_i8']:5.2f}x"
                f"  i8/w8a8 {med['slmkern_w8a8'] / med['sparse_i8']:5.2f}x", flush=True)
    torch.set_num_threads(threads)
    return rows


def main(argv: list[str] | None = None) -> int:
    from . import engine, report

    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_sparse", description=__doc__.splitlines()[0])
    p.add_argument("--sparsity", default="0.9", help="comma list of sparsities in [0, 1) (default 0.9)")
    p.add_argument("--values", default="int8", help=f"comma list of {'/'.join(VALUES)} (default int8)")
    p.add_argument("--shape", default="2048x8192", help="comma list of KxN (default 2048x8192)")
    p.add_argument("--m", default="1,16,128", help="comma list of M (default 1,16,128)")
    p.add_argument("--quick", action="store_true", help="few reps, small rotation (indicative only)")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--crossover", action="store_true",
                   help="instead: the crossover table (float/int8 values vs fp32 and w8a8) at --sparsity x --m")
    p.add_argument("--cpu-time", action="store_true", help="--crossover on one thread, timed by thread CPU time")
    a = p.parse_args(argv)
    if a.crossover:
        import json
        sps = [float(s) for s in a.sparsity.split(",")]
        K, N = (int(v) for v in a.shape.split(",")[0].lower().split("x"))
        rows = crossover(sps, [int(m) for m in a.m.split(",")], K, N, cpu_time=a.cpu_time)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(rows, f, indent=1)
        return 0
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in a.shape.split(",")]
    ms = [int(m) for m in a.m.split(",")]
    cfg = engine.BenchConfig.quick_config() if a.quick else engine.BenchConfig()
    benches = [make_bench(float(sp), vk) for vk in a.values.split(",") for sp in a.sparsity.split(",")]
    result = None
    for i, bench in enumerate(benches):
        def on_start(meta, first=(i == 0)):
            if first:
                print(report.header(meta), flush=True)
        r = engine.run([bench], shapes, ms, "cpu", None, cfg, on_start=on_start,
                       on_case=lambda case, rows, skipped: print("\n" + report.case_block(case, rows, skipped)
                                                                 + f"  [{bench.description}]", flush=True))
        if result is None:
            result = r
        else:
            result["rows"] += r["rows"]
            result["meta"]["skipped"] += r["meta"]["skipped"]
    print()
    print(report.summary(result["rows"]))
    if a.json:
        report.write_json(result, a.json)
        print(f"\nwrote {len(result['rows'])} rows to {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
