"""slmkern::attention: every ISA path against slmkern.reference.attention (and torch's sdpa), awkward shapes,
masks, causal, grouped heads, strided inputs, dtypes, errors, compile/export, autograd."""
from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from slmkern import ops, reference
from slmkern._backends import cpu as cpu_backend

OP = "attention"
TOL = 2e-6      # fp32: a different summation order than the reference's matmuls, relative to max |v|


def qkv(B, Hq, Hkv, L, S, D, dtype=torch.float32, scale=1.0):
    q = torch.randn(B, Hq, L, D) * scale
    k = torch.randn(B, Hkv, S, D) * scale
    v = torch.randn(B, Hkv, S, D)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def sdpa(q, k, v, mask=None, scale=None, is_causal=False):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, is_causal=is_causal).transpose(1, 2)


def close(out, want, v, tol=TOL):
    assert out.shape == want.shape and out.dtype == want.dtype
    err = (out.double() - want.double()).abs().max().item() if out.numel() else 0.0
    bound = tol * max(1.0, v.abs().max().item())
    assert err <= bound, f"max error {err:.3g} > {bound:.3g}"


SHAPES = [  # B, Hq, Hkv, L, S, D
    (1, 1, 1, 1, 1, 1), (2, 3, 3, 5, 7, 5), (1, 4, 2, 13, 13, 40), (2, 6, 2, 33, 50, 32), (1, 2, 1, 7, 130, 24),
    (3, 2, 2, 17, 17, 64), (1, 3, 3, 130, 129, 16), (2, 12, 12, 128, 128, 32), (1, 2, 2, 9, 31, 80),
    (1, 1, 1, 6, 6, 128), (1, 2, 2, 300, 300, 8), (1, 9, 3, 20, 20, 64),
]


@pytest.mark.parametrize("B,Hq,Hkv,L,S,D", SHAPES)
def test_matches_reference_and_sdpa(cpu_isa, B, Hq, Hkv, L, S, D):
    q, k, v = qkv(B, Hq, Hkv, L, S, D)
    out = ops.attention(q, k, v)
    close(out, reference.attention(q, k, v), v)
    close(out, sdpa(q, k, v), v)
    assert out.is_contiguous() and out.shape == (B, L, Hq, D)


@pytest.mark.parametrize("B,Hq,Hkv,L,S,D", [s for s in SHAPES if s[3] <= s[4]])
def test_causal(cpu_isa, B, Hq, Hkv, L, S, D):
    q, k, v = qkv(B, Hq, Hkv, L, S, D)
    out = ops.attention(q, k, v, is_causal=True)
    close(out, reference.attention(q, k, v, is_causal=True), v)
    if L == S:
        close(out, sdpa(q, k, v, is_causal=True), v)


def test_causal_with_more_queries_than_keys_and_dead_rows(cpu_isa):
    # top-left causal with L > S: every row sees min(i + 1, S) keys; none is dead
    q, k, v = qkv(1, 2, 2, 20, 6, 8)
    close(ops.attention(q, k, v, is_causal=True), reference.attention(q, k, v, is_causal=True), v)


MASK_SHAPES = [(2, 4, 9, 11), (2, 1, 9, 11), (2, 1, 1, 11), (1, 1, 9, 11), (9, 11), (11,), (1, 4, 1, 11)]


@pytest.mark.parametrize("mshape", MASK_SHAPES)
@pytest.mark.parametrize("kind", ["bool", "float", "float_neginf"])
def test_masks_broadcast(cpu_isa, mshape, kind):
    q, k, v = qkv(2, 4, 2, 9, 11, 24)
    if kind == "bool":
        mask = torch.rand(mshape) > 0.3
    else:
        mask = torch.randn(mshape)
        if kind == "float_neginf":
            mask = mask.masked_fill(torch.rand(mshape) > 0.6, float("-inf"))
    out = ops.attention(q, k, v, mask)
    close(out, reference.attention(q, k, v, mask), v)
    if mask.dim() >= 2:   # (sdpa takes no 1-D mask; fully masked rows are 0 there too)
        close(out, sdpa(q, k, v, mask), v)


def test_fully_masked_rows_are_zero(cpu_isa):
    q, k, v = qkv(2, 2, 2, 5, 7, 16)
    mask = torch.ones(2, 1, 5, 7, dtype=torch.bool)
    mask[0, 0, 1] = False
    mask[1, 0, 4] = False
    out = ops.attention(q, k, v, mask)
    assert torch.equal(out[0, 1], torch.zeros(2, 16)) and torch.equal(out[1, 4], torch.zeros(2, 16))
    close(out, reference.attention(q, k, v, mask), v)
    fmask = torch.zeros(2, 1, 5, 7).masked_fill(~mask, float("-inf"))
    assert torch.equal(ops.attention(q, k, v, fmask), out)


def test_mask_only_read_inside_its_row(cpu_isa):
    """A mask that is a view of a wider buffer: the kernel reads S columns per row, never past them."""
    q, k, v = qkv(1, 2, 2, 7, 13, 8)
    wide = torch.randn(1, 1, 7, 20)
    wide[..., 13:] = float("nan")            # poison: reading past S would turn the output NaN
    mask = wide[..., :13]
    out = ops.attention(q, k, v, mask)
    assert torch.isfinite(out).all()
    close(out, reference.attention(q, k, v, mask), v)


def test_strided_inputs_as_transformers_passes_them(cpu_isa):
    """q/k/v as views of one fused projection output (B, L, 3 H D) -> (B, H, L, D), no copies."""
    B, L, H, D = 2, 37, 4, 24
    x = torch.randn(B, L, 3 * H * D)
    q, k, v = (x[..., i * H * D:(i + 1) * H * D].view(B, L, H, D).transpose(1, 2) for i in range(3))
    out = ops.attention(q, k, v)
    close(out, reference.attention(q.contiguous(), k.contiguous(), v.contiguous()), v)
    # a non-unit last-dim stride is copied by the backend, not misread
    qt = torch.randn(B, H, D, L).transpose(-1, -2)
    close(ops.attention(qt, k, v), reference.attention(qt.contiguous(), k, v), v)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_dtypes_compute_in_fp32(cpu_isa, dtype):
    q, k, v = qkv(2, 4, 4, 17, 17, 32, dtype)
    out = ops.attention(q, k, v)
    want = reference.attention(q, k, v)
    assert out.dtype == dtype
    # both round one fp32 result to dtype: at most one ulp apart
    assert (out.float() - want.float()).abs().max().item() <= 2 * torch.finfo(dtype).eps * v.float().abs().max()


def test_scale(cpu_isa):
    q, k, v = qkv(1, 2, 2, 9, 9, 16)
    for scale in (0.0, 0.05, 1.0, 3.0):
        close(ops.attention(q, k, v, scale=scale), reference.attention(q, k, v, scale=scale), v)
    close(ops.attention(q, k, v, scale=0.0), v.mean(2, keepdim=True).expand(1, 2, 9, 16).transpose(1, 2), v)


def test_large_scores_do_not_overflow(cpu_isa):
    q, k, v = qkv(1, 2, 2, 16, 40, 32, scale=30.0)      # scores ~ +-1e4: exp must be max-subtracted
    out = ops.attention(q, k, v)
    assert torch.isfinite(out).all()
    close(out, reference.attention(q, k, v), v, tol=1e-5)


def test_nan_propagates(cpu_isa):
    q, k, v = qkv(1, 1, 1, 4, 6, 8)
    q[0, 0, 2, 3] = float("nan")
    out = ops.attention(q, k, v)
    assert torch.isnan(out[0, 2]).all() and torch.isfinite(out[0, [0, 1, 3]]).all()
    v[0, 0, 5, 0] = float("nan")
    assert torch.isnan(ops.attention(q, k, v)[0, :, 0, 0]).all()


def test_empty_batch_and_queries(cpu_isa):
    q, k, v = qkv(0, 2, 2, 5, 5, 8)
    assert ops.attention(q, k, v).shape == (0, 5, 2, 8)
    q, k, v = qkv(1, 2, 2, 0, 5, 8)
    assert ops.attention(q, k, v).shape == (1, 0, 2, 8)


def test_tolerance_catches_a_wrong_key(cpu_isa):
    q, k, v = qkv(1, 2, 2, 9, 9, 16)
    out = ops.attention(q, k, v)
    k2 = k.clone()
    k2[0, 1, 4, 7] += 0.5
    with pytest.raises(AssertionError):
        close(out, reference.attention(q, k2, v), v)


def test_op_isa_follows_forced_isa(cpu_isa):
    assert cpu_backend.op_isa(OP) == ("ref" if cpu_isa == "ref" else "avx2")


def test_concurrent_calls_from_python_threads():
    q, k, v = qkv(2, 4, 4, 64, 64, 32)
    want = ops.attention(q, k, v)
    errors = []

    def run():
        try:
            for _ in range(5):
                assert torch.equal(ops.attention(q, k, v), want)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_thread_counts_give_the_same_bits():
    q, k, v = qkv(2, 3, 3, 130, 130, 32)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.attention(q, k, v)
        torch.set_num_threads(max(2, n))
        assert torch.equal(ops.attention(q, k, v), one)
    finally:
        torch.set_num_threads(n)


def test_opcheck():
    q, k, v = qkv(2, 4, 2, 7, 9, 16)
    mask = torch.rand(2, 1, 7, 9) > 0.2
    for args in [(q, k, v, None, None, False), (q, k, v, mask, 0.3, False), (q, k, v[:, :, :9], None, None, True),
                 (q.half(), k.half(), v.half(), None, None, False)]:
        torch.library.opcheck(torch.ops.slmkern.attention.default, args)


def test_compile_fullgraph_and_export():
    q, k, v = qkv(2, 4, 2, 7, 7, 16)

    def f(q, k, v):
        return ops.attention(q, k, v, is_causal=True).reshape(2, 7, -1)

    want = f(q, k, v)
    assert torch.equal(torch.compile(f, fullgraph=True)(q, k, v), want)

    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return f(q, k, v)

    ep = torch.export.export(M(), (q, k, v))
    assert "slmkern.attention" in str(ep.graph)
    assert torch.equal(ep.module()(q, k, v), want)


def test_autograd_matches_the_reference():
    q, k, v = (t.double().float().requires_grad_() for t in qkv(1, 4, 2, 6, 8, 8))
    mask = torch.randn(1, 1, 6, 8)
    g = torch.randn(1, 6, 4, 8)
    ops.attention(q, k, v, mask).backward(g)
    got = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    reference.attention(q, k, v, mask).backward(g)
    for a, b in zip(got, (q.grad, k.grad, v.grad)):
        assert torch.allclose(a, b, atol=1e-6)


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("args,match", [
    (lambda q, k, v: (q.int(), k, v), "q must be a float32"),
    (lambda q, k, v: (q, k.half(), v), "share one dtype"),
    (lambda q, k, v: (q[0], k, v), "q must have 4 dims"),
    (lambda q, k, v: (q, k[:, :, :, :8], v), "head dim"),
    (lambda q, k, v: (q, k, v[:, :, :3]), "v must have the shape of k"),
    (lambda q, k, v: (q, k[:1], v[:1]), "same batch"),
    (lambda q, k, v: (q[:, :3], k, v), "multiple of k/v's heads"),
    (lambda q, k, v: (q, k[:, :, :0], v[:, :, :0]), "at least one key"),
    (lambda q, k, v: (q, k, v, torch.zeros(2, 4, 5, 3)), "mask must broadcast"),
    (lambda q, k, v: (q, k, v, torch.zeros(2, 4, 5, 6, dtype=torch.int32)), "mask must be None, bool"),
    (lambda q, k, v: (q, k, v, torch.ones(5, 6, dtype=torch.bool), None, True), "not both"),
    (lambda q, k, v: (q, k, v, None, float("nan")), "scale must be finite"),
])
def test_errors_name_the_argument(args, match):
    q, k, v = qkv(2, 4, 2, 5, 6, 16)
    with pytest.raises((TypeError, ValueError), match=match):
        ops.attention(*args(q, k, v))
    with pytest.raises((TypeError, ValueError), match=match):   # the fake says the same (compile/export)
        ops.attention(*[a.to("meta") if isinstance(a, torch.Tensor) else a for a in args(q, k, v)])
