"""slmkern.nn.attention: transformers models on slmkern::attention (attn_implementation "slmkern")."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from slmkern import ops  # noqa: E402
from slmkern.nn.attention import NAME, hf_attention_forward, use_attention_  # noqa: E402


def tiny_bert(**kw):
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=96, max_position_embeddings=64, **kw)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


def batch(B=3, L=21, pad=True):
    ids = torch.randint(0, 97, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    if pad:
        mask[0, 15:] = 0
        mask[2, 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("pad", [False, True])
def test_encoder_switches_and_matches_sdpa(pad, monkeypatch):
    model = tiny_bert()
    inputs = batch(pad=pad)
    with torch.inference_mode():
        want = model(**inputs).last_hidden_state
        assert use_attention_(model) and model.config._attn_implementation == NAME
        calls = []
        real = ops.attention
        monkeypatch.setattr(ops, "attention", lambda *a, **k: calls.append(1) or real(*a, **k))
        got = model(**inputs).last_hidden_state
    assert len(calls) == 2                       # one per layer: the kernel ran, not a fallback
    assert (got - want).abs().max().item() < 1e-5


def test_training_and_gradients_fall_back_to_sdpa(monkeypatch):
    model = tiny_bert(attention_probs_dropout_prob=0.0)
    assert use_attention_(model)
    calls = []
    real = ops.attention
    monkeypatch.setattr(ops, "attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = model(**batch()).last_hidden_state      # grad enabled, parameters require grad
    out.sum().backward()
    assert not calls and model.encoder.layer[0].attention.self.query.weight.grad is not None


def test_causal_models_are_left_alone():
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(cfg).eval()
    assert not use_attention_(model) and model.config._attn_implementation == "sdpa"
    assert not use_attention_(torch.nn.Linear(3, 3))


def test_function_handles_causal_gqa_and_cache_slices():
    """The attention function itself on decoder-style calls (what a user may register for any model)."""
    class Mod(torch.nn.Module):
        is_causal = True

    q, k, v = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    out, w = hf_attention_forward(Mod(), q, k, v, None, scaling=0.3)
    assert w is None
    kk, vv = k[:, :, :6].repeat_interleave(2, 1), v[:, :, :6].repeat_interleave(2, 1)
    want = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, scale=0.3, is_causal=True).transpose(1, 2)
    assert (out - want).abs().max().item() < 1e-5
    one, _ = hf_attention_forward(Mod(), q[:, :, -1:], k, v, None)   # a decode step sees every key
    want1 = torch.nn.functional.scaled_dot_product_attention(q[:, :, -1:], k.repeat_interleave(2, 1),
                                                             v.repeat_interleave(2, 1)).transpose(1, 2)
    assert (one - want1).abs().max().item() < 1e-5


def test_compiled_encoder_keeps_the_op_in_one_graph():
    model = tiny_bert()
    inputs = batch()
    with torch.inference_mode():
        want = model(**inputs).last_hidden_state
    assert use_attention_(model)
    compiled = torch.compile(model, fullgraph=True)
    with torch.inference_mode():
        got = compiled(**inputs).last_hidden_state
    assert (got - want).abs().max().item() < 1e-5
