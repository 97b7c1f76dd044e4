"""Count import cycles among slmkern's modules (stdlib only: ast, no import of slmkern).

    python tests/import_cycles.py [--top-level-only] [--list]

The modules are those setup.py installs: slmkern/ as ``slmkern``, and, per its package_dir, the
top-level kernels/ and benchmarks/ folders as ``slmkern.kernels`` and ``slmkern.benchmarks`` (files
in folders without an ``__init__.py``, such as benchmarks/runs/, are not modules). Edges are the
explicit ``import slmkern.x`` / ``from slmkern.x import y`` / ``from . import y`` statements of every
module (``y`` counts as a module when it is one). Implicit parent-package imports (importing
slmkern.a.b runs slmkern/__init__ and slmkern/a/__init__) are not edges. ``--top-level-only`` keeps
module-level statements (what runs at import time); by default imports inside functions count too
(they still couple the modules). Reports the strongly connected components with more than one module
(each holds at least one cycle) and the number of elementary cycles. tests/test_layers.py asserts 0.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# setup.py's package_dir: the installed package name of each source folder
PACKAGES = {"slmkern": ROOT / "slmkern", "slmkern.kernels": ROOT / "kernels", "slmkern.benchmarks": ROOT / "benchmarks"}


def _package_of(name: str) -> str:
    """The longest PACKAGES key that is `name` or a parent of it."""
    return max((p for p in PACKAGES if name == p or name.startswith(p + ".")), key=len)


def module_name(path: Path) -> str:
    pkg = max((p for p, d in PACKAGES.items() if path.is_relative_to(d)), key=lambda p: len(PACKAGES[p].parts))
    parts = list(path.relative_to(PACKAGES[pkg]).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([pkg, *parts])


def is_module(name: str) -> bool:
    if name.split(".")[0] != "slmkern":
        return False
    pkg = _package_of(name)
    p = PACKAGES[pkg].joinpath(*name[len(pkg):].split(".")[1:])
    return (p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()
            or any(p.parent.glob(p.name + ".*.so")))   # the extension (slmkern._C)


def module_files() -> list[Path]:
    """Every .py file that is a module: each folder from its package root down holds an __init__.py."""
    out = []
    for root in PACKAGES.values():
        for f in sorted(root.rglob("*.py")):
            folders = f.relative_to(root).parents
            if all((root / d / "__init__.py").is_file() for d in folders):
                out.append(f)
    return out


def edges(path: Path, top_level_only: bool) -> set[str]:
    me = module_name(path)
    pkg = me if path.name == "__init__.py" else me.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # module level, including inside if/try blocks at module level
        stack, nodes = list(tree.body), []
        while stack:
            n = stack.pop()
            nodes.append(n)
            if isinstance(n, (ast.If, ast.Try)):
                stack.extend(n.body + n.orelse + getattr(n, "finalbody", []) +
                             [s for h in getattr(n, "handlers", []) for s in h.body])
    out = set()
    for n in nodes:
        if isinstance(n, ast.Import):
            out |= {a.name for a in n.names if a.name.split(".")[0] == "slmkern"}
        elif isinstance(n, ast.ImportFrom):
            if n.level:
                base = pkg.split(".")[:len(pkg.split(".")) - (n.level - 1)]
                mod = ".".join(base + ([n.module] if n.module else []))
            else:
                mod = n.module or ""
            if mod.split(".")[0] != "slmkern":
                continue
            subs = {f"{mod}.{a.name}" for a in n.names if is_module(f"{mod}.{a.name}")}
            out |= subs
            if len(subs) < len(n.names):
                out.add(mod)
    out = {m for m in out if is_module(m)}
    out.discard(me)
    return out


def graph(top_level_only: bool) -> dict[str, set[str]]:
    g = {module_name(p): edges(p, top_level_only) for p in module_files()}
    return {m: {d for d in ds if d in g} for m, ds in g.items()}


def sccs(g: dict[str, set[str]]) -> list[list[str]]:
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return [c for c in out if len(c) > 1]


def count_cycles(g: dict[str, set[str]], comp: list[str], cap: int = 100000) -> int:
    """Elementary cycles inside one SCC (each counted once: start = its smallest node)."""
    order = {v: i for i, v in enumerate(sorted(comp))}
    n = 0
    for s in sorted(comp):
        stack = [(s, iter(sorted(w for w in g[s] if w in order and order[w] >= order[s])))]
        path = {s}
        while stack:
            v, it = stack[-1]
            w = next(it, None)
            if w is None:
                stack.pop()
                path.discard(v)
            elif w == s:
                n += 1
                if n >= cap:
                    return n
            elif w not in path:
                path.add(w)
                stack.append((w, iter(sorted(x for x in g[w] if x in order and order[x] >= order[s]))))
    return n


def main(argv: list[str]) -> int:
    top = "--top-level-only" in argv
    g = graph(top)
    comps = sccs(g)
    total = sum(count_cycles(g, c) for c in comps)
    print(f"{len(g)} modules, {sum(map(len, g.values()))} edges ({'module-level imports' if top else 'all imports'})")
    print(f"{len(comps)} strongly connected component(s) with a cycle, {total} elementary cycle(s)")
    for c in comps:
        print(f"  {len(c)} modules, {count_cycles(g, c)} cycles: " + (", ".join(c) if "--list" in argv or len(c) <= 12
                                                                      else ", ".join(c[:12]) + ", ..."))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
