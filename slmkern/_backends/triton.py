"""CUDA registrations: validate, then call the Triton launchers in slmkern.kernels (needs triton).

Without triton (or if slmkern.kernels fails to import) CUDA tensors run the pure-torch reference,
logged once.
"""
from __future__ import annotations

import contextlib
import logging

import torch

from slmkern import ops, reference
from slmkern._logging import log_once

try:
    import triton  # noqa: F401
except ImportError:  # CPU-only installs: CUDA tensors then use the reference
    HAS_TRITON = False
else:
    HAS_TRITON = True


# setup.py installs the top-level kernels/ folder as slmkern.kernels (regular and editable installs alike);
# a source tree that is only on PYTHONPATH has no slmkern.kernels until `pip install -e .`.
kernels = None
_IMPORT_ERROR: Exception | None = None
if HAS_TRITON:
    try:
        from slmkern import kernels
    except Exception as exc:  # noqa: BLE001 - a broken triton install must not break `import slmkern`
        _IMPORT_ERROR = exc

try:  # torch >= 2.6; a plain launch where wrap_triton would go through the higher-order op
    from torch._library.triton import set_wrap_triton_enabled as _set_wrap_triton_enabled
except ImportError:
    def _set_wrap_triton_enabled(enabled: bool):
        return contextlib.nullcontext()


def has_triton_kernels() -> bool:
    return kernels is not None


def _int8_linear(op: str, x, w, w_scale, bias, w_packed, activations: str | None = None,
                 epilogue: str = "none"):
    """activations: None for w8a16_linear; "int8" / "int7" for w8a8_linear (and its epilogue)."""
    ops.check_int8_linear(op, x, w, w_scale, bias, w_packed)
    if activations is not None:
        ops.check_activations(op, activations, epilogue)
    act = {} if activations is None else {"activations": activations}
    if epilogue != "none":   # in fp32 after the GEMM, by the reference's own torch ops: the same bits
        y = _int8_linear(op, x, w, w_scale, bias, w_packed, activations) if x.dtype == torch.float32 else \
            _int8_linear(op, x.float(), w, w_scale, bias if bias is None else bias.float(), w_packed, activations)
        return reference.gelu_epilogue(y).to(x.dtype)
    if kernels is None:
        why = "triton is not installed" if not HAS_TRITON else f"slmkern.kernels failed to import ({_IMPORT_ERROR})"
        log_once(f"{op}-no-triton", f"slmkern: {op} runs the pure-torch reference on CUDA because {why}",
                 logging.WARNING)
        return getattr(reference, op)(x, w, w_scale, bias, **act)
    N, K = w.shape
    x2 = ops.as_rows(x, K)
    # w_packed is the CPU kernels' tile layout; the Triton kernels read w (N, K) directly.
    b = bias.contiguous() if bias is not None else None
    # Regular tensors in eager mode: launch the kernels directly, not through wrap_triton's
    # higher-order op (what torch.library.triton_op does for the same reason). Triton launches on
    # the current device, so make it x's.
    with _set_wrap_triton_enabled(False), _on_device(x.device):
        y = getattr(kernels, op)(x2, w, w_scale.contiguous(), b, **act)
    return y.reshape(*x.shape[:-1], N)


def _on_device(device: torch.device):
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device.index)
    return contextlib.nullcontext()


@torch.library.register_kernel("slmkern::w8a8_linear", "cuda", lib=ops.LIB)
def w8a8_linear_cuda(x, w, w_scale, bias=None, w_packed=None, activations="int8", epilogue="none"):
    return _int8_linear("w8a8_linear", x, w, w_scale, bias, w_packed, activations, epilogue)


@torch.library.register_kernel("slmkern::w8a16_linear", "cuda", lib=ops.LIB)
def w8a16_linear_cuda(x, w, w_scale, bias=None, w_packed=None):
    return _int8_linear("w8a16_linear", x, w, w_scale, bias, w_packed)


def _int4_linear(op: str, x, w, scales, zeros, group_size, bias, w_packed):
    # Shape/dtype/device facts only: the zero-point range check (uint8 zeros in 0..15) reads the
    # data, i.e. a device sync per call; the module/format builders check it once instead
    # (out-of-range zeros still compute the format's formula, never read out of bounds).
    g = ops.check_int4_linear(op, x, w, scales, zeros, group_size, bias, w_packed)
    if kernels is None:
        why = "triton is not installed" if not HAS_TRITON else f"slmkern.kernels failed to import ({_IMPORT_ERROR})"
        log_once(f"{op}-no-triton", f"slmkern: {op} runs the pure-torch reference on CUDA because {why}",
                 logging.WARNING)
        return getattr(reference, op)(x, w, scales, zeros, group_size, bias)
    N, K = w.shape[0], x.shape[-1]
    x2 = ops.as_rows(x, K)
    # w_packed is the CPU kernels' layout; the Triton kernels read the canonical w (N, K/2) directly.
    z = zeros.contiguous() if zeros is not None else None
    b = bias.contiguous() if bias is not None else None
    with _set_wrap_triton_enabled(False), _on_device(x.device):
        y = getattr(kernels, op)(x2, w, scales.contiguous(), z, g, b)
    return y.reshape(*x.shape[:-1], N)


@torch.library.register_kernel("slmkern::w4a16_linear", "cuda", lib=ops.LIB)
def w4a16_linear_cuda(x, w, scales, zeros, group_size, bias=None, w_packed=None):
    return _int4_linear("w4a16_linear", x, w, scales, zeros, group_size, bias, w_packed)


@torch.library.register_kernel("slmkern::w4a8_linear", "cuda", lib=ops.LIB)
def w4a8_linear_cuda(x, w, scales, zeros, group_size, bias=None, w_packed=None):
    return _int4_linear("w4a8_linear", x, w, scales, zeros, group_size, bias, w_packed)
