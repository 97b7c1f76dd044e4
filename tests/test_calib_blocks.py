"""Block-by-block calibration feeds every block its *own* arguments (issue 17, defect 1).

A decoder whose layers differ (sliding-window vs full attention, two RoPE bases: a tiny
Gemma3 built from a config) must see, in the block replay, exactly the inputs a real
forward pass gives each block: hidden states, position tables, masks, bit for bit.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from slmkern.algorithms import _calib, gptq  # noqa: E402

LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]


def tiny_gemma3(seed: int = 0):
    """4 layers alternating sliding-window (window 4, RoPE base 1e4) and full attention (RoPE base 1e6)."""
    torch.manual_seed(seed)
    cfg = transformers.Gemma3TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, sliding_window=4, layer_types=LAYER_TYPES,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0}},
        attn_implementation="eager")
    return transformers.Gemma3ForCausalLM(cfg).eval()


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   attn_implementation="eager")
    return transformers.LlamaForCausalLM(cfg).eval()


def calib_batches(n: int = 2, seq: int = 12, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 128, (2, seq), generator=g)
        mask = torch.ones_like(ids)
        mask[1, :3] = 0   # left padding in one row: the masks differ per batch too
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _targets(model):
    return {f: m for f, m in model.named_modules() if type(m) is nn.Linear and f.startswith("model.layers.")}


def _flatten(obj, prefix=""):
    """{path: leaf} over nested tuples/lists/dicts, cache objects dropped (the replay runs without a cache)."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if k in _calib._CACHE_KWARGS or k == "use_cache":
                continue
            out.update(_flatten(v, f"{prefix}.{k}"))
        return out
    if isinstance(obj, (tuple, list)):
        out = {}
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: obj}


def _same(a, b) -> bool:
    fa, fb = _flatten(a), _flatten(b)
    if fa.keys() != fb.keys():
        return False
    for k in fa:
        x, y = fa[k], fb[k]
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
                    and x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)):
                return False
        elif x != y:
            return False
    return True


def _record_block_inputs(model):
    """Pre-hooks on every block: [(block index, args, kwargs)] in call order."""
    seen = []
    handles = [blk.register_forward_pre_hook(
        lambda mod, args, kwargs, b=b: seen.append((b, tuple(args), dict(kwargs))), with_kwargs=True)
        for b, blk in enumerate(model.model.layers)]
    return seen, handles


def test_tiny_gemma3_layers_really_differ():
    """The model under test is one where block 0's arguments are wrong for block 1 (else the test proves nothing)."""
    model = tiny_gemma3()
    seen, handles = _record_block_inputs(model)
    with torch.no_grad():
        model(**calib_batches(1)[0])
    for h in handles:
        h.remove()
    kw0, kw1 = seen[0][2], seen[1][2]
    assert not torch.equal(kw0["position_embeddings"][0], kw1["position_embeddings"][0])   # RoPE 1e4 vs 1e6
    assert not torch.equal(kw0["attention_mask"], kw1["attention_mask"])                   # sliding vs full
    assert _same(seen[0][2], seen[2][2]) and _same(seen[1][2], seen[3][2])


@pytest.mark.parametrize("make", [tiny_gemma3, tiny_llama], ids=["gemma3", "llama"])
def test_block_replay_inputs_equal_real_forward_bit_for_bit(make):
    model = make()
    batches = calib_batches(2)
    # what every block receives in a real forward pass
    real, handles = _record_block_inputs(model)
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in handles:
        h.remove()
    n_blocks = len(model.model.layers)
    assert len(real) == n_blocks * len(batches)
    # what every block receives while block-wise calibration replays it (weights left as they are)
    replay, handles = _record_block_inputs(model)
    try:
        it = _calib.blockwise_hessians(model, _targets(model), batches, torch.device("cpu"))
        assert it is not None, "the block driver must take this model"
        n_layers = sum(1 for _ in it)
    finally:
        for h in handles:
            h.remove()
    assert n_layers == len(_targets(model))
    for blk in range(n_blocks):
        calls = [(a, k) for b, a, k in replay if b == blk]
        assert calls, f"block {blk} was never replayed"
        want = [(a, k) for b, a, k in real if b == blk]
        for a, k in calls:
            assert any(_same(a, wa) and _same(k, wk) for wa, wk in want), \
                f"block {blk}: replayed with arguments no real forward pass gives it"
        for wa, wk in want:   # and every batch's own inputs were replayed
            assert any(_same(a, wa) and _same(k, wk) for a, k in calls), \
                f"block {blk}: a calibration batch's real inputs were never replayed"


def test_gptq_block_driver_matches_whole_model_replay_on_mixed_layers(monkeypatch):
    """GPTQ through the block driver = GPTQ through one whole-model pass per stage (always correct)."""
    model = tiny_gemma3()
    batches = calib_batches(2)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    flt = lambda m, fqn: fqn.startswith("model.layers.")  # noqa: E731
    wa, ra = gptq.gptq_quantize_model(a, batches, group_size=32, filter_fn=flt, progress=False)
    monkeypatch.setattr(_calib, "blockwise_hessians", lambda *args, **kw: None)
    wb, rb = gptq.gptq_quantize_model(b, batches, group_size=32, filter_fn=flt, progress=False)
    assert list(ra.layers) == list(rb.layers) and len(ra.layers) == 4 * 7
    for fqn in ra.layers:
        torch.testing.assert_close(a.get_submodule(fqn).weight, b.get_submodule(fqn).weight, rtol=1e-4, atol=1e-4,
                                   msg=lambda m, fqn=fqn: f"{fqn}: {m}")
