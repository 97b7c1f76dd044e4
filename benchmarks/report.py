"""Console tables and the JSON file of a `slmkern bench` run.

JSON layout (``--json FILE``)::

    {"meta": {schema, started, finished, device, machine{cpu, threads, torch, ...},
              bandwidth{gbs, method, buffer_mb, tries, threads}, bandwidth_gbs, cache_bytes,
              rotation_target_bytes, quantized_engine, op_paths, config, timing,
              loadavg_start, loadavg_end, skipped[{op, impl, K, N, M, device, reason}]},
     "rows": [{"op", "impl", "K", "N", "M", "dtype", "us", "floor_us",          # DESIGN.md schema
               "p10_us", "p90_us", "bytes", "weight_bytes", "bandwidth_gbs",    # + these extras
               "device", "reps", "copies", "rel_err", "others_cpu",
               <op-specific fields>}, ...]}

One row per (op, impl, K, N, M) measurement; `op` is the slmkern op, `impl` who ran it.
Ratios are computed from rows of one file (one run), never across runs.
"""
from __future__ import annotations

import json
from pathlib import Path

OTHERS_WARN = 0.1    # share of the CPUs other processes used during a case's timed rounds (engine.CONTENDED)
REL_ERR_WARN = 0.05  # w8a8 vs the float layer is ~1e-2; anything past this is a broken impl


def ratio_text(ours_us: float, peer_us: float, peer: str) -> str:
    """'slmkern is 1.35x faster than torch_fp32' style, from one run's medians."""
    r = peer_us / ours_us
    if r >= 1:
        return f"slmkern is {r:.2f}x faster than {peer}"
    return f"slmkern is {1 / r:.2f}x slower than {peer}"


def header(meta: dict) -> str:
    m = meta["machine"]
    cpu = m["cpu"]
    bw = meta["bandwidth"]
    lines = [
        f"slmkern bench  ({meta['started']})",
        f"  cpu: {cpu.get('model_name')} (family {cpu.get('family')} model {cpu.get('model')}), "
        f"torch threads {m['threads']}, LLC {meta['machine']['cpu_cache_bytes'] >> 20} MiB",
        f"  torch {m['torch']}, triton {m.get('triton')}, slmkern {meta['slmkern']}, "
        f"quantized engine {meta['quantized_engine']}",
    ]
    if "gpu" in m:
        g = m["gpu"]
        lines.append(f"  gpu: {g['name']}, L2 {g['l2_cache_bytes'] >> 20} MiB, cuda {g['cuda']}")
    lines += [
        f"  read bandwidth: {bw['gbs']:.1f} GB/s ({bw['method']}, {bw['buffer_mb']} MiB, "
        f"{bw['threads'] or '-'} threads, best of {bw['tries']})"
        + (f"; WARNING: measured while other processes used {100 * bw['others_cpu']:.0f}% of the CPUs"
           if (bw.get("others_cpu") or 0) > OTHERS_WARN else ""),
        f"  weights rotate over >= {meta['rotation_target_bytes'] / 2**20:.0f} MiB per impl "
        f"(cap {meta['config']['max_weight_bytes'] >> 20} MiB); timing: {meta['timing']}",
        "  slmkern paths: " + ", ".join(f"{op}={path}" for op, path in meta["op_paths"].items()),
    ]
    if meta.get("loadavg_start") is not None and meta["loadavg_start"] > 0.5:
        lines.append(f"  WARNING: load average {meta['loadavg_start']:.2f} at start: other processes share "
                     "this machine; timings are noisy")
    if meta["config"].get("quick"):
        lines.append("  --quick: smoke run (few reps, small rotation); numbers are indicative only")
    return "\n".join(lines)


def label(r: dict) -> str:
    """impl name, with the value type when an op times several (sparse ops: fp32/bf16/int8 values)."""
    return f"{r['impl']}[{r['values']}]" if r.get("values") and r["impl"].startswith("slmkern") else r["impl"]


def case_block(case, rows: list[dict], skipped: list[dict]) -> str:
    """One table per (op, shape, M): each impl's median/p10/p90, floor, %floor and ratio vs slmkern."""
    dtype = next((r["dtype"] for r in rows if r["impl"] == "slmkern"), str(case.dtype).removeprefix("torch."))
    lines = [f"{case.op}  K={case.K} N={case.N} M={case.M}  ({case.device}, slmkern x {dtype})",
             f"  {'impl':<20}{'median us':>11}{'p10':>10}{'p90':>10}{'floor us':>10}{'%floor':>8}"
             f"{'MiB':>8}{'copies':>7}{'reps':>6}  vs slmkern"]
    ours = next((r for r in rows if r["impl"] == "slmkern"), None)
    for r in rows:
        pct = 100.0 * r["floor_us"] / r["us"] if r["us"] > 0 else float("nan")
        # a peer that carries a value type (slmkern_w8a8 for int8 values) is compared with that variant
        mine = next((o for o in rows if o["impl"] == "slmkern" and r.get("values")
                     and o.get("values") == r.get("values")), ours)
        vs = "-" if r["impl"] == "slmkern" or mine is None else ratio_text(mine["us"], r["us"], r["impl"])
        lines.append(f"  {label(r):<20}{r['us']:>11.1f}{r['p10_us']:>10.1f}{r['p90_us']:>10.1f}"
                     f"{r['floor_us']:>10.1f}{pct:>7.1f}%{r['bytes'] / 2**20:>8.2f}{r['copies']:>7}"
                     f"{r['reps']:>6}  {vs}")
    host = [f"{r['impl']} {r['host_us']:.0f}" for r in rows if r.get("host_us") is not None]
    if host:
        lines.append("  host us per call (dispatch + launch, not in the GPU time above): " + ", ".join(host))
    for r in rows:
        if r.get("rel_err") is not None and r["rel_err"] > REL_ERR_WARN:
            lines.append(f"  WARNING: {r['impl']} output differs from the float layer: rel err {r['rel_err']:.3g}")
    others = rows[0].get("others_cpu") if rows else None
    if others is not None and others > OTHERS_WARN:
        lines.append(f"  WARNING: other processes used {100 * others:.0f}% of the CPUs while this case ran: "
                     "contended, rerun on a quiet machine")
    for s in skipped:
        lines.append(f"  note: {s['impl']} skipped: {s['reason']}")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """One line per case: slmkern's median and its speed ratio to each peer (peer us / slmkern us)."""
    peers = []
    for r in rows:
        if r["impl"] != "slmkern" and r["impl"] not in peers:
            peers.append(r["impl"])
    lines = ["summary: slmkern median us and speedup vs each peer (peer us / slmkern us; > 1 = slmkern faster)",
             f"  {'op':<26}{'K':>6}{'N':>6}{'M':>5}{'slmkern us':>12}{'%floor':>8}" + "".join(f"{p:>20}" for p in peers)
             + "  others_cpu"]
    # Rows come case by case (one case = one table above). A case starts when (op, shape, M,
    # sparsity) changes, or when slmkern rows follow peers / a peer repeats (a sparse op timed
    # once per value type): peers are only compared within their own case.
    cases: list = []
    for r in rows:
        key = (r["op"], r["K"], r["N"], r["M"], r.get("sparsity"))
        cur = cases[-1] if cases else None
        peer_seen = cur is not None and any(k != "slmkern" for k in cur[1])
        if (cur is None or cur[0] != key or (r["impl"] == "slmkern" and peer_seen)
                or (r["impl"] != "slmkern" and r["impl"] in cur[1])):
            cases.append((key, {}))
            cur = cases[-1]
        if r["impl"] == "slmkern":
            cur[1].setdefault("slmkern", []).append(r)
        else:
            cur[1][r["impl"]] = r
    for (op, K, N, M, sparsity), by_impl in cases:
        for ours in by_impl.get("slmkern", []):
            cells = []
            for p in peers:
                cells.append(f"{by_impl[p]['us'] / ours['us']:>19.2f}x" if p in by_impl else f"{'-':>20}")
            others = ours.get("others_cpu")
            name = f"{op}[{ours['values']}]" if ours.get("values") else op
            if sparsity is not None:
                name += f" {100 * float(sparsity):.0f}%"
            lines.append(f"  {name:<26}{K:>6}{N:>6}{M:>5}{ours['us']:>12.1f}"
                         f"{100 * ours['floor_us'] / ours['us']:>7.1f}%" + "".join(cells)
                         + (f"  {100 * others:>9.0f}%" if others is not None else ""))
    return "\n".join(lines)


def write_json(result: dict, path: str | Path) -> None:
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")
