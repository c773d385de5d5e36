"""The Cranfield collection: 1400 aeronautics abstracts, 225 queries, graded relevance.

File format (see the data folder's README): ``cran.all.1400`` has records ``.I id`` then ``.T``
(title), ``.A``, ``.B``, ``.W`` (abstract) marker lines; ``cran.qry`` has ``.I id`` and ``.W``;
``cranqrel`` has ``query_position doc_id grade`` rows. Two facts that are easy to get wrong:

- qrels number queries by their **position** (1..225) in ``cran.qry``, not by its ``.I`` id;
- grades run 1..4 with **1 = most relevant**; ``-1`` means not relevant. Gain = 5 - grade.

The documents 471 and 995 are empty in the official files and are dropped, as is the stray
``.`` line that ends ``cran.all.1400``. One judgment names a dropped document (query 125,
document 995, grade 3): the loader leaves it out (it cannot be retrieved), so query 125 has
16 relevant documents, not 17. trec_eval would count it: nDCG@10 is the same either way;
nDCG@100 and recall@k of the collection move by at most 3e-4 (one query of 225;
recall by at most 1/17 / 225 = 2.6e-4).

Where the data comes from, in order: the ``root`` argument; the ``MRL_CRANFIELD`` environment
variable; ``../shared/data/cranfield`` next to the repository or the working directory;
``~/.cache/mrl/cranfield``, downloaded there from the Glasgow IR group when online.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

from mrl.io import atomic_open
from mrl.text.corpus import RetrievalDataset

__all__ = ["load_cranfield", "find_cranfield", "download_cranfield", "CRANFIELD_URL", "FILES"]

CRANFIELD_URL = "http://ir.dcs.gla.ac.uk/resources/test_collections/cran/cran.tar.gz"
FILES = ("cran.all.1400", "cran.qry", "cranqrel")
_MARKER = re.compile(r"^\.([ITABW])(?:\s+(.*))?$")


def _has_files(folder: Path) -> bool:
    return all((folder / f).is_file() for f in FILES)


def _candidates() -> list[Path]:
    repo = Path(__file__).resolve().parents[3]
    out = []
    if os.environ.get("MRL_CRANFIELD"):
        out.append(Path(os.environ["MRL_CRANFIELD"]).expanduser())
    out += [
        repo.parent / "shared" / "data" / "cranfield",
        Path.cwd().parent / "shared" / "data" / "cranfield",
        Path.home() / ".cache" / "mrl" / "cranfield",
    ]
    return out


def find_cranfield(root: str | os.PathLike | None = None, download: bool = True) -> Path:
    """The folder holding the three Cranfield files; downloads them if allowed and missing."""
    if root is not None:
        folder = Path(root)
        if _has_files(folder):
            return folder
        if not download:
            raise FileNotFoundError(
                f"root={str(folder)!r} does not hold the Cranfield files {list(FILES)}"
            )
        return download_cranfield(folder)
    for folder in _candidates():
        if _has_files(folder):
            return folder
    if not download:
        raise FileNotFoundError(
            "Cranfield data not found; pass a folder, set MRL_CRANFIELD, or allow the download "
            f"(looked in {[str(p) for p in _candidates()]})"
        )
    return download_cranfield(_candidates()[-1])


def download_cranfield(
    folder: str | os.PathLike, url: str = CRANFIELD_URL, timeout: float = 30.0
) -> Path:
    """Download the official archive into ``folder``; a clear FileNotFoundError when offline."""
    folder = Path(folder)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - fixed URL
            payload = response.read()
    except (urllib.error.URLError, OSError) as exc:
        raise FileNotFoundError(
            f"Cranfield data is not in {str(folder)!r} and could not be downloaded from {url} "
            f"({exc}); copy {list(FILES)} there or set MRL_CRANFIELD to a folder holding them"
        ) from exc
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(payload), mode="r:*") as tar:
        found = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        if not set(FILES) <= set(found):
            raise FileNotFoundError(f"the archive at {url} did not contain {list(FILES)}")
        for name in FILES:  # each file whole or not at all: a partial one was used silently
            data = tar.extractfile(found[name])
            assert data is not None
            with atomic_open(folder / name, "wb") as f:
                f.write(data.read())
    return folder


def _records(text: str, name: str = "text") -> list[dict[str, str]]:
    """Split a ``.I``-record file into ``{"I": id, "T": ..., "W": ...}`` dicts. Text after a
    marker on its own line (``.W what similarity laws``) belongs to that field."""
    records: list[dict[str, list[str]]] = []
    field = None
    for lineno, line in enumerate(text.replace("\r\n", "\n").split("\n"), 1):
        m = _MARKER.match(line.rstrip())
        if m:
            field = m.group(1)
            rest = (m.group(2) or "").strip()
            if field == "I":
                records.append({"I": [rest]})
                field = None
                continue
            if not records:  # an IndexError, before
                raise ValueError(f"{name} line {lineno}: .{field} before any .I record")
            records[-1].setdefault(field, []).append(rest)
            continue
        if field is not None and records:
            records[-1][field].append(line.strip())
    out = []
    for r in records:
        out.append({k: " ".join(s for s in v if s).strip() for k, v in r.items()})
    return out


def parse_documents(text: str) -> tuple[list[str], list[str], list[str]]:
    """``(doc_ids, titles, abstracts)``, dropping empty documents."""
    return _documents(_records(text, "cran.all.1400"))


def _documents(records: list[dict[str, str]]) -> tuple[list[str], list[str], list[str]]:
    """`parse_documents` of records already split."""
    ids, titles, bodies = [], [], []
    for r in records:
        title, body = r.get("T", ""), r.get("W", "")
        if body == "." or body.endswith(" . ."):
            # The file ends with a stray "." line, which lands after the last abstract.
            body = body[:-2].rstrip()
        if not title and not body:
            continue
        ids.append(r["I"])
        titles.append(title)
        bodies.append(body)
    return ids, titles, bodies


def parse_queries(text: str) -> list[str]:
    """Query texts in file order (their position, 1-based, is what ``cranqrel`` uses)."""
    return [r.get("W", "") for r in _records(text, "cran.qry")]


def parse_qrels(text: str, num_queries: int) -> dict[str, dict[str, float]]:
    """``{query position: {doc id: gain}}`` with gain = 5 - grade for grades 1..4."""
    qrels: dict[str, dict[str, float]] = {}
    seen: dict[tuple[int, int], tuple[int, int]] = {}  # (query, doc) -> (line, grade)
    for lineno, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 3:
            raise ValueError(f"cranqrel line {lineno}: expected 3 fields, got {line!r}")
        try:
            q, d, grade = (int(p) for p in parts)
        except ValueError:  # "invalid literal for int()", without the line
            msg = f"cranqrel line {lineno}: expected three integers, got {line!r}"
            raise ValueError(msg) from None
        if not 1 <= q <= num_queries:
            raise ValueError(f"cranqrel line {lineno}: query position {q} not in 1..{num_queries}")
        if (q, d) in seen and seen[q, d][1] != grade:  # the later line silently won
            raise ValueError(f"cranqrel line {lineno}: query {q} document {d} is judged "
                             f"{grade}, but line {seen[q, d][0]} judged it {seen[q, d][1]}")
        seen.setdefault((q, d), (lineno, grade))
        if 1 <= grade <= 4:
            qrels.setdefault(str(q), {})[str(d)] = float(5 - grade)
    return qrels


def load_cranfield(
    root: str | os.PathLike | None = None, download: bool = True
) -> RetrievalDataset:
    """Cranfield as a `RetrievalDataset`; query ids are positions "1".."225" (as in qrels)."""
    folder = find_cranfield(root, download=download)
    records = _records(_read(folder / "cran.all.1400"), "cran.all.1400")  # split once: the
    doc_ids, titles, bodies = _documents(records)  # documents, and every record's id below
    queries = parse_queries(_read(folder / "cran.qry"))
    qrels = parse_qrels(_read(folder / "cranqrel"), len(queries))
    _check_judged_documents(folder, qrels, {r["I"] for r in records})
    kept = set(doc_ids)  # the judgment of dropped document 995 (it cannot be retrieved)
    qrels = {q: {d: g for d, g in judged.items() if d in kept} for q, judged in qrels.items()}
    query_ids = [str(i + 1) for i in range(len(queries))]
    return RetrievalDataset("cranfield", doc_ids, titles, bodies, query_ids, queries, qrels)


def _read(path: Path) -> str:
    """A Cranfield file's text (ASCII in the official files; UTF-8, with or without a BOM,
    accepted), or an error naming the file."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text ({exc})") from None


def _check_judged_documents(folder: Path, qrels: dict, record_ids: set[str]) -> None:
    """Judgments naming a document that ``cran.all.1400`` has no record of mean a cut file (an
    interrupted copy): its queries were scored on a fraction of their relevant documents."""
    missing = sorted({d for judged in qrels.values() for d in judged} - record_ids, key=len)
    if missing:
        raise ValueError(
            f"the Cranfield collection in {str(folder)!r} looks incomplete: cranqrel judges "
            f"{len(missing)} document(s) that cran.all.1400 has no record of (e.g. "
            f"{missing[0]}); copy the files again (or delete the folder to download them)"
        )
