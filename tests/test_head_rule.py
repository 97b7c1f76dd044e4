"""One rule for heads and poolers across quantize, prune and sparsify (issue 17, defect 4), and
sparsify never packs a layer as sparse below the unstructured kernel's measured crossover sparsity.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from slmkern import compress, quantize_, sparsify_
from slmkern.algorithms import _prune
from slmkern.algorithms.magnitude import magnitude_prune_
from slmkern.algorithms.wanda import wanda_prune_
from slmkern.api import UNSTRUCTURED_CROSSOVER_SPARSITY
from slmkern.config import Int8Config, SparseConfig
from slmkern.nn import Int8Linear, SparseLinear

from _tiny import bert_batches, tiny_bert

pytest.importorskip("transformers")

POOLER = "bert.pooler.dense"
HEAD = "classifier"
BODY = "bert.encoder.layer.0.intermediate.dense"


def _skips(report) -> dict[str, str]:
    return dict(report.skipped)


def test_quantize_prune_sparsify_give_heads_and_poolers_one_answer():
    q = tiny_bert()
    rq = quantize_(q, Int8Config())
    w = tiny_bert()
    rw = wanda_prune_(w, bert_batches(2), 0.5)
    rs = sparsify_(w, SparseConfig(format="unstructured"))
    for fqn in (POOLER, HEAD):
        assert type(q.get_submodule(fqn)) is nn.Linear, f"quantize_ converted {fqn}"
        assert type(w.get_submodule(fqn)) is nn.Linear, f"sparsify_ converted {fqn}"
        reason = _prune.head_reason(q, q.get_submodule(fqn), fqn)
        assert reason
        assert _skips(rq)[fqn] == _skips(rw)[fqn] == _skips(rs)[fqn] == reason
    assert isinstance(q.get_submodule(BODY), Int8Linear)
    assert isinstance(w.get_submodule(BODY), SparseLinear) and w.get_submodule(BODY).format == "unstructured"


def test_recipe_path_follows_the_same_rule():
    bert = tiny_bert()
    rep = compress(bert, {"steps": [{"quantize": {"algorithm": "int8"}}]}, progress=False)
    reason = _prune.head_reason(bert, bert.get_submodule(POOLER), POOLER)
    for fqn in (POOLER, HEAD):
        assert type(bert.get_submodule(fqn)) is nn.Linear
        assert rep.layers[fqn].format == "dense fp32" and _prune.head_reason(
            bert, bert.get_submodule(fqn), fqn) in rep.layers[fqn].note
    assert "pooler" in reason
    bert = tiny_bert()
    rep = compress(bert, {"steps": [{"prune": {"algorithm": "wanda", "pattern": 0.5}},
                                    {"sparsify": {"format": "unstructured"}}]},
                   calibration=bert_batches(2), progress=False)
    assert type(bert.get_submodule(POOLER)) is nn.Linear
    assert float((bert.get_submodule(POOLER).weight == 0).float().mean()) < 0.01     # not pruned either
    assert isinstance(bert.get_submodule(BODY), SparseLinear) and bert.get_submodule(BODY).format == "unstructured"


def test_explicit_selection_still_compresses_a_pooler():
    bert = tiny_bert()
    compress(bert, {"targets": ["bert.pooler"], "steps": [{"quantize": {"algorithm": "int8"}}]}, progress=False)
    assert isinstance(bert.get_submodule(POOLER), Int8Linear)
    bert = tiny_bert()
    quantize_(bert, Int8Config(), filter_fn=lambda m, fqn: fqn == POOLER)
    assert isinstance(bert.get_submodule(POOLER), Int8Linear)
    # skip_names=() / skip_names: [] takes every layer, heads and poolers included
    bert = tiny_bert()
    quantize_(bert, Int8Config(skip_names=()))
    assert isinstance(bert.get_submodule(POOLER), Int8Linear) and isinstance(bert.get_submodule(HEAD), Int8Linear)
    bert = tiny_bert()
    compress(bert, {"steps": [{"quantize": {"algorithm": "int8", "skip_names": []}}]}, progress=False)
    assert isinstance(bert.get_submodule(POOLER), Int8Linear) and isinstance(bert.get_submodule(HEAD), Int8Linear)


@pytest.mark.parametrize("values", ["float", "int8"])
def test_sparsify_never_packs_below_the_crossover(values):
    need = UNSTRUCTURED_CROSSOVER_SPARSITY[values]
    bert = tiny_bert()
    low, high = "bert.encoder.layer.0.output.dense", BODY
    magnitude_prune_(bert, max(0.0, need - 0.2), filter_fn=lambda m, fqn: fqn == low)
    magnitude_prune_(bert, min(0.95, need + 0.05), filter_fn=lambda m, fqn: fqn == high)
    rep = sparsify_(bert, SparseConfig(format="unstructured", values=values),
                    filter_fn=lambda m, fqn: fqn in (low, high, POOLER))
    assert bert.get_submodule(high).format == "unstructured"
    for fqn in (low, POOLER):   # explicitly selected, but too dense for the sparse kernel to pay off
        mod = bert.get_submodule(fqn)
        assert isinstance(mod, SparseLinear) and mod.format == "dense", f"{fqn} packed as {mod.format}"
        desc = dict(rep.swapped)[fqn]
        assert "crossover" in desc and f"{need:.0%}" in desc, desc
    # the recipe's sparsify step applies the same guard
    bert = tiny_bert()
    magnitude_prune_(bert, max(0.0, need - 0.2), filter_fn=lambda m, fqn: fqn == low)
    rep = compress(bert, {"targets": [low], "steps": [{"sparsify": {"format": "unstructured", "values": values}}]},
                   progress=False)
    assert bert.get_submodule(low).format == "dense"
    assert "crossover" in rep.layers[low].note
