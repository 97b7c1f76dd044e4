"""Offline data and model loaders read real files shipped in PyPI packages."""
from __future__ import annotations

import pytest

from slmkern import data, models


def test_rotten_tomatoes_is_balanced_and_labelled():
    rows = data.rotten_tomatoes(seed=0)
    assert len(rows) > 10000
    labels = [y for _, y in rows]
    assert set(labels) == {0, 1}
    assert 0.4 < sum(labels) / len(labels) < 0.6
    assert rows[:5] == data.rotten_tomatoes(seed=0)[:5]  # deterministic shuffle
    assert rows[:5] != data.rotten_tomatoes(seed=1)[:5]


def test_wikipedia_text_is_prose_without_markup():
    text = data.wikipedia_text(max_chars=200_000)
    assert len(text) == 200_000
    for marker in ("{{", "[[", "<ref", "|}"):
        assert marker not in text
    assert "Anarchism" in text


def test_model_paths_resolve_offline():
    d, gguf = models.model_path("minilm")
    assert (d / "config.json").exists() and gguf is None
    d, gguf = models.model_path("smollm2")
    assert gguf.endswith(".gguf") and (d / gguf).exists()
    with pytest.raises(FileNotFoundError, match="neither a short name"):
        models.model_path("no/such/model")
