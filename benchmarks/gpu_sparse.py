"""GPU benchmark of the sparse Triton kernels against the peers a user would pick instead.

    python benchmarks/gpu_sparse.py --json OUT.json [--shapes 2048x8192,4096x14336] [--m 1,16,128,2048]

For each (K, N) and M (bf16 activations):
- sparse24_linear, bf16 values: slmkern vs cublas_bf16 (F.linear on the dense bf16 weight) vs
  cusparselt_24 (torch.sparse.to_sparse_semi_structured(W) through F.linear; its error is recorded
  when it cannot run);
- sparse24_linear, int8 values: slmkern vs torch_int_mm (the bare int8 GEMM on pre-quantized x, M > 16);
- sparse24_w4a16_linear (g = 128): slmkern vs tinygemm (dense int4, aten._weight_int4pack_mm);
- sparse_linear at 90% sparsity, int8 and bf16 values: slmkern vs cublas_bf16.
Timing: triton.testing.do_bench, median, with the weights rotated over enough copies that one
rotation spans > 3x the 60 MB L2. floor_us = bytes moved (weights + x + y) / 4.3e12 B/s (H200 HBM3e,
measured copy bandwidth). One JSON row per measurement:
{"op", "impl", "K", "N", "M", "dtype", "us", "floor_us", "values", "sparsity"} (+ "error" / "note").
Runs from a source checkout once `pip install -e .` has installed kernels/ as slmkern.kernels, in under
2 minutes on an H200, Triton compiles included; exits with a message (status 0) when CUDA is absent.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
L2_BYTES = 60 << 20
HBM_BYTES_PER_S = 4.3e12
SPARSITY_UNSTRUCTURED = 0.9
GROUP_SIZE = 128


def _kernels():
    """slmkern.kernels.{sparse24, sparse24_w4a16, sparse} (slmkern itself also from a plain source tree)."""
    sys.path.insert(0, str(ROOT))
    from slmkern._backends import triton as triton_backend
    if triton_backend.kernels is None:
        raise RuntimeError(f"slmkern.kernels did not import: {triton_backend._IMPORT_ERROR}")
    import importlib
    mods = [importlib.import_module(f"slmkern.kernels.{m}") for m in ("sparse24", "sparse24_w4a16", "sparse")]
    return triton_backend, mods


# ------------------------------------------------------------------ weights (built on the GPU)

def make_24(N: int, K: int, dtype: torch.dtype, dev: str):
    """Random 2:4 weight: (values (N, K/2) dtype, meta uint8 (N, ceil(K/8)), dense (N, K) bf16)."""
    pairs = torch.tensor([(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)], device=dev)
    sel = pairs[torch.randint(0, 6, (N, K // 4), device=dev)]
    if dtype == torch.int8:
        v = torch.randint(-127, 128, (N, K // 2), dtype=torch.int8, device=dev)
    else:
        v = torch.randn(N, K // 2, device=dev).to(dtype)
    nib = (sel[..., 0] | (sel[..., 1] << 2)).to(torch.uint8)
    if nib.shape[1] % 2:
        nib = torch.cat([nib, torch.zeros(N, 1, dtype=torch.uint8, device=dev)], dim=1)
    meta = (nib[:, 0::2] | (nib[:, 1::2] << 4)).contiguous()
    cols = (4 * torch.arange(K // 4, device=dev).view(1, -1, 1) + sel).reshape(N, K // 2)
    dense = torch.zeros(N, K, dtype=torch.bfloat16, device=dev)
    dense.scatter_(1, cols, v.to(torch.bfloat16))
    return v, meta, dense


def make_bitmask(N: int, K: int, dtype: torch.dtype, sparsity: float, dev: str):
    """Random unstructured weight: (values (nnz,), bitmask (N, ceil(K/8)), row_offsets (N + 1,))."""
    keep = torch.rand(N, K, device=dev) >= sparsity
    if dtype == torch.int8:
        w = torch.randint(1, 128, (N, K), dtype=torch.int8, device=dev)
    else:
        w = (torch.randn(N, K, device=dev) + 4).to(dtype)  # never 0
    values = w[keep].contiguous()
    KB = (K + 7) // 8
    bits = torch.zeros(N, KB * 8, dtype=torch.int32, device=dev)
    bits[:, :K] = keep.to(torch.int32)
    bitmask = (bits.view(N, KB, 8) << torch.arange(8, device=dev, dtype=torch.int32)).sum(-1).to(torch.uint8)
    row_offsets = torch.zeros(N + 1, dtype=torch.int64, device=dev)
    row_offsets[1:] = keep.sum(1).cumsum(0)
    return values, bitmask.contiguous(), row_offsets


def nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))


# ------------------------------------------------------------------ timing

def bench(run, make_weights, x, weight_bytes: int) -> float | str:
    """Median us of run(weights, x), weights rotated over copies spanning > 3x L2 (or the error, as text)."""
    import triton.testing

    copies = max(2, min(64, math.ceil(3 * L2_BYTES / max(weight_bytes, 1))))
    ws = [make_weights() for _ in range(copies)]
    state = {"i": 0}

    def fn():
        state["i"] += 1
        return run(ws[state["i"] % copies], x)

    try:
        fn()  # compiles / autotunes outside the timing
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e3
    except Exception as exc:  # noqa: BLE001 - one failing kernel must not end the sweep
        return f"{type(exc).__name__}: {str(exc).splitlines()[-1] if str(exc) else ''}"
    finally:
        del ws


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, required=True, help="output file (one row per measurement)")
    ap.add_argument("--shapes", default="2048x8192,4096x14336", help="KxN list")
    ap.add_argument("--m", default="1,16,128,2048", help="M list")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_sparse.py: no CUDA device (torch.cuda.is_available() is False); nothing to benchmark.")
        return 0
    t_start = time.time()
    triton_backend, (k24, k24q, ksp) = _kernels()
    dev = "cuda"
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ms = [int(v) for v in args.m.split(",")]
    rows = []
    print(f"{'op':24s} {'impl':14s} {'values':6s} {'K':>5s} {'N':>6s} {'M':>5s} {'us':>9s} {'floor':>8s}")

    def record(op, impl, K, N, M, us, moved, values, sparsity, **extra):
        if isinstance(us, str):  # bench() caught an error
            us, extra = None, {**extra, "error": us}
        floor = moved / HBM_BYTES_PER_S * 1e6
        row = {"op": op, "impl": impl, "K": K, "N": N, "M": M, "dtype": "bfloat16",
               "us": None if us is None else round(us, 3), "floor_us": round(floor, 3),
               "values": values, "sparsity": sparsity, **extra}
        rows.append(row)
        shown = "-" if us is None else f"{us:9.2f}"
        print(f"{op:24s} {impl:14s} {values:6s} {K:5d} {N:6d} {M:5d} {shown:>9s} {floor:8.2f}"
              + (f"  ({extra['error'][:80]})" if "error" in extra else ""), flush=True)

    torch.manual_seed(0)
    with triton_backend._set_wrap_triton_enabled(False):
        for K, N in shapes:
            for M in ms:
                x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
                xy = 2 * M * K + 2 * M * N
                bias = None

                # --- dense bf16 (cuBLAS): the peer of the float 2:4 and bitmask rows
                wd = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
                us = bench(lambda w, a: F.linear(a, w), lambda: wd.clone(), x, nbytes(wd))
                for op, values, sp in (("sparse24_linear", "bf16", 0.5), ("sparse24_linear", "int8", 0.5),
                                       ("sparse_linear", "bf16", SPARSITY_UNSTRUCTURED),
                                       ("sparse_linear", "int8", SPARSITY_UNSTRUCTURED)):
                    record(op, "cublas_bf16", K, N, M, us, nbytes(wd) + xy, values, sp, note="dense weight")
                del wd

                # --- 2:4, bf16 values
                v, meta, dense = make_24(N, K, torch.bfloat16, dev)
                us = bench(lambda w, a: k24.sparse24_linear(a, w[0], w[1], None, bias),
                           lambda: (v.clone(), meta.clone()), x, nbytes(v, meta))
                record("sparse24_linear", "slmkern", K, N, M, us, nbytes(v, meta) + xy, "bf16", 0.5)
                try:
                    from torch.sparse import to_sparse_semi_structured
                    ws = to_sparse_semi_structured(dense)
                    F.linear(x, ws)
                    torch.cuda.synchronize()
                    kind = type(ws).__name__
                    us = bench(lambda w, a: F.linear(a, w), lambda: to_sparse_semi_structured(dense.clone()), x,
                               nbytes(v, meta))
                    record("sparse24_linear", "cusparselt_24", K, N, M, us, nbytes(v, meta) + xy, "bf16", 0.5,
                           note=kind)
                except Exception as exc:  # noqa: BLE001 - record why the peer cannot run
                    record("sparse24_linear", "cusparselt_24", K, N, M, None, nbytes(v, meta) + xy, "bf16", 0.5,
                           error=f"{type(exc).__name__}: {exc}")
                del v, meta, dense

                # --- 2:4, int8 values (activations quantized per row inside)
                v8, meta8, _ = make_24(N, K, torch.int8, dev)
                s8 = torch.rand(N, device=dev) * 0.01
                us = bench(lambda w, a: k24.sparse24_linear(a, w[0], w[1], s8, bias),
                           lambda: (v8.clone(), meta8.clone()), x, nbytes(v8, meta8))
                record("sparse24_linear", "slmkern", K, N, M, us, nbytes(v8, meta8, s8) + xy, "int8", 0.5)
                del v8, meta8
                if M > 16:
                    w8 = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=dev)
                    xq = torch.randint(-127, 128, (M, K), dtype=torch.int8, device=dev)
                    us = bench(lambda w, a: torch._int_mm(a, w.t()), lambda: w8.clone(), xq, nbytes(w8))
                    record("sparse24_linear", "torch_int_mm", K, N, M, us, nbytes(w8) + M * K + 4 * M * N, "int8",
                           0.5, note="dense int8 GEMM on pre-quantized x, int32 out, no epilogue")
                    del w8, xq

                # --- 2:4 x int4 values, g = 128, uint8 zeros
                G = K // GROUP_SIZE
                q = torch.randint(0, 256, (N, K // 4), dtype=torch.uint8, device=dev)
                _, metaq, _ = make_24(N, K, torch.int8, dev)
                sq = torch.rand(N, G, device=dev) * 0.01
                zq = torch.randint(0, 16, (N, G), dtype=torch.uint8, device=dev)
                us = bench(lambda w, a: k24q.sparse24_w4a16_linear(a, w[0], w[1], sq, zq, GROUP_SIZE, bias),
                           lambda: (q.clone(), metaq.clone()), x, nbytes(q, metaq))
                record("sparse24_w4a16_linear", "slmkern", K, N, M, us, nbytes(q, metaq, sq, zq) + xy, "int4", 0.5,
                       group_size=GROUP_SIZE)
                del q, metaq
                try:
                    w4 = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device=dev)
                    sz = torch.stack((torch.rand(G, N, device=dev) * 0.01, torch.rand(G, N, device=dev)),
                                     dim=-1).to(torch.bfloat16).contiguous()
                    packed = torch.ops.aten._convert_weight_to_int4pack(w4, 8)
                    us = bench(lambda w, a: torch.ops.aten._weight_int4pack_mm(a, w, GROUP_SIZE, sz),
                               lambda: packed.clone(), x, nbytes(packed))
                    record("sparse24_w4a16_linear", "tinygemm", K, N, M, us, nbytes(packed, sz) + xy, "int4", 0.0,
                           group_size=GROUP_SIZE, note="dense int4")
                except Exception as exc:  # noqa: BLE001
                    record("sparse24_w4a16_linear", "tinygemm", K, N, M, None, K * N // 2 + xy, "int4", 0.0,
                           group_size=GROUP_SIZE, error=f"{type(exc).__name__}: {exc}")

                # --- unstructured 90%: int8 and bf16 values
                for dt, name in ((torch.int8, "int8"), (torch.bfloat16, "bf16")):
                    vals, bm, ro = make_bitmask(N, K, dt, SPARSITY_UNSTRUCTURED, dev)
                    ss = torch.rand(N, device=dev) * 0.01 if dt == torch.int8 else None
                    us = bench(lambda w, a: ksp.sparse_linear(a, w[0], w[1], w[2], ss, bias),
                               lambda: (vals.clone(), bm.clone(), ro.clone()), x, nbytes(vals, bm, ro))
                    record("sparse_linear", "slmkern", K, N, M, us, nbytes(vals, bm, ro, ss) + xy, name,
                           SPARSITY_UNSTRUCTURED)
                    del vals, bm, ro
                torch.cuda.empty_cache()

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=1))
    print(f"{len(rows)} rows -> {args.json} in {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
