"""Evaluation: perplexity for causal LMs, embedding cosine for encoders."""
from __future__ import annotations

import math

import torch


@torch.inference_mode()
def perplexity(model, tokenizer, text: str, window: int = 512, max_tokens: int = 16384,
               progress: bool = True) -> dict:
    """Token-level perplexity over non-overlapping windows of `window` tokens.

    Each window is scored independently (its first token has no context and is
    not scored), so the result does not depend on batch composition.
    """
    ids = tokenizer(text, return_tensors="pt").input_ids[0][:max_tokens]
    n_win = ids.numel() // window
    if n_win == 0:
        raise ValueError(f"text: only {ids.numel()} tokens, fewer than one window of {window}")
    nll, count = 0.0, 0
    it = range(n_win)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="perplexity", unit="win", leave=False)
    for i in it:
        chunk = ids[i * window:(i + 1) * window].unsqueeze(0)
        logits = model(input_ids=chunk).logits.float()
        logp = torch.log_softmax(logits[0, :-1], dim=-1)
        tgt = chunk[0, 1:]
        nll -= logp.gather(1, tgt.unsqueeze(1)).sum().item()
        count += tgt.numel()
    return {"perplexity": math.exp(nll / count), "tokens": count, "windows": n_win}


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
