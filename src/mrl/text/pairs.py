"""Training pairs for Matryoshka fine-tuning: from a JSONL file, or made from an unlabelled corpus.

JSONL: one object per line, ``{"query": ..., "positive": ...}`` with an optional ``"negative"``
(a string). Label-free pairs from a corpus: each document's title -> its body (with the title
removed from the body's start, where the body repeats it as whole words, so the pair is not
trivial; a title that is only the start of the body's first word, "Wing" before "Wingtip ...",
leaves the body whole).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

from mrl.params import check_int
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
    lines: list[int] = []
    rows = read_jsonl(path, ("query", "positive"), ("negative",), nonempty=True,
                      line_numbers=lines)
    for row, lineno in zip(rows, lines):  # "negatives", "negative_1": silently trained without
        odd = [k for k in row if k != "negative" and k.lower().startswith(("neg", "hard"))]
        if odd:
            raise ValueError(f"{path}:{lineno}: unknown field {odd[0]!r}; a hard negative is "
                             "one string in the field 'negative'")
    pairs = [Pair(r["query"], r["positive"], r.get("negative")) for r in rows]
    if not pairs:
        raise ValueError(f"{path} holds no pairs")
    has = [p.negative is not None for p in pairs]
    if 0 < sum(has) < len(pairs):
        first = lines[has.index(not has[0])]  # the first line that differs from line 1
        raise ValueError(
            f"{path}:{first}: either every pair or none has a 'negative' ({sum(has)} of "
            f"{len(pairs)} do; line {lines[0]} {'has' if has[0] else 'has none'})"
        )
    _warn_repeats(path, pairs)
    return pairs


def _warn_repeats(path: str | os.PathLike, pairs: list[Pair]) -> None:
    """Repeated queries or positives: in a batch holding two of them, each is the other's
    in-batch negative (a false one). Warned, not refused: some corpora repeat titles."""
    queries = len(pairs) - len({p.query for p in pairs})
    positives = len(pairs) - len({p.positive for p in pairs})
    if queries or positives:
        warnings.warn(
            f"{path}: {queries} repeated queries and {positives} repeated positives; two of them "
            "in one batch are each other's (false) in-batch negatives: deduplicate if they are "
            "not intended",
            stacklevel=3,
        )


def pairs_from_titles(titles: list[str], bodies: list[str], min_words: int = 3) -> list[Pair]:
    """title -> body pairs; skips documents whose title or remaining body is empty/short
    (fewer than ``min_words`` words). Repeated titles are warned about, as `read_pairs` does."""
    check_int(min_words, "min_words", minimum=1)  # 0 kept empty positives; "3" a TypeError
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
    _warn_repeats("title -> body pairs", pairs)  # Cranfield repeats 39 titles
    return pairs
