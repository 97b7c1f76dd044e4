"""`slmkern demo`: compress a small BERT-style encoder (built in code, random weights) to int8 and int4.

Prints the layer count, the Linear weight bytes, the error against fp32 and the
latency of fp32 vs W8A8 / W8A16 / W4A16 / W4A8 on this machine. (The real-model
demo, with fine-tuning, accuracy and sparse variants, builds on this later.)
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from torch import nn

from slmkern import Int4Config, Int8Config, quantize_
from slmkern.nn import Int4Linear, Int8Linear


def build_encoder(seed: int = 0) -> nn.Module:
    """A MiniLM-L6-shaped BERT (hidden 384, 6 layers, FFN 1536) with random weights."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                  intermediate_size=1536, max_position_embeddings=512)
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


def linear_bytes(model: nn.Module) -> int:
    total = 0
    for m in model.modules():
        if type(m) is nn.Linear:
            total += sum(t.numel() * t.element_size() for t in (m.weight, m.bias) if t is not None)
        elif isinstance(m, (Int8Linear, Int4Linear)):
            total += sum(t.numel() * t.element_size() for name, t in m.named_buffers(recurse=False)
                         if name != "w_packed" and t is not None)
    return total


def median_ms(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="slmkern demo", description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    p.add_argument("--reps", type=int, default=15, help="timed forward passes per variant (median reported)")
    p.add_argument("--json", metavar="FILE", help="also write the table as JSON rows")
    args = p.parse_args(argv)
    from tqdm import tqdm

    dense = build_encoder()
    n_lin = sum(type(m) is nn.Linear for m in dense.modules())
    batches = {"b1": torch.randint(0, 30522, (1, args.seq)), "b32": torch.randint(0, 30522, (32, args.seq))}
    rows = []
    variants = [("dense fp32", None),
                ("W8A8 (int8 act)", Int8Config(activations="int8")),
                ("W8A16 (weight-only)", Int8Config(activations="float")),
                ("W4A16 g128 RTN", Int4Config(group_size=128, activations="float")),
                ("W4A8 g128 RTN", Int4Config(group_size=128, activations="int8"))]
    with torch.inference_mode():
        ref = {k: dense(input_ids=ids).last_hidden_state for k, ids in batches.items()}
        for name, cfg in tqdm(variants, desc="variants", unit="model"):
            model = dense if cfg is None else copy.deepcopy(dense)
            swapped = 0
            if cfg is not None:
                swapped = len(quantize_(model, cfg).swapped)
            out = model(input_ids=batches["b32"]).last_hidden_state
            err = (out - ref["b32"]).abs().max().item()
            cos = torch.nn.functional.cosine_similarity(out.flatten(1), ref["b32"].flatten(1)).min().item()
            lat = {k: median_ms(lambda ids=ids: model(input_ids=ids), args.reps if k == "b1" else max(3, args.reps // 5))
                   for k, ids in batches.items()}
            rows.append({"variant": name, "linear_layers": n_lin, "swapped": swapped,
                         "linear_mb": linear_bytes(model) / 1e6, "max_abs_err": err, "min_cosine": cos,
                         "latency_ms_b1": lat["b1"], "latency_ms_b32": lat["b32"]})
    base = rows[0]
    print(f"\nMiniLM-L6-shaped BERT (random weights), {n_lin} Linear layers, seq {args.seq}, "
          f"{torch.get_num_threads()} threads")
    hdr = f"{'variant':<22}{'swapped':>8}{'Linear MB':>11}{'max|err|':>10}{'cosine':>8}{'b1 ms':>9}{'b32 ms':>9}{'x b1':>7}{'x b32':>7}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['variant']:<22}{r['swapped']:>8}{r['linear_mb']:>11.2f}{r['max_abs_err']:>10.4f}"
              f"{r['min_cosine']:>8.4f}{r['latency_ms_b1']:>9.2f}{r['latency_ms_b32']:>9.1f}"
              f"{base['latency_ms_b1'] / r['latency_ms_b1']:>7.2f}{base['latency_ms_b32'] / r['latency_ms_b32']:>7.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
