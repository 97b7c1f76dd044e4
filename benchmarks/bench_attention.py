"""slmkern::attention on CPU against what a transformers model runs today: torch's sdpa (the flash CPU kernel
it dispatches to) plus the transpose copy transformers does after it, and sdpa's math backend.

    python -P -m slmkern.benchmarks.bench_attention [--threads 2] [--rounds 7] [--json out.json]

Inputs are laid out as transformers passes them: views of one fused q/k/v projection output
(B, L, 3 H D) -> (B, H, L, D), no copies. Impls are interleaved round by round; each row is the median
of the rounds. Attention is compute-bound here (4 B H L S D flops), so rows give GFLOP/s, not a bandwidth
floor. Not part of `slmkern bench` (its engine times linears against weight bytes).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

# name: (B, Hq, Hkv, L, D, causal)
CASES = {
    "minilm_b1": (1, 12, 12, 128, 32, False),
    "minilm_b32": (32, 12, 12, 128, 32, False),
    "smollm2_prefill128": (1, 9, 3, 128, 64, True),
    "bert_base_b8_seq512": (8, 12, 12, 512, 64, False),
}


def inputs(B, Hq, Hkv, L, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, (Hq + 2 * Hkv) * D, generator=g)
    q = x[..., :Hq * D].view(B, L, Hq, D).transpose(1, 2)
    k = x[..., Hq * D:(Hq + Hkv) * D].view(B, L, Hkv, D).transpose(1, 2)
    v = x[..., (Hq + Hkv) * D:].view(B, L, Hkv, D).transpose(1, 2)
    return q, k, v


def impls(causal: bool, gqa: bool) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from slmkern import ops

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa).transpose(1, 2).contiguous()

    def math(q, k, v):
        with sdpa_kernel(SDPBackend.MATH):
            return sdpa(q, k, v)

    return {"slmkern": lambda q, k, v: ops.attention(q, k, v, is_causal=causal),
            "torch_sdpa": sdpa, "torch_sdpa_math": math}


def run(cases=tuple(CASES), threads: int = 2, rounds: int = 7, reps: int = 3) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []
    for name in cases:
        B, Hq, Hkv, L, D, causal = CASES[name]
        q, k, v = inputs(B, Hq, Hkv, L, D)
        fns = impls(causal, Hq != Hkv)
        want = fns["torch_sdpa"](q, k, v)
        times = {n: [] for n in fns}
        for n, f in fns.items():          # warm-up, and every impl checked against sdpa once
            err = (f(q, k, v) - want).abs().max().item()
            if err > 1e-4:
                raise AssertionError(f"{name}/{n}: differs from torch sdpa by {err}")
        for _ in range(rounds):
            for n, f in fns.items():
                t0 = time.perf_counter()
                for _ in range(reps):
                    f(q, k, v)
                times[n].append((time.perf_counter() - t0) / reps)
        flops = 4 * B * Hq * L * L * D / (2 if causal else 1)
        ref = statistics.median(times["slmkern"])
        for n, ts in times.items():
            med = statistics.median(ts)
            rows.append({"bench": "attention", "case": name, "impl": n, "B": B, "Hq": Hq, "Hkv": Hkv, "L": L,
                         "D": D, "causal": causal, "ms": med * 1e3, "gflops": flops / med / 1e9,
                         "slmkern_speedup": med / ref, "threads": threads})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -P -m slmkern.benchmarks.bench_attention",
                                description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--json", help="write the rows here")
    a = p.parse_args(argv)
    rows = run(tuple(c for c in a.cases.split(",") if c), a.threads, a.rounds)
    print(f"{'case':<22} {'impl':<16} {'ms':>9} {'GFLOP/s':>8} {'slmkern x':>9}")
    for r in rows:
        print(f"{r['case']:<22} {r['impl']:<16} {r['ms']:>9.2f} {r['gflops']:>8.1f} {r['slmkern_speedup']:>9.2f}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
