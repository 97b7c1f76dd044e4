"""One contract per op: every layer accepts exactly the same inputs.

For every op in the ``slmkern`` torch.library namespace, a set of probes (small CPU tensors: the
valid arguments, then one fact broken or stretched at a time: group size, dtypes, shapes,
w_packed) goes through each layer that checks that op's arguments:

- ``ops.check``    the ops layer's full check (slmkern/ops/), the baseline;
- ``fake``         the registered fake kernel (meta tensors, what torch.compile/export see);
- ``cpu``          the CPU registration (slmkern/_backends/cpu.py: fast check, C++ kernel);
- ``ref backend``  the registration for other devices (slmkern/_backends/__init__.py);
- ``triton``       the CUDA registrations' checks (_backends/triton.py, triton_sparse.py), run on
                   CPU tensors with the Triton kernels switched off (they then fall back to
                   slmkern.reference, so no GPU is needed and every check still runs);
- ``reference``    slmkern/reference.py called directly;
- ``formats.*``    the format helpers that take a group size, and the CPU prepackers
                   (``_backends.cpu.prepack_*``) that do (group-size probes only).

A layer accepts when it returns, rejects when it raises TypeError/ValueError; any other exception
is reported as a crash. Group-size probes are also held against the rule stated once in
slmkern.formats.common. Layers that by design do not look at an axis say so in SKIP below, with
the reason; everything else must agree with ops.check on every probe.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import pytest
import torch

import slmkern  # noqa: F401  (registers the ops and their kernels)
import slmkern._backends as ref_backend
from slmkern import ops, reference
from slmkern._backends import cpu as cpu_backend
from slmkern._backends import triton as triton_backend
from slmkern._backends import triton_sparse
from slmkern.formats import bitmask, common, int4, int8, sparse24

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
N = 5


def ops_in_namespace() -> set[str]:
    return {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("slmkern::")}


def schema_names(op: str) -> list[str]:
    return [a.name for a in getattr(torch.ops.slmkern, op).default._schema.arguments]


@dataclasses.dataclass
class Probe:
    label: str
    axis: str           # "valid" | "group" | "dtype" | "shape" | "w_packed"
    args: dict


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- valid arguments per op
def int8_args(K: int = 40, xdt=F32) -> dict:
    w, s = int8.quantize_per_channel(torch.randn(N, K, generator=_gen()))
    return dict(x=torch.randn(3, K, generator=_gen(1)).to(xdt), w=w, w_scale=s, bias=None, w_packed=None)


def int4_args(K: int = 96, g: int = 32, zeros: str = "u8", xdt=F32) -> dict:
    gg = K if g == -1 else g
    G = K // gg if gg > 0 and K % gg == 0 else 1
    w = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=_gen())
    s = torch.rand(N, G, generator=_gen(2)) * 0.1 + 0.01
    z = {"none": None, "u8": torch.randint(0, 16, (N, G), dtype=torch.uint8, generator=_gen(3)),
         "f32": torch.rand(N, G, generator=_gen(4)) * 15}[zeros]
    return dict(x=torch.randn(3, K, generator=_gen(1)).to(xdt), w=w, scales=s, zeros=z, group_size=g, bias=None,
                w_packed=None)


def dense24(K: int) -> torch.Tensor:
    d = torch.randn(N, K, generator=_gen())
    keep = torch.zeros(N, K // 4, 4, dtype=torch.bool)
    keep[..., 1] = keep[..., 3] = True
    return d * keep.reshape(N, K)


def s24_args(K: int = 64, values: str = "f32", xdt=F32) -> dict:
    if values == "int8":
        v, m, s = sparse24.compress_int8(dense24(K))
    else:
        v, m = sparse24.compress(dense24(K).to({"f32": F32, "bf16": BF16}[values]))
        s = None
    return dict(x=torch.randn(3, K, generator=_gen(1)).to(xdt), values=v, meta=m, scales=s, bias=None,
                w_packed=None)


def s24w4_args(K: int = 96, g: int = 32, zeros: bool = True, xdt=F32) -> dict:
    gg = K if g == -1 else g
    ok = gg > 0 and gg % 4 == 0 and K % gg == 0
    q, m, s, z = sparse24.compress_int4(dense24(K), g if ok else 4, symmetric=not zeros)
    if not ok:  # scales / zeros shaped for g where that is a whole number of groups
        G = K // gg if gg > 0 and K % gg == 0 else 1
        s = torch.rand(N, G, generator=_gen(2)) * 0.1 + 0.01
        z = torch.randint(0, 16, (N, G), dtype=torch.uint8, generator=_gen(3)) if zeros else None
    return dict(x=torch.randn(3, K, generator=_gen(1)).to(xdt), qvalues=q, meta=m, scales=s, zeros=z,
                group_size=g, bias=None, w_packed=None)


def sparse_args(K: int = 37, values: str = "int8", xdt=F32) -> dict:
    d = torch.randn(N, K, generator=_gen()) * (torch.rand(N, K, generator=_gen(5)) < 0.3)
    if values == "int8":
        v, bm, ro, s = bitmask.compress_int8(d)
    else:
        (v, bm, ro), s = bitmask.compress(d), None
    return dict(x=torch.randn(3, K, generator=_gen(1)).to(xdt), values=v, bitmask=bm, row_offsets=ro, scales=s,
                bias=None, w_packed=None)


def _with(a: dict, **kw) -> dict:
    return {**a, **kw}


# ----------------------------------------------------------------------------- probes per op
def _bias_probes(a: dict, n: int) -> list[Probe]:
    x = a["x"]
    return [Probe("bias f32", "dtype", _with(a, bias=torch.randn(n))),
            Probe("bias f64", "dtype", _with(a, bias=torch.randn(n, dtype=torch.float64))),
            Probe("bias int32", "dtype", _with(a, bias=torch.zeros(n, dtype=torch.int32))),
            Probe("bias (N+1,)", "shape", _with(a, bias=torch.randn(n + 1, dtype=x.dtype))),
            Probe("bias (1, N)", "shape", _with(a, bias=torch.randn(1, n, dtype=x.dtype)))]


def _x_probes(a: dict) -> list[Probe]:
    x = a["x"]
    K = x.shape[-1]
    return [Probe("x bf16", "dtype", _with(a, x=x.to(BF16))),
            Probe("x f16", "dtype", _with(a, x=x.to(F16))),
            Probe("x f64", "dtype", _with(a, x=x.double())),
            Probe("x int32", "dtype", _with(a, x=x.to(torch.int32))),
            Probe("x 3-d", "shape", _with(a, x=x.reshape(1, 3, K))),
            Probe("x empty batch", "shape", _with(a, x=x[:0])),
            Probe("x 0-d", "shape", _with(a, x=x[0, 0])),
            Probe("x K+4", "shape", _with(a, x=torch.randn(3, K + 4, dtype=x.dtype)))]


def _w_packed_probes(a: dict, blob: torch.Tensor) -> list[Probe]:
    return [Probe("w_packed valid", "w_packed", _with(a, w_packed=blob)),
            Probe("w_packed short", "w_packed", _with(a, w_packed=blob[:-64].clone())),
            Probe("w_packed int8", "w_packed", _with(a, w_packed=blob.view(torch.int8)))]


def int8_probes() -> list[Probe]:
    a = int8_args()
    w = a["w"]
    return ([Probe("valid", "valid", a), Probe("valid bf16 x, bf16 bias", "valid",
                                               _with(a, x=a["x"].to(BF16), bias=torch.randn(N).to(BF16)))]
            + _x_probes(a) + _bias_probes(a, N)
            + [Probe("w uint8", "dtype", _with(a, w=w.view(torch.uint8))),
               Probe("w (N, K+4)", "shape", _with(a, w=torch.zeros(N, 44, dtype=torch.int8))),
               Probe("w 1-d", "shape", _with(a, w=w.reshape(-1))),
               Probe("w_scale f16", "dtype", _with(a, w_scale=a["w_scale"].half())),
               Probe("w_scale (N+1,)", "shape", _with(a, w_scale=torch.rand(N + 1)))]
            + _w_packed_probes(a, cpu_backend.prepack_int8(w)))


def w8a8_probes() -> list[Probe]:
    """int8_probes plus w8a8_linear's two string arguments (activations scheme, fused epilogue)."""
    probes = [Probe(p.label, p.axis, {**p.args, "activations": "int8", "epilogue": "none"}) for p in int8_probes()]
    a = probes[0].args
    return probes + [Probe("valid int7", "valid", _with(a, activations="int7")),
                     Probe("valid gelu", "valid", _with(a, epilogue="gelu")),
                     Probe("valid int7 gelu", "valid", _with(a, activations="int7", epilogue="gelu")),
                     Probe("activations int4", "dtype", _with(a, activations="int4")),
                     Probe("activations float", "dtype", _with(a, activations="float")),
                     Probe("epilogue relu", "dtype", _with(a, epilogue="relu"))]


INT4_GROUPS = {96: (-1, 96, 2, 4, 6, 8, 12, 16, 24, 32, 48, 3, 1, 0, -2, 64, 192, 5),
               130: (-1, 130, 2, 10, 26, 5, 13, 65, 32, 128)}


def int4_probes() -> list[Probe]:
    a = int4_args()
    probes = [Probe("valid", "valid", a),
              Probe("valid symmetric", "valid", int4_args(zeros="none")),
              Probe("valid f32 zeros", "valid", int4_args(zeros="f32"))]
    for K, gs in INT4_GROUPS.items():
        probes += [Probe(f"K={K} g={g}", "group", int4_args(K, g)) for g in gs]
    probes += _x_probes(a) + _bias_probes(a, N)
    probes += [Probe("w int8", "dtype", _with(a, w=a["w"].view(torch.int8))),
               Probe("w (N, K)", "shape", _with(a, w=torch.zeros(N, 96, dtype=torch.uint8))),
               Probe("w (0, K/2)", "shape", _with(a, w=a["w"][:0], scales=a["scales"][:0], zeros=a["zeros"][:0])),
               Probe("scales f16", "dtype", _with(a, scales=a["scales"].half())),
               Probe("scales (N, G+1)", "shape", _with(a, scales=torch.rand(N, 4))),
               Probe("scales 1-d", "shape", _with(a, scales=a["scales"].reshape(-1))),
               Probe("zeros int32", "dtype", _with(a, zeros=a["zeros"].int())),
               Probe("zeros (N, G+1)", "shape", _with(a, zeros=torch.zeros(N, 4, dtype=torch.uint8))),
               Probe("group_size bool", "dtype", _with(a, group_size=True))]
    probes += _w_packed_probes(a, cpu_backend.prepack_int4(a["w"], a["scales"], a["zeros"], 32))
    return probes


S24W4_GROUPS = {96: (-1, 96, 4, 8, 12, 16, 24, 32, 48, 2, 6, 3, 0, -4, 64, 192),
                40: (-1, 40, 4, 8, 20, 10, 2, 5, 32)}


def s24w4_probes() -> list[Probe]:
    a = s24w4_args()
    probes = [Probe("valid", "valid", a), Probe("valid symmetric", "valid", s24w4_args(zeros=False))]
    for K, gs in S24W4_GROUPS.items():
        probes += [Probe(f"K={K} g={g}", "group", s24w4_args(K, g)) for g in gs]
    probes += _x_probes(a) + _bias_probes(a, N)
    probes += [Probe("qvalues int8", "dtype", _with(a, qvalues=a["qvalues"].view(torch.int8))),
               Probe("qvalues (N, K/2)", "shape", _with(a, qvalues=torch.zeros(N, 48, dtype=torch.uint8))),
               Probe("meta int8", "dtype", _with(a, meta=a["meta"].view(torch.int8))),
               Probe("meta (N, 1)", "shape", _with(a, meta=a["meta"][:, :1].contiguous())),
               Probe("scales f16", "dtype", _with(a, scales=a["scales"].half())),
               Probe("scales (N, G+1)", "shape", _with(a, scales=torch.rand(N, 4))),
               Probe("zeros f32", "dtype", _with(a, zeros=a["zeros"].float())),
               Probe("zeros (N, G+1)", "shape", _with(a, zeros=torch.zeros(N, 4, dtype=torch.uint8))),
               Probe("group_size bool", "dtype", _with(a, group_size=True))]
    probes += _w_packed_probes(a, cpu_backend.prepack_sparse24_int4(a["qvalues"], a["meta"], a["scales"], a["zeros"],
                                                                    32))
    return probes


def s24_probes() -> list[Probe]:
    a = s24_args(values="int8")
    f = s24_args(values="f32")
    probes = [Probe("valid int8", "valid", a), Probe("valid f32", "valid", f),
              Probe("valid bf16 values", "valid", s24_args(values="bf16", xdt=BF16))]
    probes += _x_probes(a) + _bias_probes(a, N)
    probes += [Probe("x K=62", "shape", _with(a, x=torch.randn(3, 62))),
               Probe("values int16", "dtype", _with(a, values=a["values"].to(torch.int16))),
               Probe("values f64", "dtype", _with(f, values=f["values"].double())),
               Probe("values (N, K)", "shape", _with(a, values=torch.zeros(N, 64, dtype=torch.int8))),
               Probe("meta int8", "dtype", _with(a, meta=a["meta"].view(torch.int8))),
               Probe("meta (N, 1)", "shape", _with(a, meta=a["meta"][:, :1].contiguous())),
               Probe("int8 values, no scales", "dtype", _with(a, scales=None)),
               Probe("float values, scales", "dtype", _with(f, scales=torch.rand(N))),
               Probe("scales f16", "dtype", _with(a, scales=a["scales"].half())),
               Probe("scales (N+1,)", "shape", _with(a, scales=torch.rand(N + 1)))]
    probes += _w_packed_probes(a, cpu_backend.prepack_sparse24(a["values"], a["meta"], a["scales"]))
    return probes


def sparse_probes() -> list[Probe]:
    a = sparse_args(values="int8")
    f = sparse_args(values="f32")
    probes = [Probe("valid int8", "valid", a), Probe("valid f32", "valid", f)]
    probes += _x_probes(a) + _bias_probes(a, N)
    probes += [Probe("values int16", "dtype", _with(a, values=a["values"].to(torch.int16))),
               Probe("values f64", "dtype", _with(f, values=f["values"].double())),
               Probe("values 2-d", "shape", _with(a, values=a["values"].reshape(1, -1))),
               Probe("bitmask int8", "dtype", _with(a, bitmask=a["bitmask"].view(torch.int8))),
               Probe("bitmask (N, 1)", "shape", _with(a, bitmask=a["bitmask"][:, :1].contiguous())),
               Probe("row_offsets int32", "dtype", _with(a, row_offsets=a["row_offsets"].int())),
               Probe("row_offsets (N,)", "shape", _with(a, row_offsets=a["row_offsets"][:-1])),
               Probe("int8 values, no scales", "dtype", _with(a, scales=None)),
               Probe("float values, scales", "dtype", _with(f, scales=torch.rand(N))),
               Probe("scales (N+1,)", "shape", _with(a, scales=torch.rand(N + 1)))]
    K = a["x"].shape[-1]
    probes += _w_packed_probes(a, cpu_backend.prepack_bitmask(a["values"], a["bitmask"], a["row_offsets"], K,
                                                               a["scales"]))
    return probes


def attention_probes() -> list[Probe]:
    g = _gen(3)
    q, k, v = (torch.randn(2, 4, 5, 8, generator=g) for _ in range(3))
    a = {"q": q, "k": k[:, :2], "v": v[:, :2], "mask": None, "scale": None, "is_causal": False}
    m = torch.rand(2, 1, 5, 5, generator=g) > 0.3
    return [Probe("valid", "valid", a),
            Probe("valid bf16, bool mask, scale", "valid",
                  _with(a, q=q.to(BF16), k=a["k"].to(BF16), v=a["v"].to(BF16), mask=m, scale=0.2)),
            Probe("valid f16, f32 additive mask 2-d", "valid",
                  _with(a, q=q.to(F16), k=a["k"].to(F16), v=a["v"].to(F16), mask=torch.randn(5, 5))),
            Probe("valid causal, S > L", "valid",
                  _with(a, k=torch.randn(2, 2, 7, 8), v=torch.randn(2, 2, 7, 8), is_causal=True)),
            Probe("valid empty batch", "valid", _with(a, q=q[:0], k=a["k"][:0], v=a["v"][:0])),
            Probe("q f64", "dtype", _with(a, q=q.double())),
            Probe("q int32", "dtype", _with(a, q=q.int())),
            Probe("k f16 vs q f32", "dtype", _with(a, k=a["k"].half())),
            Probe("mask int32", "dtype", _with(a, mask=m.int())),
            Probe("mask f64", "dtype", _with(a, mask=torch.zeros(5, 5, dtype=torch.float64))),
            Probe("q 3-d", "shape", _with(a, q=q[0])),
            Probe("k head dim 4", "shape", _with(a, k=a["k"][..., :4])),
            Probe("v S+1", "shape", _with(a, v=torch.randn(2, 2, 6, 8))),
            Probe("Hq not a multiple of Hkv", "shape", _with(a, q=q[:, :3])),
            Probe("batch differs", "shape", _with(a, k=a["k"][:1], v=a["v"][:1])),
            Probe("no keys", "shape", _with(a, k=a["k"][:, :, :0], v=a["v"][:, :, :0])),
            Probe("mask (5, 4)", "shape", _with(a, mask=torch.zeros(5, 4))),
            Probe("mask 5-d", "shape", _with(a, mask=torch.zeros(1, 2, 1, 5, 5))),
            Probe("mask and is_causal", "shape", _with(a, mask=m, is_causal=True)),
            Probe("scale inf", "dtype", _with(a, scale=float("inf")))]


# ----------------------------------------------------------------------------- layers per op
def _meta(v):
    return v.to("meta") if isinstance(v, torch.Tensor) else v


def _fake(op: str):
    def run(*args):
        return getattr(torch.ops.slmkern, op)(*[_meta(v) for v in args])
    return run


def _op(op: str):
    return getattr(torch.ops.slmkern, op)


def _dense_uint8_zeros(z):
    return z if z is None or z.dtype == torch.uint8 else None


def layers(op: str) -> dict[str, Callable]:
    # (_backends/triton.py's @register_kernel-decorated names are None in torch 2.x: the
    # decorator returns nothing, so its shared bodies _int8_linear / _int4_linear are called.)
    common_layers = {"fake": _fake(op), "cpu": _op(op)}
    if op == "w8a8_linear":
        return {"ops.check": lambda *a: (ops.check_activations(op, *a[5:]), ops.check_int8_linear(op, *a[:5])),
                **common_layers,
                "ref backend": ref_backend._w8a8_reference,
                "triton": lambda *a: triton_backend._int8_linear(op, *a),
                "reference": reference.w8a8_linear}
    if op == "w8a16_linear":
        return {"ops.check": lambda *a: ops.check_int8_linear(op, *a), **common_layers,
                "ref backend": ref_backend._reference_kernel(op, getattr(reference, op)),
                "triton": lambda *a: triton_backend._int8_linear(op, *a),
                "reference": getattr(reference, op)}
    if op in ("w4a16_linear", "w4a8_linear"):
        return {"ops.check": lambda *a: ops.check_int4_linear(op, *a),
                "ops.check_fast": lambda *a: ops.check_int4_linear_fast(op, *a), **common_layers,
                "ref backend": ref_backend._int4_reference_kernel(op, getattr(reference, op)),
                "triton": lambda *a: triton_backend._int4_linear(op, *a),
                "reference": getattr(reference, op),
                "formats.int4.resolve_group_size": lambda x, w, s, z, g, *_: int4.resolve_group_size(x.shape[-1], g),
                "formats.int4.check": lambda x, w, s, z, g, *_: int4.check(w, s, _dense_uint8_zeros(z), g),
                "formats.int4.quantize": lambda x, w, s, z, g, *_: int4.quantize(torch.randn(N, x.shape[-1]), g),
                "_backends.cpu.prepack_int4": lambda x, w, s, z, g, *_: cpu_backend.prepack_int4(w, s, z, g)}
    if op == "sparse24_w4a16_linear":
        return {"ops.check": lambda *a: ops.check_sparse24_w4a16_linear(op, *a), **common_layers,
                "ref backend": ref_backend._sparse24_w4a16_reference,
                "triton": triton_sparse.sparse24_w4a16_linear_cuda,
                "reference": reference.sparse24_w4a16_linear,
                "formats.sparse24.validate_int4": lambda x, q, m, s, z, g, *_: sparse24.validate_int4(q, m, s, z, g),
                "formats.sparse24.compress_int4":
                    lambda x, q, m, s, z, g, *_: sparse24.compress_int4(dense24(x.shape[-1]), g),
                "_backends.cpu.prepack_sparse24_int4":
                    lambda x, q, m, s, z, g, *_: cpu_backend.prepack_sparse24_int4(q, m, s, z, g)}
    if op == "sparse24_linear":
        return {"ops.check": lambda *a: ops.check_sparse24_linear(op, *a), **common_layers,
                "ref backend": ref_backend._sparse24_reference,
                "triton": triton_sparse.sparse24_linear_cuda,
                "reference": reference.sparse24_linear}
    if op == "attention":
        return {"ops.check": ops.check_attention, **common_layers,
                "ref backend": ref_backend._attention_reference,
                "reference": reference.attention}
    if op == "sparse_linear":
        return {"ops.check": ops.check_sparse_linear, **common_layers,
                "ref backend": ref_backend._sparse_linear_reference,
                "triton": triton_sparse.sparse_linear_cuda,
                "reference": reference.sparse_linear}
    raise KeyError(op)


PROBES = {"w8a8_linear": w8a8_probes, "w8a16_linear": int8_probes, "w4a16_linear": int4_probes,
          "w4a8_linear": int4_probes, "sparse24_w4a16_linear": s24w4_probes, "sparse24_linear": s24_probes,
          "sparse_linear": sparse_probes, "attention": attention_probes}

# The axes a layer does not look at, by design (anything not listed here must agree with ops.check).
_NO_VALIDATION = "computes on whatever it gets; its callers (the registrations) run the op's check first"
SKIP = {
    ("reference", "w8a8_linear"): ({"dtype", "shape", "w_packed"}, _NO_VALIDATION),
    ("reference", "w8a16_linear"): ({"dtype", "shape", "w_packed"}, _NO_VALIDATION),
    ("reference", "sparse24_linear"): ({"dtype", "shape", "w_packed"}, _NO_VALIDATION),
    ("reference", "sparse_linear"): ({"dtype", "shape", "w_packed"}, _NO_VALIDATION),
    ("reference", "attention"): ({"dtype", "shape"}, _NO_VALIDATION),
    ("reference", "*"): ({"w_packed"}, "ignores w_packed (the CPU blob)"),
    ("triton", "sparse24_linear"): ({"w_packed"}, "CUDA sparse registrations ignore w_packed (documented)"),
    ("triton", "sparse24_w4a16_linear"): ({"w_packed"}, "CUDA sparse registrations ignore w_packed"),
    ("triton", "sparse_linear"): ({"w_packed"}, "CUDA sparse registrations ignore w_packed"),
}


def skipped(layer: str, op: str, axis: str) -> bool:
    if layer.startswith(("formats.", "_backends.cpu.prepack_")):
        return axis not in ("valid", "group")   # format helpers and packers take the weight, not x / bias / w_packed
    return any(axis in SKIP.get((layer, key), (set(), ""))[0] for key in (op, "*"))


def outcome(fn: Callable, args: list) -> str:
    try:
        fn(*args)
    except (TypeError, ValueError):
        return "rejects"
    except Exception as exc:  # noqa: BLE001 - a crash is a finding, reported by name
        return f"crashes ({type(exc).__name__}: {str(exc)[:80]})"
    return "accepts"


@pytest.fixture
def no_triton_kernels(monkeypatch):
    """The CUDA registrations run their checks, then the reference (no GPU needed)."""
    monkeypatch.setattr(triton_backend, "kernels", None)


# ----------------------------------------------------------------------------- tests
def test_every_op_in_the_namespace_has_probes():
    assert ops_in_namespace() == set(PROBES), "an op without probes here: add its spec to tests/test_op_specs.py"


def test_shared_facts_are_stated_once():
    assert ops.FLOAT_DTYPES is common.FLOAT_DTYPES
    assert triton_sparse.FLOAT_DTYPES is common.FLOAT_DTYPES
    assert sparse24.FLOAT_DTYPES is common.FLOAT_DTYPES and bitmask.FLOAT_DTYPES is common.FLOAT_DTYPES
    assert not hasattr(triton_sparse, "W4_GROUP_SIZES") and not hasattr(sparse24, "INT4_GROUP_SIZES")
    assert int4.SUPPORTED_GROUP_SIZES is common.QUANT_GROUP_SIZES


@pytest.mark.parametrize("op", sorted(PROBES))
def test_every_layer_accepts_exactly_what_the_op_accepts(op, no_triton_kernels):
    names = schema_names(op)
    checks = layers(op)
    bad = []
    n_group = 0
    for probe in PROBES[op]():
        assert set(probe.args) == set(names), (probe.label, sorted(probe.args), names)
        args = [probe.args[n] for n in names]
        want = outcome(checks["ops.check"], args)
        if probe.axis == "valid":
            assert want == "accepts", f"{op} {probe.label}: the ops check {want}"
        if probe.axis == "group":
            n_group += 1
            K, g = probe.args["x"].shape[-1], probe.args["group_size"]
            multiple = (common.SPARSE24_INT4_GROUP_MULTIPLE if op.startswith("sparse24")
                        else common.INT4_GROUP_MULTIPLE)
            rule = "accepts" if common.group_size_ok(K, g, multiple) else "rejects"
            if want != rule:
                bad.append(f"{probe.label}: ops.check {want}, slmkern.formats.common's rule {rule}")
        for layer, fn in checks.items():
            if layer == "ops.check" or skipped(layer, op, probe.axis):
                continue
            got = outcome(fn, args)
            if got != want:
                bad.append(f"{probe.label}: ops.check {want}, {layer} {got}")
    assert not bad, f"{op}: layers disagree on {len(bad)} probe(s):\n  " + "\n  ".join(bad)
    if "group_size" in names:
        assert n_group >= 8


@pytest.mark.parametrize("op", sorted(PROBES))
def test_fast_checks_never_accept_what_the_full_check_rejects(op):
    """The per-call fast passes (plain comparisons) may say "not sure" (False) but never pass a bad input."""
    # w8a8: the CPU registration's own fast pass (cpu._int8_linear): the tensor facts, then the two strings
    w8a8_ok = (lambda *a: ops.int8_linear_ok(*a[:5]) and a[5] in cpu_backend._ACT_CODE
               and a[6] in cpu_backend._EPI_CODE)
    fast = {"w8a8_linear": w8a8_ok, "w8a16_linear": ops.int8_linear_ok,
            "sparse24_linear": ops.sparse24_linear_ok, "sparse_linear": ops.sparse_linear_ok,
            "attention": ops.attention_ok}.get(op)
    if fast is None:
        pytest.skip(f"{op}: its fast check falls back to the full check itself (covered above)")
    names = schema_names(op)
    full = layers(op)["ops.check"]
    passed = 0
    for probe in PROBES[op]():
        args = [probe.args[n] for n in names]
        if fast(*args):
            passed += 1
            assert outcome(full, args) == "accepts", f"{op} {probe.label}: fast check passes what the check rejects"
    assert passed >= 1


@pytest.mark.parametrize("op", ["w4a16_linear", "w4a8_linear"])
@pytest.mark.parametrize("K,g", [(96, 16), (96, 48), (96, 6), (130, 10), (130, 26)])
def test_int4_group_sizes_outside_32_64_128_compute_the_reference(op, K, g):
    """The wider set is computed, not only accepted: the CPU kernels match reference.py."""
    for zeros in ("none", "u8", "f32"):
        a = int4_args(K, g, zeros)
        args = [a[n] for n in schema_names(op)]
        y, ref = _op(op)(*args), getattr(reference, op)(*args)
        tol = 1e-5 * (a["x"].abs().double() @ int4_dense_abs(a).T).max().item() + 1e-6
        assert y.shape == ref.shape and (y.double() - ref.double()).abs().max().item() <= tol, (op, K, g, zeros)


def int4_dense_abs(a: dict) -> torch.Tensor:
    g = a["x"].shape[-1] if a["group_size"] == -1 else a["group_size"]
    return reference.int4_weight(a["w"], a["scales"], a["zeros"], g).abs().double()


@pytest.mark.parametrize("K,g", [(96, 12), (96, 16), (96, 48), (40, 20)])
def test_sparse24_int4_group_sizes_compute_the_reference(K, g):
    a = s24w4_args(K, g)
    args = [a[n] for n in schema_names("sparse24_w4a16_linear")]
    y, ref = torch.ops.slmkern.sparse24_w4a16_linear(*args), reference.sparse24_w4a16_linear(*args)
    tol = 1e-5 * (a["x"].abs() @ sparse24.decompress_int4(a["qvalues"], a["meta"], a["scales"], a["zeros"],
                                                          g).abs().T).max().item() + 1e-6
    assert (y - ref).abs().max().item() <= tol


@pytest.mark.parametrize("op", sorted(PROBES))
def test_cpu_registration_without_the_extension_runs_the_reference(op, monkeypatch):
    """A source tree whose slmkern._C failed to import: every op's CPU registration answers with the
    reference (and a log line), never a NameError from a code path no other test reaches."""
    monkeypatch.setattr(cpu_backend, "_C", None)
    names = schema_names(op)
    probe = next(p for p in PROBES[op]() if p.axis == "valid")
    args = [probe.args[n] for n in names]
    kw = {}
    if op == "w8a8_linear":   # the reference takes the two strings by keyword
        kw = {"activations": args[5], "epilogue": args[6]}
    want = getattr(reference, op)(*args[:len(args) - len(kw)], **kw)
    assert torch.equal(_op(op)(*args), want)
