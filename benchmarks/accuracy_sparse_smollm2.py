"""SmolLM2-135M: perplexity on the gensim Wikipedia text, dense vs magnitude / Wanda / SparseGPT at 50% and 2:4.

Weights are the offline Q4_1 GGUF dequantized to fp32 by transformers. Every Linear the
default filter selects (210 of 211; lm_head is tied to the embeddings and stays dense)
is pruned in place. Evaluation: the first half of the text, non-overlapping 512-token
windows, --tokens tokens; calibration (Wanda, SparseGPT): --calib sequences of
--calib-len tokens from the other half. SparseGPT runs block by block (decoder-layer
inputs cached, see slmkern.algorithms._calib.blockwise_hessians), so it costs about
three forward passes over the calibration set plus the per-layer OBS sweeps.

    python -m benchmarks.accuracy_sparse_smollm2 [--tokens 8192] [--calib 16] [--calib-len 256]

Writes a table to stdout and JSON (default:
benchmarks/runs/2026-11-28_sparse_accuracy/accuracy_sparse_smollm2.json).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks._pruning import METHODS, pruned_copies, write_json
from slmkern.data import wikipedia_text
from slmkern.evaluation import perplexity
from slmkern.models import load_model

OUT = Path(__file__).parent / "runs" / "2026-11-28_sparse_accuracy" / "accuracy_sparse_smollm2.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192, help="evaluation tokens (non-overlapping 512-token windows)")
    ap.add_argument("--calib", type=int, default=16, help="calibration sequences")
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--patterns", default="0.5,2:4")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default); on a "
                    "shared, oversubscribed machine 1 is much faster than 2")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense perplexity (increase_pct then nan)")
    ap.add_argument("--json", default=str(OUT))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t_start = time.perf_counter()
    model, tok = load_model("smollm2")
    text = wikipedia_text()
    half = len(text) // 2
    eval_text, calib_text = text[:half], text[half:]          # disjoint: calibrate on the second half
    ids = tok(calib_text, return_tensors="pt").input_ids[0]
    L = args.calib_len
    calib = [{"input_ids": ids[i * L:(i + 1) * L].unsqueeze(0), "use_cache": False} for i in range(args.calib)]
    print(f"SmolLM2-135M; eval {args.tokens} tokens, calibration {args.calib} x {L} tokens; "
          f"torch threads {torch.get_num_threads()}", flush=True)

    def ppl(m) -> dict:
        with torch.inference_mode():
            return perplexity(m, tok, eval_text, window=512, max_tokens=args.tokens, progress=False)

    rows = []
    r = {"perplexity": float("nan")} if args.no_dense else ppl(model)
    rows.append({"method": "dense", "pattern": "-", "sparsity": 0.0, "prune_s": 0.0, **r})
    print(f"  dense: perplexity {r['perplexity']:.3f}", flush=True)
    for pat, method, m, rep, secs in pruned_copies(model, args.patterns, args.methods, calib):
        r = ppl(m)
        row = {"method": method, "pattern": str(pat), "sparsity": rep.sparsity, "prune_s": secs,
               "layers_pruned": len(rep.layers), "layers_skipped": len(rep.skipped),
               "fallbacks": sorted(f for f, li in rep.layers.items() if li.fallback), **r}
        if method == "sparsegpt":   # calibration-set output error per layer vs magnitude at the same pattern
            ratios = torch.tensor([li.rel_err / li.magnitude_rel_err for li in rep.layers.values()
                                   if li.magnitude_rel_err > 0])
            row["rel_err_vs_magnitude_median"] = float(ratios.median())
            row["rel_err_vs_magnitude_max"] = float(ratios.max())
        rows.append(row)
        print(f"  {str(pat):>4} {method:10s} perplexity {r['perplexity']:9.3f}  sparsity {rep.sparsity:.4f} "
              f"({len(rep.layers)} layers, {len(rep.skipped)} skipped)  prune {secs:.0f}s", flush=True)
        del m
    base = rows[0]["perplexity"]
    for r in rows:
        r["increase_pct"] = 100 * (r["perplexity"] / base - 1)
        r["n_calib"], r["calib_len"], r["threads"] = args.calib, L, torch.get_num_threads()
    pats = list(dict.fromkeys(r["pattern"] for r in rows[1:]))
    print(f"\nperplexity (dense {base:.3f}); increase over dense in brackets")
    print("| method | " + " | ".join(pats) + " |")
    print("|---|" + "---:|" * len(pats))
    for method in METHODS:
        cells = []
        for p in pats:
            r = next((r for r in rows if r["method"] == method and r["pattern"] == p), None)
            cells.append(f"{r['perplexity']:.2f} (+{r['increase_pct']:.0f}%)" if r else "-")
        print(f"| {method} | " + " | ".join(cells) + " |")
    print(f"total {time.perf_counter() - t_start:.0f}s")
    write_json(rows, args.json)


if __name__ == "__main__":
    main()
