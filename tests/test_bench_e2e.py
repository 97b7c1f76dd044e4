"""The model-level benchmark harness (benchmarks/bench_e2e.py) on tiny random models: row schema, impl
names, interleaving, skips of missing peers, argument errors, the CLI hook. No peer package and no real
model weights are needed; timings are never checked, only that they are there."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import slmkern
from slmkern.cli import main as cli_main

ALL_IMPLS = {"hf_fp32", "slmkern_w8a8", "slmkern_int4", "slmkern_int4_compiled", "slmkern_w8a8_compiled",
             "llamacpp_f16", "llamacpp_q8_0", "llamacpp_q4_0", "llamacpp_q4_1", "torch_fp32", "ort_fp32", "ort_int8"}


@pytest.fixture(scope="module")
def e2e():
    from slmkern.benchmarks import bench_e2e
    return bench_e2e


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is plenty, and two threads crawl when another process holds a core."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny_llama():
    import transformers
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def _tiny_bert():
    import transformers
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64)
    return transformers.BertModel(cfg).eval()


def _check_row(e2e, row):
    assert set(e2e.ROW_KEYS) <= set(row)
    assert row["bench"] == "e2e" and row["impl"] in ALL_IMPLS and row["threads"] == 2
    json.dumps(row)


def test_impl_names_are_the_fixed_ones(e2e):
    assert set(e2e.IMPL_NAMES) == ALL_IMPLS
    assert set(e2e.DECODER_IMPLS) | set(e2e.ENCODER_IMPLS) == ALL_IMPLS
    assert e2e.ROW_KEYS == ("bench", "model", "impl", "batch", "prompt_tokens", "new_tokens", "prefill_tok_s",
                            "decode_tok_s", "latency_ms", "rss_mb", "threads", "cosine")


def test_decoder_rows(e2e):
    dense = _tiny_llama()
    quant = copy.deepcopy(dense)
    slmkern.compress(quant, e2e.RECIPES[("decoder", "slmkern_w8a8")], progress=False)
    cfg = e2e.E2EConfig(workloads=("decoder",), prompt_tokens=8, new_tokens=4)
    runners = {"hf_fp32": e2e.HFDecoder(dense),
               "slmkern_w8a8": e2e.GenerateDecoder(slmkern.generate, quant, None, {"recipe": "w8a8"})}
    rows = e2e.time_decoder(runners, list(range(3, 11)), cfg, rounds=2)
    assert [r["impl"] for r in rows] == ["hf_fp32", "slmkern_w8a8"]
    for r in rows:
        _check_row(e2e, r)
        assert r["model"] == "smollm2" and r["batch"] == 1 and (r["prompt_tokens"], r["new_tokens"]) == (8, 4)
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0
        assert r["latency_ms"] is None and r["cosine"] is None
        assert len(r["meta"]["decode_tok_s_rounds"]) == 2
    # 1 token from the prefill + 4 decode steps, all identical to itself
    assert rows[0]["meta"]["same_tokens_as_hf_fp32"] == 5
    assert rows[1]["meta"]["recipe"] == "w8a8" and rows[1]["meta"]["generate_path"] == "lean"


def test_decoder_greedy_loop_matches_hf_generate(e2e):
    model = _tiny_llama()
    ids = list(range(3, 11))
    _, _, toks = e2e.HFDecoder(model).run(ids, 4)
    ref = model.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False)[0, len(ids):].tolist()
    assert toks == ref


def test_rounds_are_interleaved(e2e):
    calls = []

    class Fake:
        meta = {}

        def __init__(self, name):
            self.name = name

        def run(self, ids, n):
            calls.append(self.name)
            return 0.01, 0.02, [1, 2]

    cfg = e2e.E2EConfig(workloads=("decoder",), prompt_tokens=2, new_tokens=1)
    rows = e2e.time_decoder({"hf_fp32": Fake("a"), "llamacpp_q4_0": Fake("b")}, [1, 2], cfg, rounds=3)
    assert calls == ["a", "b"] * 4          # one warm-up round, then 3 timed rounds, each impl once per round
    assert rows[1]["prefill_tok_s"] == pytest.approx(200.0) and rows[1]["decode_tok_s"] == pytest.approx(50.0)


def test_encoder_rows_and_cosine(e2e):
    dense = _tiny_bert()
    quant = copy.deepcopy(dense)
    slmkern.compress(quant, e2e.RECIPES[("encoder", "slmkern_w8a8")], progress=False)
    g = torch.Generator().manual_seed(1)
    inputs = {"input_ids": torch.randint(0, 120, (3, 16), generator=g),
              "attention_mask": torch.ones(3, 16, dtype=torch.long), "token_type_ids": torch.zeros(3, 16, dtype=torch.long)}

    class Flipped:   # stands in for a peer whose output points the other way: cosine must say -1
        meta = {}

        def forward(self, x):
            return -runners["torch_fp32"].forward(x)

    runners = {"torch_fp32": e2e.TorchEncoder(dense), "slmkern_w8a8": e2e.TorchEncoder(quant), "ort_fp32": Flipped()}
    cfg = e2e.E2EConfig(workloads=("encoder",))
    rows = e2e.time_encoder(runners, inputs, runners["torch_fp32"].forward(inputs), cfg, rounds=2)
    for r in rows:
        _check_row(e2e, r)
        assert r["model"] == "minilm" and r["batch"] == 3 and r["prompt_tokens"] == 16
        assert r["latency_ms"] > 0 and r["prefill_tok_s"] is None and r["decode_tok_s"] is None
        assert r["meta"]["cosine_of"] == "mean-pooled last_hidden_state"
    assert [r["impl"] for r in rows] == ["torch_fp32", "slmkern_w8a8", "ort_fp32"]
    assert rows[0]["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert 0.9 < rows[1]["cosine"] <= 1.0 + 1e-6
    assert rows[2]["cosine"] == pytest.approx(-1.0, abs=1e-6) and rows[2]["meta"]["cosine_min"] < -0.99


def test_encoder_inputs_fill_every_row(e2e):
    from transformers import AutoTokenizer

    from slmkern.models import model_path
    tok = AutoTokenizer.from_pretrained(str(model_path("minilm")[0]))
    enc = e2e.encoder_inputs(tok, 3, 32, texts=["a short snippet.", "another one, a bit longer than that."])
    assert enc["input_ids"].shape == (3, 32) and bool(enc["attention_mask"].all())


@pytest.mark.parametrize("impl,package", [("llamacpp_f16", "llama-cpp-python"), ("llamacpp_q4_1", "llama-cpp-python"),
                                          ("ort_fp32", "onnxruntime"), ("ort_int8", "onnxruntime")])
def test_missing_peer_is_skipped_with_what_to_install(e2e, monkeypatch, impl, package):
    monkeypatch.setattr(e2e, "_have", lambda module: False)
    workload = "decoder" if impl.startswith("llama") else "encoder"
    msg = e2e.peer_missing(workload, impl)
    assert impl in msg and package in msg and "make bench-peers" in msg
    cfg = e2e.E2EConfig(workloads=(workload,), rss=False)
    for fn in (e2e.prepare, e2e.load):
        with pytest.raises(e2e.Skip, match="make bench-peers"):
            fn(workload, impl, cfg)


def test_compiled_decoder_skipped_without_generate(e2e, monkeypatch):
    monkeypatch.delattr(slmkern, "generate", raising=False)
    for impl in ("slmkern_int4", "slmkern_int4_compiled", "slmkern_w8a8_compiled"):
        assert "slmkern.generate" in e2e.peer_missing("decoder", impl)
    assert e2e.peer_missing("encoder", "slmkern_w8a8_compiled") is None   # torch.compile, not generate


def test_run_with_everything_skipped_reports_why(e2e, monkeypatch):
    monkeypatch.setattr(e2e, "_have", lambda module: False)
    monkeypatch.delattr(slmkern, "generate", raising=False)
    cfg = e2e.E2EConfig(workloads=("decoder", "encoder"), rss=False,
                        impls=("llamacpp_q4_0", "slmkern_int4_compiled", "ort_int8"))
    result = e2e.run(cfg, log=lambda s: None)
    assert result["rows"] == []
    assert set(result["meta"]["skipped"]) == {"decoder/llamacpp_q4_0", "decoder/slmkern_int4_compiled",
                                              "encoder/ort_int8"}
    meta = result["meta"]
    assert meta["config"]["threads"] == 2 and "machine" in meta and "torch" in meta["versions"]
    json.dumps(result, default=str)


@pytest.mark.parametrize("kwargs,name", [
    ({"reps": 0}, "reps"), ({"threads": 0}, "threads"), ({"prompt_tokens": -1}, "prompt_tokens"),
    ({"new_tokens": 1.5}, "new_tokens"), ({"workloads": ("gpu",)}, "workloads"), ({"batches": (0,)}, "batches"),
    ({"workloads": ("encoder",), "impls": ("llamacpp_q4_0",)}, "impls"),
])
def test_bad_config_names_the_argument(e2e, kwargs, name):
    with pytest.raises(ValueError, match=name):
        e2e.E2EConfig(**kwargs)


def test_cli_e2e_errors(e2e, capsys):
    assert cli_main(["bench", "--e2e", "--op", "w8a8"]) == 2
    assert "--op" in capsys.readouterr().err
    assert e2e.main(["--reps", "0"]) == 2
    assert "reps" in capsys.readouterr().err
    assert e2e.main(["--impl", "nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_cli_e2e_dispatches_and_writes_json(e2e, monkeypatch, tmp_path, capsys):
    seen = {}
    row = e2e._row("decoder", "slmkern_int4", e2e.E2EConfig(), 1, prefill_tok_s=100.0, decode_tok_s=60.0, meta={})
    peer = e2e._row("decoder", "llamacpp_q4_0", e2e.E2EConfig(), 1, prefill_tok_s=200.0, decode_tok_s=30.0, meta={})

    def fake_run(cfg, log=print):
        seen["cfg"] = cfg
        return {"meta": {"skipped": {"decoder/ort": "why"}}, "rows": [row, peer]}

    monkeypatch.setattr(e2e, "run", fake_run)
    out = tmp_path / "e2e.json"
    assert cli_main(["bench", "--e2e", "--quick", "--reps", "3", "--json", str(out)]) == 0
    assert seen["cfg"].quick and seen["cfg"].reps == 3 and seen["cfg"].threads == 2
    back = json.loads(out.read_text())
    assert set(back) == {"meta", "rows"} and [r["impl"] for r in back["rows"]] == ["slmkern_int4", "llamacpp_q4_0"]
    text = capsys.readouterr().out
    assert "slmkern_int4 / llamacpp_q4_0 = 2.00x" in text and "= 0.50x" in text and "skipped decoder/ort: why" in text


def test_new_ids_from_generate_output(e2e):
    assert e2e._new_ids(torch.tensor([[5, 6, 7, 8]]), 2) == [7, 8]
    assert e2e._new_ids(object(), 2) is None
