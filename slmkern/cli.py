"""`slmkern` command line: info | bench | demo (compress and eval come later).

Each subcommand is one function decorated with ``@command``: it adds its parser to the
subparsers and sets ``run=fn(args) -> exit code``. Adding a subcommand is adding one function.
Run as the ``slmkern`` console script or ``python -m slmkern.cli``.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
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

def load_benchmarks():
    """The benchmarks package as ``slmkern.benchmarks``.

    From a source tree (``benchmarks/`` next to the imported ``slmkern/``, with setup.py above)
    the tree's own copy is loaded, so a checkout on PYTHONPATH never picks up another install's
    benchmarks; otherwise the installed ``slmkern.benchmarks``.
    """
    name = "slmkern.benchmarks"
    if name in sys.modules:
        return sys.modules[name]
    import slmkern

    root = Path(slmkern.__file__).resolve().parent.parent
    tree = root / "benchmarks"
    if (root / "setup.py").is_file() and (tree / "engine.py").is_file():
        spec = importlib.util.spec_from_file_location(name, tree / "__init__.py",
                                                      submodule_search_locations=[str(tree)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            del sys.modules[name]
            raise
        slmkern.benchmarks = mod
        return mod
    return importlib.import_module(name)


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'384x1536,576x1536' -> [(384, 1536), (576, 1536)]; ValueError naming a malformed item."""
    out = []
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        parts = item.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"malformed shape {item!r}: expected KxN with positive integers, e.g. 384x1536")
        out.append((int(parts[0]), int(parts[1])))
    if not out:
        raise ValueError(f"no shape in {text!r}: expected KxN[,KxN...], e.g. 384x1536")
    return out


def parse_ms(text: str) -> list[int]:
    """'1,16,128' -> [1, 16, 128]; ValueError unless every item is an integer >= 1."""
    out = []
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        if not item.isdigit() or int(item) < 1:
            raise ValueError(f"malformed M {item!r}: expected positive integers, e.g. 1,16,128")
        out.append(int(item))
    if not out:
        raise ValueError(f"no M in {text!r}: expected e.g. 1,16,128")
    return out


def _argtype(parse: Callable):
    def convert(text: str):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = parse.__name__.removeprefix("parse_")
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
    p.add_argument("--shape", action="append", type=_argtype(parse_shapes), metavar="KxN",
                   help="weight shape(s), repeatable or comma list (default 384x1536,576x1536,2048x8192)")
    p.add_argument("--m", type=_argtype(parse_ms), metavar="M[,M...]", help="batch rows M (default 1,16,128)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="activation dtype for slmkern "
                   "(default float32 on cpu, bfloat16 on cuda); peers keep their own dtype")
    p.add_argument("--reps", type=_positive_int, help="timed calls per impl and case (default: adaptive)")
    p.add_argument("--json", metavar="FILE", help='write {"meta": {...}, "rows": [...]} to FILE')
    p.add_argument("--quick", action="store_true",
                   help="short smoke run: first default shape only unless --shape, few reps, small rotation")

    def run(args) -> int:
        import torch

        bm = load_benchmarks()
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
