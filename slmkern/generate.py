"""Greedy generation for Hugging Face causal LMs, batch 1: a lean decoder, a compiled decode step, or HF eager.

``slmkern.generate(model, tokenizer, prompt, max_new_tokens)`` runs batch-1 greedy decoding on one of three
paths (``mode``; ``GenerateResult.path`` says which ran):

"lean" (``slmkern.decoder.LeanDecoder``, the default where it applies: Llama / Mistral / Qwen2 layouts with
full attention over the cache): the model's own weights and modules in a loop written for batch 1, HF's aten
ops on HF's values (so HF's tokens, bit for bit), q/k/v and gate/up fused into one kernel call each, a KV
cache allocated once, no HF Python per token. The fastest path on the CPU.

"compiled" (the default for the other supported layouts, e.g. Gemma2 or sliding-window layers):

- the prompt (prefill) runs eagerly, exactly as HF generate runs it (modules' CPU fast path, HF's
  DynamicCache); its keys/values then move into a KV cache allocated once per (model, cache length),
  the length being prompt + max_new_tokens rounded up to a bucket (``cache_bucket``);
- each next token comes from ``torch.compile(fullgraph=True)`` over HF's own forward for one token plus
  the argmax. slmkern's linears appear in that graph as ``torch.ops.slmkern.*`` custom ops (fake kernels
  in ``slmkern.ops``). The number of cached tokens enters as a symbolic size, so attention sees exactly the
  shapes it sees in HF eager and one graph serves every length (up to three with sliding-window layers);
- compiled steps are kept per (model object, cache length, backend, exact) and reused by later calls.

"eager": HF's own ``model.generate``.

exact=True (default) compiles with inductor running every aten op as its eager kernel: the tokens are
those of ``model.generate(ids, max_new_tokens=..., do_sample=False)``, bit for bit, and the gain is only
the Python that disappears. exact=False lets inductor fuse (norms, rope, residuals): faster, but its
last-bit differences can flip a near-tie greedy token (W8A8 quantizes activations, which amplifies
them), so it is not guaranteed to match HF.

Anything the lean and compiled paths do not cover (another architecture, a generation_config that changes greedy
logits, a model off the CPU, a compile error) runs HF's own eager ``generate`` instead, with one log line
saying why. Sampling and beam search are not offered.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
import types
import weakref
from typing import Callable

import torch
from torch import nn

from slmkern._logging import log_once

# Decoder layouts whose HF forward was checked under fullgraph compile with the cache built below
# (tests/test_generate.py). Any other model_type takes the eager path.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")
_LAYER_TYPES = ("full_attention", "sliding_attention")

# generation_config fields that make HF's greedy search differ from a plain argmax (logits processors,
# other decoding modes, extra stopping criteria), with the value that means "off".
_GREEDY_NEUTRAL = {
    "num_beams": 1, "num_return_sequences": 1, "min_length": 0, "min_new_tokens": 0, "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None, "sequence_bias": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "exponential_decay_length_penalty": None, "suppress_tokens": None, "begin_suppress_tokens": None,
    "guidance_scale": 1.0, "watermarking_config": None, "stop_strings": None, "max_time": None,
    "penalty_alpha": None, "dola_layers": None, "constraints": None, "force_words_ids": None,
    "prompt_lookup_num_tokens": None, "use_mtp": False,
}


@dataclasses.dataclass(frozen=True)
class GenerateResult:
    """What ``generate`` produced and how.

    ``tokens`` are the new token ids, shape [1, n] (n < max_new_tokens when an EOS token ended the
    run; the EOS token is included, as HF does); ``sequences`` is prompt + new tokens, HF's layout.
    ``prefill_s`` covers the prompt's forward and the first new token, ``decode_s`` the other n - 1
    tokens; compilation is not in either (it happens once, before the prompt runs, in ``compile_s``).
    ``path`` is "lean", "compiled" or "eager"; ``reason`` says why the eager path ran (None otherwise).
    """

    tokens: torch.Tensor
    sequences: torch.Tensor
    prefill_s: float
    decode_s: float
    path: str
    reason: str | None = None
    cache_len: int | None = None        # KV cache length of the lean or compiled path
    compile_s: float = 0.0              # spent compiling in this call (0 when a cached graph was reused)
    graphs_compiled: int = 0            # graphs compiled in this call (0 when a cached graph was reused)
    text: str | None = None             # the new tokens decoded, when a tokenizer was given

    @property
    def prompt_tokens(self) -> int:
        return self.sequences.shape[1] - self.tokens.shape[1]

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tok_s(self) -> float:
        """Tokens/s over the decode steps (n - 1 of them: the first token comes out of prefill)."""
        n = self.tokens.shape[1] - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else float("nan")


def cache_bucket(total_tokens: int) -> int:
    """KV cache length for prompt + new tokens: the next power of two from 64 up to 1024, then the next
    multiple of 1024. The buffer size is part of the compiled graph, so few distinct lengths mean few
    compiles; attention only ever reads the filled part, so the rounding costs memory, not time."""
    if total_tokens <= 1024:
        return max(64, 1 << (total_tokens - 1).bit_length())
    return -(-total_tokens // 1024) * 1024


# ----------------------------------------------------------------------------- the KV cache
def _layer_class():
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        """One layer's keys/values in a buffer [1, H, max_len, D] allocated once, handing attention exactly the
        states HF's DynamicLayer / DynamicSlidingWindowLayer would: the filled positions [0, n), or the last
        ``sliding_window`` of them. Same shapes, same masks, same sdpa call as HF eager, hence the same bits:
        a padded cache with a mask (HF's StaticCache) changes the last bits of attention, and under W8A8 that
        is enough to flip a greedy token now and then.

        ``n`` (tokens in the cache once the current token is written) is set by the decode step from an input
        tensor's size, so dynamo traces it as one symbolic size: one graph serves every length (two for a
        sliding layer: before and after the window fills).
        """

        is_compileable = False   # as DynamicCache: masking then skips or builds masks exactly as it does in HF eager

        def __init__(self, max_len: int, sliding_window: int | None) -> None:
            super().__init__()
            self.max_len, self.sliding_window, self.is_sliding = max_len, sliding_window, sliding_window is not None
            self.n = 0

        def load(self, keys: torch.Tensor, values: torch.Tensor, T: int) -> None:
            """Take the prompt's states from HF's dynamic layer after prefill (they end at position T)."""
            if self.keys is None or self.keys.shape[:2] != keys.shape[:2] or self.keys.dtype != keys.dtype:
                self.keys = keys.new_zeros((*keys.shape[:2], self.max_len, keys.shape[3]))
                self.values = values.new_zeros((*values.shape[:2], self.max_len, values.shape[3]))
                self.device, self.is_initialized = keys.device, True
            L = keys.shape[2]
            self.keys[:, :, T - L:T].copy_(keys)
            self.values[:, :, T - L:T].copy_(values)
            self.n = T

        def update(self, key_states, value_states, *args, **kwargs):
            n = self.n
            self.keys[:, :, n - 1:n].copy_(key_states)
            self.values[:, :, n - 1:n].copy_(value_states)
            start = max(n - self.sliding_window, 0) if self.is_sliding else 0
            return self.keys[:, :, start:n], self.values[:, :, start:n]

        def get_seq_length(self) -> int:          # tokens before the current one
            return self.n - 1

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            past = self.n - query_length
            if not self.is_sliding:
                return past + query_length, 0
            # as DynamicSlidingWindowLayer.get_mask_sizes
            kv_offset = max(past - self.sliding_window + 1, 0)
            kv_length = (self.sliding_window - 1 if past >= self.sliding_window else past) + query_length
            return kv_length, kv_offset

        def get_max_length(self) -> int:
            return self.max_len

        def reset(self) -> None:
            self.n = 0

    return PreallocatedLayer


# ----------------------------------------------------------------------------- the compiled decode step
def _decode_step(model, cache, token, position, span):
    """One token through HF's forward; returns the greedy next token [1, 1]. span.shape[0] is the number of
    tokens in the cache once `token` is in (a size, not a value, so dynamo keeps it symbolic)."""
    n = span.shape[0]
    for layer in cache.layers:
        layer.n = n
    out = model(input_ids=token, position_ids=position, cache=cache, use_cache=True)
    return out.logits[:, -1].argmax(-1, keepdim=True)


def _fresh_step_fn(tag: str):
    """A copy of _decode_step with its own code object. Dynamo keeps compiled graphs and its
    recompile budget per code object: one copy per runner keeps each (model, cache length) apart,
    so many models or buckets in one process never exhaust one shared budget (fullgraph=True turns
    that into a hard error) nor make every step check the guards of unrelated graphs."""
    code = _decode_step.__code__.replace(co_name=f"_decode_step_{tag}")
    return types.FunctionType(code, _decode_step.__globals__, code.co_name)


def _inductor(exact: bool):
    """Inductor. exact=True keeps eager's numerics: every aten op runs as the eager kernel (no fusion, no
    decomposition: the two switches of inductor's "lite" mode), so only the Python around the ops goes away.
    Unlike "lite" it keeps inductor's graph passes (reinplacing: the cache writes stay in place instead of
    copying each layer's whole cache back every step), dead-code elimination and buffer reuse, which move
    no arithmetic."""
    from torch._inductor import compile_fx

    if not exact:
        return compile_fx.compile_fx
    return functools.partial(compile_fx.compile_fx,
                             config_patches={"fallback_by_default": True, "selective_decompose": True})


class _DecodeRunner:
    """A preallocated KV cache of ``cache_len`` positions and the compiled step that decodes into it."""

    def __init__(self, model: nn.Module, cache_len: int, backend, exact: bool) -> None:
        from transformers.cache_utils import Cache, DynamicCache

        # per-layer windows exactly as HF's DynamicCache derives them from the config
        windows = [getattr(layer, "sliding_window", None) if getattr(layer, "is_sliding", False) else None
                   for layer in DynamicCache(config=model.config).layers]
        layer_cls = _layer_class()
        self.cache = Cache(layers=[layer_cls(cache_len, w) for w in windows])
        self.cache_len = cache_len
        self.span = torch.empty(cache_len + 1, 0)   # span[:n] carries n into the step as a size
        self.lock = threading.Lock()                # one generation at a time: the cache is shared state
        self.graphs_compiled = 0
        self.failed: str | None = None              # why this runner cannot be used (a compile error), once known
        self.warm = False
        inner = _inductor(exact) if backend == "inductor" else torch._dynamo.lookup_backend(backend)

        def counting_backend(gm, example_inputs):
            self.graphs_compiled += 1
            return inner(gm, example_inputs)

        self.step = torch.compile(_fresh_step_fn(f"{cache_len}_{id(self):x}"), backend=counting_backend,
                                  fullgraph=True)

    def prefill(self, model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """The prompt through HF's forward exactly as HF generate runs it (DynamicCache, logits of the last
        token only), its keys/values moved into the preallocated cache; returns the first new token [1, 1]."""
        from transformers.cache_utils import DynamicCache

        dyn = DynamicCache(config=model.config)
        kw = {"logits_to_keep": 1} if model._supports_logits_to_keep() else {}
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), cache=dyn, use_cache=True, **kw)
        T = ids.shape[1]
        for mine, theirs in zip(self.cache.layers, dyn.layers, strict=True):
            mine.load(theirs.keys, theirs.values, T)
        return out.logits[:, -1].argmax(-1, keepdim=True)

    def decode(self, model: nn.Module, token: torch.Tensor, n: int) -> torch.Tensor:
        """Next token after `token`, which sits at position n - 1."""
        span = self.span[:n]
        torch._dynamo.maybe_mark_dynamic(span, 0)
        return self.step(model, self.cache, token, torch.tensor([[n - 1]]), span)

    def warm_up(self, model: nn.Module) -> float:
        """Compile the step before any timed work; returns seconds spent. A sliding layer's masks and slices
        differ below, at and past its window, so those lengths get their graphs here too."""
        t0 = time.perf_counter()
        lengths = {3} | {n for layer in self.cache.layers if layer.is_sliding
                         for n in (layer.sliding_window, layer.sliding_window + 1) if 3 <= n <= self.cache_len}
        for n in sorted(lengths):
            tok = self.prefill(model, torch.zeros(1, n - 1, dtype=torch.long))
            self.decode(model, tok, n)
        self.warm = True
        return time.perf_counter() - t0


_RUNNERS: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, _DecodeRunner]]" = weakref.WeakKeyDictionary()
_RUNNERS_LOCK = threading.Lock()


def _runner(model: nn.Module, cache_len: int, backend, exact: bool) -> _DecodeRunner:
    with _RUNNERS_LOCK:
        per_model = _RUNNERS.setdefault(model, {})
        key = (cache_len, backend, exact, next(model.parameters()).dtype)
        if key not in per_model:
            per_model[key] = _DecodeRunner(model, cache_len, backend, exact)
        return per_model[key]


def clear_compiled(model: nn.Module | None = None) -> None:
    """Forget the compiled decode steps and lean decoders (and their KV caches) of `model`, or of every model."""
    with _RUNNERS_LOCK:
        if model is None:
            _RUNNERS.clear()
            _LEAN.clear()
        else:
            _RUNNERS.pop(model, None)
            _LEAN.pop(model, None)


_LEAN: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _lean_decoder(model: nn.Module, cache_len: int):
    """The model's LeanDecoder (built once, rebuilt when a module or weight of the model changed) and its lock."""
    from slmkern.decoder import LeanDecoder

    with _RUNNERS_LOCK:
        dec, lock = _LEAN.get(model, (None, None))
        if dec is None or dec.stale(model):
            dec, lock = LeanDecoder(model, cache_len), threading.Lock()
            _LEAN[model] = (dec, lock)
        return dec, lock


# ----------------------------------------------------------------------------- checks
def _check_model(model) -> None:
    try:
        from transformers import GenerationMixin, PreTrainedModel
    except ImportError as exc:  # pragma: no cover - transformers is a dependency of this module's users
        raise TypeError(f"model: slmkern.generate needs transformers ({exc})") from None
    if not (isinstance(model, PreTrainedModel) and isinstance(model, GenerationMixin) and model.can_generate()):
        raise TypeError(f"model: expected a Hugging Face causal LM (e.g. AutoModelForCausalLM), got "
                        f"{type(model).__name__}")
    if getattr(model.config, "is_encoder_decoder", False):
        raise TypeError(f"model: expected a decoder-only causal LM, got the encoder-decoder {type(model).__name__}")


def _prompt_ids(tokenizer, prompt) -> torch.Tensor:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("tokenizer: needed to encode a str prompt (or pass prompt as input ids [1, T])")
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    elif isinstance(prompt, torch.Tensor):
        ids = prompt
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"prompt: input ids must be an integer tensor, got {ids.dtype}")
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2:
            raise ValueError(f"prompt: input ids must have shape [1, T], got {tuple(ids.shape)}")
        if ids.shape[0] != 1:
            raise ValueError(f"prompt: batch 1 only, got input ids of shape {tuple(ids.shape)}")
    else:
        raise TypeError(f"prompt: expected a str or a LongTensor of input ids [1, T], got {type(prompt).__name__}")
    if ids.shape[1] == 0:
        raise ValueError("prompt: is empty (0 tokens)")
    return ids.long()


def _eager_reason(model, gen_cfg) -> str | None:
    """Why the compiled path cannot run this model exactly as HF greedy does (None: it can)."""
    cfg = model.config.get_text_config(decoder=True)
    model_type = getattr(cfg, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model_type {model_type!r} is not one the compiled path supports {SUPPORTED_MODEL_TYPES}"
    odd = sorted({t for t in (getattr(cfg, "layer_types", None) or ()) if t not in _LAYER_TYPES})
    if odd:
        return f"layer_types {odd} (the compiled path handles {_LAYER_TYPES})"
    attn = getattr(model.config, "_attn_implementation", None)
    if attn not in ("sdpa", "eager"):
        return f"attention implementation {attn!r} (the compiled path handles 'sdpa' and 'eager')"
    devices = {t.device.type for t in model.parameters()} | {t.device.type for t in model.buffers()}
    if devices != {"cpu"}:
        return f"model is on {sorted(devices)}; the compiled path is CPU only for now"
    for name, neutral in _GREEDY_NEUTRAL.items():
        value = getattr(gen_cfg, name, None)
        if value is not None and value != neutral and not (neutral is None and value in ([], {}, ())):
            return f"generation_config.{name}={value!r} changes greedy decoding (the compiled path does plain argmax)"
    return None


def _eos_ids(gen_cfg) -> set[int]:
    eos = gen_cfg.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in (eos.tolist() if isinstance(eos, torch.Tensor) else eos if isinstance(eos, (list, tuple))
                             else [eos])}


# ----------------------------------------------------------------------------- the two paths
class _Clock:
    """A streamer for HF generate that only timestamps: put() is called with the prompt, then per new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _generate_eager(model, ids, max_new_tokens: int, stop_at_eos: bool, gen_cfg) -> tuple:
    """HF's own greedy generate (the reference); timings from a streamer."""
    clock = _Clock()
    kw = {"pad_token_id": next(iter(_eos_ids(gen_cfg)), 0)} if gen_cfg.pad_token_id is None else {}
    if not stop_at_eos:
        kw["eos_token_id"] = []
    t0 = time.perf_counter()
    seq = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         streamer=clock, **kw)
    t_end = time.perf_counter()
    # clock.times: [prompt, first new token, ...]
    t_first = clock.times[1] if len(clock.times) > 1 else t_end
    return seq, t_first - t0, t_end - t_first


def _generate_lean(dec, ids, max_new_tokens: int, eos: set[int]) -> tuple:
    t0 = time.perf_counter()
    tok = dec.prefill(ids)
    new = [int(tok)]
    t1 = time.perf_counter()
    if max_new_tokens > 1 and new[-1] not in eos:
        new += dec.decode_many(tok, max_new_tokens - 1, eos)
    t2 = time.perf_counter()
    seq = torch.cat([ids, torch.tensor([new], dtype=torch.long)], dim=1)
    return seq, t1 - t0, t2 - t1


def _generate_compiled(runner: _DecodeRunner, model, ids, max_new_tokens: int, eos: set[int]) -> tuple:
    T = ids.shape[1]
    t0 = time.perf_counter()
    tok = runner.prefill(model, ids)
    new = [int(tok)]
    t1 = time.perf_counter()
    for i in range(1, max_new_tokens):
        if new[-1] in eos:
            break
        tok = runner.decode(model, tok, T + i)   # the token just produced sits at position T + i - 1
        new.append(int(tok))
    t2 = time.perf_counter()
    seq = torch.cat([ids, torch.tensor([new], dtype=torch.long)], dim=1)
    return seq, t1 - t0, t2 - t1


MODES = ("auto", "lean", "compiled", "eager")


@torch.no_grad()
def generate(model, tokenizer=None, prompt: str | torch.Tensor | None = None, max_new_tokens: int = 64, *,
             mode: str = "auto", stop_at_eos: bool = True, cache_len: int | None = None,
             backend: str | Callable = "inductor", exact: bool = True) -> GenerateResult:
    """Greedy decoding, batch 1: ``model.generate(ids, max_new_tokens=..., do_sample=False)``'s tokens, faster.

    model: a Hugging Face causal LM (slmkern-compressed or not). prompt: a str (encoded with ``tokenizer``)
    or input ids [1, T]. mode: "auto" (the lean decoder where it applies, else the compiled step, else HF
    eager), "lean", "compiled" or "eager" (HF's generate: the baseline, same result type); a path that does
    not cover the model falls back to HF eager with one log line. stop_at_eos=False always produces
    max_new_tokens tokens. cache_len: the KV cache length (default: ``cache_bucket(T + max_new_tokens)``).
    backend: the torch.compile backend of the compiled step ("inductor"; "aot_eager" traces the same graph
    without generating C++; or a backend callable). exact: inductor without fusion, so the compiled path's
    tokens are HF's bit for bit (see the module docstring).
    """
    _check_model(model)
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens: expected an int > 0, got {max_new_tokens!r}")
    ids = _prompt_ids(tokenizer, prompt)
    T = ids.shape[1]
    vocab = model.get_input_embeddings().num_embeddings
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(f"prompt: token ids must lie in [0, {vocab}), got [{int(ids.min())}, {int(ids.max())}]")
    if cache_len is not None and (not isinstance(cache_len, int) or cache_len < T + max_new_tokens):
        raise ValueError(f"cache_len: expected an int >= prompt + max_new_tokens = {T + max_new_tokens}, "
                         f"got {cache_len!r}")
    gen_cfg = model.generation_config
    eos = _eos_ids(gen_cfg) if stop_at_eos else set()
    length = cache_len or cache_bucket(T + max_new_tokens)

    reason = "mode='eager'" if mode == "eager" else _eager_reason(model, gen_cfg)
    if reason is None and mode in ("auto", "lean"):
        from slmkern.decoder import unsupported_reason

        lean_reason = unsupported_reason(model, length)
        if lean_reason is None:
            dec, lock = _lean_decoder(model, length)
            with lock:
                dec.ensure_cache(length)
                seq, prefill_s, decode_s = _generate_lean(dec, ids, max_new_tokens, eos)
            return _result(tokenizer, seq, T, prefill_s, decode_s, "lean", None, dec.cache_len, 0.0, 0)
        if mode == "lean":
            reason = f"the lean decoder does not cover it: {lean_reason}"
    runner = None
    if reason is None:
        runner = _runner(model, length, backend, exact)
        reason = runner.failed
    if reason is None:
        with runner.lock:
            before, compile_s = runner.graphs_compiled, 0.0
            try:
                if not runner.warm:
                    compile_s = runner.warm_up(model)
                seq, prefill_s, decode_s = _generate_compiled(runner, model, ids, max_new_tokens, eos)
            except Exception as exc:  # any compile/trace failure: note it once, answer with HF eager
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                runner.failed = reason = f"compiling the decode step failed: {type(exc).__name__}: {first[:300]}"
            else:
                return _result(tokenizer, seq, T, prefill_s, decode_s, "compiled", None, runner.cache_len,
                               compile_s, runner.graphs_compiled - before)
    if reason != "mode='eager'":
        level = logging.WARNING if reason.startswith("compiling") else logging.INFO
        log_once(f"generate-eager:{type(model).__name__}:{reason}",
                 f"slmkern.generate: eager decoding for {type(model).__name__}: {reason}", level)
    seq, prefill_s, decode_s = _generate_eager(model, ids, max_new_tokens, stop_at_eos, gen_cfg)
    return _result(tokenizer, seq, T, prefill_s, decode_s, "eager", reason, None, 0.0, 0)


def _result(tokenizer, seq, T, prefill_s, decode_s, path, reason, cache_len, compile_s, graphs) -> GenerateResult:
    new = seq[:, T:]
    text = tokenizer.decode(new[0], skip_special_tokens=True) if tokenizer is not None else None
    return GenerateResult(tokens=new, sequences=seq, prefill_s=prefill_s, decode_s=decode_s, path=path,
                          reason=reason, cache_len=cache_len, compile_s=compile_s, graphs_compiled=graphs, text=text)


__all__ = ["GenerateResult", "MODES", "SUPPORTED_MODEL_TYPES", "cache_bucket", "clear_compiled", "generate"]
