"""SmolLM2-135M greedy decode at batch 1: tokens/s and a per-step time breakdown.

Same loop as ``slmkern.evaluation.decode_tokens_per_s`` (HF eager fp32, KV cache, one token
per step, prompt "The history of the city", 64 new tokens). Variants are built in process
(data-free: dense, W8A8, int4 RTN g64 with or without a quantized head) or loaded from
slmkern checkpoints (``--ckpt NAME=DIR``, e.g. the GPTQ models written by ``slmkern compress``).

    OMP_WAIT_POLICY=PASSIVE python -P -m slmkern.benchmarks.decode_smollm2 --runs 2 --reps 3
    OMP_WAIT_POLICY=PASSIVE python -P -m slmkern.benchmarks.decode_smollm2 --profile --variants dense,int4_rtn_head8

--profile: one warm decode step per variant timed per module class with perf_counter hooks
(slmkern linears, fp32 nn.Linear, lm_head, attention, MLP glue, norms, rotary, the rest =
HF Python + sampling), medians over 32 steps, and the weight bytes streamed per token
against the memory floor (bytes / measured read bandwidth).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

PROMPT = "The history of the city"

VARIANTS = {
    "dense": None,
    "w8a8": "recipes/smollm2_w8a8.yaml",
    "int4_rtn": {"steps": [{"quantize": {"algorithm": "rtn", "group_size": 64, "activations": "float"}}]},
    "int4_rtn_head8": {"steps": [{"quantize": {"algorithm": "rtn", "group_size": 64, "activations": "float"}},
                                 {"quantize": {"algorithm": "int8", "activations": "float", "skip_names": [],
                                               "targets": ["lm_head"]}}]},
    "int4_rtn_head4": {"steps": [{"quantize": {"algorithm": "rtn", "group_size": 64, "activations": "float",
                                               "skip_names": []}}]},
}


def build(name: str, ckpts: dict[str, str]):
    from slmkern.models import load_model
    if name in ckpts:
        from transformers import AutoTokenizer

        from slmkern import checkpoint
        return checkpoint.load(ckpts[name]), AutoTokenizer.from_pretrained(ckpts[name])
    model, tok = load_model("smollm2")
    recipe = VARIANTS[name]
    if recipe is not None:
        from slmkern import compress
        compress(model, recipe, progress=False)
    return model.eval(), tok


@torch.inference_mode()
def decode_rate(model, tok, new_tokens: int, reps: int) -> float:
    from slmkern.evaluation import decode_tokens_per_s
    return decode_tokens_per_s(model, tok, PROMPT, new_tokens=new_tokens, reps=reps)["decode_tokens_per_s"]


def _category(fqn: str, mod: nn.Module) -> str | None:
    cls = type(mod).__name__
    if fqn.endswith("lm_head"):
        return "lm_head"
    if cls in ("Int8Linear", "Int4Linear", "SparseLinear"):
        return "slmkern linears"
    if cls == "Linear":
        return "fp32 linears"
    if cls.endswith("RMSNorm"):
        return "rmsnorm"
    if cls.endswith("RotaryEmbedding"):
        return "rotary table"
    if cls.endswith("Attention"):
        return "attention (excl. its linears)"
    if cls.endswith("MLP"):
        return "mlp glue (silu*mul)"
    if cls.endswith("DecoderLayer"):
        return "decoder layer glue (residual adds)"
    if cls == "Embedding":
        return "embedding"
    return None


@torch.inference_mode()
def profile_step(model, tok, steps: int = 32) -> dict:
    """Exclusive time per module category for one decode step (median over `steps` steps)."""
    stack: list[list] = []   # [category, t0, child_time]
    acc: dict[str, float] = {}
    handles = []

    def pre(cat):
        def hook(mod, args):
            stack.append([cat, time.perf_counter(), 0.0])
        return hook

    def post(mod, args, out):
        cat, t0, child = stack.pop()
        dt = time.perf_counter() - t0
        acc[cat] = acc.get(cat, 0.0) + dt - child
        if stack:
            stack[-1][2] += dt
    for fqn, mod in model.named_modules():
        cat = _category(fqn, mod)
        if cat is not None:
            handles.append(mod.register_forward_pre_hook(pre(cat)))
            handles.append(mod.register_forward_hook(post))
    ids = tok(PROMPT, return_tensors="pt").input_ids
    out = model(input_ids=ids, use_cache=True)
    past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    per_step: list[dict] = []
    for _ in range(steps + 2):
        acc.clear()
        t0 = time.perf_counter()
        out = model(input_ids=nxt, past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        total = time.perf_counter() - t0
        row = dict(acc)
        row["HF python + rest"] = total - sum(acc.values())
        row["total"] = total
        per_step.append(row)
    for h in handles:
        h.remove()
    per_step = per_step[2:]
    keys = sorted({k for r in per_step for k in r}, key=lambda k: -statistics.median(r.get(k, 0) for r in per_step))
    return {k: statistics.median(r.get(k, 0.0) for r in per_step) * 1e3 for k in keys}


def weight_bytes_per_token(model) -> dict:
    """Bytes each decode step streams: every Linear-like module's weights (packed layout where the
    kernel reads it) + norms; the embedding reads one row only."""
    lin, head, other = 0, 0, 0
    for fqn, mod in model.named_modules():
        cls = type(mod).__name__
        if cls in ("Linear", "Int8Linear", "Int4Linear", "SparseLinear"):
            if cls == "Linear":
                b = mod.weight.numel() * mod.weight.element_size()
            else:
                packed = getattr(mod, "w_packed", None)
                b = packed.numel() if packed is not None else sum(t.numel() * t.element_size()
                                                                   for t in mod.state_dict().values())
            if fqn.endswith("lm_head"):
                head += b
            else:
                lin += b
        elif cls.endswith("RMSNorm"):
            other += sum(p.numel() * p.element_size() for p in mod.parameters(recurse=False))
    return {"linears": lin, "lm_head": head, "norms": other, "total": lin + head + other}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="dense,w8a8,int4_rtn,int4_rtn_head8,int4_rtn_head4")
    ap.add_argument("--ckpt", action="append", default=[], help="NAME=DIR: a slmkern checkpoint as variant NAME")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    ckpts = dict(c.split("=", 1) for c in args.ckpt)
    names = [v for v in args.variants.split(",") if v] + [n for n in ckpts if n not in args.variants.split(",")]
    bw = None
    try:
        import os
        import sys
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from machine import measure_bandwidth
        bw = measure_bandwidth("cpu", buffer_mb=256, tries=4, attempts=1)["gbs"]
    except Exception as exc:  # noqa: BLE001 - the floor column is optional
        print(f"(no bandwidth measurement: {exc})")
    print(f"threads {torch.get_num_threads()}, read bandwidth {bw and round(bw, 1)} GB/s")
    models = {n: build(n, ckpts) for n in names}
    res: dict = {"bandwidth_gbs": bw, "variants": {}}
    for n, (m, tok) in models.items():
        wb = weight_bytes_per_token(m)
        res["variants"][n] = {"bytes": wb, "rates": []}
        if bw:
            res["variants"][n]["floor_tok_s"] = bw * 1e9 / wb["total"]
    for r in range(args.runs):               # interleaved: run r measures every variant once
        for n, (m, tok) in models.items():
            res["variants"][n]["rates"].append(decode_rate(m, tok, args.new_tokens, args.reps))
    dense = statistics.median(res["variants"]["dense"]["rates"]) if "dense" in res["variants"] else None
    print(f"{'variant':<18}{'tok/s per run':>26}{'median':>9}{'vs dense':>9}{'MB/token':>10}{'floor tok/s':>12}")
    for n, v in res["variants"].items():
        med = statistics.median(v["rates"])
        v["median"] = med
        rel = f"{med / dense:.2f}x" if dense else "-"
        fl = f"{v['floor_tok_s']:.0f}" if "floor_tok_s" in v else "-"
        print(f"{n:<18}{' / '.join(f'{x:.1f}' for x in v['rates']):>26}{med:>9.1f}{rel:>9}"
              f"{v['bytes']['total'] / 1e6:>10.1f}{fl:>12}")
    if args.profile:
        for n, (m, tok) in models.items():
            prof = profile_step(m, tok)
            res["variants"][n]["profile_ms"] = prof
            print(f"\n{n}: one decode step (median of 32), ms")
            for k, v in prof.items():
                print(f"  {k:<36}{v:8.3f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
