"""One copy of each weight: on CPU a packed Int8Linear / Int4Linear holds its packed layout only, and
derives the canonical codes from it (state_dict, save, export, ``module.weight``) bit for bit."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import slmkern
from slmkern import ops, reference
from slmkern._backends import cpu
from slmkern.formats import int4 as int4_format
from slmkern.formats import int4_cpu
from slmkern.formats import int8 as int8_format
from slmkern.nn import Int4Linear, Int8Linear

pytestmark = pytest.mark.skipif(not cpu.has_cpp(), reason="the packed-only mode needs slmkern._C")

# (K, N, kind, group_size, symmetric): awkward N (not a multiple of 16), K not a multiple of 64
CASES = [
    (37, 19, "w8a8", None, None), (64, 48, "w8a16", None, None), (3, 1, "w8a8", None, None),
    (96, 19, "w4a16", 32, True), (96, 33, "w4a8", 32, False), (130, 17, "w4a16", -1, False),
    (192, 50, "w4a8", 64, True), (256, 7, "w4a16", 128, False),
]


def _make(K, N, kind, g, sym, bias=True):
    torch.manual_seed(K * 131 + N)
    lin = nn.Linear(K, N, bias=bias)
    if kind.startswith("w8"):
        mod = Int8Linear.from_linear(lin, activations="int8" if kind == "w8a8" else "float")
        q, s = int8_format.quantize_per_channel(lin.weight)
        return lin, mod, {"weight": q, "weight_scale": s}
    q = int4_format.quantize(lin.weight.detach(), g, sym)
    mod = Int4Linear.from_int4(lin, q, activations="int8" if kind == "w4a8" else "float")
    canon = {"weight": q.packed, "weight_scale": q.scales}
    if q.zeros is not None:
        canon["weight_zero"] = q.zeros
    return lin, mod, canon


def _reference(mod, x, canon):
    b = mod.bias
    if isinstance(mod, Int8Linear):
        fn = reference.w8a8_linear if mod.activations == "int8" else reference.w8a16_linear
        return fn(x, canon["weight"], canon["weight_scale"], b)
    fn = reference.w4a8_linear if mod.activations == "int8" else reference.w4a16_linear
    return fn(x, canon["weight"], canon["weight_scale"], canon.get("weight_zero"), mod.group_size, b)


def _storages(mod) -> dict[int, int]:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in list(mod.buffers()) + list(mod.parameters())}


@pytest.mark.parametrize("K,N,kind,g,sym", CASES)
def test_holds_packed_only_and_derives_canonical_exactly(K, N, kind, g, sym):
    _, mod, canon = _make(K, N, kind, g, sym)
    assert mod._buffers["weight"] is None and mod.w_packed is not None
    # bytes held: the packed blob + scales (+ zeros) + bias; the codes are not held a second time
    side = sum(t.nbytes for n, t in canon.items() if n != "weight") + mod.bias.nbytes
    assert sum(_storages(mod).values()) == mod.w_packed.untyped_storage().nbytes() + side
    # derived on read, bit for bit, in state_dict order
    sd = mod.state_dict()
    assert list(sd) == [k for k in ("weight", "weight_scale", "weight_zero", "bias") if k in sd]
    for name, t in canon.items():
        assert torch.equal(sd[name], t), name
    assert torch.equal(mod.weight, canon["weight"])


@pytest.mark.parametrize("K,N,kind,g,sym", CASES)
def test_forward_and_round_trip_unchanged(K, N, kind, g, sym):
    _, mod, canon = _make(K, N, kind, g, sym)
    x = torch.randn(3, K)
    y = mod(x)
    ref = _reference(mod, x, canon)
    if kind in ("w8a8", "w4a8"):
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)
    else:
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    buf = io.BytesIO()
    torch.save(mod.state_dict(), buf)
    buf.seek(0)
    back = type(mod).from_canonical(torch.load(buf), mod.slmkern_config())
    assert back._buffers["weight"] is None
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), mod.state_dict().values()))
    assert torch.equal(back.w_packed, mod.w_packed)
    assert torch.equal(back(x), y)


@pytest.mark.parametrize("kind", ["w8a8", "w4a16"])
def test_writing_into_a_derived_weight_raises(kind):
    _, mod, canon = _make(64, 24, kind, 32, True)       # symmetric: code 8 is 0
    with pytest.raises(RuntimeError, match="[Ii]nference tensor"):
        mod.weight.zero_()
    # the supported edit: back to canonical buffers, edit, repack
    x = torch.randn(2, 64)
    mod.unpack_()
    assert isinstance(mod._buffers["weight"], torch.Tensor)
    new = torch.zeros_like(canon["weight"]) if kind == "w8a8" else torch.full_like(canon["weight"], 0x88)
    mod.weight.copy_(new)
    mod.prepack()
    assert mod._buffers["weight"] is None and torch.equal(mod.weight, new)
    assert torch.equal(mod(x), mod.bias.expand(2, -1))      # zero weights: y = bias


def test_assigning_a_canonical_buffer_takes_effect_after_prepack():
    _, mod, canon = _make(64, 24, "w8a8", None, None)
    mod.weight = torch.ones_like(canon["weight"])
    assert torch.equal(mod._buffers["weight"], torch.ones_like(canon["weight"]))
    mod.prepack()
    assert mod._buffers["weight"] is None and torch.equal(mod.weight, torch.ones_like(canon["weight"]))


@pytest.mark.parametrize("kind", ["w8a16", "w4a16"])
def test_device_and_dtype_moves(kind):
    _, mod, canon = _make(96, 19, kind, 32, True)
    x = torch.randn(2, 96)
    y = mod(x)
    mod.to("cpu").float()                    # no-op moves keep the packed-only module as it is
    assert mod._buffers["weight"] is None and torch.equal(mod(x), y)
    mod.half()                               # integer codes untouched, bias rounded to fp16
    assert mod._buffers["weight"] is None and torch.equal(mod.weight, canon["weight"])
    assert torch.equal(mod(x.half()), _reference(mod, x.half(), canon))
    meta = mod.to("meta")                    # a move takes the canonical buffers along
    assert meta.weight.device.type == "meta" and meta.weight.shape == canon["weight"].shape
    assert meta.w_packed is None


@pytest.mark.parametrize("kind", ["w8a16", "w4a16"])
def test_autograd_sees_the_real_weight(kind):
    _, mod, canon = _make(64, 24, kind, 32, False)
    x = torch.randn(3, 64, requires_grad=True)
    mod(x).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    _reference(mod, x2, canon).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-4)


def test_compiled_module_uses_the_packed_layout():
    _, mod, canon = _make(96, 33, "w4a8", 32, False)
    x = torch.randn(5, 96)
    eager = mod(x)
    compiled = torch.compile(mod, fullgraph=True)
    assert torch.equal(compiled(x), eager)
    assert mod._buffers["weight"] is None


def test_shape_only_weight_contract():
    w = torch.randint(-127, 128, (24, 64), dtype=torch.int8)
    s = torch.rand(24) + 0.1
    packed = cpu.prepack_int8(w)
    stand_in = torch.zeros((), dtype=torch.int8).expand(24, 64)
    x = torch.randn(2, 64)
    assert torch.equal(ops.w8a8_linear(x, stand_in, s, None, packed), ops.w8a8_linear(x, w, s, None, packed))
    with pytest.raises(ValueError, match="w must be contiguous"):
        ops.w8a8_linear(x, stand_in, s, None, None)            # without w_packed the values are read
    q = int4_format.quantize(torch.randn(24, 64), 32, False)
    packed4 = cpu.prepack_int4(q.packed, q.scales, q.zeros, 32)
    stand4 = torch.zeros((), dtype=torch.uint8).expand(24, 32)
    assert torch.equal(ops.w4a16_linear(x, stand4, q.scales, q.zeros, 32, None, packed4),
                       ops.w4a16_linear(x, q.packed, q.scales, q.zeros, 32, None, packed4))
    with pytest.raises(ValueError, match="w must be contiguous"):
        ops.w4a16_linear(x, stand4, q.scales, q.zeros, 32, None, None)


def test_without_cpp_the_canonical_buffers_stay(monkeypatch):
    monkeypatch.setattr(cpu, "has_cpp", lambda: False)
    _, mod, canon = _make(64, 24, "w8a8", None, None)
    assert torch.equal(mod._buffers["weight"], canon["weight"])


@pytest.mark.parametrize("N,K,g,asym", [(1, 32, 32, False), (17, 96, 32, True), (33, 128, 64, False),
                                        (50, 192, -1, True), (19, 12, 6, True)])
def test_int4_unpack_inverts_both_packers(N, K, g, asym):
    torch.manual_seed(N + K)
    w = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8)
    G = K // (K if g == -1 else g)
    s = torch.rand(N, G) + 0.1
    z = torch.randint(0, 16, (N, G), dtype=torch.uint8) if asym else None
    for blob in (cpu.prepack_int4(w, s, z, g), int4_cpu.pack_reference(w, s, z, g)):
        assert torch.equal(int4_cpu.unpack_codes(blob, N, K, g, asym), w)
    with pytest.raises(ValueError, match="blob"):
        int4_cpu.unpack_codes(blob[:-1], N, K, g, asym)


@pytest.mark.parametrize("N,K", [(1, 1), (17, 37), (33, 130), (16, 4)])
def test_int8_unpack_inverts_both_packers(N, K):
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    for blob in (cpu.prepack_int8(w), int8_format.pack_reference(w)):
        assert torch.equal(int8_format.unpack_cpu(blob, N, K), w)
    with pytest.raises(ValueError, match="blob"):
        int8_format.unpack_cpu(blob[:-1], N, K)


def test_saved_checkpoint_is_unchanged_by_the_mode(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32))
    ref = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32))
    ref.load_state_dict(model.state_dict())
    slmkern.quantize_(model, slmkern.Int4Config(group_size=32))
    slmkern.save(model, tmp_path / "m")
    back = slmkern.load(tmp_path / "m", ref)
    x = torch.randn(4, 64)
    assert torch.equal(back(x), model(x))
    for a, b in zip(back.state_dict().items(), model.state_dict().items()):
        assert a[0] == b[0] and torch.equal(a[1], b[1])
    assert back[0]._buffers["weight"] is None


@pytest.mark.parametrize("kind", ["w8a8", "w4a8"])
def test_dropping_the_packed_layout_brings_the_codes_back(kind):
    _, mod, canon = _make(96, 33, kind, 32, False)
    x = torch.randn(2, 96)
    y = mod(x)
    mod.w_packed = None                      # the only copy of the codes: restored into `weight` first
    assert torch.equal(mod._buffers["weight"], canon["weight"])
    assert torch.equal(mod(x), y)            # the op path repacks per call (and logs it once)


# ----------------------------------------------------------------------------- pickle / copy.deepcopy
def _offset_module(K, N):
    """An Int4Linear in the offset form (GGUF Q4_1: W = code * scale + offset), filled at random."""
    g = torch.Generator().manual_seed(K * 7 + N)
    mod = Int4Linear(K, N, group_size=32, offsets=True)
    mod.unpack_()
    mod.weight.copy_(torch.randint(0, 256, (N, K // 2), generator=g, dtype=torch.uint8))
    mod.weight_scale.copy_(torch.rand(N, K // 32, generator=g) * 0.1)
    mod.weight_offset.copy_(torch.randn(N, K // 32, generator=g) * 0.1)
    mod.bias.copy_(torch.randn(N, generator=g))
    mod.prepack()
    return mod


def copies(mod: nn.Module) -> dict[str, nn.Module]:
    """copy.deepcopy and a pickle round trip of the whole module (torch.save / torch.load)."""
    buf = io.BytesIO()
    torch.save(mod, buf)
    buf.seek(0)
    return {"deepcopy": copy.deepcopy(mod), "pickle": torch.load(buf, weights_only=False)}


@pytest.mark.parametrize("K,N,kind,g,sym", CASES + [(96, 19, "w8a7", None, None), (96, 19, "offsets", 32, False)])
def test_pickle_and_deepcopy_give_the_same_module(K, N, kind, g, sym):
    if kind == "offsets":
        mod = _offset_module(K, N)
    elif kind == "w8a7":
        torch.manual_seed(K)
        mod = Int8Linear.from_linear(nn.Linear(K, N), activations="int7")
    else:
        mod = _make(K, N, kind, g, sym)[1]
    x = torch.randn(5, K)
    want = mod(x)                                  # the original's kernel call is planned (and cached) now
    state = {k: v.clone() for k, v in mod.state_dict().items()}
    for how, c in copies(mod).items():
        assert c._buffers["weight"] is None and c._buffers["w_packed"] is not None, how   # packed only, as before
        assert c.w_packed.data_ptr() != mod.w_packed.data_ptr(), how
        assert torch.equal(c(x), want), how
        assert c._direct_plan().fn is not None, how                                       # the fast path runs
        got = c.state_dict()
        assert got.keys() == state.keys() and all(torch.equal(got[k], v) for k, v in state.items()), how
    assert mod._buffers["weight"] is None and torch.equal(mod(x), want)   # copying left the original as it was
    # the copies share nothing with the original: not even its cached kernel call (raw pointers into its tensors)
    copied = list(copies(mod).values())
    with torch.no_grad():
        mod.w_packed.zero_()
    for c in copied:
        assert torch.equal(c(x), want)


@pytest.mark.parametrize("cls", ["Int8Linear", "Int4Linear"])
def test_the_kernel_plan_is_built_once_after_the_weight_is_dropped(cls):
    """The plan cache must match the module's stand-in weight: otherwise every forward re-checks and
    rebuilds the weight-side facts (tens of microseconds per call at M=1)."""
    import slmkern.nn as snn
    from slmkern._backends import cpu as cpu_backend
    if not cpu_backend.has_cpp():
        pytest.skip("needs slmkern._C")
    m = getattr(snn, cls).from_linear(torch.nn.Linear(128, 32))
    assert m._buffers["weight"] is None                       # only the packed copy is kept
    x = torch.randn(3, 128)
    y = m(x)
    plan = m.__dict__["_plan"]
    assert m._direct_plan() is plan and torch.equal(m(x), y) and m.__dict__["_plan"] is plan
