"""Fuzz specs: for every public slmkern op and module, a hypothesis strategy of valid inputs,
the slmkern.reference function that defines the answer, and the comparison that decides.

tests/test_fuzz.py runs every spec in OP_SPECS and MODULE_SPECS; tests/test_export.py
reuses the same cases for opcheck. To cover a new op (e.g. a sparse one), write a
``cases`` strategy that draws shapes/dtypes/layouts plus a seed and builds the tensors
from that seed, and append ``Spec(name, cases, run, expected, check)`` to the table.
``test_every_op_has_a_spec`` fails until every op in the ``slmkern`` namespace has one.

Tensors come from a ``torch.Generator`` seeded by a drawn integer: hypothesis shrinks
shapes and the seed, and a failure prints the shapes, dtypes and layout (``Case.meta``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from hypothesis import strategies as st

import int4_spec
from slmkern import reference
from slmkern.formats import int4 as _int4_format
from slmkern.formats import int4_cpu
from slmkern.formats import int8 as int8_format
from slmkern.nn import Int4Linear, Int8Linear

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MANTISSA_BITS = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}
PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 61, 67, 97, 127, 131, 257, 383)
LAYOUTS = ("contig", "rowstride", "colstride", "transposed", "expanded", "batch_perm")
BIASES = ("none", "fp32", "xdtype")


class Case:
    """One drawn input. ``args`` are the op's positional arguments (or (x,) for a module)."""

    def __init__(self, args: tuple, meta: dict, module: torch.nn.Module | None = None) -> None:
        self.args, self.meta, self.module = args, meta, module

    def __repr__(self) -> str:  # what hypothesis prints for a falsifying example
        return f"Case({', '.join(f'{k}={v}' for k, v in self.meta.items())})"


@dataclass(frozen=True)
class Spec:
    name: str
    cases: Callable[[], st.SearchStrategy]        # strategy of Case
    run: Callable[[Case], torch.Tensor]           # the kernel under test
    expected: Callable[[Case], torch.Tensor]      # slmkern.reference
    check: Callable[[torch.Tensor, torch.Tensor, Case], None]   # raises AssertionError on mismatch
    exact: bool = False                           # bit-exact spec (then a 1-ulp change must fail)
    tags: tuple[str, ...] = field(default=())


# ----------------------------------------------------------------------------- shared draws
def sizes(lo: int, hi: int) -> st.SearchStrategy[int]:
    """Sizes in [lo, hi], biased toward primes, 1 and powers of two +- 1."""
    special = sorted({v for v in PRIMES + (1, 15, 16, 17, 63, 64, 65, 128, 129) if lo <= v <= hi})
    return st.one_of(st.sampled_from(special), st.integers(lo, hi))


def lead_dims() -> st.SearchStrategy[tuple]:
    """Leading (batch) dims of x: M alone (0, 1, primes, ...) or a 2-/3-D batch."""
    m = st.one_of(st.sampled_from((0, 1, 2, 3, 5, 7, 13, 17, 31, 65)), st.integers(0, 70))
    return st.one_of(m.map(lambda v: (v,)),
                     st.tuples(st.integers(0, 4), st.integers(0, 9)),
                     st.tuples(st.integers(1, 2), st.integers(0, 3), st.integers(0, 5)))


def make_x(lead: tuple, K: int, dtype: torch.dtype, layout: str, gen: torch.Generator,
           special: str = "none") -> torch.Tensor:
    """Rows of different magnitudes with outliers, viewed in the given memory layout."""
    M = math.prod(lead)
    row_scale = 0.5 if dtype == torch.float16 else 1.0   # keep f16 outputs far from 65504
    x = torch.randn(M, K, generator=gen) * torch.exp(row_scale * torch.randn(M, 1, generator=gen))
    if M * K:
        idx = torch.randint(0, M * K, (max(1, M * K // 97),), generator=gen)
        x.view(-1)[idx] *= 20
    if M and special != "none":
        r = int(torch.randint(0, M, (1,), generator=gen))
        if special == "zero_row":
            x[r] = 0
        elif special == "tiny_row":
            x[r] = torch.sign(torch.randn(K, generator=gen)) * 2.0 ** -110
        elif special == "nan":
            x[r, int(torch.randint(0, K, (1,), generator=gen))] = float("nan")
        elif special == "inf":
            x[r, int(torch.randint(0, K, (1,), generator=gen))] = float("-inf")
    x = x.to(dtype).reshape(*lead, K)
    if layout == "rowstride":                       # rows K + pad apart; the gap holds NaN
        big = torch.full((*lead, K + 5), float("nan"), dtype=dtype)
        big[..., 2:2 + K] = x
        return big[..., 2:2 + K]
    if layout == "colstride":                       # last dim not contiguous
        big = torch.full((*lead, 2 * K), float("nan"), dtype=dtype)
        big[..., ::2] = x
        return big[..., ::2]
    if layout == "transposed":                      # column-major (K, M).t()
        return x.reshape(M, K).t().contiguous().t().reshape(*lead, K)
    if layout == "expanded" and M > 1:              # every row is one row (stride 0)
        return x.reshape(M, K)[:1].expand(*lead, K)
    if layout == "batch_perm" and len(lead) >= 2:   # leading dims permuted
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    return x


def make_bias(kind: str, N: int, dtype: torch.dtype, gen: torch.Generator):
    if kind == "none":
        return None
    b = torch.randn(N, generator=gen)
    return b if kind == "fp32" else b.to(dtype)


def _ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` values at |v| (subnormal spacing near zero)."""
    fi = torch.finfo(dtype)
    _, e = torch.frexp(v.abs())
    sp = torch.ldexp(torch.ones_like(v), e - 1 - MANTISSA_BITS[dtype])
    return sp.clamp_min(fi.smallest_normal * fi.eps)


def assert_same_bits(y: torch.Tensor, ref: torch.Tensor, case: Case) -> None:
    """Bit-exact (NaN positions must agree; NaN payloads may differ from torch's)."""
    assert y.dtype == ref.dtype and y.shape == ref.shape, (y.dtype, y.shape, ref.dtype, ref.shape, case)
    nan_y, nan_r = torch.isnan(y), torch.isnan(ref)
    assert torch.equal(nan_y, nan_r), f"NaN positions differ: {case}"
    same = (y == ref) | nan_r
    if not bool(same.all()):
        i = int((~same).flatten().nonzero()[0])
        raise AssertionError(f"{int((~same).sum())} of {y.numel()} outputs differ; first: kernel "
                             f"{float(y.flatten()[i])!r} vs reference {float(ref.flatten()[i])!r}; {case}")


def assert_within(y: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, case: Case) -> None:
    """|y - ref| <= bound + 2 ulp(ref) of the output dtype; non-finite outputs must match exactly."""
    assert y.dtype == ref.dtype and y.shape == ref.shape, (y.dtype, y.shape, ref.dtype, ref.shape, case)
    yd, rd = y.double(), ref.double()
    fin = torch.isfinite(rd)
    assert torch.equal(torch.isfinite(yd), fin), f"finite/non-finite outputs differ: {case}"
    assert torch.equal(torch.isnan(yd), torch.isnan(rd)), f"NaN positions differ: {case}"
    assert torch.equal(yd[~fin & ~torch.isnan(rd)], rd[~fin & ~torch.isnan(rd)]), f"infinities differ: {case}"
    err = (yd - rd).abs()[fin]
    tol = (bound.reshape(rd.shape)[fin] + 2 * _ulp(rd[fin], y.dtype) + 1e-30)
    bad = ~(err <= tol)
    if bool(bad.any()):
        i = int(err.argmax())
        raise AssertionError(f"{int(bad.sum())} of {err.numel()} outputs off; worst err {float(err[i]):.3g} "
                             f"at tol {float(tol[i]):.3g}; {case}")


# ----------------------------------------------------------------------------- int8 weights
@st.composite
def int8_cases(draw, allow_special: bool) -> Case:
    K = draw(st.one_of(sizes(1, 300), st.sampled_from((384, 576, 1024, 2053))))
    N = draw(st.one_of(sizes(1, 200), st.sampled_from((256, 333))))
    lead = draw(lead_dims())
    if K * N * max(1, math.prod(lead)) > 3_000_000:   # keep one case cheap
        lead = (draw(st.integers(0, 3)),)
    dtype = draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from(LAYOUTS))
    bias = draw(st.sampled_from(BIASES))
    packed = draw(st.booleans())
    special = draw(st.sampled_from(("none", "none", "zero_row", "tiny_row", "nan", "inf"))
                   if allow_special else st.just("none"))
    wkind = draw(st.sampled_from(("random", "random", "extreme")))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    gen = torch.Generator().manual_seed(seed)
    x = make_x(lead, K, dtype, layout, gen, special)
    if wkind == "extreme":   # +-127 only: the largest int32 sums
        w = (torch.randint(0, 2, (N, K), generator=gen, dtype=torch.int8) * 254 - 127).to(torch.int8)
    else:
        w = torch.randint(-127, 128, (N, K), generator=gen, dtype=torch.int8)
    s = torch.rand(N, generator=gen) * 0.02 + 1e-3
    b = make_bias(bias, N, dtype, gen)
    wp = int8_format.prepack_cpu(w) if packed else None
    meta = dict(x=tuple(x.shape), x_stride=x.stride(), K=K, N=N, dtype=str(dtype), layout=layout, bias=bias,
                packed=packed, special=special, w=wkind, seed=seed)
    return Case((x, w, s, b, wp), meta)


def _op(name: str) -> Callable[[Case], torch.Tensor]:
    return lambda case: getattr(torch.ops.slmkern, name)(*case.args)


def _int8_ref(name: str):
    return lambda case: getattr(reference, name)(*case.args[:4])


def _w8a16_bound(x, w, s, b):
    K = x.shape[-1]
    mag = (x.reshape(-1, K).double().abs() @ w.double().abs().T) * s.double()
    if b is not None:
        mag = mag + b.double().abs()
    return 2 * 5e-7 * math.sqrt(K) * mag   # kernel and reference: each ~8 fp32 roundoffs per sqrt(K)


def check_w8a16(y, ref, case):
    x, w, s, b = case.args[:4]
    assert_within(y, ref, _w8a16_bound(x, w, s, b), case)


# ----------------------------------------------------------------------------- int4 weights
@st.composite
def int4_shape(draw, module: bool = False) -> tuple[int, int]:
    """(K, group_size): g even and dividing K, or -1 (per-channel); modules take 32/64/128/-1 only."""
    if draw(st.integers(0, 4)) == 0:
        K = 2 * draw(st.one_of(sizes(1, 150), st.just(512)))
        return K, -1
    g = draw(st.sampled_from((32, 64, 128)) if module else
             st.one_of(st.sampled_from((2, 10, 32, 64, 128)), st.integers(1, 70).map(lambda v: 2 * v)))
    G = draw(st.integers(1, max(1, min(6, 768 // g))))
    return g * G, g


@st.composite
def int4_cases(draw) -> Case:
    K, g = draw(int4_shape())
    N = draw(sizes(1, 160))
    lead = draw(lead_dims())
    dtype = draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from(LAYOUTS))
    bias = draw(st.sampled_from(BIASES))
    zk = draw(st.sampled_from(("sym", "u8", "f32")))
    packed = draw(st.booleans())
    special = draw(st.sampled_from(("none", "none", "none", "zero_row")))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    gen = torch.Generator().manual_seed(seed)
    G = K // (K if g == -1 else g)
    x = make_x(lead, K, dtype, layout, gen, special)
    w = torch.randint(0, 256, (N, K // 2), generator=gen, dtype=torch.uint8)
    s = torch.rand(N, G, generator=gen) * 0.1 + 0.01
    z = {"sym": None,
         "u8": torch.randint(0, 16, (N, G), generator=gen, dtype=torch.uint8),
         "f32": torch.rand(N, G, generator=gen) * 15}[zk]
    b = make_bias(bias, N, dtype, gen)
    wp = int4_cpu.prepack_cpu(w, s, z, g) if packed else None
    meta = dict(x=tuple(x.shape), x_stride=x.stride(), K=K, N=N, g=g, zeros=zk, dtype=str(dtype), layout=layout,
                bias=bias, packed=packed, special=special, seed=seed)
    return Case((x, w, s, z, g, b, wp), meta)


def _int4_ref(name: str):
    """slmkern.reference where it defines the group size; the ops also take any even g dividing K,
    which reference.py's format check rejects: those cases use the test-side restatement
    (tests/int4_spec.py, the same formula) instead."""
    def expected(case: Case) -> torch.Tensor:
        K, g = case.args[0].shape[-1], case.args[4]
        if g in _int4_format.SUPPORTED_GROUP_SIZES or g in (-1, K):
            return getattr(reference, name)(*case.args[:6])
        return getattr(int4_spec, name)(*case.args[:6])
    return expected


def _w4a16_bound(x, w, s, z, g, b):
    """Twice the kernel-vs-float64 bound of tests/test_w4a16.py (1e-5 * sum |x||W|), plus the
    SIMD engine's own documented bound (csrc/x86/w4_engine.h): x is held as a 24-bit fixed
    point of the row's amax, so an element far below amax is off by up to amax * 2^-23 and
    the error is <~ 2^-23 * amax * sum_k |W[n, k]| -- larger than 1e-5 * sum |x||W| when the
    output is dominated by a tiny x element (found by this fuzzer: K=2, x = [-0.44, 0.0012],
    W row = [0, -0.044])."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K).double()
    Wabs = int4_spec.dequantize(w, s, z, g, torch.float64).abs()
    mag = x2.abs() @ Wabs.T
    if b is not None:
        mag = mag + b.double().abs()
    fixed_point = 2.0 ** -22 * x2.abs().amax(-1, keepdim=True) * Wabs.sum(-1) if x2.shape[0] else 0
    return 2e-5 * mag + fixed_point


def _w4a8_bound(x, w, s, z, g, b):
    sx, acc, asum, sd, sz = int4_spec._w4a8_terms(x, w, s, z, g)
    mag = sx.double().abs().unsqueeze(1) * ((sd * acc).abs() + (sz * asum).abs()).sum(-1)
    mag = torch.nan_to_num(mag, nan=0.0)
    if b is not None:
        mag = mag + b.double().abs()
    return 8e-6 * mag      # twice the kernel-vs-float64 bound of tests/test_w4a8.py


def check_w4a16(y, ref, case):
    assert_within(y, ref, _w4a16_bound(*case.args[:6]), case)


def check_w4a8(y, ref, case):
    assert_within(y, ref, _w4a8_bound(*case.args[:6]), case)


# ----------------------------------------------------------------------------- modules
@st.composite
def int8_module_cases(draw, activations: str) -> Case:
    K, N = draw(sizes(1, 300)), draw(sizes(1, 200))
    lead = draw(lead_dims())
    dtype = draw(st.sampled_from(DTYPES))
    convert = draw(st.booleans())          # build in fp32, then .to(dtype): scales must stay fp32
    has_bias = draw(st.booleans())
    layout = draw(st.sampled_from(LAYOUTS))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    gen = torch.Generator().manual_seed(seed)
    mod = Int8Linear(K, N, bias=has_bias, activations=activations,
                     dtype=torch.float32 if convert else dtype)
    sd = {"weight": torch.randint(-127, 128, (N, K), generator=gen, dtype=torch.int8),
          "weight_scale": torch.rand(N, generator=gen) * 0.02 + 1e-3}
    if has_bias:
        sd["bias"] = torch.randn(N, generator=gen).to(mod.bias.dtype)
    mod.load_state_dict(sd)                # the post-load hook rebuilds w_packed
    if convert:
        mod = mod.to(dtype)
    x = make_x(lead, K, dtype, layout, gen)
    meta = dict(activations=activations, x=tuple(x.shape), x_stride=x.stride(), K=K, N=N, dtype=str(dtype),
                layout=layout, bias=has_bias, convert=convert, seed=seed)
    return Case((x,), meta, mod)


@st.composite
def int4_module_cases(draw, activations: str) -> Case:
    K, g = draw(int4_shape(module=True))
    N = draw(sizes(1, 160))
    lead = draw(lead_dims())
    dtype = draw(st.sampled_from(DTYPES))
    convert = draw(st.booleans())
    has_bias = draw(st.booleans())
    symmetric = draw(st.booleans())
    layout = draw(st.sampled_from(LAYOUTS))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    gen = torch.Generator().manual_seed(seed)
    mod = Int4Linear(K, N, bias=has_bias, group_size=g, symmetric=symmetric, activations=activations,
                     dtype=torch.float32 if convert else dtype)
    G = K // mod.group_size
    sd = {"weight": torch.randint(0, 256, (N, K // 2), generator=gen, dtype=torch.uint8),
          "weight_scale": torch.rand(N, G, generator=gen) * 0.1 + 0.01}
    if not symmetric:
        sd["weight_zero"] = torch.randint(0, 16, (N, G), generator=gen, dtype=torch.uint8)
    if has_bias:
        sd["bias"] = torch.randn(N, generator=gen).to(mod.bias.dtype)
    mod.load_state_dict(sd)
    if convert:
        mod = mod.to(dtype)
    x = make_x(lead, K, dtype, layout, gen)
    meta = dict(activations=activations, x=tuple(x.shape), x_stride=x.stride(), K=K, N=N, g=g,
                symmetric=symmetric, dtype=str(dtype), layout=layout, bias=has_bias, convert=convert, seed=seed)
    return Case((x,), meta, mod)


def _module_run(case: Case) -> torch.Tensor:
    with torch.no_grad():
        return case.module(*case.args)


def _int8_module_args(case: Case) -> tuple:
    m = case.module
    return case.args[0], m.weight, m.weight_scale, m.bias


def _int4_module_args(case: Case) -> tuple:
    m = case.module
    return case.args[0], m.weight, m.weight_scale, m.weight_zero, m.group_size, m.bias


def _int8_module_check(case: Case) -> None:
    assert case.module.weight_scale.dtype == torch.float32, "weight_scale must stay fp32"


# ----------------------------------------------------------------------------- the tables
OP_SPECS: list[Spec] = [
    Spec("w8a8_linear", lambda: int8_cases(allow_special=True), _op("w8a8_linear"), _int8_ref("w8a8_linear"),
         assert_same_bits, exact=True),
    Spec("w8a16_linear", lambda: int8_cases(allow_special=False), _op("w8a16_linear"),
         _int8_ref("w8a16_linear"), check_w8a16),
    Spec("w4a16_linear", int4_cases, _op("w4a16_linear"), _int4_ref("w4a16_linear"), check_w4a16),
    Spec("w4a8_linear", int4_cases, _op("w4a8_linear"), _int4_ref("w4a8_linear"), check_w4a8),
]

MODULE_SPECS: list[Spec] = [
    Spec("Int8Linear[int8]", lambda: int8_module_cases("int8"), _module_run,
         lambda c: reference.w8a8_linear(*_int8_module_args(c)),
         lambda y, r, c: (_int8_module_check(c), assert_same_bits(y, r, c)), exact=True),
    Spec("Int8Linear[float]", lambda: int8_module_cases("float"), _module_run,
         lambda c: reference.w8a16_linear(*_int8_module_args(c)),
         lambda y, r, c: (_int8_module_check(c), assert_within(y, r, _w8a16_bound(*_int8_module_args(c)), c))),
    Spec("Int4Linear[float]", lambda: int4_module_cases("float"), _module_run,
         lambda c: reference.w4a16_linear(*_int4_module_args(c)),
         lambda y, r, c: assert_within(y, r, _w4a16_bound(*_int4_module_args(c)), c)),
    Spec("Int4Linear[int8]", lambda: int4_module_cases("int8"), _module_run,
         lambda c: reference.w4a8_linear(*_int4_module_args(c)),
         lambda y, r, c: assert_within(y, r, _w4a8_bound(*_int4_module_args(c)), c)),
]

# Ops whose fuzzing lives elsewhere or that are not public kernels (none today).
NOT_FUZZED: dict[str, str] = {}

# Cases run per spec name in this session (conftest prints the total at the end).
CASES_RUN: dict[str, int] = {}
