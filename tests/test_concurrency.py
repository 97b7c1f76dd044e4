"""The same module called from 8 Python threads at once gives the results of serial calls.

Covers every module kind (Int8Linear int8/float activations, Int4Linear float/int8,
SparseLinear 2:4 int8 and unstructured int8/float), a
mix of kinds in one burst, calls without a prepacked layout (repack + log-once path), and
the lazy first-use paths: a fresh module's first call from 8 threads at once, and, in a
fresh process, the first call of the process (CPUID dispatch, ISA cap, thread pool and its
workers, per-thread scratch) from 8 threads at once. The C++ kernels release the GIL, so
the threads really run the kernels concurrently.

Repetitions: a few in `make test` ("ci" profile), 100 under HYPOTHESIS_PROFILE=nightly (`make fuzz`).
"""
from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
from _child_env import child_env
import torch
from torch import nn

import slmkern
from conftest import FUZZ_PROFILE
from slmkern._backends import cpu as cpu_backend
from slmkern.nn import Int4Linear, Int8Linear, SparseLinear

NIGHTLY = FUZZ_PROFILE == "nightly"
REPS = 100 if NIGHTLY else 2
FRESH_PROCESS_REPS = 10 if NIGHTLY else 1
THREADS = 8
KINDS = [("Int8Linear", "int8"), ("Int8Linear", "float"), ("Int4Linear", "float"), ("Int4Linear", "int8"),
         ("SparseLinear", "2:4-int8"), ("SparseLinear", "unstructured-int8"), ("SparseLinear", "unstructured-float")]
K, N = 384, 200

pytestmark = pytest.mark.skipif(not cpu_backend.has_cpp(), reason="slmkern._C is not built")


def build(kind: str, activations: str, seed: int, prepacked: bool = True) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(K, N)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K, generator=gen) * 0.05)
        lin.bias.copy_(torch.randn(N, generator=gen))
    if kind == "SparseLinear":           # activations = "<format>-<values>"; prune first
        fmt, values = activations.split("-")
        with torch.no_grad():
            w = lin.weight
            if fmt == "2:4":
                g = w.reshape(N, K // 4, 4)
                keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.abs().topk(2, dim=-1).indices, True)
                w.mul_(keep.reshape(N, K))
            else:                        # 85% sparse, a few all-zero rows
                w.mul_(torch.rand(N, K, generator=gen) >= 0.85)
                w[::37] = 0
        mod = SparseLinear.from_linear(lin, format=fmt, values=values)
    elif kind == "Int8Linear":
        mod = Int8Linear.from_linear(lin, activations=activations)
    else:
        mod = Int4Linear.from_linear(lin, group_size=64, activations=activations, clip="minmax")
    if not prepacked:
        mod.w_packed = None      # every call repacks (and logs that once)
    return mod.eval()


def inputs(seed: int) -> list[torch.Tensor]:
    """One input per thread: M = 1 .. 64, 3-D batches, bf16/f16, a strided view."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    return [r(1, K), r(3, K), r(17, K), r(64, K), r(2, 5, K), r(7, K).bfloat16(), r(4, K).half(),
            r(9, K + 8)[:, 4:4 + K]]


def burst(calls: list, iters: int) -> list[list]:
    """calls[t]: list of (module, x) that thread t runs in turn, all threads released at once.
    Returns each thread's outputs (or the exception it raised)."""
    barrier = threading.Barrier(len(calls))
    outs: list[list] = [[] for _ in calls]

    def work(t: int) -> None:
        try:
            barrier.wait()
            with torch.no_grad():
                for j in range(iters):
                    mod, x = calls[t][j % len(calls[t])]
                    outs[t].append(mod(x))
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            outs[t].append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(len(calls))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return outs


def describe(mod: nn.Module) -> str:
    if isinstance(mod, SparseLinear):
        return f"{mod.format} {mod.value_kind}"
    return mod.activations


def assert_same_as_serial(calls: list, outs: list[list], iters: int) -> None:
    with torch.no_grad():
        for t, per_thread in enumerate(outs):
            assert len(per_thread) == iters, f"thread {t} stopped early: {per_thread[-1]!r}"
            for j, y in enumerate(per_thread):
                mod, x = calls[t][j % len(calls[t])]
                assert not isinstance(y, BaseException), f"thread {t} call {j} raised {y!r}"
                want = mod(x)
                assert torch.equal(y, want), (f"thread {t} call {j} ({type(mod).__name__} "
                                              f"{describe(mod)}, x {tuple(x.shape)} {x.dtype}) differs "
                                              f"from the serial call; max diff {(y.float() - want.float()).abs().max()}")


@pytest.mark.parametrize("kind,activations", KINDS, ids=[f"{k}-{a}" for k, a in KINDS])
def test_one_module_from_8_threads(kind, activations):
    for rep in range(REPS):
        mod = build(kind, activations, seed=rep)          # fresh: its first call is the burst
        xs = inputs(seed=1000 + rep)
        calls = [[(mod, xs[(t + j) % len(xs)]) for j in range(len(xs))] for t in range(THREADS)]
        outs = burst(calls, iters=len(xs))
        assert_same_as_serial(calls, outs, len(xs))


def test_all_module_kinds_at_once():
    for rep in range(REPS):
        mods = [build(k, a, seed=rep) for k, a in KINDS]
        xs = inputs(seed=2000 + rep)
        calls = [[(mods[(t + j) % len(mods)], xs[(t * 3 + j) % len(xs)]) for j in range(8)] for t in range(THREADS)]
        outs = burst(calls, iters=8)
        assert_same_as_serial(calls, outs, 8)


@pytest.mark.parametrize("kind,activations", KINDS, ids=[f"{k}-{a}" for k, a in KINDS])
def test_without_prepacked_layout_from_8_threads(kind, activations):
    for rep in range(max(1, REPS // 10)):
        mod = build(kind, activations, seed=3000 + rep, prepacked=False)
        xs = inputs(seed=4000 + rep)
        calls = [[(mod, xs[(t + j) % len(xs)]) for j in range(2)] for t in range(THREADS)]
        outs = burst(calls, iters=2)
        assert_same_as_serial(calls, outs, 2)


FRESH_PROCESS = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
import test_concurrency as tc
mods = [tc.build(k, a, seed=7) for k, a in tc.KINDS]
xs = tc.inputs(seed=8)
# nothing has called a kernel yet: the burst makes the first calls of the process
calls = [[(mods[t % len(mods)], xs[(t + j) % len(xs)]) for j in range(4)] for t in range(tc.THREADS)]
outs = tc.burst(calls, iters=4)
tc.assert_same_as_serial(calls, outs, 4)
from slmkern._backends import cpu
print("ok", cpu._C.active_isa())
"""


def test_first_calls_of_a_fresh_process_from_8_threads():
    """Lazy dispatch, thread pool and scratch initialisation race-free: in a new process (where
    nothing is initialised), 8 threads make the first kernel calls at once."""
    tests_dir = str(Path(__file__).resolve().parent)
    env = child_env()   # the slmkern this session imported
    for _ in range(FRESH_PROCESS_REPS):
        r = subprocess.run([sys.executable, "-c", FRESH_PROCESS, tests_dir], env=env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0 and "ok" in r.stdout, f"rc={r.returncode}\n{r.stdout}\n{r.stderr[-3000:]}"
