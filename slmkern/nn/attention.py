"""slmkern::attention behind Hugging Face's attention interface (``attn_implementation="slmkern"``).

``use_attention_(model)`` switches a transformers model whose attention layers are bidirectional (BERT,
RoBERTa, MiniLM, ... encoders) to the name "slmkern": its layers then call ``hf_attention_forward``,
which runs slmkern::attention on CPU and writes the heads-last output the output projection reads (no
transpose copy). The masks are sdpa's (boolean, built by transformers' ``sdpa_mask``), so outputs agree
with sdpa to fp32 rounding.

Whatever the kernel does not cover goes to transformers' own sdpa function, so nothing changes there:
training (dropout, or gradients), a position bias, a softcap or attention sinks, output_attentions, a
device other than CPU, or q/k/v shapes sdpa would broadcast. Causal decoders keep their sdpa (their fast
path is slmkern.generate's decoder, whose greedy tokens are tested against Hugging Face's).
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from slmkern import ops
from slmkern._logging import logger

NAME = "slmkern"
_registered = False


def hf_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                         is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: (B, H, L, D) inputs -> ((B, L, H, D) output, None)."""
    if (dropout or kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None
            or kwargs.get("s_aux") is not None or kwargs.get("output_attentions", False)
            or not query.is_cpu or (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad
                                                                   or value.requires_grad))
            or key.shape[0] != query.shape[0] or key.shape[-1] != query.shape[-1]
            or value.shape != key.shape or query.shape[1] % key.shape[1]):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    q_len, kv_len = query.shape[2], key.shape[2]
    # the same rule as transformers' sdpa function: causal only for a prefill without a mask
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(q_len > 1 and attention_mask is None and causal)
    if causal and kv_len > q_len:       # prefill into an empty static cache: the keys past the prompt are unused
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    if attention_mask is not None and attention_mask.dim() == 4:
        attention_mask = attention_mask[:, :, :, :key.shape[2]]
    return ops.attention(query, key, value, attention_mask, scaling, causal), None


def register() -> None:
    """Make "slmkern" a transformers attention implementation (masks: sdpa's). Idempotent."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, hf_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    _registered = True


def _bidirectional(model: nn.Module) -> bool:
    flags = [m.is_causal for m in model.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    return bool(flags) and not any(flags)


def use_attention_(model: nn.Module) -> bool:
    """Switch a transformers encoder (every attention layer bidirectional) to slmkern::attention, in place.
    Returns whether it switched; a model that cannot (not a transformers model, causal layers, no
    attention-interface support) is left as it is."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation") or not _bidirectional(model):
        return False
    if getattr(config, "_attn_implementation", None) == NAME:
        return True
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager", None):
        return False   # flash / flex / a custom kernel the user chose: keep it
    register()
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, ImportError, AttributeError) as exc:
        logger.info("slmkern: attention stays %s: %s", config._attn_implementation, exc)
        return False
    return getattr(config, "_attn_implementation", None) == NAME
