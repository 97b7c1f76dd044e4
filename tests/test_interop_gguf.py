"""GGUF import (slmkern.load_gguf): the file's own Q4_0/Q4_1/Q8_0 codes in our modules, bit for bit.

Small GGUF files are written here with gguf.GGUFWriter and quantized with the gguf package's own
quantizers; its dequantizer (gguf.quants.dequantize) is the reference.
"""
from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

from slmkern.formats import int4  # noqa: E402
from slmkern.interop import gguf as G  # noqa: E402
from slmkern.nn import Int4Linear, Int8Linear  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
QT = gguf.GGMLQuantizationType


def _weights(N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.05 + (torch.rand(N, 1, generator=g) - 0.5) * 0.02
    w[0, :32] = 0.0                       # an all-zero block (d = 0)
    w[1, 32:64] = 0.0123                  # a constant block (Q4_1: d = 0, m != 0)
    w[2, :32] = -w[2, :32].abs()          # an all-negative block (Q4_0: d > 0 with max|w| negative)
    return w.numpy().astype(np.float32)


def _ref(data, qtype) -> torch.Tensor:
    return torch.from_numpy(np.asarray(gguf.quants.dequantize(data, qtype), dtype=np.float32).copy())


# ----------------------------------------------------------------------------- block layouts
@pytest.mark.parametrize("N,K", [(48, 96), (5, 32), (17, 160)])
def test_q4_0_is_int4_symmetric_g32_bit_exact(N, K):
    w = _weights(N, K)
    data = gguf.quants.quantize(w, QT.Q4_0)
    q = G.q4_0_to_int4(data, (N, K), "t")
    assert q.zeros is None and q.scales.shape == (N, K // 32) and q.packed.shape == (N, K // 2)
    assert torch.equal(int4.dequantize(q.packed, q.scales, None, 32), _ref(data, QT.Q4_0))


def test_q4_0_nibble_order():
    # GGUF: element j in the low nibble, element j+16 in the high nibble of byte j; ours: pairs along k.
    block = np.zeros((1, 18), dtype=np.uint8)
    block[0, :2] = np.frombuffer(np.float16(1.0).tobytes(), dtype=np.uint8)
    block[0, 2:] = np.arange(16, dtype=np.uint8) | (np.uint8(15) - np.arange(16, dtype=np.uint8)) << 4
    codes = int4.unpack(G.q4_0_to_int4(block, (1, 32)).packed)[0]
    assert codes.tolist() == list(range(16)) + list(range(15, -1, -1))


@pytest.mark.parametrize("N,K", [(48, 96), (5, 32), (17, 160)])
def test_q4_1_offset_form_bit_exact(N, K):
    w = _weights(N, K, seed=1)
    data = gguf.quants.quantize(w, QT.Q4_1)
    q = G.q4_1_to_int4(data, (N, K), "t")
    ref = _ref(data, QT.Q4_1)
    assert torch.equal(q.dequantize(), ref)
    assert torch.equal(int4.dequantize_offset(q.packed, q.scales, q.offsets, 32), ref)


def test_q4_1_float_zero_points_are_not_exact():
    # why the offset form exists: (code - zf) * s with zf = -m/d misses d*q + m somewhere
    N, K = 256, 256
    data = gguf.quants.quantize(np.random.default_rng(2).standard_normal((N, K)).astype(np.float32) * 0.05,
                                QT.Q4_1)
    q = G.q4_1_to_int4(data, (N, K), "t")
    zf = int4.offset_zero_points(q.scales, q.offsets)
    codes = int4.unpack(q.packed).float().reshape(N, K // 32, 32)
    hqq = ((codes - zf.unsqueeze(-1)) * q.scales.unsqueeze(-1)).reshape(N, K)
    ref = _ref(data, QT.Q4_1)
    assert not torch.equal(hqq, ref)
    assert torch.allclose(hqq, ref, rtol=0, atol=1e-6)


def test_q8_0_per_row_only_when_exact():
    N, K = 8, 64
    w = _weights(N, K, seed=3)
    data = gguf.quants.quantize(w, QT.Q8_0)
    q, d = G.q8_0_blocks(data, (N, K), "t")
    assert torch.equal((q.float().reshape(N, -1, 32) * d.unsqueeze(-1)).reshape(N, K), _ref(data, QT.Q8_0))
    assert G.q8_0_per_row(q, d) is None           # random rows: per-32 scales differ
    w2 = w.copy()
    w2[:, :] = np.where(np.arange(K) % 32 == 0, 0.5, w2 * 0.1)   # every block of every row: max|w| = 0.5
    data2 = gguf.quants.quantize(w2, QT.Q8_0)
    q2, d2 = G.q8_0_blocks(data2, (N, K), "t")
    rows = G.q8_0_per_row(q2, d2)
    assert rows is not None
    assert torch.equal(rows[0].float() * rows[1].unsqueeze(1), _ref(data2, QT.Q8_0))


def test_bad_blocks_raise_naming_the_tensor():
    data = gguf.quants.quantize(_weights(4, 64), QT.Q4_1)
    with pytest.raises(ValueError, match=r"blk\.0\.ffn_up\.weight: Q4_1 .*K=48 is not a multiple of 32"):
        G.q4_1_to_int4(data, (4, 48), "blk.0.ffn_up.weight")
    with pytest.raises(ValueError, match=r"w: Q4_1 \[N=4, K=96\] needs 240 bytes"):
        G.q4_1_to_int4(data, (4, 96), "w")
    bad = np.array(data).copy()
    bad[1, :2] = np.frombuffer(np.float16(np.nan).tobytes(), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"w: block scale d contains NaN"):
        G.q4_1_to_int4(bad, (4, 64), "w")
    with pytest.raises(ValueError, match=r"w: Q4_0 stores blocks of 32 along K, but K=2 "):
        G.q4_0_to_int4(np.zeros((4, 18), np.uint8), (36, 2), "w")


# ----------------------------------------------------------------------------- modules
def _offset_module(N, K, seed=4, bias=False, special_blocks=True):
    w = _weights(N, K, seed=seed) if special_blocks else \
        np.random.default_rng(seed).standard_normal((N, K)).astype(np.float32) * 0.05
    data = gguf.quants.quantize(w, QT.Q4_1)
    q = G.q4_1_to_int4(data, (N, K), "t")
    lin = torch.nn.Linear(K, N, bias=bias)
    return G._int4_module(lin, q, "float"), _ref(data, QT.Q4_1), lin


def test_int4_offset_module_runs_the_exact_weight():
    mod, ref, _ = _offset_module(40, 96)
    assert isinstance(mod, Int4Linear) and mod.offsets
    assert torch.equal(mod.dequantized_weight(), ref)
    with torch.no_grad():
        eye = torch.eye(96)
        for M in (1, 3):   # one-hot rows read single weights back through the CPU kernel
            assert torch.equal(mod(eye[:M]), ref.T[:M])
        x = torch.randn(17, 96)
        torch.testing.assert_close(mod(x), x @ ref.T, rtol=1e-5, atol=1e-5)
        # through the op with the module's packed layout (torch.compile/export take this path): exact weight
        from slmkern import ops
        y_op = ops.w4a16_linear(x[:1], mod.weight, mod.weight_scale, mod.weight_zero, 32, None, mod.w_packed)
        assert torch.equal(ops.w4a16_linear(eye[:1], mod.weight, mod.weight_scale, mod.weight_zero, 32, None,
                                            mod.w_packed), ref.T[:1])
        torch.testing.assert_close(y_op, x[:1] @ ref.T, rtol=1e-5, atol=1e-5)
    # op level without the packed layout (float zero points -offset/s, as on CUDA): within an ulp of the
    # weight, except blocks with d = 0 and m != 0 (none here; load_gguf warns about them)
    mod2, ref2, _ = _offset_module(40, 96, special_blocks=False)
    from slmkern import reference
    w_ref = reference.int4_weight(mod2.weight, mod2.weight_scale, mod2.weight_zero, 32)
    torch.testing.assert_close(w_ref, ref2, rtol=0, atol=1e-7)


def test_int4_offset_module_round_trips():
    mod, ref, _ = _offset_module(24, 64, bias=True)
    cfg, tensors = mod.slmkern_config(), mod.canonical_tensors()
    assert cfg["offsets"] is True and set(tensors) == {"weight", "weight_scale", "weight_offset", "bias"}
    back = Int4Linear.from_canonical(tensors, cfg)
    assert torch.equal(back.dequantized_weight(), ref)
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(back(x), mod(x))
    with pytest.raises(ValueError, match="offsets: the offset form is asymmetric"):
        Int4Linear(64, 8, group_size=32, symmetric=True, offsets=True)


# ----------------------------------------------------------------------------- whole files
V, H, F, L, NH, NKV = 64, 64, 96, 2, 4, 2


def _write_tiny_llama(path, types: dict[str, object], tied=True, seed=0):
    """A tiny llama GGUF: every Linear quantized with gguf's own quantizer to types[name] (default Q4_0)."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(64)
    w.add_embedding_length(H)
    w.add_block_count(L)
    w.add_feed_forward_length(F)
    w.add_head_count(NH)
    w.add_head_count_kv(NKV)
    w.add_rope_dimension_count(H // NH)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(V)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<t{i}>" for i in range(V)])
    w.add_token_scores([0.0] * V)
    w.add_token_types([1] * V)

    def add(name, shape, qtype):
        x = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if qtype == "F32":
            w.add_tensor(name, x)
        else:
            t = QT[qtype]
            w.add_tensor(name, gguf.quants.quantize(x, t), raw_dtype=t)

    add("token_embd.weight", (V, H), types.get("token_embd", "Q8_0"))
    for i in range(L):
        add(f"blk.{i}.attn_norm.weight", (H,), "F32")
        add(f"blk.{i}.ffn_norm.weight", (H,), "F32")
        for name, shape in (("attn_q", (H, H)), ("attn_k", (NKV * H // NH, H)), ("attn_v", (NKV * H // NH, H)),
                            ("attn_output", (H, H)), ("ffn_gate", (F, H)), ("ffn_up", (F, H)),
                            ("ffn_down", (H, F))):
            add(f"blk.{i}.{name}.weight", shape, types.get(name, "Q4_0"))
    add("output_norm.weight", (H,), "F32")
    if not tied:
        add("output.weight", (V, H), types.get("output", "Q4_1"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _fp32_model(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


TYPES = {"attn_q": "Q4_1", "attn_k": "Q4_0", "attn_v": "Q4_1", "attn_output": "Q8_0", "ffn_gate": "Q4_0",
         "ffn_up": "Q4_1", "ffn_down": "Q5_0"}


def test_load_gguf_tiny_llama(tmp_path, caplog):
    import slmkern

    path = _write_tiny_llama(tmp_path / "tiny.gguf", TYPES, tied=False)
    ref = _fp32_model(path)
    with caplog.at_level(logging.INFO, logger="slmkern.gguf"):
        model, report = slmkern.load_gguf(path, return_report=True)
    acts = {(r.tensor.split(".", 2)[-1].removesuffix(".weight"), r.action) for r in report}
    for i in range(L):
        layer, rl = model.model.layers[i], ref.model.layers[i]
        for mod, rmod, cls, offsets in ((layer.self_attn.q_proj, rl.self_attn.q_proj, Int4Linear, True),
                                        (layer.self_attn.k_proj, rl.self_attn.k_proj, Int4Linear, False),
                                        (layer.self_attn.v_proj, rl.self_attn.v_proj, Int4Linear, True),
                                        (layer.mlp.gate_proj, rl.mlp.gate_proj, Int4Linear, False),
                                        (layer.mlp.up_proj, rl.mlp.up_proj, Int4Linear, True)):
            assert type(mod) is cls and mod.offsets is offsets and mod.group_size == 32
            # q/k rows are un-permuted the way transformers does it; every weight is the same fp32 bits
            assert torch.equal(mod.dequantized_weight(), rmod.weight.detach())
        assert type(layer.self_attn.o_proj) is Int8Linear      # Q8_0 with per-32 scales: requantized per row
        assert type(layer.mlp.down_proj) is Int8Linear          # Q5_0: no exact form, requantized
    assert type(model.lm_head) is Int4Linear and torch.equal(model.lm_head.dequantized_weight(), ref.lm_head.weight)
    assert ("attn_output", "requantized") in acts and ("ffn_down", "requantized") in acts
    logs = caplog.text
    assert "blk.0.attn_output.weight (Q8_0) -> model.layers.0.self_attn.o_proj: dequantized and requantized" in logs
    assert "blk.1.ffn_down.weight (Q5_0) -> model.layers.1.mlp.down_proj: dequantized and requantized" in logs
    # the dequantized weights of the direct (non-permuted) tensors equal gguf's own dequantizer
    reader = gguf.GGUFReader(str(path))
    up = next(t for t in reader.tensors if t.name == "blk.1.ffn_up.weight")
    assert torch.equal(model.model.layers[1].mlp.up_proj.dequantized_weight(), _ref(up.data, up.tensor_type))
    ids = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(ids).logits, ref(ids).logits
    assert a.abs().max() > 0.01
    torch.testing.assert_close(a, b, rtol=0, atol=3e-3 * b.abs().max().item())


def test_load_gguf_exact_types_match_fp32_logits(tmp_path):
    import slmkern

    path = _write_tiny_llama(tmp_path / "tiny.gguf", {"attn_output": "Q4_1", "ffn_down": "Q4_1"}, tied=True)
    ref = _fp32_model(path)
    model, report = slmkern.load_gguf(path, return_report=True)
    assert {r.action for r in report if r.tensor.startswith("blk.")} == {"exact"}
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, ref.model.embed_tokens.weight)
    ids = torch.randint(0, V, (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)


def test_load_gguf_rejects_bad_input(tmp_path):
    import slmkern

    with pytest.raises(FileNotFoundError, match="path: .* is not a file"):
        slmkern.load_gguf(tmp_path / "missing.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 64)
    with pytest.raises(ValueError, match="is not a GGUF file"):
        slmkern.load_gguf(bad)
    path = _write_tiny_llama(tmp_path / "tiny.gguf", {})
    with pytest.raises(ValueError, match="activations: expected 'float' or 'int8'"):
        slmkern.load_gguf(path, activations="int4")


def test_cli_compress_accepts_a_gguf_file(tmp_path, capsys):
    from slmkern import checkpoint, cli

    path = _write_tiny_llama(tmp_path / "tiny.gguf", {"ffn_down": "Q4_1"}, tied=True)
    ref = _fp32_model(path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - quantize: {algorithm: int8}\n")
    out = tmp_path / "out"
    rc = cli.main(["compress", "--model", str(path), "--recipe", str(recipe), "--out", str(out)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err[-2000:]
    assert "through slmkern.load_gguf" in cap.err and "saved to" in cap.out
    model = checkpoint.load(out)
    for i in range(L):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            mod = getattr(model.model.layers[i].self_attn, name)
            assert type(mod) is Int4Linear
            assert torch.equal(mod.dequantized_weight(), getattr(ref.model.layers[i].self_attn, name).weight)
        assert type(model.model.layers[i].mlp.down_proj) is Int4Linear and model.model.layers[i].mlp.down_proj.offsets
    ids = torch.randint(0, V, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():   # the saved model reloads and runs (the recipe only ever touches float Linears)
        b = ref(ids).logits
        torch.testing.assert_close(model(ids).logits, b, rtol=0, atol=3e-3 * b.abs().max().item())
    rc = cli.main(["compress", "--model", str(path), "--kind", "encoder", "--recipe", str(recipe), "--out",
                   str(tmp_path / "o2")])
    assert rc == 2 and "a GGUF file loads as a causal LM" in capsys.readouterr().err


class _CountingC:
    """Stands in for slmkern._C: counts the int4 kernel calls, forwards everything."""

    def __init__(self, real):
        self._real, self.calls = real, 0

    def __getattr__(self, name):
        fn = getattr(self._real, name)
        if name not in ("w4a16_linear", "w4a8_linear"):
            return fn

        def counted(*args):
            self.calls += 1
            return fn(*args)
        return counted


@pytest.mark.slow
def test_smollm2_gguf_import_matches_fp32_perplexity(monkeypatch):
    from slmkern import evaluation
    from slmkern._backends import cpu
    from slmkern.data import wikipedia_text
    from slmkern.models import load_model, model_path

    if not cpu.has_cpp():
        pytest.skip("slmkern._C is not built")
    d, f = model_path("smollm2")
    model, tok = load_model("smollm2")          # transformers' fp32 dequantization of the Q4_1 file
    text = wikipedia_text()
    text = text[:len(text) // 2]
    b = evaluation.perplexity(model, tok, text, window=512, max_tokens=2048, progress=False)
    counting = _CountingC(cpu._C)
    monkeypatch.setattr(cpu, "_C", counting)      # before the imported modules' first forward builds their plans
    with torch.no_grad():                         # what load_gguf does after the same transformers load
        report = G.import_linears(model, d / f)
    linears = [m for m in model.model.layers.modules() if isinstance(m, (torch.nn.Linear, Int4Linear))]
    assert len(linears) == 210 and all(type(m) is Int4Linear and m.offsets and m.group_size == 32 for m in linears)
    assert sum(r.action == "exact" for r in report) == 210
    assert model.lm_head.weight is model.model.embed_tokens.weight       # the Q8_0 table: exact fp32, tied
    a = evaluation.perplexity(model, tok, text, window=512, max_tokens=2048, progress=False)
    assert counting.calls >= 210 * a["windows"]                         # every Linear ran on our int4 kernel
    assert a["tokens"] == b["tokens"] > 2000
    assert abs(a["perplexity"] - b["perplexity"]) <= 1e-4 * b["perplexity"], (a, b)


def test_load_gguf_int8_activations(tmp_path):
    import slmkern

    path = _write_tiny_llama(tmp_path / "tiny.gguf", {"attn_output": "Q4_1", "ffn_down": "Q4_1"}, tied=True)
    ref = _fp32_model(path)
    model = slmkern.load_gguf(path, activations="int8")
    mods = [m for m in model.model.layers.modules() if isinstance(m, Int4Linear)]
    assert len(mods) == 7 * L and all(m.activations == "int8" for m in mods)
    assert all(torch.equal(m.dequantized_weight(), r.weight) for m, r in
               zip(mods, [r for r in ref.model.layers.modules() if isinstance(r, torch.nn.Linear)]))
    ids = torch.randint(0, V, (1, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():   # W4A8: the same weights, int8 activations (per-token rounding)
        b = ref(ids).logits
        torch.testing.assert_close(model(ids).logits, b, rtol=0, atol=0.05 * b.abs().max().item())
