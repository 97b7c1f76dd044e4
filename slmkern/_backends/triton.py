"""CUDA registrations: the Triton kernels in slmkern.kernels (needs triton)."""
from __future__ import annotations

try:
    import triton  # noqa: F401
except ImportError:  # CPU-only installs: CUDA tensors then use the reference
    HAS_TRITON = False
else:
    HAS_TRITON = True
