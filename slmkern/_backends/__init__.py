"""Kernel registration. Importing this package registers every backend:

- ``cpu``    -> C++ (slmkern._C), runtime ISA dispatch
- ``triton`` -> Triton kernels in slmkern.kernels (CUDA), if triton is importable
- any other device -> slmkern.reference (pure torch)
"""
from __future__ import annotations

import torch

from slmkern import ops, reference


def _reference_kernel(op: str, fn):
    def kernel(x, w, w_scale, bias=None, w_packed=None):
        ops.check_int8_linear(op, x, w, w_scale, bias, w_packed)
        return fn(x, w, w_scale, bias)
    return kernel


def _w8a8_reference(x, w, w_scale, bias=None, w_packed=None, activations="int8", epilogue="none"):
    ops.check_activations("w8a8_linear", activations, epilogue)
    ops.check_int8_linear("w8a8_linear", x, w, w_scale, bias, w_packed)
    return reference.w8a8_linear(x, w, w_scale, bias, activations=activations, epilogue=epilogue)


ops.LIB.impl("w8a8_linear", _w8a8_reference, "CompositeExplicitAutograd")
ops.LIB.impl("w8a16_linear", _reference_kernel("w8a16_linear", reference.w8a16_linear), "CompositeExplicitAutograd")


def _int4_reference_kernel(op: str, fn):
    def kernel(x, w, scales, zeros, group_size, bias=None, w_packed=None):
        ops.check_int4_linear(op, x, w, scales, zeros, group_size, bias, w_packed)
        ops.check_int4_zero_values(op, zeros)
        return fn(x, w, scales, zeros, group_size, bias)
    return kernel


ops.LIB.impl("w4a16_linear", _int4_reference_kernel("w4a16_linear", reference.w4a16_linear),
             "CompositeExplicitAutograd")
ops.LIB.impl("w4a8_linear", _int4_reference_kernel("w4a8_linear", reference.w4a8_linear),
             "CompositeExplicitAutograd")


# ----------------------------------------------------------------------------- 2:4 semi-structured
def _sparse24_reference(x, values, meta, scales=None, bias=None, w_packed=None):
    ops.check_sparse24_linear("sparse24_linear", x, values, meta, scales, bias, w_packed)
    ops.sparse24_format.validate(values, meta, scales)
    return reference.sparse24_linear(x, values, meta, scales, bias)


def _sparse24_w4a16_reference(x, qvalues, meta, scales, zeros, group_size, bias=None, w_packed=None):
    ops.check_sparse24_w4a16_linear("sparse24_w4a16_linear", x, qvalues, meta, scales, zeros, group_size, bias,
                                    w_packed)
    ops.sparse24_format.validate_int4(qvalues, meta, scales, zeros, group_size)
    return reference.sparse24_w4a16_linear(x, qvalues, meta, scales, zeros, group_size, bias)


ops.LIB.impl("sparse24_linear", _sparse24_reference, "CompositeExplicitAutograd")
ops.LIB.impl("sparse24_w4a16_linear", _sparse24_w4a16_reference, "CompositeExplicitAutograd")


def _sparse_linear_reference(x, values, bitmask, row_offsets, scales=None, bias=None, w_packed=None):
    ops.check_sparse_linear(x, values, bitmask, row_offsets, scales, bias, w_packed)
    ops.check_sparse_linear_data(x, values, bitmask, row_offsets, scales)
    return reference.sparse_linear(x, values, bitmask, row_offsets, scales, bias)


ops.LIB.impl("sparse_linear", _sparse_linear_reference, "CompositeExplicitAutograd")
# ----------------------------------------------------------------------------- end 2:4

from slmkern._backends import cpu  # noqa: E402,F401
from slmkern._backends import triton  # noqa: E402,F401


# CUDA kernels of the sparse ops (Triton), once their schemas exist (slmkern/ops/).
from slmkern._backends import triton_sparse  # noqa: E402

triton_sparse.register(ops.LIB)


# ----------------------------------------------------------------------------- attention
def _attention_reference(q, k, v, mask=None, scale=None, is_causal=False):
    ops.check_attention(q, k, v, mask, scale, is_causal)
    return reference.attention(q, k, v, mask, scale, is_causal)


def _attention_cuda(q, k, v, mask=None, scale=None, is_causal=False):
    """CUDA: torch's sdpa (flash / memory-efficient kernels), in the op's heads-last layout."""
    ops.check_attention(q, k, v, mask, scale, is_causal)
    Hq, Hkv = q.shape[1], k.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                           is_causal=is_causal, enable_gqa=Hq != Hkv)
    return out.transpose(1, 2).contiguous()


ops.LIB.impl("attention", _attention_reference, "CompositeExplicitAutograd")
ops.LIB.impl("attention", _attention_cuda, "CUDA")
