"""Evaluation: classification metrics, perplexity for causal LMs, embedding cosine for encoders, size, memory, speed."""
from __future__ import annotations

import math

import torch


# ----------------------------------------------------------------------------- token windows
# How special tokens (BOS, ...) are placed when a long text is cut into fixed-length windows
# (perplexity) or rows (calibration):
SPECIAL_TOKEN_PROTOCOLS = {
    "per-window": "every window is a sequence as the tokenizer itself builds one (add_special_tokens=True): "
                  "its special tokens (e.g. BOS) around each window's text tokens",
    "text-start": "the tokenizer's special tokens once, around the whole text, and windows cut from that "
                  "stream (HF's non-overlapping perplexity recipe): only the first window starts with BOS",
    "none": "no special tokens anywhere (add_special_tokens=False)",
}


def special_token_frame(tokenizer) -> tuple[list[int], list[int]]:
    """(prefix, suffix): the token ids the tokenizer puts before and after a text with add_special_tokens=True.

    Read off the tokenizer itself (its post-processor / template), by encoding a short probe text
    with and without special tokens; ([], []) for a tokenizer that adds none.
    """
    probe = "Hello world"
    with_sp = [int(t) for t in _encode(tokenizer, probe, True)]
    without = [int(t) for t in _encode(tokenizer, probe, False)]
    n = len(without)
    for i in range(len(with_sp) - n + 1):
        if with_sp[i:i + n] == without:
            return with_sp[:i], with_sp[i + n:]
    raise ValueError("tokenizer: cannot tell where it puts its special tokens (the text's tokens are not a "
                     "contiguous part of its add_special_tokens=True encoding)")


def _encode(tokenizer, text: str, add_special_tokens: bool) -> torch.Tensor:
    try:
        out = tokenizer(text, return_tensors="pt", add_special_tokens=add_special_tokens)
    except TypeError:   # a bare callable tokenizer without the keyword: it adds nothing of its own
        out = tokenizer(text, return_tensors="pt")
    return out.input_ids[0]


def token_windows(tokenizer, text: str, window: int, max_windows: int | None = None,
                  special_tokens: str = "per-window") -> tuple[torch.Tensor, torch.Tensor]:
    """Cut ``text`` into non-overlapping windows of exactly ``window`` tokens -> (ids [n, window], scored [n, window]).

    ``special_tokens`` (see :data:`SPECIAL_TOKEN_PROTOCOLS`): "per-window" frames every window the way
    the tokenizer frames any sequence (prefix + ``window - len(prefix) - len(suffix)`` text tokens +
    suffix); "text-start" tokenizes the whole text with its special tokens and cuts that stream;
    "none" uses the text tokens alone. ``scored`` marks the positions a perplexity counts: text tokens
    that have at least one token before them in their window (a window's first token, and the
    special tokens, are not scored).
    """
    if special_tokens not in SPECIAL_TOKEN_PROTOCOLS:
        raise ValueError(f"special_tokens: expected one of {tuple(SPECIAL_TOKEN_PROTOCOLS)}, got {special_tokens!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window: expected a positive int, got {window!r}")
    prefix, suffix = special_token_frame(tokenizer) if special_tokens != "none" else ([], [])
    if special_tokens == "per-window":
        body = window - len(prefix) - len(suffix)
        if body < 1:
            raise ValueError(f"window: {window} tokens leave no room for text next to the tokenizer's "
                             f"{len(prefix) + len(suffix)} special token(s)")
        ids = _encode(tokenizer, text, False)
        n = ids.numel() // body
        if max_windows is not None:
            n = min(n, max_windows)
        rows = ids[:n * body].reshape(n, body)
        pre = torch.tensor(prefix, dtype=ids.dtype).expand(n, -1)
        suf = torch.tensor(suffix, dtype=ids.dtype).expand(n, -1)
        out = torch.cat([pre, rows, suf], dim=1)
        scored = torch.zeros(out.shape, dtype=torch.bool)
        scored[:, max(1, len(prefix)):len(prefix) + body] = True
        return out, scored
    ids = _encode(tokenizer, text, special_tokens == "text-start")
    n = ids.numel() // window
    if max_windows is not None:
        n = min(n, max_windows)
    out = ids[:n * window].reshape(n, window)
    special = torch.zeros(ids.numel(), dtype=torch.bool)
    if special_tokens == "text-start":
        special[:len(prefix)] = True
        if suffix:
            special[ids.numel() - len(suffix):] = True
    scored = ~special[:n * window].reshape(n, window)
    scored[:, 0] = False
    return out, scored


def describe_special_tokens(tokenizer, special_tokens: str, window: int, what: str = "window") -> str:
    """One line for a log: the protocol, and the special tokens it puts where."""
    if special_tokens not in SPECIAL_TOKEN_PROTOCOLS:
        raise ValueError(f"special_tokens: expected one of {tuple(SPECIAL_TOKEN_PROTOCOLS)}, got {special_tokens!r}")
    prefix, suffix = special_token_frame(tokenizer) if special_tokens != "none" else ([], [])
    conv = getattr(tokenizer, "convert_ids_to_tokens", None)
    names = (lambda ids: conv(ids)) if conv is not None else (lambda ids: ids)  # noqa: E731
    frame = f"prefix {names(prefix)}, suffix {names(suffix)}" if prefix or suffix else "the tokenizer adds none"
    where = {"per-window": f"on every {window}-token {what}", "text-start": "once, at the start of the text",
             "none": "none"}[special_tokens]
    return f"special tokens: {special_tokens} ({where}; {frame})"


# ----------------------------------------------------------------------------- calibration data
EVAL_TEST_SIZE = 2000  # Rotten Tomatoes: the first 2000 snippets (seed 0) are the test split, as in the demo


def calibration_batches(tok, kind: str, n: int, seq: int, batch: int = 4, special_tokens: str = "per-window"
                        ) -> list[dict]:
    """Calibration batches: causal LMs read the second half of the Wikipedia text (eval reads the
    first half) in rows of ``seq`` tokens, each framed with the tokenizer's own special tokens (BOS)
    as the model saw every training sequence (``special_tokens``: see SPECIAL_TOKEN_PROTOCOLS);
    encoders/classifiers read Rotten Tomatoes snippets outside the eval split (EVAL_TEST_SIZE).
    ValueError (from token_windows) when the text cannot give such rows."""
    if kind == "causal-lm":
        from slmkern.data import wikipedia_text
        text = wikipedia_text()
        rows, _ = token_windows(tok, text[len(text) // 2:], seq, n, special_tokens)
        n = rows.shape[0]
        return [{"input_ids": rows[i:i + batch], "attention_mask": torch.ones_like(rows[i:i + batch])}
                for i in range(0, n, batch)]
    from slmkern.data import rotten_tomatoes
    texts = [t for t, _ in rotten_tomatoes(seed=0)[EVAL_TEST_SIZE:EVAL_TEST_SIZE + n]]
    return [dict(tok(texts[i:i + 16], padding=True, truncation=True, max_length=seq, return_tensors="pt"))
            for i in range(0, len(texts), 16)]


@torch.inference_mode()
def perplexity(model, tokenizer, text: str, window: int = 512, max_tokens: int = 16384,
               progress: bool = True, special_tokens: str = "per-window") -> dict:
    """Token-level perplexity over non-overlapping windows of `window` tokens.

    Each window is scored independently (its first token has no context and is
    not scored), so the result does not depend on batch composition.
    special_tokens: "per-window" (default: every window starts with the tokenizer's own
    special tokens, e.g. BOS, as the model saw every sequence in training; its first text
    token is scored given BOS), "text-start" (BOS only at the start of the whole text) or
    "none"; see :data:`SPECIAL_TOKEN_PROTOCOLS`. max_tokens bounds the tokens fed to the model.
    """
    windows, scored = token_windows(tokenizer, text, window, max(1, max_tokens // window), special_tokens)
    n_win = windows.shape[0]
    if n_win == 0:
        raise ValueError(f"text: too short, fewer than one window of {window} tokens")
    nll, count = 0.0, 0
    it = range(n_win)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="perplexity", unit="win", leave=False)
    for i in it:
        chunk = windows[i:i + 1]
        logits = model(input_ids=chunk).logits.float()
        logp = torch.log_softmax(logits[0, :-1], dim=-1)
        tgt = chunk[0, 1:]
        keep = scored[i, 1:]
        nll -= logp.gather(1, tgt.unsqueeze(1)).squeeze(1)[keep].sum().item()
        count += int(keep.sum())
    return {"perplexity": math.exp(nll / count), "tokens": count, "windows": n_win,
            "special_tokens": special_tokens}


@torch.inference_mode()
def mean_pooled_embeddings(model, tokenizer, texts: list[str], batch_size: int = 32,
                           max_length: int = 128) -> torch.Tensor:
    """Sentence embeddings as all-MiniLM does it: attention-masked mean of the last hidden state."""
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        h = model(**enc).last_hidden_state.float()
        m = enc["attention_mask"].unsqueeze(-1).float()
        out.append((h * m).sum(1) / m.sum(1).clamp(min=1))
    return torch.cat(out)


def embedding_cosine(reference: torch.Tensor, candidate: torch.Tensor) -> dict:
    """Per-sentence cosine between two embedding sets: mean and minimum."""
    cos = torch.nn.functional.cosine_similarity(reference, candidate, dim=-1)
    return {"mean_cosine": cos.mean().item(), "min_cosine": cos.min().item()}


# ----------------------------------------------------------------------------- classification
def classification_metrics(preds, labels, num_classes: int | None = None) -> dict:
    """Accuracy and macro-averaged precision, recall and F1 (a class never predicted has precision 0)."""
    p = torch.as_tensor(preds).long().flatten()
    y = torch.as_tensor(labels).long().flatten()
    if p.shape != y.shape:
        raise ValueError(f"preds/labels: shapes differ, {tuple(p.shape)} vs {tuple(y.shape)}")
    if p.numel() == 0:
        raise ValueError("preds/labels: empty")
    C = num_classes or int(max(p.max(), y.max())) + 1
    conf = torch.zeros(C, C, dtype=torch.long)
    conf.index_put_((y, p), torch.ones_like(y), accumulate=True)   # rows: true, cols: predicted
    tp = conf.diagonal().double()
    prec = torch.where(conf.sum(0) > 0, tp / conf.sum(0).clamp(min=1), torch.zeros_like(tp))
    rec = torch.where(conf.sum(1) > 0, tp / conf.sum(1).clamp(min=1), torch.zeros_like(tp))
    f1 = torch.where(prec + rec > 0, 2 * prec * rec / (prec + rec).clamp(min=1e-30), torch.zeros_like(tp))
    present = (conf.sum(1) > 0) | (conf.sum(0) > 0)          # macro over classes that occur at all
    return {"accuracy": float(tp.sum() / y.numel()), "precision": float(prec[present].mean()),
            "recall": float(rec[present].mean()), "f1": float(f1[present].mean()), "n": int(y.numel())}


@torch.inference_mode()
def predict_classes(model, tokenizer, texts: list[str], batch_size: int = 64, max_length: int = 64,
                    progress: bool = False, desc: str = "eval") -> torch.Tensor:
    """argmax of a sequence classifier's logits over `texts`."""
    out = []
    it = range(0, len(texts), batch_size)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc=desc, unit="batch", leave=False)
    for i in it:
        enc = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        out.append(model(**enc).logits.argmax(-1))
    return torch.cat(out)


def evaluate_classifier(model, tokenizer, texts: list[str], labels: list[int], **kw) -> dict:
    return classification_metrics(predict_classes(model, tokenizer, texts, **kw), labels)


# ----------------------------------------------------------------------------- size, memory, speed
def model_bytes(model) -> int:
    """Bytes of the model's canonical tensors (what save() writes; tied tensors once, packed layouts excluded)."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def dir_bytes(path) -> int:
    """Size on disk of a checkpoint directory (every file under it)."""
    from pathlib import Path
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB): VmHWM from /proc/self/status, else getrusage.

    VmHWM first: Linux carries ru_maxrss over fork + exec, so a process started by a large parent would
    report the parent's peak; VmHWM belongs to this process's own address space.
    """
    import resource
    import sys
    from pathlib import Path
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def median_ms(fn, reps: int = 10, warmup: int = 1) -> float:
    """Median wall time of fn() in ms."""
    import statistics
    import time
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@torch.inference_mode()
def decode_tokens_per_s(model, tokenizer, prompt: str = "The history of the city", new_tokens: int = 64,
                        reps: int = 3, mode: str = "auto") -> dict:
    """Greedy decoding with the KV cache, one token per step (batch 1): median tokens/s over reps.

    Prefill is timed separately; the generated text is returned so runs can be compared.
    Also returned: every rep's rate (``decode_tokens_per_s_reps``, to show the spread on a shared
    machine), the median step time (``decode_ms_per_token``) and ``decode_path``: which loop ran.
    A Hugging Face causal LM decodes through ``slmkern.generate(mode=mode)`` (by default its fastest path
    that gives HF's tokens: "lean", "compiled" or "eager"); mode="hf", or a model that is not an HF causal
    LM, runs the plain HF eager loop (``model(input_ids=..., past_key_values=..., use_cache=True)``).
    """
    import statistics
    import time
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    rates, prefill, text = [], [], ""
    use_generate = mode != "hf" and _is_hf_causal_lm(model)
    path = "hf"
    for _ in range(reps + 1):                   # first run warms up
        if use_generate:
            from slmkern.generate import generate
            res = generate(model, None, ids, max_new_tokens=new_tokens, mode=mode, stop_at_eos=False)
            rates.append(res.decode_tok_s)
            prefill.append(res.prefill_s * 1e3)
            text, path = tokenizer.decode(res.tokens[0]), res.path
            continue
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        t1 = time.perf_counter()
        toks = [nxt]
        for _ in range(new_tokens - 1):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            toks.append(nxt)
        t2 = time.perf_counter()
        rates.append((new_tokens - 1) / (t2 - t1))
        prefill.append((t1 - t0) * 1e3)
        text = tokenizer.decode(torch.cat(toks, 1)[0])
    rate = statistics.median(rates[1:])
    return {"decode_tokens_per_s": rate, "decode_ms_per_token": 1e3 / rate,
            "decode_tokens_per_s_reps": [round(r, 2) for r in rates[1:]],
            "prefill_ms": statistics.median(prefill[1:]), "new_tokens": new_tokens, "text": text,
            "decode_path": path}


def _is_hf_causal_lm(model) -> bool:
    """Would slmkern.generate take this model (its own check, no second copy of it)?"""
    from slmkern.generate import _check_model
    try:
        _check_model(model)
    except TypeError:
        return False
    return True
