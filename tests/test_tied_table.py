"""One table for a tied head quantized to int8 (issue 17, item 4): the input embedding reads the int8 head's
codes and scales (slmkern.nn.Int8Embedding) instead of keeping its own fp32 copy.

Bytes are counted on the distinct storages behind the model's parameters and buffers.
"""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import slmkern
from slmkern import compress, quantize_
from slmkern._backends import cpu as cpu_backend
from slmkern.config import Int4Config, Int8Config
from slmkern.nn import Int4Linear, Int8Embedding, Int8Linear

transformers = pytest.importorskip("transformers")

VOCAB, DIM = 50, 64          # 50 rows: not a multiple of the 16-row tiles
TABLE_FP32 = VOCAB * DIM * 4


def storage_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        s = t.untyped_storage()
        if s.data_ptr() in seen:
            continue
        seen.add(s.data_ptr())
        total += s.nbytes()
    return total


def fp32_tables(model: nn.Module) -> int:
    return len({t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())
                if tuple(t.shape) == (VOCAB, DIM) and t.is_floating_point()})


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=True, pad_token_id=3)
    model = transformers.LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def ids(T: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(seed))


def head_rows(head: Int8Linear, i: torch.Tensor) -> torch.Tensor:
    return head.weight[i].float() * head.weight_scale[i].unsqueeze(-1)


def untied_reference(model):
    """The same compressed model with the embedding as its own fp32 table (the dequantized head rows)."""
    ref = copy.deepcopy(model)
    table = head_rows(ref.lm_head, torch.arange(VOCAB))
    ref.model.embed_tokens = nn.Embedding.from_pretrained(table, freeze=True, padding_idx=3)
    return ref


HEAD_STEP = {"quantize": {"algorithm": "int8", "activations": "float", "skip_names": [], "targets": ["lm_head"]}}


# ----------------------------------------------------------------------------- the module
@pytest.mark.parametrize("N,K", [(49, 13), (50, 64), (16, 4), (1, 1), (33, 576)])
@pytest.mark.parametrize("canonical", [False, True])
def test_rows_are_the_dequantized_head_rows_bit_for_bit(N, K, canonical, monkeypatch):
    torch.manual_seed(N * 1000 + K)
    head = Int8Linear.from_linear(nn.Linear(K, N, bias=False), activations="float")
    if canonical:
        head.unpack_()                     # canonical codes present (as off the CPU / without the C++ kernels)
        assert head._buffers["weight"] is not None
    elif cpu_backend.has_cpp():
        assert head._buffers["weight"] is None and head.w_packed is not None   # packed layout only
    codes = head.weight.clone()
    emb = Int8Embedding(head)
    i = torch.randint(0, N, (3, 7))
    i[0, 0], i[-1, -1] = 0, N - 1
    want = codes[i].float() * head.weight_scale[i].unsqueeze(-1)
    if not canonical:   # no full unpack per call: the rows come from a strided view of the tiles
        monkeypatch.setattr(type(head), "_unpack_cpu", lambda *a, **k: (_ for _ in ()).throw(AssertionError("unpack")))
    got = emb(i)
    assert got.dtype == torch.float32 and got.shape == (3, 7, K)
    assert torch.equal(got, want)
    assert torch.equal(emb.codes(i), codes[i])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_and_padding_idx_follow_the_embedding(dtype):
    torch.manual_seed(0)
    e = nn.Embedding(VOCAB, DIM, padding_idx=3).to(dtype)
    head = Int8Linear.from_linear(nn.Linear(DIM, VOCAB, bias=False), activations="float")
    q = Int8Embedding.from_embedding(e, head)
    assert q.padding_idx == 3 and q.dtype == dtype and (q.num_embeddings, q.embedding_dim) == (VOCAB, DIM)
    i = ids()
    assert q(i).dtype == dtype and torch.equal(q(i), head_rows(head, i).to(dtype))
    q.float()
    assert q(i).dtype == torch.float32
    q.half()
    assert q(i).dtype == torch.float16


def test_bad_input_names_the_argument():
    head = Int8Linear.from_linear(nn.Linear(DIM, VOCAB, bias=False))
    q = Int8Embedding(head)
    with pytest.raises(TypeError, match="input"):
        q(torch.zeros(3))
    with pytest.raises(IndexError, match="input"):
        q(torch.tensor([0, VOCAB]))
    with pytest.raises(IndexError, match="input"):
        q(torch.tensor([-1]))
    with pytest.raises(TypeError, match="head"):
        Int8Embedding(nn.Linear(DIM, VOCAB))
    with pytest.raises(ValueError, match="padding_idx"):
        Int8Embedding(head, padding_idx=VOCAB)
    with pytest.raises(ValueError, match="head"):
        Int8Embedding.from_embedding(nn.Embedding(VOCAB + 1, DIM), head)


# ----------------------------------------------------------------------------- compress / quantize_
@pytest.mark.parametrize("activations", ["float", "int8"])
def test_compress_keeps_one_table(activations):
    model = tiny_llama()
    step = {"quantize": dict(HEAD_STEP["quantize"], activations=activations)}
    rep = compress(model, {"steps": [step]}, progress=False)
    head, emb = model.lm_head, model.model.embed_tokens
    assert isinstance(head, Int8Linear) and head.activations == activations
    assert isinstance(emb, Int8Embedding) and emb.head is head, type(emb).__name__
    assert fp32_tables(model) == 0
    # bytes: exactly one fp32 table less than the same model with its own fp32 embedding
    ref = untied_reference(model)
    assert storage_bytes(ref) - storage_bytes(model) == TABLE_FP32
    assert model.get_input_embeddings() is emb and emb.padding_idx == 3
    text = str(rep)
    assert "one table" in text and f"{TABLE_FP32:,}" in text, text
    # the embedding's rows are the head's dequantized rows, bit for bit
    i = ids()
    assert torch.equal(emb(i), head_rows(head, i))
    # logits equal those of the same compressed model with an untied fp32 copy of those rows
    with torch.no_grad():
        a, b = model(input_ids=i).logits, ref(input_ids=i).logits
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_compress_one_table_is_the_embeddings_own_int8_table():
    model = tiny_llama()
    table = model.model.embed_tokens.weight.detach().clone()
    compress(model, {"steps": [{"quantize": {"algorithm": "int8", "activations": "int8"}}, HEAD_STEP]},
             progress=False)
    from slmkern.formats import int8 as int8_format
    q, s = int8_format.quantize_per_channel(table)
    assert torch.equal(model.lm_head.weight, q) and torch.equal(model.lm_head.weight_scale, s)
    assert isinstance(model.model.embed_tokens, Int8Embedding)


def test_quantize_keeps_one_table():
    model = tiny_llama()
    rep = quantize_(model, Int8Config(activations="float"), filter_fn=lambda m, fqn: fqn == "lm_head")
    assert isinstance(model.model.embed_tokens, Int8Embedding) and model.model.embed_tokens.head is model.lm_head
    assert fp32_tables(model) == 0
    assert any("one table" in n and f"{TABLE_FP32:,}" in n for n in rep.notes), rep.notes
    assert model.config.tie_word_embeddings is False   # no shared parameter for HF's tie_weights to redo


def test_int4_head_keeps_todays_untied_copy():
    model = tiny_llama()
    rep = quantize_(model, Int4Config(group_size=32), filter_fn=lambda m, fqn: fqn == "lm_head")
    assert isinstance(model.lm_head, Int4Linear) and type(model.model.embed_tokens) is nn.Embedding
    assert fp32_tables(model) == 1
    assert any("own float32 copy" in n for n in rep.notes), rep.notes


def test_weight_is_the_dequantized_table_read_only():
    model = tiny_llama()
    compress(model, {"steps": [HEAD_STEP]}, progress=False)
    emb, head = model.get_input_embeddings(), model.lm_head
    w = emb.weight                                   # what Hugging Face code reads (shape, dtype, device, values)
    assert type(w) is torch.Tensor and not w.requires_grad
    assert w.shape == (VOCAB, DIM) and w.dtype == emb.dtype and torch.equal(w, head_rows(head, torch.arange(VOCAB)))
    assert emb.weight is not w                       # a new tensor each read: writing into it changes nothing
    w.zero_()
    i = ids()
    assert torch.equal(emb(i), head_rows(head, i))
    with pytest.raises(AttributeError, match="weight"):
        emb.weight = torch.zeros(VOCAB, DIM)
    # not a parameter or buffer: saved once, under the head; slmkern.save's checkpoint is unchanged
    assert list(emb.named_parameters()) == [] and list(emb.named_buffers()) == []
    assert not any(k.startswith("model.embed_tokens") for k in model.state_dict())
    assert emb.to(torch.bfloat16).weight.dtype == torch.bfloat16
    emb.to(torch.float32)
    # Hugging Face: tie_weights leaves the int8 head alone (tie_word_embeddings was cleared), a resize to the same
    # size is a no-op, any other size is refused by transformers itself (it resizes nn.Embedding only)
    with torch.no_grad():
        want = model(input_ids=i).logits
    model.tie_weights()
    assert model.resize_token_embeddings(VOCAB) is emb
    with pytest.raises(TypeError, match="Embedding"):
        model.resize_token_embeddings(VOCAB + 8)
    assert model.model.embed_tokens is emb and emb.head is model.lm_head and isinstance(model.lm_head, Int8Linear)
    assert emb.num_embeddings == VOCAB
    with torch.no_grad():
        assert torch.equal(model(input_ids=i).logits, want)


def test_later_steps_do_not_materialise_the_table(monkeypatch):
    # the head rule (every model-level entry point asks it of each Linear) looks for a shared parameter, and an
    # Int8Embedding has none: it must not read the weight property (a full dequantized table per Linear)
    model = tiny_llama()
    compress(model, {"steps": [HEAD_STEP]}, progress=False)
    monkeypatch.setattr(Int8Embedding, "dequantized_table", lambda self: pytest.fail("the table was materialised"))
    rep = quantize_(model, Int8Config())
    assert isinstance(model.model.layers[0].mlp.up_proj, Int8Linear), rep


def test_pickle_and_deepcopy_keep_one_table():
    model = tiny_llama()
    compress(model, {"steps": [HEAD_STEP]}, progress=False)
    i = ids()
    with torch.no_grad():
        want = model(input_ids=i).logits
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for how, m in {"deepcopy": copy.deepcopy(model), "pickle": torch.load(buf, weights_only=False)}.items():
        emb = m.model.embed_tokens
        assert isinstance(emb, Int8Embedding) and emb.head is m.lm_head and emb.head is not model.lm_head, how
        assert fp32_tables(m) == 0, how
        with torch.no_grad():
            assert torch.equal(m(input_ids=i).logits, want), how
    alone = copy.deepcopy(model.model.embed_tokens)      # an embedding copied on its own takes its head along
    assert alone.head is not model.lm_head and torch.equal(alone(i), model.model.embed_tokens(i))


# ----------------------------------------------------------------------------- save / load, decoder
def test_save_load_round_trip(tmp_path):
    model = tiny_llama()
    compress(model, {"steps": [HEAD_STEP]}, progress=False)
    i = ids()
    with torch.no_grad():
        want = model(input_ids=i).logits
    out = slmkern.save(model, tmp_path / "ck")
    cfg = slmkern.checkpoint.read_config(out)
    assert not any(k.startswith("model.embed_tokens") for k in cfg["tensors"]), "the table is stored twice"
    assert cfg["tied_embeddings"]["model.embed_tokens"]["head"] == "lm_head"
    assert (out / "model.safetensors").stat().st_size < storage_bytes(untied_reference(model)) - TABLE_FP32 + 4096
    back = slmkern.load(out)
    emb = back.model.embed_tokens
    assert isinstance(emb, Int8Embedding) and emb.head is back.lm_head and emb.padding_idx == 3
    assert fp32_tables(back) == 0
    with torch.no_grad():
        assert torch.equal(back(input_ids=i).logits, want)


def test_lean_decoder_runs_the_int8_table():
    from slmkern.decoder import LeanDecoder, unsupported_reason
    model = tiny_llama()
    quantize_(model, Int8Config(), overrides={"lm_head": Int8Config(activations="float")})
    assert isinstance(model.model.embed_tokens, Int8Embedding)
    assert unsupported_reason(model, 64) is None
    i = ids()[:1]
    with torch.inference_mode():
        ref = model(input_ids=i, logits_to_keep=1).logits[:, -1]
        assert torch.equal(LeanDecoder(model, 64).logits(i), ref)
    res = slmkern.generate(model, None, i, max_new_tokens=4, stop_at_eos=False)
    assert res.path == "lean"


def test_compressed_tensors_export_writes_the_embedding_rows(tmp_path):
    from safetensors.torch import load_file

    from slmkern.interop.compressed_tensors import save_compressed
    model = tiny_llama()
    compress(model, {"steps": [HEAD_STEP]}, progress=False)
    save_compressed(model, tmp_path / "ct")
    t = load_file(str(tmp_path / "ct" / "model.safetensors"))
    # the HF format has no shared int8 table: the embedding is written as its own rows (config untied)
    assert torch.equal(t["model.embed_tokens.weight"], head_rows(model.lm_head, torch.arange(VOCAB)))


def test_smoothed_tied_head_does_not_scale_the_embedding():
    # Int8Config(smooth=...) folds scales into the head's weight: into its own copy, never the shared embedding;
    # that head's table is then not the embedding's, so the embedding keeps its fp32 copy (and the report says so)
    model = tiny_llama()
    ref = copy.deepcopy(model)
    table = model.model.embed_tokens.weight.detach().clone()
    calib = [ids(16, seed) for seed in range(4)]
    rep = quantize_(model, Int8Config(activations="float", smooth=0.5), filter_fn=lambda m, fqn: fqn == "lm_head",
                    calibration=calib)
    emb = model.model.embed_tokens
    assert type(emb) is nn.Embedding and torch.equal(emb.weight, table)
    assert any("own float32 copy" in n for n in rep.notes), rep.notes
    i = ids()
    with torch.no_grad():
        err = (model(input_ids=i).logits - ref(input_ids=i).logits).abs().max().item()
    assert err < 0.1, err
