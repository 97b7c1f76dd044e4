"""slmkern.decoder.LeanDecoder: HF eager's logits bit for bit, fused linears equal to separate ones, what it refuses."""
from __future__ import annotations

import logging

import pytest
import torch

import slmkern
from slmkern import Int4Config, Int8Config, quantize_
from slmkern.decoder import LeanDecoder, unsupported_reason
from slmkern.nn import Int4Linear, Int8Linear

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512)

CONFIGS = {"fp32": None, "w8a8": Int8Config(), "w8a16": Int8Config(activations="float"),
           "w4a8": Int4Config(group_size=32, activations="int8"), "w4a16": Int4Config(group_size=32)}


def tiny(family: str, config=None, dtype=torch.float32, **extra):
    torch.manual_seed(0)
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, **extra))
    elif family == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**TINY, **extra))
    elif family == "qwen2":   # q/k/v with bias, every layer full attention
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY, **extra))
    elif family == "gemma2":
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**TINY, head_dim=16, sliding_window=6))
    else:
        raise AssertionError(family)
    model = model.to(dtype).eval()
    if config is not None:
        quantize_(model, config)
    return model


def prompt(T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (1, T), generator=torch.Generator().manual_seed(seed))


def hf_logits_steps(model, ids, steps: int):
    """HF eager: the prompt's last logits, then `steps` greedy single-token steps' logits (DynamicCache)."""
    out_logits, toks = [], []
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        for _ in range(steps + 1):
            lg = out.logits[:, -1]
            out_logits.append(lg.clone())
            tok = lg.argmax(-1, keepdim=True)
            toks.append(tok)
            out = model(input_ids=tok, use_cache=True, cache=out["cache"] if "cache" in out else out.past_key_values)
    return out_logits, toks


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("fmt", list(CONFIGS))
def test_logits_are_hf_eager_bit_for_bit(family, fmt):
    model = tiny(family, CONFIGS[fmt])
    ids = prompt(11)
    ref, toks = hf_logits_steps(model, ids, 6)
    dec = LeanDecoder(model, 64)
    if fmt != "fp32":   # q/k/v and gate/up are one kernel call each
        assert all(layer[1].fused is not None and layer[4].fused is not None for layer in dec.layers)
        assert all(layer[i].planned for layer in dec.layers for i in (1, 2, 4, 5))
        assert dec.all_planned == isinstance(model.lm_head, (Int8Linear, Int4Linear))
        assert dec.fast_rope       # decode steps take the C++ rope + cache write (csrc/decoder.cpp)
        assert dec.lanes in (8, 16)  # ... and the C++ residual add + RMSNorm (it matches this torch's sum)
    with torch.inference_mode():
        assert torch.equal(dec.logits(ids), ref[0])
        for step in range(6):
            assert torch.equal(dec._forward(toks[step]), ref[step + 1]), f"step {step}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_model_logits_match(dtype):
    model = tiny("llama", None, dtype)
    ids = prompt(9)
    ref, toks = hf_logits_steps(model, ids, 3)
    dec = LeanDecoder(model, 32)
    with torch.inference_mode():
        assert torch.equal(dec.logits(ids), ref[0])
        for step in range(3):
            assert torch.equal(dec._forward(toks[step]), ref[step + 1])


@pytest.mark.parametrize("fmt", ["w8a8", "w4a8", "w4a16"])
def test_fused_equals_unfused(fmt):
    model = tiny("qwen2", CONFIGS[fmt])
    ids = prompt(13)
    a, b = LeanDecoder(model, 64, fuse=True), LeanDecoder(model, 64, fuse=False)
    assert a.layers[0][1].fused is not None and b.layers[0][1].fused is None
    ta = [int(a.prefill(ids))] + a.decode_many(a.prefill(ids), 8)
    tb = [int(b.prefill(ids))] + b.decode_many(b.prefill(ids), 8)
    assert ta == tb


@pytest.mark.parametrize("M", [1, 3, 17, 64])
@pytest.mark.parametrize("kind", ["w8a8", "w8a16", "w4a8", "w4a16_sym"])
def test_fused_kernel_call_gives_each_linears_bits(kind, M):
    """One call over weights stacked along N (awkward sizes: not multiples of the 16-column tiles) returns every
    module's own output, bit for bit, for the M = 1 decode kernels and the M > 1 prompt kernels."""
    from slmkern.decoder import _Linears

    torch.manual_seed(3)
    K, sizes = 96, (40, 24, 8)
    lins = [torch.nn.Linear(K, n, bias=True) for n in sizes]
    if kind.startswith("w8"):
        mods = [Int8Linear.from_linear(lin, activations="int8" if kind == "w8a8" else "float") for lin in lins]
    else:
        mods = [Int4Linear.from_linear(lin, group_size=32, symmetric=kind.endswith("sym"),
                                       activations="int8" if kind == "w4a8" else "float") for lin in lins]
    fused = _Linears(mods)
    assert fused.fused is not None and fused.planned
    x = torch.randn(1, M, K)
    with torch.inference_mode():
        for got, mod in zip(fused(x), mods):
            assert torch.equal(got, mod(x))


@pytest.mark.parametrize("n", [16, 64, 96, 576, 577, 1000, 2048, 4099])
def test_cpp_add_rms_norm_is_atens_sum_order(n):
    """csrc/decoder.cpp's residual add + RMSNorm replays aten's float sum (vector lanes, 4 accumulators, a
    cascade every 16 steps, tails): bit for bit at every model width, on rows norm_lanes never saw. (Rows
    shorter than a vector take another aten kernel: norm_lanes says None there and the decoder keeps aten.)"""
    from slmkern._backends import cpu
    from slmkern.decoder import _aten_add_rms_norm, norm_lanes

    if not cpu.has_cpp():
        pytest.skip("the C++ extension is not built")
    gen = torch.Generator().manual_seed(100 + n)
    w = torch.randn(n, generator=gen)
    lanes = norm_lanes(cpu._C, n, w, 1e-6)
    assert lanes == (16 if "512" in torch.backends.cpu.get_cpu_capability() else 8)
    for scale in (1e-4, 1.0, 1e4):
        a, b = torch.randn(n, generator=gen) * scale, torch.randn(n, generator=gen)
        h_ref, x_ref = _aten_add_rms_norm(a.view(1, 1, n), b.view(1, 1, n), w, 1e-6)
        h, x = a.clone(), torch.empty(n)
        cpu._C.add_rms_norm_f32(h.data_ptr(), b.data_ptr(), n, w.data_ptr(), 1e-6, h.data_ptr(), x.data_ptr(),
                                lanes)   # the residual updated in place, as the decoder runs it
        assert torch.equal(h, h_ref.view(n)) and torch.equal(x, x_ref.view(n))


def test_mixed_formats_are_not_fused_but_still_right():
    from slmkern.decoder import _Linears

    torch.manual_seed(4)
    lins = [torch.nn.Linear(64, 32) for _ in range(3)]
    mods = [Int8Linear.from_linear(lins[0]), Int4Linear.from_linear(lins[1], group_size=32), lins[2]]
    group = _Linears(mods)
    assert group.fused is None and not group.planned
    x = torch.randn(1, 1, 64)
    with torch.inference_mode():
        for got, mod in zip(group(x), mods):
            assert torch.equal(got, mod(x))


# ----------------------------------------------------------------------------- through slmkern.generate
def hf_greedy(model, ids, n):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                              pad_token_id=0)


@pytest.mark.parametrize("family,fmt", [("llama", "w4a8"), ("qwen2", "w8a8"), ("mistral", "fp32")])
def test_generate_takes_the_lean_path_with_hf_tokens(family, fmt):
    model = tiny(family, CONFIGS[fmt])
    ids = prompt(10)
    res = slmkern.generate(model, None, ids, max_new_tokens=12, stop_at_eos=False)
    assert res.path == "lean" and res.reason is None and res.cache_len == 64
    assert torch.equal(res.sequences, hf_greedy(model, ids, 12))
    assert res.prefill_s > 0 and res.decode_s > 0


def test_threads_restored_and_used(monkeypatch):
    model = tiny("llama", Int4Config(group_size=32, activations="int8", skip_names=[]))   # the head too
    dec = LeanDecoder(model, 64)
    seen = []
    real = dec._forward

    def spy(ids, threads=0):
        seen.append((torch.get_num_threads(), threads))
        return real(ids, threads)

    monkeypatch.setattr(dec, "_forward", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        dec.decode_many(dec.prefill(prompt(5)), 3)
        assert torch.get_num_threads() == 2
        # every decode step: aten on this thread alone, the kernels on 2 threads
        assert seen[-3:] == [(1, 2)] * 3
    finally:
        torch.set_num_threads(before)


def test_float_head_gets_torchs_threads_back(monkeypatch):
    model = tiny("llama", CONFIGS["w8a8"])       # lm_head stays a float nn.Linear
    dec = LeanDecoder(model, 64)
    assert dec.body_planned and not dec.all_planned
    seen, real = [], model.lm_head.forward
    monkeypatch.setattr(model.lm_head, "forward", lambda x: (seen.append(torch.get_num_threads()), real(x))[1])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ids = prompt(6)
        toks = dec.decode_many(dec.prefill(ids), 4)
        assert torch.get_num_threads() == 2 and seen == [2] * 5          # prefill + 4 steps, all on 2 threads
        assert [int(dec.logits(ids).argmax())] + toks[:3] == hf_greedy(model, ids, 4)[0, 6:].tolist()
    finally:
        torch.set_num_threads(before)


def test_edited_model_is_seen(caplog):
    model = tiny("llama", CONFIGS["w8a8"])
    ids = prompt(8)
    first = slmkern.generate(model, None, ids, max_new_tokens=6, stop_at_eos=False)
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight.mul_(1.5)   # in place: the decoder must notice
    res = slmkern.generate(model, None, ids, max_new_tokens=6, stop_at_eos=False)
    assert res.path == first.path == "lean"
    assert torch.equal(res.sequences, hf_greedy(model, ids, 6))
    model.model.layers[1].mlp.down_proj = Int4Linear.from_linear(
        torch.nn.Linear(TINY["intermediate_size"], TINY["hidden_size"]), group_size=32)   # a replaced module
    res = slmkern.generate(model, None, ids, max_new_tokens=6, stop_at_eos=False)
    assert res.path == "lean" and torch.equal(res.sequences, hf_greedy(model, ids, 6))


def test_longer_request_grows_the_cache():
    model = tiny("llama", CONFIGS["w4a16"])
    a = slmkern.generate(model, None, prompt(10), max_new_tokens=8, stop_at_eos=False)
    ids = prompt(100, seed=3)
    b = slmkern.generate(model, None, ids, max_new_tokens=8, stop_at_eos=False)
    assert (a.cache_len, b.cache_len) == (64, 128)
    assert torch.equal(b.sequences, hf_greedy(model, ids, 8))


# ----------------------------------------------------------------------------- what it does not cover
def test_unsupported_layouts_say_why():
    assert "gemma2" in unsupported_reason(tiny("gemma2"), 64)
    qwen_sliding = tiny("qwen2", use_sliding_window=True, sliding_window=6, max_window_layers=1)
    assert "sliding" in unsupported_reason(qwen_sliding, 64)
    assert unsupported_reason(tiny("mistral", sliding_window=4096), 64) is None   # the window covers the cache
    assert "sliding_window" in unsupported_reason(tiny("mistral", sliding_window=6), 64)
    with pytest.raises(ValueError, match="model: "):
        LeanDecoder(tiny("gemma2"), 64)


def test_mode_lean_on_an_uncovered_model_falls_back_to_hf(caplog):
    model = tiny("gemma2", CONFIGS["w8a8"])
    ids = prompt(8)
    with caplog.at_level(logging.INFO, logger="slmkern"):
        res = slmkern.generate(model, None, ids, max_new_tokens=5, mode="lean")
    assert res.path == "eager" and "lean decoder does not cover" in res.reason
    assert any("slmkern.generate: eager decoding" in r.message for r in caplog.records)
    assert torch.equal(res.sequences, hf_greedy(model, ids, 5))
    # auto takes the compiled step for it instead
    assert slmkern.generate(model, None, ids, max_new_tokens=5, backend="aot_eager").path == "compiled"


def test_bad_mode():
    with pytest.raises(ValueError, match="mode"):
        slmkern.generate(tiny("llama"), None, prompt(4), max_new_tokens=2, mode="fast")


def test_prompt_longer_than_cache_is_refused():
    dec = LeanDecoder(tiny("llama"), 16)
    with pytest.raises(ValueError, match="ids: "):
        dec.prefill(prompt(17))


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["w4a8_head8", "w8a8"])
def test_smollm2_lean_matches_hf_eager(recipe):
    pytest.importorskip("gguf")
    from slmkern.models import load_model
    model, tok = load_model("smollm2")
    steps = [{"quantize": {"algorithm": "int8"}}] if recipe == "w8a8" else [
        {"quantize": {"algorithm": "rtn", "group_size": 64, "activations": "int8"}},
        {"quantize": {"algorithm": "int8", "activations": "float", "skip_names": [], "targets": ["lm_head"]}}]
    slmkern.compress(model, steps, progress=False)
    text = "The history of the city"
    res = slmkern.generate(model, tok, text, max_new_tokens=32, stop_at_eos=False)
    assert res.path == "lean", res.reason
    assert torch.equal(res.sequences, hf_greedy(model, tok(text, return_tensors="pt").input_ids, 32))
