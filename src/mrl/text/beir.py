"""A generic retrieval format for users' own data: BEIR-style JSONL + TSV.

A folder holding::

    corpus.jsonl     {"_id": "d1", "title": "...", "text": "..."}      one document per line
    queries.jsonl    {"_id": "q1", "text": "..."}                       one query per line
    qrels/test.tsv   query-id <TAB> corpus-id <TAB> score              header line, score > 0 = gain

``title`` is optional. Queries without a positive judgment (none, or only score 0) are dropped:
they cannot be scored (BEIR's pytrec_eval would average them in as 0; so does
`mrl.evaluate.evaluate_ranking` given such a query directly). Other
judgment files beside ``test.tsv`` (``qrels/dev.tsv``, ...) are picked by ``split``. Where only
the documents are needed (fine-tuning, an adaptor, encoding) ``corpus.jsonl`` alone suffices.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from mrl.text.corpus import RetrievalDataset

__all__ = ["load_beir", "load_beir_documents", "read_jsonl", "is_beir_folder"]


def is_beir_folder(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / "corpus.jsonl").is_file() and (p / "queries.jsonl").is_file()


def read_jsonl(
    path: str | os.PathLike,
    required: tuple[str, ...],
    optional: tuple[str, ...] = (),
    nonempty: bool = False,
    any_text: tuple[str, ...] = (),
    line_numbers: list[int] | None = None,
) -> list[dict[str, Any]]:
    """Objects of a JSONL file; a ValueError naming the file and line on bad lines.

    ``any_text``: at least one of these fields must hold more than whitespace (a document's
    title or text). ``line_numbers``: a list that receives each returned row's line number.

    ``required`` fields must be strings; ``optional`` ones, where present and not null, too.
    With ``nonempty`` those strings must hold more than whitespace.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a folder, not a JSONL file")
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist")
    rows = []
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(
                f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}"
            )
        for key in required:
            if key not in row:
                raise ValueError(f"{path}:{lineno}: missing field {key!r}")
        for key in required + optional:
            value = row.get(key)
            if value is None and key in optional:
                continue
            if not isinstance(value, str):
                raise ValueError(
                    f"{path}:{lineno}: field {key!r} must be a string, got {value!r}"
                )
            if nonempty and not value.strip():
                raise ValueError(f"{path}:{lineno}: field {key!r} is empty")
        if any_text and not any((row.get(k) or "").strip() for k in any_text):
            raise ValueError(f"{path}:{lineno}: _id {row.get('_id')!r} has no text (fields "
                             f"{list(any_text)} are empty)")
        rows.append(row)
        if line_numbers is not None:
            line_numbers.append(lineno)
    return rows


def _lines(path: Path):
    """(line number, line) of a UTF-8 text file (a byte-order mark at its start is dropped, as
    Windows editors write one); a ValueError naming the file and line otherwise (decoded line
    by line: a text-mode reader decodes in blocks, so its error does not know the line)."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text ({exc.reason})") from None
            yield lineno, line.replace("\r\n", "\n")


def _read_qrels(path: Path) -> dict[str, dict[str, float]]:
    """Positive judgments ``{query: {doc: score}}``; a pair judged twice with two scores, or a
    score that is not finite, is an error naming the line (a later line silently won, or not,
    by its sign); a repeated identical line counts once."""
    qrels: dict[str, dict[str, float]] = {}
    first: dict[tuple[str, str], tuple[int, float]] = {}
    header = True  # the first non-blank line may be the header
    for lineno, line in _lines(path):
        parts = line.rstrip("\n").split("\t")
        if not line.strip():
            continue
        if header and parts[0] == "query-id":
            header = False
            continue
        header = False
        if len(parts) != 3:
            raise ValueError(f"{path}:{lineno}: expected 3 tab-separated fields, got {line!r}")
        try:
            score = float(parts[2])
        except ValueError:
            raise ValueError(
                f"{path}:{lineno}: score must be a number, got {parts[2]!r}"
            ) from None
        if not math.isfinite(score):
            raise ValueError(f"{path}:{lineno}: score must be finite, got {parts[2]!r}")
        pair = (parts[0], parts[1])
        if pair in first and first[pair][1] != score:
            raise ValueError(f"{path}:{lineno}: query {parts[0]!r} judges document {parts[1]!r} "
                             f"{score:g}, but line {first[pair][0]} judged it "
                             f"{first[pair][1]:g}; keep one score per pair")
        first.setdefault(pair, (lineno, score))
        if score > 0:
            qrels.setdefault(parts[0], {})[parts[1]] = score
    return qrels


def _check_unique(ids: list[str], path: Path, lines: list[int]) -> None:
    """Each _id once; a repeat is named by the file's line numbers of both (the entries'
    positions, counted without blank lines, pointed at other lines)."""
    seen: dict[str, int] = {}
    for i, ident in enumerate(ids):
        if ident in seen:
            raise ValueError(f"{path}: _id {ident!r} appears twice (lines {lines[seen[ident]]} "
                             f"and {lines[i]}); ids must be unique")
        seen[ident] = i


def _check_judged_queries(path: Path, queries: list[dict], qrels: dict) -> None:
    """A judged query must have text (named by line and _id: later only a list index could
    be); empty queries of other splits are dropped with them, as before."""
    for lineno, row in _rows_with_lines(path, queries):
        if str(row["_id"]) in qrels and not row["text"].strip():
            raise ValueError(f"{path}:{lineno}: judged query _id {row['_id']!r} has no text")


def _rows_with_lines(path: Path, rows: list[dict]):
    """(line number, row) for `read_jsonl`'s rows (it skips blank lines)."""
    numbers = [n for n, line in _lines(path) if line.strip()]
    return zip(numbers, rows)


def load_beir(root: str | os.PathLike, split: str = "test") -> RetrievalDataset:
    """A BEIR-style folder as a `RetrievalDataset` judged by ``qrels/SPLIT.tsv`` (only judged
    queries are kept). Its name is the folder's, with ``:SPLIT`` unless the split is "test"
    (records of two splits must not mix in one table)."""
    root = _check_root(root)
    if not isinstance(split, str) or not split or "/" in split or "\\" in split:
        raise ValueError(f"split must be a qrels file name such as 'test' or 'dev', got {split!r}")
    ds = load_beir_documents(root)
    query_lines: list[int] = []
    queries = read_jsonl(root / "queries.jsonl", ("_id", "text"), line_numbers=query_lines)
    qrels_path = root / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        have = sorted(p.stem for p in (root / "qrels").glob("*.tsv"))
        raise FileNotFoundError(
            f"split={split!r}: {str(qrels_path)!r} does not exist"
            + (f" (qrels splits there: {', '.join(have)})" if have else "")
        )
    qrels = _read_qrels(qrels_path)
    if not qrels:
        raise ValueError(f"{qrels_path} holds no judgment with a score > 0: nothing to evaluate")
    query_ids = [str(r["_id"]) for r in queries]
    _check_unique(query_ids, root / "queries.jsonl", query_lines)
    known, known_q = set(ds.doc_ids), set(query_ids)
    for q, docs in qrels.items():
        if q not in known_q:  # a typo or a stale file: that query would silently not count
            raise ValueError(f"{qrels_path}: query id {q!r} is not in queries.jsonl")
        unknown = [d for d in docs if d not in known]
        if unknown:
            raise ValueError(f"{qrels_path}: query {q!r} judges unknown corpus ids {unknown[:5]}")
    _check_judged_queries(root / "queries.jsonl", queries, qrels)
    name = root.name if split == "test" else f"{root.name}:{split}"
    texts = [r["text"] for r in queries]
    judged = RetrievalDataset(name, ds.doc_ids, ds.titles, ds.bodies, query_ids, texts, qrels)
    return judged.judged()


def load_beir_documents(root: str | os.PathLike) -> RetrievalDataset:
    """Only the documents of a BEIR-style folder (``corpus.jsonl``; no queries, no judgments):
    for fine-tuning, fitting an adaptor or encoding, where a corpus is all that is needed."""
    root = _check_root(root)
    # empty texts are named by file, line and _id here (later only a list index could be)
    lines: list[int] = []
    corpus = read_jsonl(root / "corpus.jsonl", ("_id", "text"), ("title",),
                        any_text=("title", "text"), line_numbers=lines)  # fmt: skip
    doc_ids = [str(r["_id"]) for r in corpus]
    _check_unique(doc_ids, root / "corpus.jsonl", lines)
    titles = [str(r.get("title") or "") for r in corpus]
    return RetrievalDataset(root.name, doc_ids, titles, [r["text"] for r in corpus], [], [])


def _check_root(root: str | os.PathLike) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"root={str(root)!r} is not a folder")
    return root.resolve()  # its name names the data set ("." named it "")
