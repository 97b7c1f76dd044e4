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


def main(argv: list[str] | None = None) -> int:
    from . import engine, report

    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_sparse", description=__doc__.splitlines()[0])
    p.add_argument("--sparsity", default="0.9", help="comma list of sparsities in [0, 1) (default 0.9)")
    p.add_argument("--values", default="int8", help=f"comma list of {'/'.join(VALUES)} (default int8)")
    p.add_argument("--shape", default="2048x8192", help="comma list of KxN (default 2048x8192)")
    p.add_argument("--m", default="1,16,128", help="comma list of M (default 1,16,128)")
    p.add_argument("--quick", action="store_true", help="few reps, small rotation (indicative only)")
    p.add_argument("--json", metavar="FILE")
    a = p.parse_args(argv)
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
