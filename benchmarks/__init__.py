"""slmkern benchmarks: the `slmkern bench` engine and the pytest-benchmark suites.

Installed as ``slmkern.benchmarks``. Every ``bench_<op>.py`` module here defines
``BENCH = BenchOp(...)`` (see engine.py); :func:`registry` finds them, so adding an op
to ``slmkern bench`` and to ``pytest benchmarks --benchmark-only`` is adding one file.
"""
from __future__ import annotations

import importlib
import pkgutil


def registry() -> tuple[dict, dict]:
    """({op name: BenchOp}, {module name: import error}) for every bench_*.py module here."""
    ops, errors = {}, {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        # e2e: model level (`bench --e2e`); attention: not a linear (python -m slmkern.benchmarks.bench_attention)
        if not info.name.startswith("bench_") or info.name in ("bench_e2e", "bench_attention"):
            continue
        try:
            mod = importlib.import_module(f"{__name__}.{info.name}")
        except Exception as exc:  # one broken op file must not hide the others
            errors[info.name] = f"{type(exc).__name__}: {exc}"
            continue
        bench = getattr(mod, "BENCH", None)
        if bench is None:
            errors[info.name] = "defines no BENCH"
            continue
        ops[bench.op] = bench
    return ops, errors
