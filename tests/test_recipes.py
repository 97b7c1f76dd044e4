"""Recipes: parsing (Python, YAML, JSON), every bad input, and what compress does to a model."""
from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn

from slmkern import Int4Config, Int8Config
from slmkern.formats import int4 as int4_format
from slmkern.nn import Int4Linear, Int8Linear
from slmkern.recipes import Recipe, RecipeError, StepUnavailable, compress, parse_recipe
from tests._tiny import MLP, TiedLM, bert_batches, tiny_bert

RECIPE = {"ignore": ["fc3"], "steps": [{"quantize": {"algorithm": "int8", "activations": "int8"}},
                                       {"distill": {"steps": 3, "lr": 1e-3}}]}
YAML = """
ignore: [fc3]
steps:
  - quantize: {algorithm: int8, activations: int8}
  - distill: {steps: 3, lr: 1.0e-3}
"""


def test_parse_python_yaml_json_agree(tmp_path):
    (tmp_path / "r.yaml").write_text(YAML)
    (tmp_path / "r.json").write_text(json.dumps(RECIPE))
    a = parse_recipe(RECIPE)
    assert parse_recipe(tmp_path / "r.yaml") == a == parse_recipe(str(tmp_path / "r.json"))
    assert a.ignore == ("fc3",) and [s.kind for s in a.steps] == ["quantize", "distill"]
    assert parse_recipe(a.to_dict()) == a                       # round trip
    assert parse_recipe(RECIPE["steps"]).steps == a.steps       # a bare list of steps
    assert isinstance(parse_recipe(a), Recipe)


@pytest.mark.parametrize("recipe, msg", [
    ({"steps": [{"quantize": {"algorithm": "awq"}}]}, "unknown quantize algorithm 'awq'"),
    ({"steps": [{"prune": {"algorithm": "lottery", "pattern": 0.5}}]}, "unknown prune algorithm"),
    ({"steps": [{"prune": {"algorithm": "wanda"}}]}, "needs a pattern"),
    ({"steps": [{"prune": {"algorithm": "wanda", "pattern": 1.5}}]}, "strictly between 0 and 1"),
    ({"steps": [{"prune": {"algorithm": "wanda", "pattern": "2-4"}}]}, "'N:M'"),
    ({"steps": [{"fold": {}}]}, "unknown step 'fold'"),
    ({"steps": [{"quantize": {"algorithm": "gptq", "group_size": 48}}]}, "group_size"),
    ({"steps": [{"quantize": {"algorithm": "int8", "bits": 3}}]}, "bad option for int8"),
    ({"steps": [{"distill": {"epochs": 3}}]}, "unknown option"),
    ({"steps": [{"sparsify": {"format": "4:8"}}]}, "format"),
    ({"steps": [{"sparsify": {}}, {"quantize": {"algorithm": "int8"}}]}, "must be the last step"),
    ({"steps": [{"quantize": {"algorithm": "int8"}}, {"prune": {"algorithm": "magnitude", "pattern": 0.5}}]},
     "'prune' must come before 'quantize'"),
    ({"steps": []}, "non-empty"),
    ({"stepz": []}, "unknown key"),
    ({"steps": [{"quantize": {}, "prune": {}}]}, "exactly one"),
    ({"ignore": [3], "steps": [{"quantize": {"algorithm": "int8"}}]}, "module-name patterns"),
    (42, "expected a list of steps"),
])
def test_bad_recipes_are_clear_errors(recipe, msg):
    with pytest.raises(RecipeError, match=msg if not msg.startswith("'") else None) as e:
        parse_recipe(recipe)
    assert msg.strip("'") in str(e.value) or msg in str(e.value)


def test_bad_recipe_files(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        parse_recipe(tmp_path / "missing.yaml")
    (tmp_path / "r.yaml").write_text("steps: [quantize: {algorithm: int8")
    with pytest.raises(RecipeError, match="could not be parsed"):
        parse_recipe(tmp_path / "r.yaml")
    (tmp_path / "r.txt").write_text(YAML)
    with pytest.raises(RecipeError, match=".yaml, .yml or .json"):
        parse_recipe(tmp_path / "r.txt")


def test_int8_matches_from_linear_and_report():
    m = MLP()
    ref = MLP()
    x = torch.randn(5, 64)
    rep = compress(m, {"ignore": ["fc3"], "steps": [{"quantize": {"algorithm": "int8"}}]}, progress=False)
    assert isinstance(m.fc1, Int8Linear) and isinstance(m.fc2, Int8Linear) and type(m.fc3) is nn.Linear
    for name in ("fc1", "fc2"):
        want = Int8Linear.from_linear(getattr(ref, name))
        assert torch.equal(getattr(m, name).weight, want.weight)
        assert torch.equal(getattr(m, name).weight_scale, want.weight_scale)
    assert rep.layers["fc1"].format == "int8 W8A8" and rep.layers["fc3"].format == "dense fp32"
    assert "ignore" in rep.layers["fc3"].note
    assert rep.layers["fc1"].bytes == 128 * 64 + 128 * 4 + 128 * 4
    assert 0 < rep.layers["fc1"].rel_err < 0.02
    assert rep.total_bytes() == sum(r.bytes for r in rep.layers.values())
    assert "fc1" in str(rep) and "total" in str(rep)
    y = m(x)
    assert (y - ref(x)).abs().max() < 0.05 * ref(x).abs().max()


def test_int4_rtn_matches_from_linear_and_shape_it_cannot_take_stays_dense():
    m, ref = MLP(), MLP()
    rep = compress(m, [{"quantize": {"algorithm": "rtn", "group_size": 64, "symmetric": True}}], progress=False)
    for name in ("fc1", "fc2"):
        want = Int4Linear.from_linear(getattr(ref, name), 64, True, "float", "rtn", "mse")
        assert torch.equal(getattr(m, name).weight, want.weight)
        assert torch.equal(getattr(m, name).weight_scale, want.weight_scale)
    assert type(m.fc3) is nn.Linear                      # K=96 is not a multiple of 64
    assert "int4 kernel cannot take in_features=96" in rep.layers["fc3"].note
    assert rep.layers["fc3"].format == "dense fp32"


def test_step_targets_and_two_quantize_steps():
    m = MLP()
    compress(m, [{"quantize": {"algorithm": "int8", "activations": "float", "targets": ["fc3"]}},
                 {"quantize": {"algorithm": "hqq", "group_size": 64}}], progress=False)
    assert isinstance(m.fc3, Int8Linear) and m.fc3.activations == "float"
    assert isinstance(m.fc1, Int4Linear) and isinstance(m.fc2, Int4Linear)


def test_regex_patterns_and_parent_names():
    bert = tiny_bert()
    compress(bert, {"ignore": ["re:.*attention.*", "classifier"],
                    "steps": [{"quantize": {"algorithm": "int8"}}]}, progress=False)
    assert type(bert.bert.encoder.layer[0].attention.self.query) is nn.Linear
    assert isinstance(bert.bert.encoder.layer[0].intermediate.dense, Int8Linear)
    bert = tiny_bert()
    compress(bert, {"targets": ["bert.pooler"], "steps": [{"quantize": {"algorithm": "int8"}}]}, progress=False)
    assert isinstance(bert.bert.pooler.dense, Int8Linear)
    assert type(bert.bert.encoder.layer[0].intermediate.dense) is nn.Linear


def test_tied_weight_is_untied_before_quantizing():
    m = TiedLM()
    emb = m.emb.weight.detach().clone()
    compress(m, {"steps": [{"quantize": {"algorithm": "int8", "skip_names": [], "targets": ["lm_head"]}}]},
             progress=False)
    assert isinstance(m.lm_head, Int8Linear) and type(m.body) is nn.Linear
    # the grid was written into the head's own copy, once: the one kept table is the embedding's RTN int8 table
    from slmkern.formats import int8 as int8_format
    from slmkern.nn import Int8Embedding
    q, s = int8_format.quantize_per_channel(emb)
    assert torch.equal(m.lm_head.weight, q) and torch.equal(m.lm_head.weight_scale, s)
    assert isinstance(m.emb, Int8Embedding) and m.emb.head is m.lm_head


def test_gptq_step_on_bert_beats_rtn():
    bert, ref = tiny_bert(), tiny_bert()
    calib = bert_batches(3)
    rep = compress(bert, {"ignore": ["classifier"],
                          "steps": [{"quantize": {"algorithm": "gptq", "group_size": 64}}]}, calibration=calib,
                   progress=False)
    assert isinstance(bert.bert.encoder.layer[1].output.dense, Int4Linear)
    assert "gptq out-err" in rep.layers["bert.encoder.layer.0.attention.self.query"].note
    with torch.no_grad():
        x = bert_batches(1, seed=9)[0]
        err = (bert(**x).logits - ref(**x).logits).abs().max()
    assert err < 0.05


# ----------------------------------------------------------------------------- bad inputs to compress
def test_model_without_linear_layers():
    with pytest.raises(ValueError, match="no torch.nn.Linear"):
        compress(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)), [{"quantize": {"algorithm": "int8"}}])


def test_module_pattern_matching_nothing():
    with pytest.raises(RecipeError, match="'decoder.\\*' matches no module"):
        compress(MLP(), {"ignore": ["decoder.*"], "steps": [{"quantize": {"algorithm": "int8"}}]})
    with pytest.raises(RecipeError, match="matches no module"):
        compress(MLP(), {"targets": ["re:fc[7-9]"], "steps": [{"quantize": {"algorithm": "int8"}}]})
    with pytest.raises(RecipeError, match="leave no nn.Linear"):
        compress(MLP(), {"ignore": ["fc*"], "steps": [{"quantize": {"algorithm": "int8"}}]})
    m = MLP()
    with pytest.raises(RecipeError, match="matches no selected layer"):
        compress(m, [{"quantize": {"algorithm": "int8", "targets": ["head"]}}])
    assert type(m.fc1) is nn.Linear


def test_calibration_of_the_wrong_shape():
    recipe = [{"quantize": {"algorithm": "gptq", "group_size": 64}}]
    m = MLP()
    with pytest.raises(ValueError, match="calibration: batch 0 cannot be run through the model"):
        compress(m, recipe, calibration=[torch.randn(4, 65)])
    assert type(m.fc1) is nn.Linear                             # untouched
    with pytest.raises(ValueError, match="calibration: batch 0 'input_ids' has shape"):
        compress(tiny_bert(), recipe, calibration=[{"input_ids": torch.zeros(12, dtype=torch.long)}])
    with pytest.raises(ValueError, match="needs calibration data"):
        compress(MLP(), recipe)


def test_missing_algorithm_is_a_clear_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "slmkern.algorithms.wanda", None)   # import fails as if not built
    m = MLP()
    with pytest.raises(StepUnavailable, match="step 'prune' needs slmkern.algorithms.wanda"):
        compress(m, [{"prune": {"algorithm": "wanda", "pattern": 0.5}}], calibration=[torch.randn(4, 64)])
    assert type(m.fc1) is nn.Linear


def test_missing_sparse_kernel_is_a_clear_message(monkeypatch):
    import slmkern.nn as snn
    monkeypatch.delattr(snn, "SparseLinear", raising=False)
    with pytest.raises(StepUnavailable, match="step 'sparsify' needs slmkern.nn.SparseLinear"):
        compress(MLP(), [{"sparsify": {"format": "2:4"}}])


def test_configs_still_accept_the_recipe_fields():
    # the recipe maps straight onto the frozen configs
    from slmkern.recipes import _quant_config
    assert _quant_config({"algorithm": "int8", "activations": "float"}, "x") == Int8Config(activations="float")
    assert _quant_config({"algorithm": "gptq", "config": {"group_size": 64}}, "x") == \
        Int4Config(group_size=64, method="gptq")
    assert int4_format.SUPPORTED_GROUP_SIZES
