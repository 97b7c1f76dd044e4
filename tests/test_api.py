"""quantize_ on real model structures: a transformers BERT built from a config in code."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import slmkern
from slmkern import Int8Config, quantize_
from slmkern.nn import Int8Linear

transformers = pytest.importorskip("transformers")


def tiny_bert() -> nn.Module:
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=96, max_position_embeddings=32)
    return transformers.BertModel(cfg).eval()


def n_linear(model: nn.Module) -> int:
    return sum(type(m) is nn.Linear for m in model.modules())


@pytest.mark.parametrize("activations", ["int8", "float"])
def test_quantize_bert_swaps_every_linear_and_stays_close(activations):
    model = tiny_bert()
    ids = torch.randint(0, 120, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
    total = n_linear(model)
    report = quantize_(model, Int8Config(activations=activations))
    assert total == 2 * 6 + 1  # q,k,v,o,inter,out per layer + pooler
    assert len(report.swapped) == 2 * 6   # the pooler stays dense: the head/pooler rule (issue 17)
    assert [fqn for fqn, _ in report.skipped] == ["pooler.dense"] and "pooler" in report.skipped[0][1]
    assert n_linear(model) == 1
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == total - 1
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1)).min()
    assert cos > 0.99, f"int8 model drifted: min cosine {cos:.4f}"
    assert "swapped 12 layer(s), skipped 1" in str(report)


def test_filter_fn_and_skip_reasons():
    model = tiny_bert()
    report = quantize_(model, Int8Config(), filter_fn=lambda m, fqn: "attention" in fqn)
    assert all("attention" in fqn for fqn, _ in report.swapped)
    assert len(report.swapped) == 2 * 4
    assert {why for _, why in report.skipped} == {"filter_fn returned False"}
    assert len(report.skipped) == 5


def test_default_skips_lm_head_by_name():
    model = nn.Sequential()
    model.add_module("body", nn.Linear(8, 8))
    model.add_module("lm_head", nn.Linear(8, 20))
    report = quantize_(model, Int8Config())
    assert [fqn for fqn, _ in report.swapped] == ["body"]
    assert report.skipped[0][0] == "lm_head" and "skip_names" in report.skipped[0][1]
    assert isinstance(model.lm_head, nn.Linear)


def test_bad_inputs():
    with pytest.raises(ValueError, match="no torch.nn.Linear"):
        quantize_(nn.Sequential(nn.ReLU()), Int8Config())
    with pytest.raises(TypeError, match="config: expected Int8Config or Int4Config"):
        quantize_(nn.Linear(2, 2), {"activations": "int8"})
    with pytest.raises(TypeError, match="model: expected torch.nn.Module"):
        quantize_("bert", Int8Config())
    with pytest.raises(ValueError, match="activations"):
        Int8Config(activations="fp8")


def test_config_json_round_trip():
    cfg = Int8Config(activations="float", skip_names=["head"])
    d = json.loads(cfg.to_json())
    assert d == {"type": "Int8Config", "activations": "float", "skip_names": ["head"], "smooth": None}
    assert Int8Config.from_dict(d) == cfg
    with pytest.raises(ValueError, match="config type"):
        Int8Config.from_dict({"type": "Int4Config"})


def test_info_names_every_op_and_isa():
    text = slmkern.info()
    assert "w8a8_linear" in text and "w8a16_linear" in text and "torch" in text
    assert "cuda" in text
