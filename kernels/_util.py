"""Launch helpers shared by the Triton kernel files: M buckets for autotuning, wrap_triton, interpreter flag."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# TRITON_INTERPRET=1 runs kernels on CPU tensors with numpy (CI has no GPU). Autotuning there
# would "benchmark" on the CPU, so each kernel then gets a single small config instead.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Autotune keys use a bucket of M, not M itself: one tuned config serves a band of batch sizes
# (decode M=1, small batches, prefill), so a new M does not re-run the tuner.
M_BUCKETS = (1, 16, 64, 256)
M_BUCKET_LARGE = 1024


def m_bucket(M: int) -> int:
    """1 -> 1, 2-16 -> 16, 17-64 -> 64, 65-256 -> 256, >256 -> 1024."""
    for bound in M_BUCKETS:
        if M <= bound:
            return bound
    return M_BUCKET_LARGE


def launch(kernel):
    """`kernel` wrapped with torch.library.wrap_triton, so make_fx / triton_op tracing records the launch.

    Outside tracing the registered CUDA kernels turn the wrapper off (see _backends/triton.py),
    like torch.library.triton_op does, because dispatching through the higher-order op costs
    far more than these kernels run.
    """
    wrap = getattr(torch.library, "wrap_triton", None)
    return wrap(kernel) if wrap is not None else kernel


def tiled_configs(tiles_by_bucket: dict, interpret_tile: tuple, group_m: int = 8) -> list:
    """triton.Config per distinct (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) tile.

    Under the interpreter only `interpret_tile` (one small config: nothing to tune on a CPU).
    """
    tiles = [interpret_tile] if INTERPRET else sorted({t for ts in tiles_by_bucket.values() for t in ts})
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
                          num_warps=w, num_stages=s) for bm, bn, bk, w, s in tiles]


def prune_to_bucket(tiles_by_bucket: dict):
    """early_config_prune: time only the tiles listed for the call's M_BUCKET."""

    def prune(configs, named_args, **kwargs):
        wanted = set(tiles_by_bucket.get(named_args["M_BUCKET"], ()))
        kept = [c for c in configs
                if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages) in wanted]
        return kept or list(configs)

    return prune


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program_id(0): GROUP_M row-tiles sweep the N tiles together, so weight
    tiles are reused from L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_rows
    pid_n = (pid % group) // group_rows
    return pid_m, pid_n


@triton.jit
def cast_out(y, OUT_DTYPE: tl.constexpr):
    """fp32 -> OUT_DTYPE, round to nearest even.

    bf16 goes through explicit bit arithmetic: the interpreter's fp32 -> bf16 cast truncates
    (triton 3.9), and this way CPU tests and the GPU run the same rounding. NaN stays NaN.
    """
    if OUT_DTYPE == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(y != y, 0x7FC0, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return y.to(OUT_DTYPE)


def compile_ptx(kernel, signature: dict, constexprs: dict, arch: int = 90, num_warps: int = 4,
                num_stages: int = 3) -> str:
    """PTX of `kernel` (a @triton.jit function, or an autotune/heuristics wrapper of one) for sm_<arch>.

    Needs no GPU, only the ptxas bundled with triton's NVIDIA backend: the tests use it to check
    that every kernel compiles for Hopper and to inspect the instructions (int8 wgmma, IEEE
    division, no FMA contraction in the w8a8 epilogue). Not usable under TRITON_INTERPRET=1.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = fn.fn
    sig = {**signature, **{name: "constexpr" for name in constexprs}}
    src = ASTSource(fn, sig, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    return compiled.asm["ptx"]
