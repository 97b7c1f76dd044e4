"""What the pruning-accuracy scripts share: the methods, the --patterns syntax, the pruned copies, the JSON."""
from __future__ import annotations

import copy
import json
import os
import time
from typing import Iterator

from slmkern.algorithms.magnitude import magnitude_prune_
from slmkern.algorithms.sparsegpt import sparsegpt_prune_
from slmkern.algorithms.wanda import wanda_prune_

METHODS = ("magnitude", "wanda", "sparsegpt")


def parse_patterns(spec: str) -> list:
    """'0.5,2:4' -> [0.5, '2:4'] (a fraction is unstructured sparsity, 'N:M' a pattern)."""
    return [s if ":" in s else float(s) for s in spec.split(",")]


def pruned_copies(base, patterns: str, methods: str, calib) -> Iterator[tuple]:
    """For each pattern x method: (pattern, method, pruned deep copy of base, prune report, prune seconds)."""
    for pat in parse_patterns(patterns):
        for method in methods.split(","):
            if method not in METHODS:
                raise SystemExit(f"--methods: unknown {method!r}; choose from {METHODS}")
            model = copy.deepcopy(base)
            t0 = time.perf_counter()
            if method == "magnitude":
                rep = magnitude_prune_(model, pat)
            elif method == "wanda":
                rep = wanda_prune_(model, calib, pat)
            else:
                rep = sparsegpt_prune_(model, calib, pat, progress=False)
            yield pat, method, model, rep, time.perf_counter() - t0
            del model          # one pruned copy alive at a time


def write_json(rows: list, path: str | None) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as fh:
            json.dump(rows, fh, indent=1)
        print(f"wrote {path}")
