"""SmolLM2-135M: perplexity on the gensim Wikipedia text, fp32 vs int4 RTN vs int4 GPTQ.

Weights are the offline Q4_1 GGUF dequantized to fp32 by transformers (they sit on a 4-bit
grid with group 32, so g64/g128 are the meaningful int4 tests). hidden = 576 is not a multiple
of 128: at --group-size 128 the 576-input layers use g64 (an override), the 1536-input ones g128.
All Linear layers except lm_head (tied to the embeddings) are converted with slmkern.quantize_
and run through the int4 kernels.

    python benchmarks/accuracy_int4_smollm2.py [--group-size 128] [--tokens 8192] [--calib 16]
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time

import torch

from slmkern import Int4Config, quantize_
from slmkern.data import wikipedia_text
from slmkern.evaluation import perplexity
from slmkern.models import load_model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=8192, help="evaluation tokens (non-overlapping 512-token windows)")
    p.add_argument("--calib", type=int, default=16, help="GPTQ calibration sequences")
    p.add_argument("--calib-len", type=int, default=256)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--json")
    args = p.parse_args()
    torch.manual_seed(0)
    model, tok = load_model("smollm2")
    text = wikipedia_text()
    half = len(text) // 2
    eval_text, calib_text = text[:half], text[half:]          # disjoint: calibrate on the second half
    ids = tok(calib_text, return_tensors="pt").input_ids[0]
    calib = [{"input_ids": ids[i * args.calib_len:(i + 1) * args.calib_len].unsqueeze(0)} for i in range(args.calib)]
    rows = []
    g = args.group_size
    for name, cfg in [("fp32", None), (f"int4 RTN g{g}", Int4Config(group_size=g, method="rtn")),
                      (f"int4 GPTQ g{g}", Int4Config(group_size=g, method="gptq"))]:
        m = model if cfg is None else copy.deepcopy(model)
        t0 = time.time()
        if cfg is not None:
            # layers whose in_features (576) is not a multiple of g fall back to g64
            small = dataclasses.replace(cfg, group_size=64)
            over = {f"*{n}": small for n in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj")}
            rep = quantize_(m, cfg, calibration=calib if cfg.method == "gptq" else None,
                            overrides=over if 576 % g else None)
            print(f"{name}: swapped {len(rep.swapped)}, skipped {len(rep.skipped)} in {time.time() - t0:.0f}s")
        with torch.inference_mode():
            r = perplexity(m, tok, eval_text, window=512, max_tokens=args.tokens)
        rows.append({"variant": name, **r})
        print(f"{name}: perplexity {r['perplexity']:.3f} over {r['tokens']} tokens")
    base = rows[0]["perplexity"]
    for r in rows:
        r["increase_pct"] = 100 * (r["perplexity"] / base - 1)
        print(f"{r['variant']:<16} ppl {r['perplexity']:8.3f}  (+{r['increase_pct']:.2f}%)")
    if args.json:
        json.dump(rows, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
