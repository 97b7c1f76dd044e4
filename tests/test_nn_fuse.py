"""slmkern.nn.fuse: GELU into the preceding Int8Linear's epilogue, query/key/value as one kernel call.

On a tiny BERT built from a config. The sibling grouping is bit-identical to the unfused model; the GELU
epilogue is reference.gelu_epilogue instead of torch's erf GELU (within 2e-7 |v| + 1e-7), so the fused
model is compared with a tolerance far below the int8 quantization error, and bit for bit against a
model whose GELUs are replaced by that same function.
"""
from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

import slmkern
from _tiny import bert_batches, tiny_bert
from slmkern import reference
from slmkern._backends import cpu as cpu_backend
from slmkern.nn import Int8Linear, fuse_, fuse_gelu_, fuse_siblings_
from slmkern.nn.fuse import FusedActivation, SiblingGroup

pytestmark = pytest.mark.skipif(not cpu_backend.has_cpp(), reason="needs slmkern._C")


def compressed_bert(act: str = "int7"):
    model = tiny_bert()
    slmkern.compress(model, {"steps": [{"quantize": {"algorithm": "int8", "activations": act}}]}, progress=False)
    return model.eval()


class RefGelu(nn.Module):
    def forward(self, x):
        return reference.gelu_epilogue(x).to(x.dtype)


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("act", ["int8", "int7"])
def test_gelu_fusion_matches_the_epilogue_function(act):
    model = compressed_bert(act)
    spec = copy.deepcopy(model)
    for layer in spec.bert.encoder.layer:
        layer.intermediate.intermediate_act_fn = RefGelu()
    plain = copy.deepcopy(model)
    fused = fuse_gelu_(model, force=True)
    assert fused == [f"bert.encoder.layer.{i}.intermediate.dense" for i in range(2)]
    inter = model.bert.encoder.layer[0].intermediate
    assert isinstance(inter.intermediate_act_fn, FusedActivation) and inter.dense.epilogue == "gelu"
    assert "epilogue=gelu" in repr(inter.dense) and "GELU fused into" in repr(inter.intermediate_act_fn)
    for batch in bert_batches(2):
        got = logits(model, batch)
        assert torch.equal(got, logits(spec, batch))
        torch.testing.assert_close(got, logits(plain, batch), rtol=0, atol=1e-4)
    assert fuse_gelu_(model, force=True) == []          # idempotent


def test_siblings_are_bit_identical_and_one_call():
    model = compressed_bert()
    plain = copy.deepcopy(model)
    assert fuse_siblings_(model) == [f"bert.encoder.layer.{i}.attention.self" for i in range(2)]
    att = model.bert.encoder.layer[0].attention.self
    group = att.query.__dict__["_sibling"][0]
    assert isinstance(group, SiblingGroup) and group.members == [att.query, att.key, att.value]
    calls = []
    plan = group.fused._direct_plan()
    group.fused.__dict__["_plan"] = lambda x, threads=0: calls.append(x) or plan(x, threads)
    group.fused._direct_plan = lambda: group.fused.__dict__["_plan"]
    for batch in bert_batches(3):
        assert torch.equal(logits(model, batch), logits(plain, batch))
    assert len(calls) == 3      # one stacked call per forward in layer 0, not three
    assert set(model.state_dict()) == set(plain.state_dict())   # nothing new is saved


def test_a_changed_member_makes_the_group_step_aside():
    model = compressed_bert()
    fuse_siblings_(model)
    att = model.bert.encoder.layer[1].attention.self
    other = compressed_bert()
    other.bert.encoder.layer[1].attention.self.key.load_state_dict(
        Int8Linear.from_linear(nn.Linear(64, 64), activations="int7").state_dict())
    att.key.load_state_dict(other.bert.encoder.layer[1].attention.self.key.state_dict())
    batch = bert_batches(1)[0]
    assert torch.equal(logits(model, batch), logits(other, batch))
    assert att.query.__dict__["_sibling"][0].dead


def test_threads_share_a_fused_model():
    model = compressed_bert()
    plain = copy.deepcopy(model)
    fuse_(model)
    batches = bert_batches(4, seed=3)
    want = [logits(plain, b) for b in batches]
    errors = []

    def work(i):
        for j in range(15):
            k = (i + j) % len(batches)
            # within the GELU epilogue's tolerance; another thread's slices would be off by O(1)
            if not torch.allclose(logits(model, batches[k]), want[k], rtol=0, atol=1e-4):
                errors.append((i, j))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_save_load_refuses_nothing_and_fuses_again(tmp_path):
    model = compressed_bert()
    plain = copy.deepcopy(model)
    fuse_(model)
    batch = bert_batches(1)[0]
    slmkern.save(model, tmp_path / "m")
    back = slmkern.load(tmp_path / "m", tiny_bert())          # the skeleton still has its GELUs
    if cpu_backend.fuses_gelu():
        assert back.bert.encoder.layer[0].intermediate.dense.epilogue == "gelu"
    assert "_sibling" in back.bert.encoder.layer[0].attention.self.value.__dict__
    assert torch.equal(logits(back, batch), logits(model, batch))
    unfused = slmkern.load(tmp_path / "m", tiny_bert(), fuse=False)
    assert torch.equal(logits(unfused, batch), logits(plain, batch))
    # deepcopy keeps working (the group's per-thread state is not copied; its __getstate__ drops it)
    again = copy.deepcopy(model)
    assert torch.equal(logits(again, batch), logits(model, batch))
    group = again.bert.encoder.layer[0].attention.self.query.__dict__["_sibling"][0]
    assert group.members[0] is again.bert.encoder.layer[0].attention.self.query


def test_compile_of_a_fused_model():
    model = compressed_bert()
    fuse_(model)
    batch = bert_batches(1)[0]
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(logits(compiled, batch), logits(model, batch), rtol=0, atol=1e-5)


def test_no_gelu_fusion_where_the_kernel_would_not_fuse(monkeypatch):
    model = compressed_bert()
    monkeypatch.setattr(cpu_backend, "fuses_gelu", lambda: False)
    assert fuse_gelu_(model) == []
    assert model.bert.encoder.layer[0].intermediate.dense.epilogue == "none"
    with pytest.raises(ValueError, match="epilogue"):
        Int8Linear(8, 8, activations="float").set_epilogue("gelu")
    with pytest.raises(ValueError, match="epilogue"):
        Int8Linear(8, 8).set_epilogue("silu")


def test_sequential_linear_gelu_pattern():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 8), nn.GELU(approximate="tanh"))
    seq[0] = Int8Linear.from_linear(seq[0], activations="int7")
    seq[2] = Int8Linear.from_linear(seq[2], activations="int7")
    x = torch.randn(5, 32)
    want = seq(x)
    assert fuse_gelu_(seq, force=True) == ["0"]           # the tanh GELU is a different function: left alone
    assert isinstance(seq[1], FusedActivation) and isinstance(seq[3], nn.GELU)
    torch.testing.assert_close(seq(x), want, rtol=0, atol=1e-5)
