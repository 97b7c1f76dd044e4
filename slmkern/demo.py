"""`slmkern demo`: MiniLM-L6 fine-tuned on Rotten Tomatoes, compressed five ways, measured side by side.

1. fine-tune all-MiniLM-L6-v2 + a 2-class head on Rotten Tomatoes snippets (train/test split fixed
   by --seed); the result is cached under ~/.cache/slmkern/ keyed by a hash of the settings;
2. variants: dense fp32, W8A8, int4 GPTQ, 50% sparse (Wanda) + int8, 2:4 (Wanda) + distillation,
   each made by one ``slmkern.compress`` recipe (the classifier head stays dense);
3. one table: accuracy, macro precision/recall/F1, model MB (saved size), latency at batch 1 and
   32 (medians, timed round-robin so load changes hit every variant alike) and speed-up vs dense;
   a PNG plot of accuracy against size and against speed; ``--json FILE`` writes the rows.

A variant whose pieces are not in this build is listed as skipped, with what it needs.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import time
from pathlib import Path

import torch

ROW_KEYS = ("variant", "accuracy", "precision", "recall", "f1", "mb", "latency_ms_b1", "latency_ms_b32",
            "speedup_b1", "speedup_b32")
HEAD = ["classifier"]


def variants(int4_act: str, distill_steps: int) -> list[tuple[str, dict | None]]:
    return [
        ("dense fp32", None),
        ("W8A8", {"ignore": HEAD, "steps": [{"quantize": {"algorithm": "int8", "activations": "int8"}}]}),
        ("int4 GPTQ", {"ignore": HEAD, "steps": [{"quantize": {"algorithm": "gptq", "group_size": 128,
                                                               "activations": int4_act}}]}),
        ("50% sparse + int8", {"ignore": HEAD, "steps": [{"prune": {"algorithm": "wanda", "pattern": 0.5}},
                                                         {"sparsify": {"format": "unstructured", "values": "int8"}}]}),
        ("2:4 + distill", {"ignore": HEAD, "steps": [
            {"prune": {"algorithm": "wanda", "pattern": "2:4"}},
            {"distill": {"steps": distill_steps, "lr": 5e-5, "temperature": 2.0, "label_weight": 0.5}},
            {"sparsify": {"format": "2:4", "values": "int8"}}]}),
    ]


def _batches(tok, pairs, batch_size: int, max_length: int, labels: bool = True) -> list[dict]:
    out = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        enc = dict(tok([t for t, _ in chunk], padding=True, truncation=True, max_length=max_length,
                       return_tensors="pt"))
        if labels:
            enc["labels"] = torch.tensor([y for _, y in chunk])
        out.append(enc)
    return out


def finetune(train, args, cache_root: Path):
    """The fine-tuned dense classifier and its tokenizer (cached by a hash of the settings)."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    from slmkern import checkpoint
    from slmkern.models import model_path

    settings = {"model": "minilm", "steps": args.train_steps, "batch": args.train_batch, "lr": args.lr,
                "max_length": args.max_length, "seed": args.seed, "test_size": args.test_size, "v": 2}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    cache = cache_root / f"minilm-rt-{key}"
    if (cache / checkpoint.CONFIG_NAME).is_file() and not args.no_cache:
        print(f"fine-tuned model: cached at {cache}")
        return checkpoint.load(cache), AutoTokenizer.from_pretrained(str(cache))
    path, _ = model_path("minilm")
    tok = AutoTokenizer.from_pretrained(str(path))
    torch.manual_seed(args.seed)
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()   # "classifier newly initialised" is expected here
    model = BertForSequenceClassification.from_pretrained(str(path), num_labels=2)
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train), generator=g).tolist()
    n = args.train_steps * args.train_batch
    order = (order * (n // len(order) + 1))[:n]
    for p in model.bert.embeddings.parameters():   # frozen: a third less work per step, same accuracy here
        p.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.01)
    warm = max(1, args.train_steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: (i + 1) / warm if i < warm else max(0.0, (args.train_steps - i) / (args.train_steps - warm)))
    model.train()
    from tqdm.auto import tqdm
    bar = tqdm(range(args.train_steps), desc="fine-tune MiniLM", unit="step")
    for step in bar:
        idx = order[step * args.train_batch:(step + 1) * args.train_batch]
        b = _batches(tok, [train[i] for i in idx], args.train_batch, args.max_length)[0]
        loss = model(**b).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    checkpoint.save(model, cache, overwrite=True, tokenizer=tok, meta={"settings": settings})
    print(f"fine-tuned model: saved to {cache}")
    return model, tok


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["accuracy"] is not None]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "mb", "model size (MB)"), (axes[1], "speedup_b32", "speed-up vs dense fp32 (batch 32)")):
        for r in done:
            ax.scatter(r[key], 100 * r["accuracy"], s=40)
            ax.annotate(r["variant"], (r[key], 100 * r["accuracy"]), textcoords="offset points", xytext=(5, 4),
                        fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].set_title("accuracy vs size")
    axes[1].set_title("accuracy vs speed")
    fig.suptitle("MiniLM-L6 on Rotten Tomatoes: slmkern variants")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(rows: list[dict], notes: dict[str, str]) -> None:
    hdr = (f"{'variant':<20}{'accuracy':>9}{'precision':>10}{'recall':>8}{'f1':>8}{'MB':>8}"
           f"{'b1 ms':>8}{'b32 ms':>9}{'x b1':>7}{'x b32':>7}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        if r["accuracy"] is None:
            print(f"{r['variant']:<20}  skipped: {notes.get(r['variant'], '')}")
            continue
        print(f"{r['variant']:<20}{100 * r['accuracy']:>8.2f}%{100 * r['precision']:>9.2f}%{100 * r['recall']:>7.2f}%"
              f"{100 * r['f1']:>7.2f}%{r['mb']:>8.1f}{r['latency_ms_b1']:>8.2f}{r['latency_ms_b32']:>9.1f}"
              f"{r['speedup_b1']:>7.2f}{r['speedup_b32']:>7.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="slmkern demo", description=__doc__.splitlines()[0])
    p.add_argument("--json", metavar="FILE", help="write the table as JSON rows")
    p.add_argument("--plot", metavar="PNG", default="results/demo.png", help="plot path (default results/demo.png)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-size", type=int, default=1000)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--train-steps", type=int, default=100)
    p.add_argument("--train-batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--distill-steps", type=int, default=60)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--int4-activations", choices=("int8", "float"), default="int8",
                   help="int4 variant: W4A8 (int8, default: faster here) or W4A16 (float)")
    p.add_argument("--reps", type=int, default=9, help="timed batch-1 passes per variant (batch 32: reps/3)")
    p.add_argument("--variants", help="comma list of variant names to run (default: all)")
    p.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "slmkern"))
    p.add_argument("--no-cache", action="store_true", help="fine-tune again even if a cached model exists")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tqdm.auto import tqdm

    from slmkern.data import rotten_tomatoes
    from slmkern.evaluation import median_ms, model_bytes, predict_classes, classification_metrics
    from slmkern.recipes import StepUnavailable, compress

    t_start = time.perf_counter()
    data = rotten_tomatoes(seed=args.seed)
    test, train = data[:args.test_size], data[args.test_size:]
    print(f"Rotten Tomatoes: {len(train)} train / {len(test)} test snippets (seed {args.seed}); "
          f"{torch.get_num_threads()} threads")
    dense, tok = finetune(train, args, Path(args.cache_dir))
    texts, labels = [t for t, _ in test], [y for _, y in test]
    calib = _batches(tok, train[:args.calib_samples], 16, args.max_length, labels=False)
    distill_data = _batches(tok, train[-args.distill_steps * 16:], 16, args.max_length)
    enc = tok(texts[:32], padding="max_length", truncation=True, max_length=args.max_length, return_tensors="pt")
    timing = {"b1": {k: v[:1] for k, v in enc.items()}, "b32": dict(enc)}

    chosen = variants(args.int4_activations, args.distill_steps)
    if args.variants:
        want = [v.strip() for v in args.variants.split(",")]
        chosen = [v for v in chosen if v[0] in want or v[0] == "dense fp32"]
    models, notes, rows = {}, {}, []
    for name, recipe in chosen:
        if recipe is None:
            models[name] = dense
            continue
        print(f"\n== {name}")
        m = copy.deepcopy(dense)
        try:
            rep = compress(m, recipe, calibration=calib, teacher=dense, distill_data=distill_data)
        except StepUnavailable as exc:
            notes[name] = str(exc)
            print(f"   skipped: {exc}")
            continue
        for n in rep.notes:
            print(f"   {n}")
        models[name] = m.eval()
    metrics = {}
    for name, m in tqdm(models.items(), desc="evaluate", unit="variant"):
        with torch.inference_mode():
            pred = predict_classes(m, tok, texts, batch_size=64, max_length=args.max_length, progress=True,
                                   desc=name)
        metrics[name] = classification_metrics(pred, labels, 2)
    lat = {name: {"b1": [], "b32": []} for name in models}
    reps32 = max(3, args.reps // 3)
    with torch.inference_mode():
        for m in models.values():  # warm-up
            m(**timing["b1"])
            m(**timing["b32"])
        for r in tqdm(range(args.reps), desc="latency (round-robin)", unit="round"):
            for name, m in models.items():
                lat[name]["b1"].append(median_ms(lambda: m(**timing["b1"]), reps=1, warmup=0))
                if r < reps32:
                    lat[name]["b32"].append(median_ms(lambda: m(**timing["b32"]), reps=1, warmup=0))
    import statistics
    base = {k: statistics.median(lat["dense fp32"][k]) for k in ("b1", "b32")}
    for name, _ in chosen:
        if name not in models:
            rows.append(dict.fromkeys(ROW_KEYS) | {"variant": name})
            continue
        b1, b32 = statistics.median(lat[name]["b1"]), statistics.median(lat[name]["b32"])
        mt = metrics[name]
        rows.append({"variant": name, "accuracy": mt["accuracy"], "precision": mt["precision"],
                     "recall": mt["recall"], "f1": mt["f1"], "mb": model_bytes(models[name]) / 1e6,
                     "latency_ms_b1": b1, "latency_ms_b32": b32,
                     "speedup_b1": base["b1"] / b1, "speedup_b32": base["b32"] / b32})
    print(f"\nMiniLM-L6 fine-tuned on Rotten Tomatoes ({len(test)} test snippets), seq {args.max_length}, "
          f"{torch.get_num_threads()} threads; MB = saved model size (embeddings stay fp32)")
    print_table(rows, notes)
    dense_acc = rows[0]["accuracy"]
    for r in rows[1:]:
        if r["accuracy"] is not None:
            print(f"  {r['variant']}: {100 * (r['accuracy'] - dense_acc):+.2f} accuracy points vs dense")
    plot = Path(args.plot)
    _plot(rows, plot)
    print(f"wrote {plot}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"wrote {args.json}")
    print(f"demo took {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
