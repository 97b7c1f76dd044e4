"""What the benchmark runs on: CPU/GPU identity, last-level cache size, measured memory read bandwidth.

The bandwidth measured here is the denominator of every floor in a run
(floor_us = bytes moved / bandwidth), so it is measured once per run, on the
same machine state as the timings, and reported next to them.
"""
from __future__ import annotations

import functools
import os
import platform
import time
from pathlib import Path

import torch

MiB = 1 << 20
DEFAULT_L3_BYTES = 32 * MiB  # the Zen 4 dev box; used only if sysfs says nothing


def cpu_model() -> dict:
    """Model name, family/model numbers and flags of interest from /proc/cpuinfo (Linux; best effort)."""
    out = {"model_name": platform.processor() or platform.machine(), "family": None, "model": None,
           "logical_cpus": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return out
    first = text.split("\n\n", 1)[0]
    for line in first.splitlines():
        key, _, val = line.partition(":")
        key, val = key.strip(), val.strip()
        if key == "model name":
            out["model_name"] = val
        elif key == "cpu family":
            out["family"] = int(val)
        elif key == "model":
            out["model"] = int(val)
        elif key == "flags":
            flags = set(val.split())
            out["isa_flags"] = sorted(f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512vl",
                                                  "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8")
                                      if f in flags)
    return out


def _parse_size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * mult


@functools.lru_cache(maxsize=None)
def cpu_last_level_cache_bytes() -> int:
    """Size of the largest CPU cache level (L3 on the dev box) from sysfs, else 32 MiB."""
    best = 0
    for idx in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            best = max(best, _parse_size((idx / "size").read_text()))
        except (OSError, ValueError):
            continue
    return best or DEFAULT_L3_BYTES


def cache_bytes(device: str) -> int:
    """Largest cache in front of memory on `device`: CPU L3, or the GPU's L2."""
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        return int(getattr(props, "L2_cache_size", 0) or 50 * MiB)
    return cpu_last_level_cache_bytes()


def loadavg() -> float | None:
    """1-minute load average: other processes on a 2-core box distort every timing."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


class OtherLoad:
    """Share of the machine's CPU time used by *other* processes between start() and stop().

    System busy ticks (/proc/stat) minus this process's own ticks (/proc/self/stat), over
    cpu_count x elapsed ticks. On the shared 2-core box, > ~0.1 means the timings were contended.
    """

    def __init__(self) -> None:
        self._t0 = None

    @staticmethod
    def _snap():
        try:
            cpu = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
            me = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
            return sum(cpu) - cpu[3] - cpu[4], int(me[11]) + int(me[12]), time.monotonic()
        except (OSError, ValueError, IndexError):
            return None

    def start(self) -> "OtherLoad":
        self._t0 = self._snap()
        return self

    def stop(self) -> float | None:
        t1 = self._snap()
        if self._t0 is None or t1 is None:
            return None
        busy, mine, wall = (b - a for a, b in zip(self._t0, t1))
        ticks = wall * os.sysconf("SC_CLK_TCK") * (os.cpu_count() or 1)
        return max(0.0, min(1.0, (busy - mine) / ticks)) if ticks > 0 else None


def measure_bandwidth(device: str = "cpu", buffer_mb: int = 512, tries: int = 8,
                      threads: int | None = None, attempts: int = 3) -> dict:
    """Memory read bandwidth in GB/s (1e9 bytes/s), best of `tries` passes after one warm-up pass.

    CPU: slmkern._C.stream_read over a `buffer_mb` MiB buffer with torch.get_num_threads()
    threads (eight independent xor chains per thread). Without the extension, a torch sum.
    CUDA: torch.sum over a float32 buffer of the same size (a read-only reduction), CUDA events.
    On a shared CPU the measurement is repeated (up to `attempts` times) while other processes
    used > 10% of the CPUs during it; the best is kept and `others_cpu` says how contended it was.
    """
    nbytes = buffer_mb * MiB
    nthreads = None
    if device == "cuda":
        buf = torch.ones(nbytes // 4, dtype=torch.float32, device="cuda")

        def passes() -> list[float]:
            times = []
            for _ in range(tries + 1):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                buf.sum()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) * 1e-3)
            return times[1:]
        method = "torch.sum(float32) on cuda, CUDA events"
    else:
        from slmkern._backends import cpu as cpu_backend

        nthreads = threads or torch.get_num_threads()
        buf = torch.empty(nbytes, dtype=torch.uint8)
        buf.fill_(1)  # fault every page in before timing
        if cpu_backend.has_cpp():
            def one_pass():
                cpu_backend._C.stream_read(buf.data_ptr(), nbytes, nthreads)
            method = "slmkern._C.stream_read"
        else:
            wide = buf.view(torch.int64)

            def one_pass():
                wide.sum()
            method = "torch.sum(int64) (slmkern._C missing)"

        def passes() -> list[float]:
            times = []
            for _ in range(tries + 1):
                t0 = time.perf_counter()
                one_pass()
                times.append(time.perf_counter() - t0)
            return times[1:]

    best, others = float("inf"), None
    for attempt in range(max(1, attempts)):
        load = OtherLoad().start()
        t = min(passes())
        o = load.stop() if device != "cuda" else None
        if t < best:
            best, others = t, o
        if o is None or o <= 0.1:
            break
        time.sleep(1.0)
    del buf
    return {"gbs": nbytes / best / 1e9, "method": method, "buffer_mb": buffer_mb, "tries": tries,
            "threads": nthreads, "best_s": best, "attempts": attempt + 1, "others_cpu": others}


def quantized_engine() -> str:
    """The FBGEMM-backed engine of torch.ao dynamic quantization: x86 (fbgemm inside) or fbgemm."""
    engines = torch.backends.quantized.supported_engines
    for name in ("x86", "fbgemm"):
        if name in engines:
            return name
    raise RuntimeError(f"no FBGEMM quantized engine in this torch build (have {engines})")


def machine_info(device: str) -> dict:
    info = {"cpu": cpu_model(), "cpu_cache_bytes": cpu_last_level_cache_bytes(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "l2_cache_bytes": cache_bytes("cuda"),
                       "memory_bytes": int(props.total_memory), "cuda": torch.version.cuda}
    return info
