"""Training pairs for Matryoshka fine-tuning: from a JSONL file, or made from an unlabelled corpus.

JSONL: one object per line, ``{"query": ..., "positive": ...}`` with an optional ``"negative"``
(a string). Label-free pairs from a corpus: each document's title -> its body (with the title
removed from the body's start, where the body repeats it as whole words, so the pair is not
trivial; a title that is only the start of the body's first word, "Wing" before "Wingtip ...",
leaves the body whole).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from mrl.text.beir import read_jsonl
from mrl.text.corpus import repeats_title

__all__ = ["Pair", "read_pairs", "pairs_from_titles"]


@dataclass(frozen=True)
class Pair:
    query: str
    positive: str
    negative: str | None = None


def read_pairs(path: str | os.PathLike) -> list[Pair]:
    """Pairs from a JSONL file; ValueError with the line number on a bad line or empty text."""
    rows = read_jsonl(path, ("query", "positive"), ("negative",), nonempty=True)
    pairs = [Pair(r["query"], r["positive"], r.get("negative")) for r in rows]
    if not pairs:
        raise ValueError(f"{path} holds no pairs")
    negs = sum(p.negative is not None for p in pairs)
    if 0 < negs < len(pairs):
        raise ValueError(
            f"{path}: either every pair or none has a 'negative' ({negs} of {len(pairs)} do)"
        )
    return pairs


def pairs_from_titles(titles: list[str], bodies: list[str], min_words: int = 3) -> list[Pair]:
    """title -> body pairs; skips documents whose title or remaining body is empty/short."""
    if len(titles) != len(bodies):
        raise ValueError(
            f"titles and bodies must match in length, got {len(titles)} and {len(bodies)}"
        )
    pairs = []
    for title, body in zip(titles, bodies):
        title, body = title.strip(), body.strip()
        if repeats_title(title, body):  # "Wing" -> "Wingtip vortices" keeps "Wingtip"
            body = body[len(title) :].strip()
        if len(title.split()) < 1 or len(body.split()) < min_words:
            continue
        pairs.append(Pair(title, body))
    if not pairs:
        raise ValueError("no usable title -> body pairs (titles or bodies are empty)")
    return pairs
