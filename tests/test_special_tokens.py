"""Perplexity windows and CLI calibration rows follow the tokenizer's own special-token convention
(issue 17, defect 3): by default every window / row is framed as the tokenizer frames any sequence
(add_special_tokens=True: BOS first), with "text-start" (one BOS for the whole text) and "none" as
options; the CLI says which protocol it used. A tiny word-level tokenizer built in code, no hub.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from slmkern import evaluation as ev

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

N_WORDS = 40
UNK, BOS, EOS = 0, 1, 2


def tiny_tokenizer(template: str = "<s> $A"):
    """Word-level tokenizer over w0..w39 whose post-processor adds BOS (or the given template)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(N_WORDS)]
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("<s>", BOS), ("</s>", EOS)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")


def text_of(n_words: int, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(f"w{int(i)}" for i in torch.randint(0, N_WORDS, (n_words,), generator=g))


class Recorder(nn.Module):
    """A causal LM stand-in: records every input_ids it is given; logits favour "the token after BOS is w0"."""

    def __init__(self, vocab: int = N_WORDS + 3):
        super().__init__()
        self.vocab = vocab
        self.seen: list[torch.Tensor] = []
        self.lin = nn.Linear(1, 1)

    def forward(self, input_ids, **kw):
        self.seen.append(input_ids.clone())
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., 3] = (input_ids == BOS).float() * 5.0    # after BOS, w0 is likely

        class O:
            pass
        o = O()
        o.logits = logits
        return o


def test_perplexity_puts_bos_on_every_window_by_default():
    tok = tiny_tokenizer()
    model = Recorder()
    r = ev.perplexity(model, tok, text_of(100), window=16, progress=False)
    assert r["windows"] == len(model.seen) == 100 // 15
    for w in model.seen:
        assert w.shape == (1, 16)
        assert int(w[0, 0]) == BOS, f"window without BOS: {w.tolist()}"
        assert int((w == BOS).sum()) == 1
    # every text token of a window is scored, the first one given BOS
    assert r["tokens"] == r["windows"] * 15
    assert r["special_tokens"] == "per-window"


def test_windows_are_the_tokenizers_own_framing():
    tok = tiny_tokenizer("<s> $A </s>")
    text = text_of(40)
    ids, scored = ev.token_windows(tok, text, 10)
    body = tok(text, add_special_tokens=False).input_ids
    assert ids.shape == (5, 10)
    for i, row in enumerate(ids.tolist()):
        words = body[i * 8:(i + 1) * 8]
        assert row == tok(tok.decode(words), add_special_tokens=True).input_ids   # = add_special_tokens=True
    assert not scored[:, 0].any() and not scored[:, -1].any() and scored[:, 1:-1].all()   # EOS is not scored


def test_text_start_protocol_matches_one_bos_for_the_whole_text():
    tok = tiny_tokenizer()
    model = Recorder()
    r = ev.perplexity(model, tok, text_of(100), window=16, progress=False, special_tokens="text-start")
    assert int(model.seen[0][0, 0]) == BOS and all(int(w[0, 0]) != BOS for w in model.seen[1:])
    assert r["special_tokens"] == "text-start" and r["tokens"] == r["windows"] * 15
    model = Recorder()
    ev.perplexity(model, tok, text_of(100), window=16, progress=False, special_tokens="none")
    assert all(int((w == BOS).sum()) == 0 for w in model.seen)


def test_bad_protocol_is_a_clear_error():
    with pytest.raises(ValueError, match="special_tokens"):
        ev.perplexity(Recorder(), tiny_tokenizer(), text_of(100), window=16, progress=False, special_tokens="bos")
    with pytest.raises(ValueError, match="window"):
        ev.token_windows(tiny_tokenizer("<s> $A </s>"), text_of(100), 2)


def test_cli_calibration_rows_start_with_bos(monkeypatch):
    from slmkern import cli, data
    monkeypatch.setattr(data, "wikipedia_text", lambda max_chars=None: text_of(2000, seed=3))
    tok = tiny_tokenizer()
    batches = cli._calibration(tok, "causal-lm", 8, 32)
    rows = torch.cat([b["input_ids"] for b in batches])
    assert rows.shape == (8, 32)
    assert (rows[:, 0] == BOS).all(), "a calibration row without BOS"
    assert int((rows == BOS).sum()) == 8
    rows = torch.cat([b["input_ids"] for b in cli._calibration(tok, "causal-lm", 8, 32, special_tokens="text-start")])
    assert int(rows[0, 0]) == BOS and int((rows == BOS).sum()) == 1   # one BOS, at the start of the text read


def test_cli_eval_prints_the_protocol(monkeypatch, capsys):
    from slmkern import cli, data
    tok = tiny_tokenizer()
    monkeypatch.setattr(data, "wikipedia_text", lambda max_chars=None: text_of(400, seed=4))

    class TinyForCausalLM(Recorder):
        pass

    monkeypatch.setattr(cli, "_load_any", lambda name, kind="auto": (TinyForCausalLM(), tok))
    monkeypatch.setattr(ev, "decode_tokens_per_s", lambda *a, **k: {"decode_path": "hf"})
    assert cli.main(["eval", "--model", "x", "--window", "16", "--max-tokens", "64"]) == 0
    out = capsys.readouterr()
    assert "special tokens: per-window" in out.err + out.out and "<s>" in out.err + out.out
    assert cli.main(["eval", "--model", "x", "--window", "16", "--special-tokens", "text-start"]) == 0
    out = capsys.readouterr()
    assert "special tokens: text-start" in out.err + out.out
