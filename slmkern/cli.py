"""`slmkern` command line: info | bench | compress | eval | demo.

Each subcommand is one function decorated with ``@command``: it adds its parser to the
subparsers and sets ``run=fn(args) -> exit code``. Adding a subcommand is adding one function.
Run as the ``slmkern`` console script or ``python -m slmkern.cli``.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Callable

COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def command(fn: Callable[[argparse._SubParsersAction], None]):
    """Register a subcommand: fn(subparsers) adds its parser and sets defaults(run=...)."""
    COMMANDS.append(fn)
    return fn


class CLIError(Exception):
    """A user error: printed as `slmkern <cmd>: error: ...` with exit code 2, no traceback."""


# ---------------------------------------------------------------- info

@command
def _info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="what this install can do on this machine (ops, ISA, CUDA)")

    def run(args) -> int:
        import slmkern
        print(slmkern.info())
        return 0

    p.set_defaults(run=run)


# ---------------------------------------------------------------- bench

def _benchmarks():
    """slmkern.benchmarks, imported on use: only `slmkern bench` needs it (the cli is the one layer above it)."""
    try:
        from slmkern import benchmarks
    except ModuleNotFoundError as exc:
        if exc.name != "slmkern.benchmarks":
            raise
        raise CLIError("slmkern.benchmarks is not installed (setup.py installs the top-level benchmarks/ folder "
                       "as slmkern.benchmarks; a source tree on PYTHONPATH needs `pip install -e .`)") from None
    return benchmarks


def _argtype(parser: str):
    """An argparse type running slmkern.benchmarks.engine.<parser> (parse_shapes, parse_ms)."""
    def convert(text: str):
        try:
            _benchmarks()
            from slmkern.benchmarks import engine
            return getattr(engine, parser)(text)
        except (ValueError, CLIError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = parser.removeprefix("parse_")
    return convert


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def _resolve_ops(requested: list[str] | None, registry: dict, errors: dict) -> list:
    if not registry:
        raise CLIError("no benchmark ops could be loaded" + (f": {errors}" if errors else ""))
    if not requested:
        return list(registry.values())
    out = []
    for name in requested:
        key = name if name in registry else f"{name}_linear"
        if key not in registry:
            raise CLIError(f"unknown op {name!r}; available: {', '.join(sorted(registry))}"
                           + (f" (failed to load: {errors})" if errors else ""))
        if registry[key] not in out:
            out.append(registry[key])
    return out


@command
def _bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time slmkern ops against their peers, side by side",
                       description="Time each slmkern op and the peers a user would pick instead, in one run, "
                                   "with weights rotating out of cache; report median/p10/p90 us, the bandwidth "
                                   "floor and the fraction of it reached.")
    p.add_argument("--op", action="append", metavar="NAME",
                   help="op to benchmark (repeatable; w8a8_linear or w8a8); default: every registered op")
    p.add_argument("--shape", action="append", type=_argtype("parse_shapes"), metavar="KxN",
                   help="weight shape(s), repeatable or comma list (default 384x1536,576x1536,2048x8192)")
    p.add_argument("--m", type=_argtype("parse_ms"), metavar="M[,M...]", help="batch rows M (default 1,16,128)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="activation dtype for slmkern "
                   "(default float32 on cpu, bfloat16 on cuda); peers keep their own dtype")
    p.add_argument("--reps", type=_positive_int, help="timed calls per impl and case (default: adaptive)")
    p.add_argument("--json", metavar="FILE", help='write {"meta": {...}, "rows": [...]} to FILE')
    p.add_argument("--quick", action="store_true",
                   help="short smoke run: first default shape only unless --shape, few reps, small rotation")
    p.add_argument("--e2e", action="store_true",
                   help="model level instead: SmolLM2 decode and MiniLM forward against HF, llama.cpp and ONNX "
                        "Runtime (benchmarks/bench_e2e.py; takes --json, --quick, --reps; peers: make bench-peers)")

    def run(args) -> int:
        import torch

        if args.e2e:
            given = [f"--{k}" for k in ("op", "shape", "m", "dtype") if getattr(args, k)]
            given += ["--device"] if args.device != "cpu" else []
            if given:
                raise CLIError(f"--e2e takes only --json, --quick and --reps, not {', '.join(given)}")
            _benchmarks()
            from slmkern.benchmarks import bench_e2e
            return bench_e2e.main([], quick=args.quick, reps=args.reps, json_path=args.json)

        bm = _benchmarks()
        from slmkern.benchmarks import engine, report

        registry, errors = bm.registry()
        ops = _resolve_ops(args.op, registry, errors)
        if args.device == "cuda" and not torch.cuda.is_available():
            raise CLIError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
        shapes = [s for group in args.shape for s in group] if args.shape else \
            (list(engine.DEFAULT_SHAPES[:1]) if args.quick else list(engine.DEFAULT_SHAPES))
        ms = args.m or list(engine.DEFAULT_MS)
        dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
        cfg = engine.BenchConfig.quick_config(args.reps) if args.quick else engine.BenchConfig(reps=args.reps)
        for mod, err in errors.items():
            print(f"warning: benchmarks.{mod} not loaded: {err}", file=sys.stderr)

        def on_start(meta):
            print(report.header(meta), flush=True)

        def on_case(case, rows, skipped):
            print()
            print(report.case_block(case, rows, skipped), flush=True)

        result = engine.run(ops, shapes, ms, args.device, dtype, cfg, on_start=on_start, on_case=on_case)
        print()
        print(report.summary(result["rows"]))
        if args.json:
            report.write_json(result, args.json)
            print(f"\nwrote {len(result['rows'])} rows to {args.json}")
        return 0

    p.set_defaults(run=run)


# ---------------------------------------------------------------- compress / eval

def _calibration(tok, kind: str, n: int, seq: int, batch: int = 4, special_tokens: str = "per-window"
                 ) -> list[dict]:
    """evaluation.calibration_batches, its text-too-short error as a CLI error."""
    from slmkern.evaluation import calibration_batches

    try:
        return calibration_batches(tok, kind, n, seq, batch, special_tokens)
    except ValueError as exc:
        if kind != "causal-lm":
            raise
        raise CLIError(f"--calib-seq: {exc}") from None


def _special_tokens_arg(p: argparse.ArgumentParser, what: str) -> None:
    from slmkern.evaluation import SPECIAL_TOKEN_PROTOCOLS
    p.add_argument("--special-tokens", choices=tuple(SPECIAL_TOKEN_PROTOCOLS), default="per-window",
                   help=f"{what}: per-window (default: every window/row framed as the tokenizer frames any "
                        "sequence, add_special_tokens=True), text-start (once for the whole text, as HF's "
                        "non-overlapping perplexity recipe) or none")


def _model_kind(model) -> str:
    name = type(model).__name__
    if name.endswith("ForCausalLM"):
        return "causal-lm"
    if name.endswith("ForSequenceClassification"):
        return "classifier"
    return "encoder"


@command
def _compress(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compress", help="apply a recipe (YAML/JSON) to a model and save it",
                       description="Load a model (short name minilm/smollm2, a local Hugging Face path or a slmkern "
                                   "checkpoint), apply the recipe's steps, print the per-layer report, save to --out.")
    p.add_argument("--model", required=True, help="minilm | smollm2 | local HF path | slmkern checkpoint dir | "
                   "file.gguf (Q4_0/Q4_1 Linears imported as Int4Linear without requantization; the recipe "
                   "then applies to the Linears still float)")
    p.add_argument("--recipe", required=True, help="recipe file (.yaml/.yml/.json)")
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--kind", choices=("auto", "encoder", "causal-lm"), default="auto")
    p.add_argument("--calib-samples", type=_positive_int, default=16, help="calibration sequences (default 16)")
    p.add_argument("--calib-seq", type=_positive_int, default=256, help="tokens per calibration sequence")
    _special_tokens_arg(p, "causal LMs: where the tokenizer's special tokens (BOS) go in the calibration rows")

    def run(args) -> int:
        import time

        from slmkern import checkpoint
        from slmkern.recipes import RecipeError, compress, needs_calibration, parse_recipe

        out = Path(args.out)
        if out.exists() and not args.overwrite:
            raise CLIError(f"--out {str(out)!r} already exists; pass --overwrite to replace it")
        try:
            recipe = parse_recipe(args.recipe)
        except RecipeError as exc:
            raise CLIError(str(exc)) from None
        model, tok = _load_any(args.model, args.kind)
        kind = _model_kind(model)
        calib = None
        if needs_calibration(recipe):
            calib = _calibration(tok, kind, args.calib_samples, args.calib_seq, special_tokens=args.special_tokens)
            if kind == "causal-lm":
                from slmkern.evaluation import describe_special_tokens
                print(f"calibration {describe_special_tokens(tok, args.special_tokens, args.calib_seq, 'row')}",
                      file=sys.stderr)
        t0 = time.perf_counter()
        try:
            report = compress(model, recipe, calibration=calib)
        except (ValueError, TypeError) as exc:
            raise CLIError(str(exc)) from None
        print(report)
        print(f"compressed in {time.perf_counter() - t0:.1f} s")
        try:
            checkpoint.save(model, out, overwrite=args.overwrite, tokenizer=tok,
                            meta={"source": args.model, "recipe": recipe.to_dict(), "report": report.to_dict()})
        except FileExistsError as exc:
            raise CLIError(str(exc)) from None
        print(f"saved to {out}")
        return 0

    p.set_defaults(run=run)


def _load_any(name: str, kind: str = "auto"):
    """(model, tokenizer) from a slmkern checkpoint dir, a GGUF file, a short name or a local HF path."""
    from slmkern import checkpoint
    from slmkern.models import load_model

    path = Path(name)
    if path.is_file() and path.suffix == ".gguf":
        # a GGUF file: the file's own Q4_0/Q4_1 codes in Int4Linear (no requantization), see load_gguf
        from slmkern.interop.gguf import load_gguf
        from slmkern.models import load_tokenizer

        if kind == "encoder":
            raise CLIError(f"--model {name!r}: a GGUF file loads as a causal LM, not with --kind encoder")
        try:
            model = load_gguf(path)
        except (ValueError, TypeError) as exc:
            raise CLIError(str(exc)) from None
        print(f"loaded {path.name} through slmkern.load_gguf (GGUF codes imported as is)", file=sys.stderr)
        return model, load_tokenizer(str(path))
    if (path / checkpoint.CONFIG_NAME).is_file():
        from transformers import AutoTokenizer
        try:
            model = checkpoint.load(path)
        except (ValueError, TypeError) as exc:
            raise CLIError(str(exc)) from None
        return model, AutoTokenizer.from_pretrained(str(path))
    if kind == "auto" and (path / "config.json").is_file():
        # a local HF model keeps its own head (e.g. ForSequenceClassification), named in config.json
        import json

        import transformers
        arch = (json.loads((path / "config.json").read_text()).get("architectures") or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        if cls is not None:
            return cls.from_pretrained(str(path)).eval(), transformers.AutoTokenizer.from_pretrained(str(path))
    try:
        return load_model(name, kind)
    except FileNotFoundError as exc:
        raise CLIError(str(exc)) from None


@command
def _eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model or checkpoint: quality, size, memory, speed",
                       description="Causal LMs: perplexity over non-overlapping windows of the first half of the "
                                   "Wikipedia text + greedy decode tokens/s at batch 1 (KV cache, HF eager loop; "
                                   "median and every rep, ms/token, prefill ms). Classifiers: accuracy and "
                                   "macro precision/recall/F1 on the Rotten Tomatoes test split. Encoders: embedding "
                                   "cosine to --reference. All: size, peak memory, latency at batch 1 and 32.")
    p.add_argument("--model", required=True, help="slmkern checkpoint dir | minilm | smollm2 | local HF path")
    p.add_argument("--kind", choices=("auto", "encoder", "causal-lm"), default="auto")
    p.add_argument("--max-tokens", type=_positive_int, default=8192, help="perplexity: tokens scored (default 8192)")
    p.add_argument("--window", type=_positive_int, default=512, help="perplexity window (default 512)")
    _special_tokens_arg(p, "perplexity: where the tokenizer's special tokens (BOS) go")
    p.add_argument("--decode-tokens", type=_positive_int, default=64, help="greedy decode length (default 64)")
    p.add_argument("--reference", default="minilm", help="encoders: the model to compare embeddings with")
    p.add_argument("--max-length", type=_positive_int, default=64, help="classifier/encoder sequence length")
    p.add_argument("--reps", type=_positive_int, default=3, help="timing repetitions (median)")
    p.add_argument("--json", metavar="FILE", help="write the results as one JSON object")

    def run(args) -> int:
        import json

        import torch

        from slmkern import evaluation as ev
        from slmkern.checkpoint import CONFIG_NAME

        model, tok = _load_any(args.model, args.kind)
        kind = _model_kind(model)
        path = Path(args.model)
        import os
        res = {"model": args.model, "kind": kind, "threads": torch.get_num_threads(),
               "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
               "mb": ev.model_bytes(model) / 1e6,
               "disk_mb": ev.dir_bytes(path) / 1e6 if (path / CONFIG_NAME).is_file() else None}
        with torch.inference_mode():
            if kind == "causal-lm":
                from slmkern.data import wikipedia_text
                text = wikipedia_text()
                print(f"perplexity {ev.describe_special_tokens(tok, args.special_tokens, args.window)}",
                      file=sys.stderr)
                try:
                    res.update(ev.perplexity(model, tok, text[:len(text) // 2], window=args.window,
                                             max_tokens=args.max_tokens, special_tokens=args.special_tokens))
                except ValueError as exc:
                    raise CLIError(f"perplexity: {exc}") from None
                if res["omp_wait_policy"].upper() != "PASSIVE":
                    print("note: OMP_WAIT_POLICY is not PASSIVE: torch's OpenMP threads spin between ops and take "
                          "the cores from the decode loop on a small machine (benchmarks/NOTES.md, "
                          "SmolLM2 decode, session 3)",
                          file=sys.stderr)
                res.update(ev.decode_tokens_per_s(model, tok, new_tokens=args.decode_tokens, reps=args.reps))
                print(f"decode path: {res['decode_path']} (slmkern.generate; 'lean' is the fast batch-1 decoder)",
                      file=sys.stderr)
            else:
                from slmkern.data import rotten_tomatoes
                test = rotten_tomatoes(seed=0)[:ev.EVAL_TEST_SIZE]
                texts = [t for t, _ in test]
                if kind == "classifier":
                    res.update(ev.evaluate_classifier(model, tok, texts, [y for _, y in test],
                                                      max_length=args.max_length, progress=True))
                else:
                    ref, rtok = _load_any(args.reference, "encoder")
                    a = ev.mean_pooled_embeddings(ref, rtok, texts[:512], max_length=args.max_length)
                    b = ev.mean_pooled_embeddings(model, tok, texts[:512], max_length=args.max_length)
                    res.update(ev.embedding_cosine(a, b))
                enc = tok(texts[:32], padding="max_length", truncation=True, max_length=args.max_length,
                          return_tensors="pt")
                b1 = {k: v[:1] for k, v in enc.items()}
                res["latency_ms_b1"] = ev.median_ms(lambda: model(**b1), reps=5 * args.reps)
                res["latency_ms_b32"] = ev.median_ms(lambda: model(**enc), reps=args.reps)
        res["peak_rss_mb"] = ev.peak_rss_mb()
        for k, v in res.items():
            print(f"{k:>20}: {v:.4f}" if isinstance(v, float) else f"{k:>20}: {v}")
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))
            print(f"wrote {args.json}")
        return 0

    p.set_defaults(run=run)


# ---------------------------------------------------------------- demo

@command
def _demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="end-to-end demo on a real small model (slmkern.demo); "
                       "arguments after `demo` go to slmkern.demo.main", add_help=False)
    p.set_defaults(extra_args_ok=True)

    def run(args) -> int:
        try:
            demo = importlib.import_module("slmkern.demo")
        except ModuleNotFoundError as exc:
            if exc.name in ("slmkern.demo",):
                raise CLIError("slmkern.demo is not part of this install (the demo module is missing)") from None
            raise CLIError(f"the demo needs the module {exc.name!r}, which is not installed "
                           "(try: pip install 'slmkern[hf]')") from None
        if not hasattr(demo, "main"):
            raise CLIError("slmkern.demo has no main(argv) function")
        rc = demo.main(list(args.extra_args))
        return int(rc or 0)

    p.set_defaults(run=run)


# ---------------------------------------------------------------- entry point

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slmkern", description="Compression kernels for small language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if extra and not getattr(args, "extra_args_ok", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra_args = extra
    try:
        return args.run(args)
    except CLIError as exc:
        print(f"slmkern {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
