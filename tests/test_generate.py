"""slmkern.generate: the compiled decode path gives HF eager greedy's tokens, reuses its graphs, falls back loudly."""
from __future__ import annotations

import logging
import sys

import pytest
import torch

import slmkern
from slmkern import Int4Config, Int8Config, quantize_

transformers = pytest.importorskip("transformers")
gen_mod = sys.modules["slmkern.generate"]

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512)


def tiny(family: str, config=Int8Config()):
    """A tiny random causal LM of `family` with its Linears swapped for slmkern modules."""
    torch.manual_seed(0)
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY))
    elif family == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**TINY, sliding_window=6))
    elif family == "qwen2":   # layer 0 full attention, layer 1 a sliding window of 6
        cfg = transformers.Qwen2Config(**TINY, use_sliding_window=True, sliding_window=6, max_window_layers=1)
        model = transformers.Qwen2ForCausalLM(cfg)
    elif family == "gemma2":  # sliding, full, sliding, full
        cfg = dict(TINY, num_hidden_layers=4)
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**cfg, head_dim=16, sliding_window=6))
    elif family == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4))
    else:
        raise AssertionError(family)
    model.eval()
    if config is not None:
        quantize_(model, config)
    return model


def hf_greedy(model, ids, n):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                              pad_token_id=0)


def prompt(T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (1, T), generator=torch.Generator().manual_seed(seed))


def slmkern_ops_in(gm) -> set[str]:
    """Custom ops named in a dynamo graph (targets are OpOverloadPackets there: no ".default")."""
    return {str(n.target).removesuffix(".default") for n in gm.graph.nodes
            if n.op == "call_function" and str(n.target).startswith("slmkern.")}


# ----------------------------------------------------------------------------- token identity, compiled (inductor)
@pytest.fixture(scope="module")
def qwen2_int8():
    return tiny("qwen2")


def test_qwen2_sliding_full_compiled_matches_hf_eager(qwen2_int8):
    ids = prompt(9)                        # 9 + 16 tokens > the window of 6: the sliding layer's mask matters
    res = slmkern.generate(qwen2_int8, None, ids, max_new_tokens=16, stop_at_eos=False)
    assert res.path == "compiled", res.reason
    assert torch.equal(res.sequences, hf_greedy(qwen2_int8, ids, 16))
    assert res.tokens.shape == (1, 16) and res.prompt_tokens == 9
    assert res.cache_len == 64 and res.prefill_s > 0 and res.decode_s > 0 and res.decode_tok_s > 0


def test_second_call_reuses_the_compiled_graph(qwen2_int8):
    first = slmkern.generate(qwen2_int8, None, prompt(9), max_new_tokens=16, stop_at_eos=False)
    assert first.path == "compiled"
    # another prompt, another length, same cache bucket (64): nothing compiles
    ids = prompt(20, seed=2)
    res = slmkern.generate(qwen2_int8, None, ids, max_new_tokens=8, stop_at_eos=False)
    assert (res.path, res.graphs_compiled, res.compile_s, res.cache_len) == ("compiled", 0, 0.0, 64)
    assert torch.equal(res.sequences, hf_greedy(qwen2_int8, ids, 8))


@pytest.mark.slow
def test_smollm2_w8a8_compiled_matches_hf_eager():
    pytest.importorskip("gguf")
    from slmkern.models import load_model
    model, tok = load_model("smollm2")
    slmkern.compress(model, [{"quantize": {"algorithm": "int8"}}])
    text = "The history of the city"
    res = slmkern.generate(model, tok, text, max_new_tokens=24, mode="compiled")
    assert res.path == "compiled", res.reason
    assert torch.equal(res.sequences, hf_greedy(model, tok(text, return_tensors="pt").input_ids, 24))
    assert res.text == tok.decode(res.tokens[0], skip_special_tokens=True)


# ----------------------------------------------------------------- more layouts (aot_eager: the same graph, no C++)
@pytest.mark.parametrize("family,config", [("llama", Int4Config(group_size=32)), ("mistral", Int8Config()),
                                           ("gemma2", Int8Config())], ids=["llama-int4", "mistral-int8", "gemma2-int8"])
def test_layouts_fullgraph_match_hf_eager(family, config):
    model = tiny(family, config)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    ids = prompt(10)
    res = slmkern.generate(model, None, ids, max_new_tokens=12, stop_at_eos=False, backend=capture, mode="compiled")
    assert res.path == "compiled", res.reason
    assert torch.equal(res.sequences, hf_greedy(model, ids, 12))
    # whole-step graphs (fullgraph), with slmkern's linears in them as custom ops: one for every cache length,
    # up to three with sliding layers (masks and slices differ below, at and past the window), all at warm-up
    assert len(graphs) == res.graphs_compiled
    assert len(graphs) == 1 if family == "llama" else 2 <= len(graphs) <= 3
    expected = "slmkern.w4a16_linear" if isinstance(config, Int4Config) else "slmkern.w8a8_linear"
    assert all(expected in slmkern_ops_in(gm) for gm in graphs)


def test_stops_at_eos_like_hf():
    model = tiny("llama")
    ids = prompt(7)
    full = slmkern.generate(model, None, ids, max_new_tokens=10, stop_at_eos=False, backend="aot_eager",
                            mode="compiled").tokens[0]
    eos = int(full[4])
    first = int((full == eos).nonzero()[0])    # the run ends at eos's first appearance
    model.generation_config.eos_token_id = eos
    res = slmkern.generate(model, None, ids, max_new_tokens=10, backend="aot_eager", mode="compiled")
    assert res.path == "compiled" and res.tokens[0].tolist() == full[:first + 1].tolist()
    assert torch.equal(res.sequences, hf_greedy(model, ids, 10))


def test_new_cache_bucket_compiles_once_more():
    model = tiny("llama")
    a = slmkern.generate(model, None, prompt(10), max_new_tokens=8, backend="aot_eager", mode="compiled")
    # 68 tokens -> bucket 128
    b = slmkern.generate(model, None, prompt(60), max_new_tokens=8, backend="aot_eager", mode="compiled")
    c = slmkern.generate(model, None, prompt(70), max_new_tokens=8, backend="aot_eager", mode="compiled")
    assert (a.cache_len, b.cache_len, c.cache_len) == (64, 128, 128)
    assert (a.graphs_compiled, b.graphs_compiled, c.graphs_compiled) == (1, 1, 0)


def test_cache_bucket():
    assert [gen_mod.cache_bucket(n) for n in (1, 64, 65, 192, 1024, 1025, 3000)] == [64, 64, 128, 256, 1024, 2048, 3072]


# ----------------------------------------------------------------------------- fallbacks: one log line, HF's tokens
def _fallback_lines(caplog):
    return [r for r in caplog.records if r.name == "slmkern" and "slmkern.generate: eager decoding" in r.message]


def test_unsupported_architecture_falls_back_to_eager(caplog):
    model = tiny("gpt2")
    ids = prompt(8)
    with caplog.at_level(logging.INFO, logger="slmkern"):
        res = slmkern.generate(model, None, ids, max_new_tokens=10)
        again = slmkern.generate(model, None, ids, max_new_tokens=10)
    assert res.path == again.path == "eager" and "gpt2" in res.reason
    lines = _fallback_lines(caplog)
    assert len(lines) == 1 and "gpt2" in lines[0].message
    assert torch.equal(res.sequences, hf_greedy(model, ids, 10)) and torch.equal(again.sequences, res.sequences)
    assert res.prefill_s > 0 and res.decode_s > 0


def test_compile_failure_falls_back_to_eager(caplog, monkeypatch):
    def broken(tag):
        def step(model, cache, token, position, span):
            torch._dynamo.graph_break()          # fullgraph=True turns this into an error
            return token
        return step
    monkeypatch.setattr(gen_mod, "_fresh_step_fn", broken)
    model = tiny("llama")
    ids = prompt(8)
    with caplog.at_level(logging.INFO, logger="slmkern"):
        res = slmkern.generate(model, None, ids, max_new_tokens=6, backend="aot_eager", mode="compiled")
        again = slmkern.generate(model, None, ids, max_new_tokens=6, backend="aot_eager", mode="compiled")
    assert res.path == again.path == "eager" and res.reason.startswith("compiling the decode step failed")
    assert "TypeError" not in res.reason      # it failed where meant to: dynamo refusing the graph break
    assert len(_fallback_lines(caplog)) == 1
    assert torch.equal(res.sequences, hf_greedy(model, ids, 6))


def test_greedy_changing_generation_config_falls_back(caplog):
    model = tiny("llama")
    model.generation_config.repetition_penalty = 1.3
    ids = prompt(8)
    with caplog.at_level(logging.INFO, logger="slmkern"):
        res = slmkern.generate(model, None, ids, max_new_tokens=6)
    assert res.path == "eager" and "repetition_penalty" in res.reason and len(_fallback_lines(caplog)) == 1
    assert torch.equal(res.sequences, hf_greedy(model, ids, 6))


def test_mode_eager_is_hf_eager():
    model = tiny("llama")
    ids = prompt(8)
    res = slmkern.generate(model, None, ids, max_new_tokens=6, mode="eager")
    assert (res.path, res.reason) == ("eager", "mode='eager'")
    assert torch.equal(res.sequences, hf_greedy(model, ids, 6))


# ----------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def llama():
    return tiny("llama", config=None)


@pytest.mark.parametrize("n", [0, -1, 2.0, True])
def test_bad_max_new_tokens(llama, n):
    with pytest.raises(ValueError, match="max_new_tokens"):
        slmkern.generate(llama, None, prompt(4), max_new_tokens=n)


@pytest.mark.parametrize("bad,exc", [(torch.zeros(2, 4, dtype=torch.long), ValueError),
                                     (torch.zeros(1, 0, dtype=torch.long), ValueError),
                                     (torch.zeros(1, 1, 4, dtype=torch.long), ValueError),
                                     (torch.zeros(1, 4), TypeError),
                                     (torch.full((1, 4), 256), ValueError),
                                     ([1, 2, 3], TypeError)], ids=["batch2", "empty", "3d", "float", "range", "list"])
def test_bad_prompt(llama, bad, exc):
    with pytest.raises(exc, match="prompt"):
        slmkern.generate(llama, None, bad, max_new_tokens=4)


def test_str_prompt_needs_a_tokenizer(llama):
    with pytest.raises(ValueError, match="tokenizer"):
        slmkern.generate(llama, None, "hello", max_new_tokens=4)


def test_cache_len_too_small(llama):
    with pytest.raises(ValueError, match="cache_len"):
        slmkern.generate(llama, None, prompt(10), max_new_tokens=8, cache_len=16)


def test_not_a_causal_lm():
    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                          num_attention_heads=2, intermediate_size=64)).eval()
    with pytest.raises(TypeError, match="model"):
        slmkern.generate(bert, None, prompt(4), max_new_tokens=4)
    with pytest.raises(TypeError, match="model"):
        slmkern.generate(torch.nn.Linear(4, 4), None, prompt(4), max_new_tokens=4)
