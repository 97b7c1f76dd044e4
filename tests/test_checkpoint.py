"""save / load: exact round trip in a fresh process, refusal to overwrite, no half-written directory,
and clear errors for truncated or tampered files (nothing is unpickled)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from _child_env import child_env
import torch
from torch import nn

from slmkern import checkpoint
from slmkern.checkpoint import CheckpointError, load, save
from slmkern.nn import Int4Linear, Int8Linear
from slmkern.recipes import compress
from tests._tiny import MLP, TiedLM, bert_batches, tiny_bert

ROOT = Path(__file__).resolve().parent.parent


def _compressed_mlp() -> nn.Module:
    m = MLP()
    compress(m, [{"quantize": {"algorithm": "int8", "targets": ["fc1"]}},
                 {"quantize": {"algorithm": "rtn", "group_size": 64, "activations": "int8", "targets": ["fc2"]}}],
             progress=False)
    return m


def test_round_trip_exact_in_a_fresh_process(tmp_path):
    m = _compressed_mlp()
    assert isinstance(m.fc1, Int8Linear) and isinstance(m.fc2, Int4Linear) and type(m.fc3) is nn.Linear
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(3))
    want = m(x)
    save(m, tmp_path / "ck")
    from safetensors.torch import save_file
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    script = f"""
import torch
from safetensors.torch import load_file, save_file
from slmkern.checkpoint import load
from _tiny import MLP
m = load({str(tmp_path / 'ck')!r}, MLP(seed=123))   # a different random skeleton: every weight must come from disk
x = load_file({str(tmp_path / 'x.safetensors')!r})["x"]
print(type(m.fc1).__name__, type(m.fc2).__name__, type(m.fc3).__name__)
save_file({{"y": m(x).detach()}}, {str(tmp_path / 'y.safetensors')!r})
"""
    env = child_env(ROOT / "tests")
    out = subprocess.run([sys.executable, "-P", "-c", script], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["Int8Linear", "Int4Linear", "Linear"]
    from safetensors.torch import load_file
    got = load_file(str(tmp_path / "y.safetensors"))["y"]
    assert torch.equal(got, want.detach())


def test_hf_model_rebuilt_from_its_config(tmp_path):
    bert = tiny_bert()
    compress(bert, {"ignore": ["classifier"], "steps": [{"quantize": {"algorithm": "int8"}}]}, progress=False)
    x = bert_batches(1)[0]
    with torch.no_grad():
        want = bert(**x).logits
    save(bert, tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "slmkern_config.json").read_text())
    assert cfg["hf_class"] == "BertForSequenceClassification"
    q = cfg["modules"]["bert.encoder.layer.0.attention.self.query"]
    assert q == {"class": "Int8Linear", "in_features": 64, "out_features": 64, "bias": True,
                 "activations": "int8", "dtype": "float32"}
    assert not any("w_packed" in k for k in cfg["tensors"])      # never the packed CPU layout
    back = load(tmp_path / "ck", fuse=False)
    assert isinstance(back.bert.encoder.layer[1].output.dense, Int8Linear)
    assert back.bert.encoder.layer[1].output.dense.w_packed is not None   # repacked here
    with torch.no_grad():
        assert torch.equal(back(**x).logits, want)
    # the default load fuses GELU into the intermediate linears (slmkern.nn.fuse: a 2e-7-relative GELU)
    fused = load(tmp_path / "ck")
    with torch.no_grad():
        torch.testing.assert_close(fused(**x).logits, want, rtol=0, atol=1e-4)


def test_tied_weights_are_stored_once(tmp_path):
    m = TiedLM()
    save(m, tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "slmkern_config.json").read_text())
    assert len(cfg["aliases"]) == 1
    m2 = TiedLM()
    with torch.no_grad():
        m2.emb.weight.zero_()
    load(tmp_path / "ck", m2)
    assert torch.equal(m2.emb.weight, m.emb.weight) and m2.lm_head.weight is m2.emb.weight


def test_existing_directory_is_refused_unless_overwrite(tmp_path):
    m = _compressed_mlp()
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists"):
        save(m, tmp_path / "ck")
    assert (tmp_path / "ck" / "keep.txt").read_text() == "mine"
    save(m, tmp_path / "ck", overwrite=True)
    assert not (tmp_path / "ck" / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]          # no temp dirs left


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch as st

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save(_compressed_mlp(), tmp_path / "ck")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def saved(tmp_path):
    save(_compressed_mlp(), tmp_path / "ck")
    return tmp_path / "ck"


def test_truncated_file(saved):
    f = saved / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load(saved, MLP())


def test_tampered_bytes(saved):
    f = saved / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0x40
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 does not match"):
        load(saved, MLP())


def _rewrite(saved: Path, fn) -> None:
    cfg = json.loads((saved / "slmkern_config.json").read_text())
    fn(cfg)
    (saved / "slmkern_config.json").write_text(json.dumps(cfg))


def test_tampered_header_with_matching_checksum(saved):
    f = saved / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:12] = b"!!!!"                                   # corrupt the JSON header itself
    f.write_bytes(bytes(data))
    import hashlib

    def fix(cfg):
        cfg["tensor_file"]["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    _rewrite(saved, fix)
    with pytest.raises(CheckpointError, match="cannot be parsed as safetensors"):
        load(saved, MLP())


@pytest.mark.parametrize("edit, msg", [
    (lambda c: c["tensors"]["fc1.weight"].update(shape=[128, 65]), "'fc1.weight' is \\[128, 64\\]"),
    (lambda c: c["tensors"].pop("fc2.weight_zero"), "tensor names differ"),
    (lambda c: c["modules"]["fc1"].update({"class": "Int3Linear"}), "'Int3Linear' is not available"),
    (lambda c: c["modules"]["fc2"].update({"group_size": 32}), "weight_scale"),
    (lambda c: c["modules"].update({"fc9": {"class": "Int8Linear"}}), "no such submodule"),
    (lambda c: c.update(slmkern_format_version=99), "slmkern_format_version"),
])
def test_config_not_matching_the_tensors(saved, edit, msg):
    _rewrite(saved, edit)
    with pytest.raises(CheckpointError, match=msg):
        load(saved, MLP())


def test_not_a_checkpoint_and_corrupt_json(tmp_path, saved):
    with pytest.raises(CheckpointError, match="not a slmkern checkpoint"):
        load(tmp_path / "nowhere", MLP())
    (saved / "slmkern_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load(saved, MLP())


def test_wrong_skeleton(saved):
    with pytest.raises(CheckpointError, match="no such submodule"):
        load(saved, TiedLM())
    m = MLP()
    m.extra = nn.Linear(2, 2)
    with pytest.raises(CheckpointError, match="does not match the model \\(missing \\['extra.weight'"):
        load(saved, m)
    m = MLP()
    m.fc3 = nn.Linear(96, 11)
    with pytest.raises(CheckpointError, match="size mismatch"):
        load(saved, m)


def test_from_canonical_checks_shapes():
    mod = Int8Linear.from_linear(nn.Linear(32, 16))
    t = mod.canonical_tensors()
    again = Int8Linear.from_canonical(t, mod.slmkern_config())
    x = torch.randn(3, 32)
    assert torch.equal(again(x), mod(x))
    bad = dict(t, weight=t["weight"][:, :31].contiguous())
    with pytest.raises(ValueError, match="'weight' is \\(16, 31\\)"):
        Int8Linear.from_canonical(bad, mod.slmkern_config())
    with pytest.raises(ValueError, match="missing \\['weight_scale'\\]"):
        Int8Linear.from_canonical({k: v for k, v in t.items() if k != "weight_scale"}, mod.slmkern_config())
    assert set(checkpoint.packed_module_classes()) >= {"Int8Linear", "Int4Linear"}


def test_hf_load_never_builds_the_dense_linears(tmp_path):
    """The skeleton's Linears start on meta (no memory); the ones that stay dense get real data."""
    with checkpoint._meta_linears():
        lin = nn.Linear(8, 4)
    assert lin.weight.is_meta and lin.bias.is_meta
    assert not nn.Linear(8, 4).weight.is_meta                  # the patch ends with the block

    import transformers
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(cfg).eval()
    compress(lm, {"ignore": ["lm_head", "model.layers.1.mlp.down_proj"],
                  "steps": [{"quantize": {"algorithm": "int8"}}]}, progress=False)
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        want = lm(input_ids=ids).logits
    save(lm, tmp_path / "ck")
    back = load(tmp_path / "ck")
    assert not any(t.is_meta for t in list(back.parameters()) + list(back.buffers()))
    assert type(back.model.layers[1].mlp.down_proj) is nn.Linear   # kept dense, filled from the file
    assert back.lm_head.weight is back.model.embed_tokens.weight    # still tied
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, want)
