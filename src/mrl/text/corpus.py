"""The two dataset shapes of the text side.

`RetrievalDataset`: documents, queries and graded relevance (Cranfield, BEIR-style folders).
`LabelledCorpus`: documents with one class label each (BBC News).
Both keep titles apart from bodies, so label-free training pairs (title -> body) can be built.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

__all__ = ["RetrievalDataset", "LabelledCorpus", "join_title", "repeats_title"]


def repeats_title(title: str, body: str) -> bool:
    """Whether ``body`` starts by repeating ``title`` (both stripped) as whole words: "Wing" is
    repeated by "Wing lift ..." or "Wing, ...", not by "Wingtip vortices ..." (a longer word)."""
    if not title or not body.startswith(title):
        return False
    rest = body[len(title) : len(title) + 1]
    return not (rest.isalnum() and title[-1].isalnum())


def join_title(title: str, body: str) -> str:
    """``title`` then ``body`` on a new line, unless the body already starts with the title
    (as whole words: `repeats_title`)."""
    title, body = title.strip(), body.strip()
    if not title or repeats_title(title, body):
        return body
    if not body:
        return title
    return f"{title}\n{body}"


@dataclass
class RetrievalDataset:
    """Documents, queries and graded relevance judgments.

    Attributes:
        name: short name for records ("cranfield", a folder name, ...).
        doc_ids / titles / bodies: one entry per document (N); titles may be "".
        query_ids / queries: one entry per query (Q).
        qrels: query id -> {doc id -> gain > 0}; documents not listed have gain 0.
    """

    name: str
    doc_ids: list[str]
    titles: list[str]
    bodies: list[str]
    query_ids: list[str]
    queries: list[str]
    qrels: dict[str, dict[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.doc_ids)
        if not (len(self.titles) == len(self.bodies) == n):
            raise ValueError(
                f"doc_ids, titles and bodies must have the same length, got "
                f"{n}, {len(self.titles)}, {len(self.bodies)}"
            )
        if len(self.queries) != len(self.query_ids):
            raise ValueError(
                f"query_ids and queries must have the same length, got "
                f"{len(self.query_ids)} and {len(self.queries)}"
            )
        if len(set(self.doc_ids)) != n:
            raise ValueError(f"doc_ids must be unique in dataset {self.name!r}")
        self._check_qrels()

    def _check_qrels(self) -> None:
        """Judgments name known queries and documents: an unknown one was dropped in silence
        (a relevant document left the ideal DCG and recall's denominator, a query vanished)."""
        docs, queries = set(self.doc_ids), set(self.query_ids)
        for q, judged in self.qrels.items():
            if q not in queries:
                raise ValueError(f"qrels of dataset {self.name!r} judge query {q!r}, which is "
                                 "not in query_ids")
            unknown = [d for d in judged if d not in docs]
            if unknown:
                raise ValueError(f"qrels of dataset {self.name!r}: query {q!r} judges documents "
                                 f"{unknown[:5]} that are not in doc_ids")

    def digest(self) -> str:
        """A short hash of the documents, queries and judgments: records carry it, so that two
        data sets of one name (two folders called data) are told apart."""
        qrels = sorted((q, sorted(j.items())) for q, j in self.qrels.items())
        return _digest([self.doc_ids, self.titles, self.bodies, self.query_ids, self.queries,
                        qrels])  # fmt: skip

    @property
    def documents(self) -> list[str]:
        """The text that is encoded for each document: title and body."""
        return [join_title(t, b) for t, b in zip(self.titles, self.bodies)]

    def gain_matrix(self) -> np.ndarray:
        """Dense gains ``[Q, N]`` (float32) in the order of ``query_ids`` and ``doc_ids``."""
        col = {d: j for j, d in enumerate(self.doc_ids)}
        gains = np.zeros((len(self.query_ids), len(self.doc_ids)), dtype=np.float32)
        for i, q in enumerate(self.query_ids):
            for d, g in self.qrels.get(q, {}).items():
                if d in col and g > 0:
                    gains[i, col[d]] = g
        return gains

    def judged(self) -> RetrievalDataset:
        """Only the queries with at least one relevant document (standard IR practice)."""
        keep = [
            i
            for i, q in enumerate(self.query_ids)
            if any(g > 0 for g in self.qrels.get(q, {}).values())
        ]
        return RetrievalDataset(
            self.name,
            self.doc_ids,
            self.titles,
            self.bodies,
            [self.query_ids[i] for i in keep],
            [self.queries[i] for i in keep],
            {self.query_ids[i]: self.qrels[self.query_ids[i]] for i in keep},
        )


@dataclass
class LabelledCorpus:
    """Documents with one integer class label each.

    Attributes:
        name: short name for records.
        titles / bodies: one entry per document (N).
        labels: ``[N]`` int64 class ids into ``classes``.
        classes: the class names (C).
    """

    name: str
    titles: list[str]
    bodies: list[str]
    labels: np.ndarray
    classes: list[str]

    def __post_init__(self) -> None:
        labels = np.asarray(self.labels)
        if labels.size == 0:  # [] is float64 to numpy: an empty corpus has no label to check
            labels = labels.astype(np.int64)
        if labels.dtype.kind not in "iu" or (labels.size and not (
                0 <= labels.min() and labels.max() < len(self.classes))):
            # float labels were truncated (0.7 -> 0), a label past the classes kept
            raise ValueError(f"labels must be integer class ids in [0, {len(self.classes)}) "
                             f"(one per class name), got dtype {labels.dtype}"
                             + (f", values {labels.min()}..{labels.max()}"
                                if labels.dtype.kind in "iuf" and labels.size else ""))
        self.labels = labels.astype(np.int64)
        if not (len(self.titles) == len(self.bodies) == len(self.labels)):
            raise ValueError(
                f"titles, bodies and labels must have the same length, got "
                f"{len(self.titles)}, {len(self.bodies)}, {len(self.labels)}"
            )

    def digest(self) -> str:
        """A short hash of the documents and labels (see `RetrievalDataset.digest`)."""
        return _digest([self.titles, self.bodies, np.asarray(self.labels).tolist(),
                        self.classes])  # fmt: skip

    @property
    def documents(self) -> list[str]:
        return [join_title(t, b) for t, b in zip(self.titles, self.bodies)]


def _digest(parts: list) -> str:
    return hashlib.blake2b(json.dumps(parts).encode(), digest_size=8).hexdigest()
