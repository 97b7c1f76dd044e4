"""Evaluation helpers: classification metrics by hand, perplexity of a known model, sizes."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from slmkern import evaluation as ev
from tests._tiny import TiedLM


def test_classification_metrics_by_hand():
    y = [0, 0, 0, 1, 1, 2]
    p = [0, 0, 1, 1, 2, 2]
    m = ev.classification_metrics(p, y)
    # class 0: P 2/2 R 2/3; class 1: P 1/2 R 1/2; class 2: P 1/2 R 1/1
    prec = (1 + 0.5 + 0.5) / 3
    rec = (2 / 3 + 0.5 + 1) / 3
    f1s = [2 * a * b / (a + b) for a, b in ((1, 2 / 3), (0.5, 0.5), (0.5, 1))]
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(prec) and m["recall"] == pytest.approx(rec)
    assert m["f1"] == pytest.approx(sum(f1s) / 3) and m["n"] == 6


def test_never_predicted_class_counts_as_zero_precision():
    m = ev.classification_metrics([0, 0, 0, 0], [0, 0, 1, 1], num_classes=2)
    assert m["accuracy"] == 0.5 and m["precision"] == pytest.approx(0.25) and m["recall"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="shapes differ"):
        ev.classification_metrics([0, 1], [0])
    with pytest.raises(ValueError, match="empty"):
        ev.classification_metrics([], [])


class _Tok:
    """Whitespace 'tokenizer': token id = len(word) % V."""

    def __init__(self, V):
        self.V = V

    def __call__(self, text, return_tensors=None):
        class R:
            pass
        r = R()
        r.input_ids = torch.tensor([[len(w) % self.V for w in text.split()]])
        return r

    def decode(self, ids):
        return " ".join(str(int(i)) for i in ids)


class _Uniform(nn.Module):
    def __init__(self, V):
        super().__init__()
        self.V = V
        self.lin = nn.Linear(1, 1)

    def forward(self, input_ids, **kw):
        class O:
            pass
        o = O()
        o.logits = torch.zeros(*input_ids.shape, self.V)
        o.past_key_values = None
        return o


def test_perplexity_of_a_uniform_model_is_the_vocab_size():
    V = 17
    text = " ".join("w" * (i % 9 + 1) for i in range(300))
    r = ev.perplexity(_Uniform(V), _Tok(V), text, window=64, progress=False)
    assert r["perplexity"] == pytest.approx(V, rel=1e-5)
    assert r["windows"] == 300 // 64 and r["tokens"] == r["windows"] * 63
    with pytest.raises(ValueError, match="fewer than one window"):
        ev.perplexity(_Uniform(V), _Tok(V), "a b c", window=64, progress=False)


def test_decode_loop_counts_tokens():
    r = ev.decode_tokens_per_s(_Uniform(5), _Tok(5), "a bb ccc", new_tokens=6, reps=1)
    assert r["new_tokens"] == 6 and r["decode_tokens_per_s"] > 0
    assert r["text"] == " ".join(["0"] * 6)                       # argmax of all-zero logits
    r = ev.decode_tokens_per_s(_Uniform(5), _Tok(5), "a bb ccc", new_tokens=4, reps=3)
    assert len(r["decode_tokens_per_s_reps"]) == 3 and all(v > 0 for v in r["decode_tokens_per_s_reps"])
    assert r["decode_ms_per_token"] == pytest.approx(1e3 / r["decode_tokens_per_s"])
    assert r["decode_path"] == "hf"                                # not an HF causal LM: the plain loop


def test_decode_of_an_hf_causal_lm_takes_slmkern_generate():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(cfg).eval()
    fast = ev.decode_tokens_per_s(model, _Tok(64), "a bb ccc", new_tokens=5, reps=1)
    plain = ev.decode_tokens_per_s(model, _Tok(64), "a bb ccc", new_tokens=5, reps=1, mode="hf")
    assert (fast["decode_path"], plain["decode_path"]) == ("lean", "hf")
    assert fast["text"] == plain["text"] and fast["decode_tokens_per_s"] > 0     # the same greedy tokens


def test_sizes(tmp_path):
    m = TiedLM(vocab=50, dim=64)
    # tied weight counted once: emb 50*64 + body 64*64+64
    assert ev.model_bytes(m) == 4 * (50 * 64 + 64 * 64 + 64)
    (tmp_path / "a").write_bytes(b"x" * 100)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b").write_bytes(b"y" * 23)
    assert ev.dir_bytes(tmp_path) == 123
    assert ev.peak_rss_mb() > 10
    assert ev.median_ms(lambda: None, reps=3) >= 0
    assert not math.isnan(ev.median_ms(lambda: sum(range(100)), reps=3))
