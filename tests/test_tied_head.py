"""A tied lm_head stays tied unless it is quantized (issue 17, defect 2), in compress() and quantize_ alike.

Counted on bytes: the distinct storages behind the model's parameters and buffers, so a second
fp32 copy of the embedding shows up as vocab x dim x 4 more bytes.
"""
from __future__ import annotations

import torch
from torch import nn

from slmkern import compress, quantize_
from slmkern.config import Int4Config, Int8Config
from slmkern.nn import Int4Linear, Int8Embedding, Int8Linear

from _tiny import TiedLM

VOCAB, DIM = 50, 64
TABLE_BYTES = VOCAB * DIM * 4


def storage_bytes(model: nn.Module) -> int:
    """Bytes of the distinct storages behind every parameter and buffer (tied tensors count once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        s = t.untyped_storage()
        if s.data_ptr() in seen:
            continue
        seen.add(s.data_ptr())
        total += s.nbytes()
    return total


def table_copies(model: nn.Module) -> int:
    """How many distinct fp32 [VOCAB, DIM] storages the model holds."""
    ptrs = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())
            if tuple(t.shape) == (VOCAB, DIM) and t.dtype == torch.float32}
    return len(ptrs)


def test_compress_keeps_an_unquantized_tied_head_tied():
    m = TiedLM(VOCAB, DIM)
    before = storage_bytes(m)
    rep = compress(m, {"steps": [{"quantize": {"algorithm": "int8"}}]}, progress=False)
    assert isinstance(m.body, Int8Linear) and type(m.lm_head) is nn.Linear
    assert m.lm_head.weight is m.emb.weight, "the skipped head was untied"
    assert table_copies(m) == 1
    body_saved = DIM * DIM * 4 - (DIM * DIM + DIM * 4)     # fp32 weight -> int8 weight + fp32 scales
    assert storage_bytes(m) <= before - body_saved + 1024  # + the int8 kernel's packed copy, at most
    assert "dense" in rep.layers["lm_head"].format


def test_compress_quantized_tied_head_reports_the_embedding_copy():
    # an int4 head unties (an int8 head keeps one table instead: tests/test_tied_table.py)
    m = TiedLM(VOCAB, DIM)
    emb = m.emb.weight.detach().clone()
    rep = compress(m, {"steps": [{"quantize": {"algorithm": "rtn", "group_size": 32, "skip_names": [],
                                               "targets": ["lm_head"]}}]}, progress=False)
    assert isinstance(m.lm_head, Int4Linear)
    assert torch.equal(m.emb.weight, emb)                  # the embedding keeps its own fp32 table
    assert table_copies(m) == 1
    text = str(rep)
    assert "lm_head" in text and "tied" in text and f"{TABLE_BYTES:,}" in text, text


def test_quantize_follows_the_same_rule():
    m = TiedLM(VOCAB, DIM)
    rep = quantize_(m, Int8Config())
    assert type(m.lm_head) is nn.Linear and m.lm_head.weight is m.emb.weight and table_copies(m) == 1
    m = TiedLM(VOCAB, DIM)
    rep = quantize_(m, Int8Config(), overrides={"lm_head": Int8Config(activations="float")})
    assert isinstance(m.lm_head, Int8Linear) and isinstance(m.emb, Int8Embedding) and table_copies(m) == 0
    assert any("one table" in n and f"{TABLE_BYTES:,}" in n for n in rep.notes), rep.notes
    m = TiedLM(VOCAB, DIM)
    rep = quantize_(m, Int8Config(), overrides={"lm_head": Int4Config(group_size=32)})
    assert isinstance(m.lm_head, Int4Linear) and table_copies(m) == 1
    assert any("tied" in n and f"{TABLE_BYTES:,}" in n for n in rep.notes), rep.notes


def test_hf_tied_model_keeps_one_table_and_its_config_flag():
    import pytest
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    lm = transformers.LlamaForCausalLM(cfg).eval()
    assert lm.lm_head.weight is lm.model.embed_tokens.weight
    compress(lm, {"steps": [{"quantize": {"algorithm": "rtn", "group_size": 32}}]}, progress=False)
    assert lm.lm_head.weight is lm.model.embed_tokens.weight and table_copies(lm) == 1
    assert lm.config.tie_word_embeddings is True
    compress(lm, {"steps": [{"quantize": {"algorithm": "int8", "activations": "float", "skip_names": [],
                                          "targets": ["lm_head"]}}]}, progress=False)
    assert isinstance(lm.lm_head, Int8Linear) and table_copies(lm) == 0   # one table: the head's int8 codes
    assert isinstance(lm.model.embed_tokens, Int8Embedding) and lm.model.embed_tokens.head is lm.lm_head
    assert lm.config.tie_word_embeddings is False
