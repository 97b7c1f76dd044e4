"""`slmkern info`: what this install can do on this machine."""
from __future__ import annotations

import os
import platform

import torch

from slmkern._version import __version__

# "op[variant]": an op whose CPU kernel is chosen per value type (2:4 int8 values need VBMI).
OPS = ("w8a8_linear", "w8a16_linear", "w4a16_linear", "w4a8_linear", "sparse_linear", "sparse24_linear",
       "sparse24_linear[int8]", "sparse24_w4a16_linear", "attention")
CUDA_BY_TORCH = {"attention": "torch-sdpa"}   # CUDA kernels that are torch's own, not Triton


def _has_cuda_kernel(op: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"slmkern::{op.split('[')[0]}", "CUDA")


def info_dict() -> dict:
    from slmkern._backends import cpu, triton as triton_backend

    d = {
        "slmkern": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": None,
        "cuda_available": torch.cuda.is_available(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_extension": cpu.has_cpp(),
        "cpu_isa_detected": cpu._C.detected_isa() if cpu.has_cpp() else None,
        "cpu_isa_active": cpu._C.active_isa() if cpu.has_cpp() else None,
        "SLMKERN_CPU_ISA": os.environ.get("SLMKERN_CPU_ISA"),
        "threads": torch.get_num_threads(),
        "ops": {op: {"cpu": cpu.op_isa(op),
                     "cuda": (CUDA_BY_TORCH.get(op, "triton") if _has_cuda_kernel(op) else "reference")}
               for op in OPS},
    }
    if triton_backend.HAS_TRITON:
        import triton
        d["triton"] = triton.__version__
    return d


def info() -> str:
    d = info_dict()
    lines = [f"slmkern {d['slmkern']} (python {d['python']}, torch {d['torch']}, triton {d['triton']})",
             f"cuda: {d['cuda_available']}" + (f" ({d['cuda_device']})" if d["cuda_device"] else ""),
             f"cpu extension: {'built' if d['cpu_extension'] else 'MISSING (reference fallback)'}; "
             f"ISA detected {d['cpu_isa_detected']}, active {d['cpu_isa_active']}"
             + (f" (SLMKERN_CPU_ISA={d['SLMKERN_CPU_ISA']})" if d["SLMKERN_CPU_ISA"] else "")
             + f"; threads {d['threads']}"]
    for op, where in d["ops"].items():
        lines.append(f"  {op:<22} cpu={where['cpu']:<11} cuda={where['cuda']}")
    return "\n".join(lines)
