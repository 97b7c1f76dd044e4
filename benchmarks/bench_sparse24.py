"""sparse24_linear: 2:4 semi-structured weights (float or int8 values) vs the dense layers a user
would run instead, side by side in one run.

Rows of impl ``slmkern`` carry ``values`` (float32 / bfloat16 / int8); peers: ``torch_fp32``
(F.linear on the same pruned weight, dense fp32) and ``slmkern_w8a8`` (our dense w8a8_linear on
the same int8 weight). ``python -m benchmarks.bench_sparse24 [--json FILE]`` prints the ratios.
"""
from __future__ import annotations

import torch

from . import peers
from ._sparse24 import make_source, ratios, slmkern_float, slmkern_int8, slmkern_w8a8_dense
from .engine import BenchOp
from .pytest_glue import pytest_benchmark_test

BENCH = BenchOp(
    op="sparse24_linear",
    make_source=make_source,
    impls=(slmkern_float(torch.float32), slmkern_float(torch.bfloat16), slmkern_int8(), slmkern_w8a8_dense(),
           peers.torch_fp32()),
    devices=("cpu",),
    description="2:4 semi-structured linear (float or int8 values)",
)

test_sparse24_linear = pytest_benchmark_test(BENCH)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    from . import engine

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="2048x8192")
    p.add_argument("--m", default="1,16,128")
    p.add_argument("--json")
    a = p.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shape.split(",")]
    ms = [int(v) for v in a.m.split(",")]
    res = engine.run([BENCH], shapes, ms, "cpu", None, engine.BenchConfig())
    for r in res["rows"]:
        print(f"{r['K']:>5}x{r['N']:<5} M={r['M']:<4} {r['impl']:<13} {r.get('values') or '':<9} "
              f"{r['us']:>10.1f} us  floor {r['floor_us']:>9.1f}  ({100 * r['floor_us'] / r['us']:.0f}%)")
    for r in ratios(res["rows"]):
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()})
    if a.json:
        res["ratios"] = ratios(res["rows"])
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
