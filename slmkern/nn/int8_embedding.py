"""Int8Embedding: the input embedding of a tied model, served from its int8 head's own table.

A tied decoder (``lm_head.weight is embed_tokens.weight``) whose head becomes an
:class:`~slmkern.nn.Int8Linear` would otherwise keep a second, fp32 copy of the table for the
lookup (SmolLM2-135M: 49152 x 576, 113 MB). This module holds no tensor of its own: row ``n``
of the embedding is ``head.weight[n] * head.weight_scale[n]`` (the head's int8 codes and per-row
fp32 scale), in the model's embedding dtype -- one table, as llama.cpp's Q8_0 tied embedding/head.

On CPU a packed head holds only its packed layout (slmkern.nn._base): the rows are gathered from
the tiles directly (row n is a strided view of them: tile[n // 16][:, n % 16, :]), never by
unpacking the whole table. Elsewhere (or without the C++ kernels) the head's canonical ``weight``
buffer is indexed. Either way the result equals ``codes[ids].float() * scale[ids]`` bit for bit.

The head is referenced, not registered as a submodule: the state dict holds the table once (under
the head's name), and ``slmkern.save``/``slmkern.load`` record and rebuild the tie
(``slmkern_config()`` / :meth:`Int8Embedding.from_config`).
"""
from __future__ import annotations

import torch
from torch import nn

from slmkern.formats import int8 as int8_format
from slmkern.nn.int8_linear import Int8Linear

_FLOAT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Int8Embedding(nn.Module):
    """``nn.Embedding`` (inference) whose table is ``head``'s int8 codes times its per-row scale.

    head: the tied output head, an :class:`Int8Linear` of shape (num_embeddings, embedding_dim).
    padding_idx: kept as nn.Embedding keeps it (it only affects gradients there; here there are
      none): that row is returned as the table holds it.
    dtype: the dtype of the rows returned (the model's embedding dtype; float32/float16/bfloat16);
      follows ``model.half()`` / ``.to(dtype)`` like an nn.Embedding's weight would.
    """

    def __init__(self, head: Int8Linear, padding_idx: int | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if not isinstance(head, Int8Linear):
            raise TypeError(f"head: expected slmkern.nn.Int8Linear, got {type(head).__name__}")
        if dtype not in _FLOAT.values():
            raise ValueError(f"dtype: expected one of {sorted(_FLOAT)}, got {dtype}")
        n = head.out_features
        if padding_idx is not None:
            if not isinstance(padding_idx, int) or isinstance(padding_idx, bool) or not -n <= padding_idx < n:
                raise ValueError(f"padding_idx: expected an int in [-{n}, {n}) or None, got {padding_idx!r}")
            padding_idx = padding_idx % n
        self.__dict__["head"] = head    # referenced, not a submodule: the table lives (and is saved) once
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.padding_idx, self.dtype = padding_idx, dtype

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, head: Int8Linear) -> "Int8Embedding":
        """The module that replaces ``embedding`` (same shape, padding_idx and dtype), reading ``head``'s table."""
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"embedding: expected torch.nn.Embedding, got {type(embedding).__name__}")
        if not isinstance(head, Int8Linear):
            raise TypeError(f"head: expected slmkern.nn.Int8Linear, got {type(head).__name__}")
        if (embedding.num_embeddings, embedding.embedding_dim) != (head.out_features, head.in_features):
            raise ValueError(f"head: shape ({head.out_features}, {head.in_features}) does not match the embedding's "
                             f"({embedding.num_embeddings}, {embedding.embedding_dim})")
        if embedding.max_norm is not None:
            raise ValueError("embedding: max_norm renormalizes rows in place; a shared int8 table cannot follow it")
        return cls(head, embedding.padding_idx, embedding.weight.dtype)

    # ------------------------------------------------------------------ save / load
    def slmkern_config(self, head_name: str) -> dict:
        """JSON description; ``head_name`` is the head's module name in the model."""
        return {"class": type(self).__name__, "head": head_name, "num_embeddings": self.num_embeddings,
                "embedding_dim": self.embedding_dim, "padding_idx": self.padding_idx,
                "dtype": str(self.dtype).removeprefix("torch.")}

    @classmethod
    def from_config(cls, config: dict, head: nn.Module) -> "Int8Embedding":
        """Rebuild from :meth:`slmkern_config` and the (loaded) head; ValueError naming what does not match."""
        if config.get("class") != cls.__name__:
            raise ValueError(f"config class: expected {cls.__name__}, got {config.get('class')!r}")
        if config.get("dtype") not in _FLOAT:
            raise ValueError(f"config dtype: expected one of {sorted(_FLOAT)}, got {config.get('dtype')!r}")
        if not isinstance(head, Int8Linear):
            raise ValueError(f"head {config.get('head')!r}: expected an Int8Linear, got {type(head).__name__}")
        if (config.get("num_embeddings"), config.get("embedding_dim")) != (head.out_features, head.in_features):
            raise ValueError(f"head {config.get('head')!r}: shape ({head.out_features}, {head.in_features}) does not "
                             f"match the config's ({config.get('num_embeddings')}, {config.get('embedding_dim')})")
        return cls(head, config.get("padding_idx"), _FLOAT[config["dtype"]])

    # ------------------------------------------------------------------ lookup
    def codes(self, ids: torch.Tensor) -> torch.Tensor:
        """The int8 codes of rows ``ids`` (any shape) -> ``ids.shape + (embedding_dim,)``, read from the head's
        canonical buffer when it has one, else gathered from its CPU packed tiles (no full unpack)."""
        head = self.head
        w = head._buffers.get("weight")
        if w is not None:
            return w[ids]
        blob = head._buffers.get("w_packed")
        if blob is None:
            raise RuntimeError("head: Int8Linear holds neither its codes nor its packed layout")
        N, K = self.num_embeddings, self.embedding_dim
        Np, Kp = int8_format._ceil(N, int8_format.NB), int8_format._ceil(K, int8_format.KB)
        tiles = blob[:Np * Kp].view(torch.int8).view(Np // int8_format.NB, Kp // int8_format.KB,
                                                     int8_format.NB, int8_format.KB)
        flat = ids.reshape(-1)
        rows = tiles[flat // int8_format.NB, :, flat % int8_format.NB, :]   # [B, Kp/4, 4]: row n's bytes
        return rows.reshape(flat.shape[0], Kp)[:, :K].reshape(*ids.shape, K)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not isinstance(input, torch.Tensor) or input.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input: expected an int64/int32 tensor of token ids, got "
                            f"{input.dtype if isinstance(input, torch.Tensor) else type(input).__name__}")
        if input.numel() and not torch.compiler.is_compiling():
            lo, hi = int(input.min()), int(input.max())
            if lo < 0 or hi >= self.num_embeddings:
                raise IndexError(f"input: token ids must lie in [0, {self.num_embeddings}), got [{lo}, {hi}]")
        head = self.head
        ids = input.to(head.weight_scale.device)
        rows = self.codes(ids).float() * head.weight_scale[ids].unsqueeze(-1)
        return rows.to(self.dtype)

    def dequantized_table(self) -> torch.Tensor:
        """The whole table ([num_embeddings, embedding_dim], self.dtype): a new tensor, for checks and exports."""
        return self.forward(torch.arange(self.num_embeddings, device=self.head.weight_scale.device))

    @property
    def weight(self) -> torch.Tensor:
        """Read-only, for code that reads ``nn.Embedding.weight`` (Hugging Face's ``get_input_embeddings().weight``
        shape/dtype/device reads, tie checks): :meth:`dequantized_table`, materialised anew on every read
        (num_embeddings x embedding_dim in self.dtype; writing into it changes nothing). A plain tensor, not a
        parameter or buffer: never saved, never tied to (the table is the head's, saved once under its name)."""
        return self.dequantized_table()

    def _apply(self, fn, recurse=True):
        # no tensors of our own: follow dtype changes (model.half(), .to(bf16)) as nn.Embedding's weight would
        try:
            out = fn(torch.zeros((), dtype=self.dtype))
            if isinstance(out, torch.Tensor) and out.dtype in _FLOAT.values():
                self.dtype = out.dtype
        except Exception:  # noqa: BLE001 - a device move fn on a CPU probe: the dtype is unchanged
            pass
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        pad = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        return (f"{self.num_embeddings}, {self.embedding_dim}{pad}, dtype={str(self.dtype).removeprefix('torch.')}, "
                f"table=tied int8 head ({type(self.head).__name__})")
