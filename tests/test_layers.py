"""One direction of imports (ARCHITECTURE.md, "Layers").

`make test` runs import-linter first: the layers contract in pyproject.toml checks the order of the
layers under slmkern/. These tests check, with stdlib ast (tests/import_cycles.py), what that contract
cannot see: cycles inside one layer, and the two folders setup.py installs from outside slmkern/
(kernels/ as slmkern.kernels, benchmarks/ as slmkern.benchmarks). Imports inside functions count.
"""
from __future__ import annotations

import import_cycles

# What the Triton kernels may import: themselves and what lies below _backends (they are its CUDA half).
KERNEL_DEPS = ("slmkern.kernels", "slmkern.reference", "slmkern.formats", "slmkern._logging")


def _in(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def _edges(top_level_only: bool = False) -> list[tuple[str, str]]:
    g = import_cycles.graph(top_level_only)
    return [(m, d) for m, ds in sorted(g.items()) for d in sorted(ds)]


def test_no_import_cycle():
    for top_level_only in (True, False):
        g = import_cycles.graph(top_level_only)
        assert "slmkern.kernels" in g and "slmkern.benchmarks.engine" in g and "slmkern._backends.cpu" in g
        cycles = import_cycles.sccs(g)
        assert not cycles, f"import cycles (top_level_only={top_level_only}): {cycles}"


def test_benchmarks_depend_on_the_package_never_the_reverse():
    up = [(m, d) for m, d in _edges() if _in(m, "slmkern.benchmarks") and d == "slmkern.cli"]
    assert not up, f"benchmarks import the cli, the one layer above them: {up}"
    down = [(m, d) for m, d in _edges()
            if _in(d, "slmkern.benchmarks") and not _in(m, "slmkern.benchmarks", "slmkern.cli")]
    assert not down, f"only the cli may import slmkern.benchmarks: {down}"


def test_kernels_import_only_what_lies_below_the_backends():
    bad = [(m, d) for m, d in _edges() if _in(m, "slmkern.kernels") and not _in(d, *KERNEL_DEPS)]
    assert not bad, bad
    users = {m for m, d in _edges() if _in(d, "slmkern.kernels") and not _in(m, "slmkern.kernels")}
    assert users == {"slmkern._backends.triton", "slmkern._backends.triton_sparse"}, users


def test_the_graph_sees_function_level_and_mapped_imports():
    """The checks above are only as good as the graph: a lazy import and a kernels/ import are edges."""
    edges = set(_edges())
    assert ("slmkern._backends.triton", "slmkern.kernels") in edges                    # kernels/, mapped
    assert ("slmkern._backends.triton_sparse", "slmkern.kernels.sparse24") in edges     # inside a function
    assert ("slmkern.cli", "slmkern.benchmarks.engine") in edges
    assert ("slmkern._backends.triton_sparse", "slmkern.kernels.sparse24") not in set(_edges(top_level_only=True))
