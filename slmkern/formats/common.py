"""Facts shared by every format and op, stated once (pure torch, imports nothing of slmkern).

``slmkern.ops`` (checks, fakes), ``slmkern.reference``, the backends and the format helpers all
read these; ``tests/test_op_specs.py`` asserts that every layer accepts exactly the same inputs.
"""
from __future__ import annotations

import torch

# Activations (x), float weight values and outputs of every op.
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# ----------------------------------------------------------------------------- group sizes
# A group of g consecutive k shares one scale (and zero point). The formats and every kernel
# (C++ make_int4_args, the Triton launchers, reference.py) take any g > 0 that divides K and is
# a multiple of the format's GROUP_MULTIPLE, or -1 for per-channel (g = K):
INT4_GROUP_MULTIPLE = 2             # int4: two codes per byte, a group never splits a byte
SPARSE24_INT4_GROUP_MULTIPLE = 4    # 2:4 x int4: a group holds whole 2:4 groups of 4 columns
# The group sizes slmkern's quantizer configs (Int4Config, SparseConfig) offer (besides per-channel):
# a policy for what is produced, not a limit of the kernels. Checkpoint importers take any group
# size group_size_ok accepts (the file's codes are held exactly) and say so with group_size_rule.
QUANT_GROUP_SIZES = (32, 64, 128)


def group_size_ok(K, group_size: int, multiple: int) -> bool:
    """Is group_size (an int; -1 = per-channel) a valid group size for rows of K values?"""
    g = K if group_size == -1 else group_size
    return g > 0 and g % multiple == 0 and K % g == 0


def group_size_rule(multiple: int) -> str:
    """The rule of group_size_ok in words, for error messages."""
    what = "an even number" if multiple == 2 else f"a multiple of {multiple}"
    return f"{what} dividing K (e.g. {', '.join(map(str, QUANT_GROUP_SIZES))}), or -1 / K for per-channel"


def resolve_group_size(K: int, group_size: int, multiple: int, name: str = "group_size") -> int:
    """Validate group_size for rows of K values; returns g (-1 -> K). TypeError/ValueError name `name`."""
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"{name}: expected an int, got {type(group_size).__name__}")
    if not group_size_ok(K, group_size, multiple):
        raise ValueError(f"{name}: expected {group_size_rule(multiple)}, got {group_size} for K={K}")
    return K if group_size == -1 else group_size
