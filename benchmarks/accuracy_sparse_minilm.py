"""Pruning accuracy on real weights: all-MiniLM-L6-v2 embeddings, magnitude / Wanda / SparseGPT vs fp32.

Every nn.Linear the default filter selects (36 of 37: the pooler, unused by mean-pooled
sentence embeddings, stays dense) is pruned in place to 50% unstructured sparsity or
2:4. Calibration (Wanda, SparseGPT): 128 Rotten Tomatoes snippets; evaluation: cosine
of mean-pooled sentence embeddings to the fp32 model's on 1,000 other snippets.
Offline only (slmkern.models / slmkern.data):

    python -m benchmarks.accuracy_sparse_minilm [--patterns 0.5,2:4] [--json out.json]

Writes a table to stdout and JSON (default:
benchmarks/runs/2026-11-28_sparse_accuracy/accuracy_sparse_minilm.json).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks._pruning import METHODS, pruned_copies, write_json
from slmkern.data import rotten_tomatoes
from slmkern.evaluation import mean_pooled_embeddings
from slmkern.models import load_model

OUT = Path(__file__).parent / "runs" / "2026-11-28_sparse_accuracy" / "accuracy_sparse_minilm.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patterns", default="0.5,2:4")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--eval", type=int, default=1000)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default); on a "
                    "shared, oversubscribed machine 1 is much faster than 2")
    ap.add_argument("--json", default=str(OUT))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    base, tok = load_model("minilm")
    base = base.float().eval()
    texts = [t for t, _ in rotten_tomatoes(seed=args.seed)]
    calib_texts, eval_texts = texts[:args.calib], texts[args.calib:args.calib + args.eval]
    eval_texts.sort(key=len)   # less padding per batch; every variant sees the same order
    calib = [dict(tok(calib_texts[i:i + 16], padding=True, truncation=True, max_length=args.max_length,
                      return_tensors="pt")) for i in range(0, len(calib_texts), 16)]
    ref = mean_pooled_embeddings(base, tok, eval_texts, max_length=args.max_length)
    print(f"all-MiniLM-L6-v2; {len(texts)} snippets, calib {len(calib_texts)}, eval {len(eval_texts)}; "
          f"torch threads {torch.get_num_threads()}")

    rows = []
    for pat, method, model, rep, secs in pruned_copies(base, args.patterns, args.methods, calib):
        cos = torch.nn.functional.cosine_similarity(
            mean_pooled_embeddings(model, tok, eval_texts, max_length=args.max_length), ref, dim=-1)
        row = {"model": "all-MiniLM-L6-v2", "method": method, "pattern": str(pat), "threads": torch.get_num_threads(),
               "cos_mean": float(cos.mean()), "cos_p05": float(cos.quantile(0.05)), "cos_min": float(cos.min()),
               "sparsity": rep.sparsity, "layers_pruned": len(rep.layers), "layers_skipped": len(rep.skipped),
               "prune_s": secs, "n_eval": int(cos.numel()), "n_calib": len(calib_texts),
               "fallbacks": sorted(f for f, li in rep.layers.items() if li.fallback)}
        rows.append(row)
        print(f"  {str(pat):>4} {method:10s} cos mean {row['cos_mean']:.5f}  p05 {row['cos_p05']:.5f}  "
              f"min {row['cos_min']:.5f}  sparsity {row['sparsity']:.4f} ({row['layers_pruned']} layers)  "
              f"{secs:.1f}s", flush=True)

    print("\n| pattern | magnitude | Wanda | SparseGPT |  (mean cosine to fp32; p05 in brackets)")
    print("|---|---:|---:|---:|")
    for pat in dict.fromkeys(r["pattern"] for r in rows):
        cells = []
        for m in METHODS:
            r = next((r for r in rows if r["pattern"] == pat and r["method"] == m), None)
            cells.append(f"{r['cos_mean']:.4f} ({r['cos_p05']:.4f})" if r else "-")
        print(f"| {pat} | " + " | ".join(cells) + " |")
    write_json(rows, args.json)


if __name__ == "__main__":
    main()
