"""The `slmkern bench` engine: time an slmkern op and its peers side by side, in one run.

An op plugs in with one file, ``benchmarks/bench_<op>.py``, that defines ``BENCH = BenchOp(...)``:

- ``make_source(case, gen)``: the canonical weights of one layer (a :class:`LinearSource`), on CPU;
  every impl builds its own format from it, so all impls compute the same function;
- ``impls``: :class:`Impl` objects, ours (``slmkern``) first, then the peers a user would pick
  instead. An Impl says how to build one weight copy (``prepare``), how to call it (``run``),
  how many weight bytes one call reads in its own format (``weight_bytes``) and when it cannot
  run (``skip``).

For each case (op, K, N, M, device) the engine builds, per impl, enough weight copies that one
rotation covers >= ``cache_factor`` x the last-level cache (as in a forward pass, where each
layer's weights come from DRAM), then times the impls interleaved in rounds so machine noise hits
them alike. It reports median / p10 / p90 per call and the bandwidth floor
``floor_us = (weight bytes + activation bytes in + output bytes) / measured read bandwidth``.
Activations are not rotated: in a forward pass they were just written by the previous layer.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import machine

IMPL_NAMES = ("slmkern", "torch_fp32", "torch_fbgemm_int8", "torch_int4pack_bf16", "torch_csr",
              "cublas_bf16", "torch_int_mm", "tinygemm", "cusparselt_24", "gemlite",
              # ---- unstructured: our dense w8a8_linear as a peer of sparse_linear with int8 values
              "slmkern_w8a8")
DEFAULT_SHAPES = ((384, 1536), (576, 1536), (2048, 8192))  # MiniLM, SmolLM2, 1B-class
DEFAULT_MS = (1, 16, 128)
DEFAULT_DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}
CONTENDED = 0.1  # others_cpu above this: other processes shared the CPUs during the timed rounds
ROW_KEYS = ("op", "impl", "K", "N", "M", "dtype", "us", "floor_us")  # DESIGN.md; extra fields follow


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'384x1536,576x1536' -> [(384, 1536), (576, 1536)]; ValueError naming a malformed item."""
    out = []
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        parts = item.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"malformed shape {item!r}: expected KxN with positive integers, e.g. 384x1536")
        out.append((int(parts[0]), int(parts[1])))
    if not out:
        raise ValueError(f"no shape in {text!r}: expected KxN[,KxN...], e.g. 384x1536")
    return out


def parse_ms(text: str) -> list[int]:
    """'1,16,128' -> [1, 16, 128]; ValueError unless every item is an integer >= 1."""
    out = []
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        if not item.isdigit() or int(item) < 1:
            raise ValueError(f"malformed M {item!r}: expected positive integers, e.g. 1,16,128")
        out.append(int(item))
    if not out:
        raise ValueError(f"no M in {text!r}: expected e.g. 1,16,128")
    return out


@dataclass(frozen=True)
class Case:
    op: str
    K: int
    N: int
    M: int
    device: str = "cpu"
    dtype: torch.dtype = torch.float32  # activation dtype slmkern is called with

    @property
    def label(self) -> str:
        return f"{self.op} K={self.K} N={self.N} M={self.M}"


@dataclass
class LinearSource:
    """One layer's weights, canonical and on CPU. ``weight`` is the float weight every impl computes
    with (for quantized ops: the dequantized grid values, so peers run the same function);
    ``extra`` holds the op's own canonical format (e.g. int8 ``q`` and ``scale``)."""
    weight: torch.Tensor                 # (N, K) float32
    bias: torch.Tensor | None            # (N,) float32
    extra: dict = field(default_factory=dict)


def _default_make_x(impl: "Impl", case: Case, x: torch.Tensor) -> torch.Tensor:
    return x.to(device=case.device, dtype=impl.x_dtype or case.dtype)


@dataclass(frozen=True)
class Impl:
    name: str                                              # one of IMPL_NAMES
    prepare: Callable[[Case, LinearSource], Any]           # one weight copy (fresh memory), on case.device
    run: Callable[[Any, torch.Tensor], torch.Tensor]       # (copy, x) -> y
    weight_bytes: Callable[[Case], int]                    # bytes one call reads for its weights (own format)
    devices: tuple[str, ...] = ("cpu",)
    x_dtype: torch.dtype | None = None                     # None: the case's dtype (slmkern); peers pin theirs
    make_x: Callable[["Impl", Case, torch.Tensor], torch.Tensor] = _default_make_x
    skip: Callable[[Case], str | None] = lambda case: None  # a reason string when it cannot run this case
    float_output: bool = True                              # False: output is not y (e.g. int32 accumulators)
    # --- 2:4 sparse: op-specific row fields of this impl, e.g. (("values", "bfloat16"),) for one of several
    # slmkern variants timed in one case (rows then differ by that field, not by impl name)
    fields: tuple = ()
    # --- end 2:4 sparse

    def __post_init__(self) -> None:
        if self.name not in IMPL_NAMES:
            raise ValueError(f"impl name {self.name!r} is not one of the fixed names {IMPL_NAMES}")


@dataclass(frozen=True)
class BenchOp:
    op: str                                                # slmkern op name, e.g. "w8a8_linear"
    make_source: Callable[[Case, torch.Generator], LinearSource]
    impls: tuple[Impl, ...]                                # slmkern first
    devices: tuple[str, ...] = ("cpu", "cuda")
    extra_fields: Callable[[Case], dict] = lambda case: {}  # op-specific row fields (group_size, ...)
    description: str = ""


@dataclass(frozen=True)
class BenchConfig:
    reps: int | None = None          # timed calls per impl and case; None: adaptive within the budget
    budget_s: float = 0.2            # adaptive: aim for this much timed work per impl and case
    min_reps: int = 5
    max_reps: int = 200
    warmup: int = 3
    rounds: int = 5                  # impls are interleaved in this many rounds
    cache_factor: float = 3.0        # one rotation of weight copies covers >= this x the LLC
    max_weight_bytes: int = 512 << 20  # per impl: cap on the memory spent on copies
    max_copies: int = 512
    seed: int = 0
    quick: bool = False
    retry_contended: int = 1         # rerun a case whose timed rounds shared the CPUs (others_cpu > 0.1)

    @classmethod
    def quick_config(cls, reps: int | None = None) -> "BenchConfig":
        """A smoke run: a few reps, small rotation. Numbers are indicative only."""
        return cls(reps=reps, budget_s=0.02, min_reps=3, max_reps=10, warmup=1, rounds=1,
                   cache_factor=1.0, max_weight_bytes=64 << 20, max_copies=16, quick=True, retry_contended=0)


# ---------------------------------------------------------------- arithmetic (tested)

def copies_for(weight_bytes: int, cache_bytes: int, factor: float = 3.0,
               cap_bytes: int = 512 << 20, max_copies: int = 512) -> int:
    """Weight copies so one rotation spans >= factor x cache_bytes, within cap_bytes and max_copies.

    Always >= 2 (a copy never runs twice in a row), unless a single copy already exceeds the cap.
    """
    if weight_bytes <= 0:
        raise ValueError(f"weight_bytes must be > 0, got {weight_bytes}")
    want = max(2, math.ceil(factor * cache_bytes / weight_bytes))
    fit = max(1, cap_bytes // weight_bytes)
    return max(1, min(want, fit, max_copies))


def floor_us(nbytes: int, bandwidth_gbs: float) -> float:
    """Time to move `nbytes` at `bandwidth_gbs` (1e9 bytes/s), in microseconds."""
    if bandwidth_gbs <= 0:
        raise ValueError(f"bandwidth must be > 0 GB/s, got {bandwidth_gbs}")
    return nbytes / (bandwidth_gbs * 1e3)


def percentile(sorted_vals: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of an ascending list."""
    if not sorted_vals:
        raise ValueError("percentile of an empty list")
    pos = (len(sorted_vals) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def summarize(times_us: list[float]) -> dict:
    s = sorted(times_us)
    return {"us": statistics.median(s), "p10_us": percentile(s, 10), "p90_us": percentile(s, 90)}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    y = y.detach().float().cpu().reshape(ref.shape)
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


# ---------------------------------------------------------------- timing

def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class _Timer:
    """Per-call timing with weight rotation. CPU: perf_counter_ns around each call.

    CUDA: an event pair around each call, all queued behind a short torch.cuda._sleep so the CPU
    runs ahead and the events time the kernels back to back (GPU time, launch overhead hidden).
    """

    def __init__(self, device: str):
        self.device = device

    def time(self, fn: Callable, copies: list, x: torch.Tensor, start: int, n: int) -> list[float]:
        k = len(copies)
        if self.device != "cuda":
            out = []
            clock = time.perf_counter_ns
            for i in range(start, start + n):
                w = copies[i % k]
                t0 = clock()
                fn(w, x)
                out.append((clock() - t0) * 1e-3)
            return out
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(n)]
        torch.cuda.synchronize()
        try:
            # ~1 ms per call at ~2 GHz: the queue stays full even when the host side of a call
            # (dispatch, checks, Triton's launcher) takes hundreds of microseconds, so the events
            # time the kernels alone. The host side is recorded separately (host_us).
            torch.cuda._sleep(int(2e6 * n))
        except (AttributeError, RuntimeError):
            pass
        clock = time.perf_counter_ns
        host = []
        for j, i in enumerate(range(start, start + n)):
            a, b = events[j]
            t0 = clock()
            a.record()
            fn(copies[i % k], x)
            b.record()
            host.append((clock() - t0) * 1e-3)
        self.last_host_us = host
        torch.cuda.synchronize()
        return [a.elapsed_time(b) * 1e3 for a, b in events]


# ---------------------------------------------------------------- one case

@dataclass
class Prepared:
    impl: Impl
    copies: list
    x: torch.Tensor
    bytes: int
    weight_bytes: int
    out_dtype: torch.dtype
    rel_err: float | None
    times_us: list = field(default_factory=list)
    host_us: list = field(default_factory=list)  # CUDA: host time per call (enqueue), not in "us"
    next_index: int = 0
    reps: int = 0


def prepare_impl(impl: Impl, case: Case, source: LinearSource, x_float: torch.Tensor,
                 ref: torch.Tensor | None, cache: int, cfg: BenchConfig) -> Prepared:
    """Build the rotation of weight copies and the activations; one checked call."""
    wb = int(impl.weight_bytes(case))
    n = copies_for(wb, cache, cfg.cache_factor, cfg.max_weight_bytes, cfg.max_copies)
    copies = [impl.prepare(case, source) for _ in range(n)]
    x = impl.make_x(impl, case, x_float)
    with torch.inference_mode():
        y = impl.run(copies[0], x)
    _sync(case.device)
    rel = relative_error(y, ref) if (ref is not None and impl.float_output) else None
    nbytes = wb + x.numel() * x.element_size() + y.numel() * y.element_size()
    return Prepared(impl, copies, x, nbytes, wb, y.dtype, rel)


def _estimate_reps(p: Prepared, timer: _Timer, cfg: BenchConfig) -> int:
    """Warm up (up to cfg.warmup calls, fewer for a call slower than the budget) and pick the reps."""
    warm: list[float] = []
    with torch.inference_mode():
        while len(warm) < max(1, cfg.warmup) and sum(warm) * 1e-6 < cfg.budget_s:
            warm += timer.time(p.impl.run, p.copies, p.x, p.next_index, 1)
            p.next_index += 1
    if cfg.reps is not None:
        return max(1, cfg.reps)
    est = max(min(warm), 0.1) * 1e-6
    return int(min(cfg.max_reps, max(cfg.min_reps, cfg.budget_s / est)))


def run_case(bench: BenchOp, case: Case, cfg: BenchConfig, bandwidth_gbs: float,
             log: Callable[[str], None] = lambda s: None) -> tuple[list[dict], list[dict]]:
    """Time every impl of `bench` on `case`, interleaved. Returns (rows, skipped)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    source = bench.make_source(case, gen)
    x_float = torch.randn(case.M, case.K, generator=gen)
    ref = torch.nn.functional.linear(x_float, source.weight, source.bias)
    cache = machine.cache_bytes(case.device)
    timer = _Timer(case.device)
    prepared: list[Prepared] = []
    skipped: list[dict] = []

    def skip(impl: Impl, reason: str) -> None:
        skipped.append({"op": case.op, "impl": impl.name, "K": case.K, "N": case.N, "M": case.M,
                        "device": case.device, "reason": reason})
        log(f"  {impl.name}: skipped ({reason})")

    for impl in bench.impls:
        if case.device not in impl.devices:
            continue
        reason = impl.skip(case)
        if reason:
            skip(impl, reason)
            continue
        try:
            prepared.append(prepare_impl(impl, case, source, x_float, ref, cache, cfg))
        except Exception as exc:  # a peer missing from this torch build must not end the run
            skip(impl, f"failed: {type(exc).__name__}: {exc}")
    del source

    for p in prepared:
        p.reps = _estimate_reps(p, timer, cfg)
    rounds = max(1, cfg.rounds)
    load = machine.OtherLoad().start()
    with torch.inference_mode():
        for r in range(rounds):
            for p in prepared:
                n = p.reps // rounds + (1 if r < p.reps % rounds else 0)
                if n:
                    p.times_us += timer.time(p.impl.run, p.copies, p.x, p.next_index, n)
                    p.host_us += getattr(timer, "last_host_us", [])
                    p.next_index += n

    others = load.stop()
    rows = []
    for p in prepared:
        stats = summarize(p.times_us)
        row = {"op": case.op, "impl": p.impl.name, "K": case.K, "N": case.N, "M": case.M,
               "dtype": dtype_name(p.x.dtype), "us": stats["us"],
               "floor_us": floor_us(p.bytes, bandwidth_gbs),
               "p10_us": stats["p10_us"], "p90_us": stats["p90_us"], "bytes": p.bytes,
               "weight_bytes": p.weight_bytes, "bandwidth_gbs": bandwidth_gbs, "device": case.device,
               "reps": len(p.times_us), "copies": len(p.copies), "rel_err": p.rel_err,
               "others_cpu": None if others is None else round(others, 3),
               "host_us": statistics.median(p.host_us) if p.host_us else None}
        row.update(bench.extra_fields(case))
        row.update(dict(p.impl.fields))  # 2:4 sparse: per-impl fields (e.g. "values")
        rows.append(row)
    return rows, skipped


# ---------------------------------------------------------------- a whole run

def cases_for(ops: list[BenchOp], shapes, ms, device: str, dtype: torch.dtype | None) -> list[tuple[BenchOp, Case]]:
    out = []
    for bench in ops:
        if device not in bench.devices:
            continue
        for K, N in shapes:
            for M in ms:
                out.append((bench, Case(bench.op, int(K), int(N), int(M), device, dtype or DEFAULT_DTYPE[device])))
    return out


def op_paths(op_names: list[str], device: str) -> dict:
    """Which kernel path slmkern takes for each op on this device (from slmkern.info)."""
    try:
        from slmkern._info import info_dict
        d = info_dict()["ops"]
    except Exception:  # an op not known to info yet
        d = {}
    return {op: (d.get(op, {}).get(device, "unknown")) for op in op_names}


def _quantized_engine() -> str:
    try:
        return machine.quantized_engine()
    except RuntimeError as exc:
        return f"none ({exc})"


def run(ops: list[BenchOp], shapes=DEFAULT_SHAPES, ms=DEFAULT_MS, device: str = "cpu",
        dtype: torch.dtype | None = None, cfg: BenchConfig = BenchConfig(),
        on_start: Callable[[dict], None] | None = None,
        on_case: Callable[[Case, list, list], None] | None = None) -> dict:
    """Run every (op, shape, M) case; returns {"meta": {...}, "rows": [...]} (layout: report.py).

    on_start(meta) is called once the bandwidth is measured; on_case(case, rows, skipped) after each case.
    """
    import slmkern

    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is available")
    load0 = machine.loadavg()
    bw = machine.measure_bandwidth(device, tries=2 if cfg.quick else 8, attempts=1 if cfg.quick else 3)
    meta = {
        "schema": "slmkern-bench/1",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "slmkern": slmkern.__version__,
        "device": device,
        "machine": machine.machine_info(device),
        "bandwidth": bw,
        "bandwidth_gbs": bw["gbs"],
        "cache_bytes": machine.cache_bytes(device),
        "rotation_target_bytes": int(cfg.cache_factor * machine.cache_bytes(device)),
        "quantized_engine": _quantized_engine(),
        "op_paths": op_paths([b.op for b in ops], device),
        "config": {k: v for k, v in cfg.__dict__.items()},
        "timing": ("CUDA events per call, queued behind torch.cuda._sleep (GPU time)" if device == "cuda"
                   else "time.perf_counter_ns per call, torch.inference_mode"),
        "loadavg_start": load0,
        "skipped": [],
    }
    if on_start is not None:
        on_start(meta)
    rows: list[dict] = []
    for bench, case in cases_for(ops, shapes, ms, device, dtype):
        case_rows, skipped = run_case(bench, case, cfg, bw["gbs"])
        for _ in range(cfg.retry_contended):
            if not case_rows or (case_rows[0].get("others_cpu") or 0.0) <= CONTENDED:
                break
            time.sleep(1.0)
            again, skipped2 = run_case(bench, case, cfg, bw["gbs"])
            if again and (again[0].get("others_cpu") or 0.0) < (case_rows[0].get("others_cpu") or 0.0):
                case_rows, skipped = again, skipped2
        rows += case_rows
        meta["skipped"] += skipped
        if on_case is not None:
            on_case(case, case_rows, skipped)
    meta["loadavg_end"] = machine.loadavg()
    meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return {"meta": meta, "rows": rows}
