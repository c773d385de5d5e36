"""Batch embedding of a large corpus into an `EmbeddingStore`, in resumable shards.

A corpus (``.txt``: one text per line; ``.jsonl``: one object per line with a text field, or
several joined by ``+`` such as ``title+text``, and an optional id field) is cut into shards of
``shard_size`` consecutive rows. Each shard is encoded and
written to ``STORE.parts/`` as ``shard-00003.npy`` (+ ``.ids.npy``), and then its marker
``shard-00003.json`` is written atomically: the marker is the commit point, so a shard without one
is redone and a shard with one is skipped. After all shards exist they are appended, in order, to
the store at ``STORE`` (one atomic append per shard, so an interrupted merge resumes too), and the
parts folder is removed.

Several processes (``torchrun --nproc-per-node 4 -m mrl.cli embed ...`` or any launcher setting
``RANK``/``WORLD_SIZE``) split the shards round-robin: rank r encodes shards r, r + W, r + 2W...
No process group is needed: rank 0 waits for every marker, then merges; ``merge=False`` (or
``mrl embed --merge-only`` later) leaves merging to a separate step.
"""

from __future__ import annotations

import glob
import json
import numbers
import os
import secrets
import shutil
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mrl import distributed as _distributed
from mrl._optional import require
from mrl.io import atomic_open, atomic_write_json, exclusive_lock, file_digest
from mrl.params import check_int

__all__ = ["EmbedReport", "embed_corpus", "merge_shards", "read_corpus", "shard_plan"]

MANIFEST_FORMAT = "mrl-embed-parts"
MANIFEST_VERSION = 1


@dataclass
class EmbedReport:
    """What one `embed_corpus` call did."""

    rows: int  # texts in the corpus
    shards: int  # shards in the corpus
    encoded: list[int]  # shards this call encoded
    skipped: list[int]  # shards of this rank that were already done
    merged: bool  # whether this call produced the final store
    seconds: float
    truncated: int = 0  # texts this call encoded that exceed the model's max_tokens
    already: bool = False  # a rank other than 0 found the store merged: nothing to do


# ---------------------------------------------------------------------- reading the corpus
def read_corpus(path: str | os.PathLike, field: str = "text",
                id_field: str = "id") -> Iterator[tuple[Any, str]]:
    """Yield ``(id, text)`` per line: ids from ``id_field`` (.jsonl) or the row number.

    Bad lines raise ValueError with the 1-based line number: invalid JSON, a missing or non-string
    text field, an empty text, a null id.
    """
    for row, ident, text in _rows(path, field, id_field):
        yield (row if ident is None else ident), text


def _rows(path: str | os.PathLike, field: str, id_field: str,
          seen: set[str] | None = None) -> Iterator[tuple[int, Any, str]]:
    """(row, id or None when the line has none, text) per line; see `read_corpus`. ``seen``:
    collects the names of ``field``'s parts that some line holds (not null)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        raise ValueError(f"input must be a .txt or .jsonl file, got {path.name!r}")
    # Binary lines end at \n only, as `_count_lines` counts them (text mode's universal newlines
    # also split at a bare \r, which shifted every later row out of its shard). CRLF ends are
    # stripped.
    with open(path, "rb") as f:  # decoded line by line, so a bad byte's error names its line
        for row, raw in enumerate(f):
            try:
                # a byte-order mark at the file's start (Windows editors) is not text
                line = raw.decode("utf-8-sig" if row == 0 else "utf-8")
                line = line.removesuffix("\n").removesuffix("\r")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path.name} line {row + 1}: not UTF-8 text ({exc.reason} at "
                                 f"byte {exc.start})") from None
            if not line.strip():  # often an editor's trailing line; a row would shift the ids
                raise ValueError(f"{path.name} line {row + 1}: blank line; every line is one "
                                 "text: remove it")
            if suffix == ".txt":
                text, ident = line, None
            else:
                text, ident = _parse_jsonl(line, row + 1, field, id_field, path, seen)
            if not text.strip():
                raise ValueError(f"{path.name} line {row + 1}: empty text")
            yield row, ident, text


def check_corpus(path: str | os.PathLike, field: str = "text", id_field: str = "id") -> int:
    """One cheap pass over the input before encoding: every line parses (`read_corpus`), ids
    are unique and of one kind (all int or all str), and either every line has one or none
    (then ids are row numbers; a non-default ``id_field`` no line has is an error, as it is
    surely misspelt, and so is a part of a joined ``field`` such as "title+text"). Returns the
    number of rows. Errors give the line numbers, so that hours of encoding never end in a
    duplicate id."""
    path = Path(path)
    first_line: dict[Any, int] = {}
    kind = None
    with_id: bool | None = None
    seen: set[str] = set()
    for row, raw, _ in _rows(path, field, id_field, seen):
        if with_id is not None and (raw is not None) != with_id:
            this, line_1 = ("has an", "has none") if raw is not None else ("has no", "has one")
            raise ValueError(f"{path.name} line {row + 1} {this} {id_field!r} field but line 1 "
                             f"{line_1}; give every line an id or none")
        with_id = raw is not None
        ident = row if raw is None else raw
        this = "int" if isinstance(ident, int) else "str"
        if kind is not None and this != kind:
            raise ValueError(f"{path.name} line {row + 1}: id {ident!r} is a {this}, but earlier "
                             f"ids are {kind}s (ids must be all int or all str)")
        kind = this
        _check_id_value(ident, row, path)
        if ident in first_line:
            raise ValueError(f"{path.name} line {row + 1}: id {ident!r} is also on line "
                             f"{first_line[ident]}; ids must be unique")
        first_line[ident] = row + 1
    if with_id is False and id_field != "id" and path.suffix.lower() == ".jsonl":
        raise ValueError(f"{path.name}: no line has the id field {id_field!r} (id_field); "
                         "check its spelling")
    absent = [n for n in field.split("+") if n not in seen]
    if absent and path.suffix.lower() == ".jsonl":  # a joined part that is surely misspelt
        raise ValueError(f"{path.name}: no line has the field {absent[0]!r} of field={field!r}; "
                         "check its spelling")
    return len(first_line)


def _check_id_value(ident: Any, row: int, path: Path) -> None:
    """Ids the store keeps as given (`mrl.retrieval.store.unkept_id`), named by line."""
    from mrl.retrieval.store import unkept_id

    problem = unkept_id(ident)
    if problem == "int64":
        raise ValueError(f"{path.name} line {row + 1}: id {ident} does not fit in int64; "
                         "give such ids as strings")
    if problem == "nul":
        raise ValueError(f"{path.name} line {row + 1}: id {ident!r} ends with a NUL character, "
                         "which the store cannot keep")


def _parse_jsonl(line: str, lineno: int, field: str, id_field: str, path: Path,
                 seen: set[str] | None = None):
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path.name} line {lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path.name} line {lineno}: expected a JSON object")
    text = _joined_text(obj, field, lineno, path)
    if seen is not None:
        seen.update(n for n in field.split("+") if obj.get(n) is not None)
    ident = obj.get(id_field)
    if id_field in obj and ident is None:
        raise ValueError(f"{path.name} line {lineno}: {id_field!r} is null; give an int or a "
                         "string id, or leave the field out on every line")
    if ident is not None and (isinstance(ident, bool) or not isinstance(ident, (int, str))):
        raise ValueError(f"{path.name} line {lineno}: {id_field!r} must be an int or a string")
    # a JSON "\ud800" escape is a str no encoder or Qdrant can take: it failed shards later,
    # in a tokenizer's TypeError, or in the export after the collection was set up
    for name, value in ((field, text), (id_field, ident)):
        if isinstance(value, str) and _has_surrogate(value):
            raise ValueError(f"{path.name} line {lineno}: {name!r} holds an unpaired UTF-16 "
                             "surrogate (a \\ud800-\\udfff escape), which is not text")
    return text, ident


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _joined_text(obj: dict, field: str, lineno: int, path: Path) -> str:
    """The text of one JSONL object: ``field``, or for ``"title+text"`` the fields joined as
    `mrl eval` joins a BEIR document's title and body (missing or null parts are left out)."""
    names = field.split("+")
    if len(names) == 1:
        if field not in obj:
            raise ValueError(f"{path.name} line {lineno}: no field {field!r} (keys: "
                             f"{', '.join(map(repr, list(obj)[:5]))}); pick the text field "
                             "with --field")
        text = obj.get(field)
        if not isinstance(text, str):
            raise ValueError(f"{path.name} line {lineno}: field {field!r} must be a string, "
                             f"got {type(text).__name__}")
        return text
    from mrl.text.corpus import join_title

    text = ""
    for name in names:
        part = obj.get(name)
        if part is not None and not isinstance(part, str):
            raise ValueError(f"{path.name} line {lineno}: field {name!r} must be a string or "
                             f"null, got {type(part).__name__}")
        text = join_title(text, part or "")
    return text


def check_field(field: str, param: str = "field") -> str:
    """A text field name, or several joined by '+' ("title+text"); a ValueError naming ``param``.
    (A key that itself contains '+' cannot be selected.)"""
    if not isinstance(field, str) or not all(n.strip() for n in field.split("+")):
        raise ValueError(f"{param} must be a field name or names joined by '+' (e.g. "
                         f"'title+text'), got {field!r}")
    return field


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(buf.count(b"\n") for buf in iter(lambda: f.read(1 << 20), b"")) + (
            1 if path.stat().st_size and not _ends_with_newline(path) else 0)


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def shard_plan(rows: int, shard_size: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """The shards rank ``rank`` of ``world_size`` encodes: r, r + W, r + 2W, ..."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got shard_size={shard_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got rank={rank}")
    shards = -(-rows // shard_size)
    return list(range(rank, shards, world_size))


# ---------------------------------------------------------------------- shard files
def _parts_dir(out: Path) -> Path:
    out = Path(os.path.abspath(out))  # --out . has no name to add ".parts" to
    return out.with_name(out.name + ".parts")


def _shard_paths(parts: Path, s: int) -> tuple[Path, Path, Path]:
    stem = parts / f"shard-{s:05d}"
    return stem.with_suffix(".npy"), Path(f"{stem}.ids.npy"), stem.with_suffix(".json")


def _shard_done(parts: Path, s: int, expected_rows: int) -> bool:
    vec, ids, marker = _shard_paths(parts, s)
    if not marker.is_file():
        return False
    try:  # the commit point; one that cannot be read (a disk error) means: encode it again
        meta = json.loads(marker.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return False
    return (isinstance(meta, dict) and meta.get("count") == expected_rows and vec.is_file()
            and ids.is_file())  # fmt: skip


def _read_manifest(parts: Path) -> dict[str, Any]:
    """PARTS/manifest.json; a damaged one is an error naming it (not a bare JSON message)."""
    path = parts / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is damaged ({exc}); remove {parts} to encode again") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path} is damaged (not a JSON object); remove {parts} to encode again")
    return manifest


def _write_shard(parts: Path, s: int, emb: np.ndarray, ids: list[Any]) -> None:
    vec_path, ids_path, marker = _shard_paths(parts, s)
    with atomic_open(vec_path, "wb") as f:
        np.save(f, emb, allow_pickle=False)
    with atomic_open(ids_path, "wb") as f:
        np.save(f, np.asarray(ids), allow_pickle=False)
    atomic_write_json(marker, {"shard": s, "count": len(emb)})  # the commit point


# manifest keys recorded since a version of mrl: parts written before them still resume
_LATER_KEYS = ("input_sha256", "model_fingerprint")


def _model_fingerprint(encoder: Any) -> Any:
    """The encoder's ``fingerprint()`` (its files), or None for one without (a fake, a plugin)."""
    fingerprint = getattr(encoder, "fingerprint", None)
    return fingerprint() if callable(fingerprint) else None


def _check_manifest(parts: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest, or refuse parts written for another corpus/model/shard size."""
    path = parts / "manifest.json"
    if path.is_file():
        old = _read_manifest(parts)
        later = [k for k in _LATER_KEYS if k not in old]
        if later:  # parts from before these keys were recorded: compare the rest
            if old == {k: v for k, v in manifest.items() if k not in later}:
                warnings.warn(f"{parts} predates recording {later}: its shards are taken as "
                              "they are (an input edited in place or another model of the same "
                              "name cannot be told); remove it to encode again", stacklevel=3)
                atomic_write_json(path, manifest)  # and record them from now on
                return
        if old != manifest:
            # Refused even when no shard is finished: another job may be encoding its first
            # shard into this folder right now.
            diff = sorted(k for k in manifest if old.get(k) != manifest[k])
            why = ("an earlier version of the input file (it has changed since)"
                   if diff == ["input_sha256"] else "another run")
            done = len(list(parts.glob("shard-*.json")))
            raise ValueError(f"{parts} holds {done} finished shards of {why} (differs in "
                             f"{diff}); remove it (once no other job writes there) or use "
                             "another --out")
        return
    parts.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, manifest)


# ---------------------------------------------------------------------- embedding
RankError = _distributed.RankError  # where it lived first
_rank_from_env = _distributed.rank_from_env


def already_merged(out: Path) -> bool:
    """The store at ``out`` is whole and its parts are gone: a resumed rank other than 0 that
    starts after rank 0 merged has nothing to do (it failed on "a store already exists", or
    re-created the parts folder and encoded its shards again)."""
    return (out / "store.json").is_file() and not _parts_dir(out).is_dir()


def check_inputs(input_path: Path, out: Path, field: str, id_field: str, rank: int,
                 field_param: str = "field") -> int:
    """The input's row count, after checking the input and ``out`` (every line and id): one-line
    errors before any model is loaded or text encoded. ``field_param``: the name a bad
    ``field``'s error gives it (the CLI's ``--field``)."""
    check_field(field, field_param)
    if not input_path.is_file():
        raise FileNotFoundError(f"input file {str(input_path)!r} does not exist")
    if (out / "store.json").is_file() and not _parts_dir(out).is_dir():
        raise FileExistsError(f"a store already exists at {out}; choose another --out")
    from mrl.retrieval.store import check_new_store_path

    check_new_store_path(out, "out")  # before any encoding, not at the merge
    rows = _count_lines(input_path)
    if rows == 0:
        raise ValueError(f"input file {str(input_path)!r} is empty: nothing to embed")
    # Every line and id. Rank 0 only: the check holds one id per row in memory, and when it
    # fails torchrun stops the other ranks.
    if rank == 0:
        check_corpus(input_path, field, id_field)
    return rows


def embed_corpus(
    encoder,
    input_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    shard_size: int = 10_000,
    batch_size: int = 64,
    rank: int | None = None,
    world_size: int | None = None,
    field: str = "text",
    id_field: str = "id",
    merge: bool = True,
    wait_timeout_s: float = 24 * 3600.0,
    dtype: str | None = None,
    show_progress: bool = True,
    rows: int | None = None,
) -> EmbedReport:
    """Embed every line of ``input_path`` with ``encoder`` into the store at ``out``.

    ``rows``: what `check_inputs` returned when it already ran (the CLI runs it before loading
    the model), so its passes over the input are not repeated; None: checked here.

    ``encoder`` has ``encode(texts) -> [B, D]``, ``name`` and ``nesting`` (the `Encoder`
    protocol of `mrl.serve.encoders`). Rows are stored L2-normalised at full size. Rank and world
    size default to the ``RANK``/``WORLD_SIZE`` environment variables (torchrun sets them).
    """
    t0 = time.perf_counter()
    if rank is None or world_size is None:
        env_rank, env_world = _rank_from_env()
        rank = env_rank if rank is None else rank
        world_size = env_world if world_size is None else world_size
    # 2.5 failed in range() (for batch_size after the manifest was written), "10" in a compare
    batch_size = check_int(batch_size, "batch_size", 1)
    shard_size = check_int(shard_size, "shard_size", 1)
    if isinstance(wait_timeout_s, bool) or not isinstance(wait_timeout_s, numbers.Real):
        raise ValueError(f"wait_timeout_s must be a number of seconds, got "
                         f"wait_timeout_s={wait_timeout_s!r}")
    from mrl.retrieval.store import DTYPES

    if dtype is not None and dtype not in DTYPES:  # was checked at the merge, after the encoding
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got dtype={dtype!r}")
    if not wait_timeout_s > 0:  # NaN too; inf waits for ever
        raise ValueError(f"wait_timeout_s must be positive, got {wait_timeout_s}")
    input_path, out = Path(input_path), Path(out)
    if rank != 0 and already_merged(out):  # rank 0 finished the whole job before this started
        return EmbedReport(0, 0, [], [], False, time.perf_counter() - t0, already=True)
    if rows is None:
        rows = check_inputs(input_path, out, field, id_field, rank)
    mine = shard_plan(rows, shard_size, rank, world_size)
    parts = _parts_dir(out)
    if rank != 0 and already_merged(out):  # merged while this rank read the input: the parts
        return EmbedReport(rows, -(-rows // shard_size), [], [], False,  # must not come back
                           time.perf_counter() - t0, already=True)
    _check_manifest(parts, {
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION,
        "input": str(input_path.resolve()), "input_bytes": input_path.stat().st_size,
        # the content, not the mtime: an edit that keeps the size (sed -i) must not let a resumed
        # run merge shards of the old text, and a copy or touch changes no row
        "input_sha256": file_digest(input_path),
        "rows": rows, "shard_size": shard_size, "model": encoder.name,
        # what the model is, not its folder's name: every demo run is runs/mrl
        "model_fingerprint": _model_fingerprint(encoder),
        "dim": encoder.nesting.dim, "nesting": encoder.nesting.to_dict(), "field": field,
        "id_field": id_field})
    n_shards = -(-rows // shard_size)
    size_of = lambda s: min(shard_size, rows - s * shard_size)  # noqa: E731
    todo = [s for s in mine if not _shard_done(parts, s, size_of(s))]
    report = EmbedReport(rows, n_shards, [], [s for s in mine if s not in todo], False, 0.0)
    bar = _bar(sum(size_of(s) for s in todo), show_progress, f"embed rank {rank}")
    for s, ids, texts in _shards(input_path, field, id_field, shard_size, set(todo)):
        emb = np.concatenate([_encode(encoder, texts[i : i + batch_size], bar)
                              for i in range(0, len(texts), batch_size)])  # [n, D]
        _write_shard(parts, s, emb, ids)
        report.encoded.append(s)
        report.truncated += _count_long(encoder, texts)
    if bar is not None:
        bar.close()
    if report.truncated:  # as `mrl eval` and `mrl text encode` say it
        warnings.warn(f"{report.truncated} of the {sum(size_of(s) for s in todo)} texts encoded "
                      f"exceed the model's max_tokens={encoder.max_tokens} tokens and were "
                      "truncated to it", stacklevel=2)
    if merge and rank == 0:
        _wait_for_shards(parts, rows, shard_size, wait_timeout_s)
        merge_shards(out, dtype=dtype)
        report.merged = True
    report.seconds = time.perf_counter() - t0
    return report


def _count_long(encoder: Any, texts: list[str]) -> int:
    """Texts longer than the encoder's ``max_tokens`` (the model truncates them); not counted
    for an encoder of one "token" per input (images)."""
    if getattr(encoder, "max_tokens", 0) <= 1 or not hasattr(encoder, "count_tokens"):
        return 0
    return sum(n > encoder.max_tokens for n in encoder.count_tokens(texts))


def _encode(encoder, texts: list[str], bar) -> np.ndarray:
    emb = np.asarray(encoder.encode(texts), dtype=np.float32)  # [b, D]
    # Checked before the shard is written: a bad shard on disk was found only at the merge, and
    # a rerun with a fixed encoder of the same name kept failing on it.
    dim = encoder.nesting.dim
    if emb.shape != (len(texts), dim):
        raise ValueError(f"encoder {encoder.name!r} returned shape {emb.shape} for {len(texts)} "
                         f"texts; expected [{len(texts)}, {dim}]")
    if not np.isfinite(emb).all():
        row = int(np.flatnonzero(~np.isfinite(emb).all(1))[0])
        raise ValueError(f"encoder {encoder.name!r} returned NaN or inf (text {row} of the "
                         f"batch: {texts[row][:60]!r})")
    if bar is not None:
        bar.update(len(texts))
    return emb


def _shards(path: Path, field: str, id_field: str, shard_size: int,
            wanted: set[int]) -> Iterator[tuple[int, list[Any], list[str]]]:
    """Yield (shard, ids, texts) for the wanted shards, streaming the file once."""
    ids: list[Any] = []
    texts: list[str] = []
    current = 0
    for row, (ident, text) in enumerate(read_corpus(path, field, id_field)):
        s = row // shard_size
        if s != current:
            if current in wanted:
                yield current, ids, texts
            ids, texts, current = [], [], s
        if s in wanted:
            ids.append(ident)
            texts.append(text)
    if current in wanted and texts:
        yield current, ids, texts


def _bar(total: int, show: bool, desc: str):
    if not show or total == 0:
        return None
    return require("tqdm", "text").tqdm(total=total, unit="text", desc=desc)


def _wait_for_shards(parts: Path, rows: int, shard_size: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    n_shards = -(-rows // shard_size)
    while True:
        missing = [s for s in range(n_shards)
                   if not _shard_done(parts, s, min(shard_size, rows - s * shard_size))]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"shards {missing[:10]} are still missing after {timeout_s:.0f} s")
        time.sleep(0.2)


def merge_shards(out: str | os.PathLike, *, dtype: str | None = None, keep_parts: bool = False):
    """Append every finished shard, in order, to the `EmbeddingStore` at ``out``; resumable.

    Returns the store. A store that already holds the first j shards (an interrupted merge)
    continues with shard j. ``dtype``: of a new store (None: float32); a resumed merge keeps its
    store's, and another one given is an error (it was ignored).
    """
    from mrl.retrieval import EmbeddingStore

    out = Path(out)
    parts = _parts_dir(out)
    with _merge_lock(parts):  # one merger at a time; the others then find the work done
        if not (parts / "manifest.json").is_file():
            if (out / "store.json").is_file():
                _remove_trash(parts)  # of a removal killed midway
                return EmbeddingStore.open(out)  # merged earlier and the parts were removed
            raise FileNotFoundError(f"no shards to merge at {parts}")
        return _merge_locked(out, parts, dtype, keep_parts)


@contextmanager
def _merge_lock(parts: Path) -> Iterator[None]:
    """Exclusive lock on ``STORE.parts/.merge.lock`` (waits for a merge in progress; freed when
    its holder exits). No lock when the parts folder is gone: there is nothing left to merge."""
    with exclusive_lock(parts / ".merge.lock", missing_ok=True):
        yield


def _merge_locked(out: Path, parts: Path, dtype: str, keep_parts: bool):
    from mrl.nesting import Nesting
    from mrl.retrieval import EmbeddingStore

    manifest = _read_manifest(parts)
    rows, shard_size = manifest["rows"], manifest["shard_size"]
    _wait_for_shards(parts, rows, shard_size, 0.0)
    if (out / "store.json").is_file():
        store = EmbeddingStore.open(out)
        if dtype is not None and dtype != store.dtype:
            raise ValueError(f"the interrupted merge into {out} writes {store.dtype}, not "
                             f"dtype={dtype}: resume it without a dtype (or {store.dtype}), or "
                             "remove the store folder to merge again")
    else:
        store = EmbeddingStore.create(out, Nesting.from_dict(manifest["nesting"]),
                                      dtype=dtype or "float32", normalize=True)
    if store.count % shard_size and store.count != rows:
        raise ValueError(f"store at {out} holds {store.count} rows, not a whole number of "
                         f"shards of {shard_size}; it was not written by this merge")
    first = -(-rows // shard_size) if store.count == rows else store.count // shard_size
    for s in range(first, -(-rows // shard_size)):
        vec, ids, _ = _shard_paths(parts, s)
        store.append(np.load(vec), ids=np.load(ids))
    store = _check_merged(out, parts, rows, shard_size)
    if not keep_parts:  # only once the store on disk is whole: the shards are its only source
        _remove_parts(parts)
    return store


def _remove_parts(parts: Path) -> None:
    """Remove the parts folder: renamed first (one atomic step), then deleted. rmtree deletes
    file by file, and a kill midway left a complete store beside a parts folder missing some
    shards, which the next run could neither merge nor skip: it encoded them again."""
    trash = parts.with_name(f"{parts.name}.removing-{secrets.token_hex(4)}")
    os.replace(parts, trash)
    _remove_trash(parts)


def _remove_trash(parts: Path) -> None:
    """Delete ``PARTS.removing-*`` folders (this removal's, and those of removals killed)."""
    for trash in parts.parent.glob(f"{glob.escape(parts.name)}.removing-*"):
        shutil.rmtree(trash, ignore_errors=True)


def _check_merged(out: Path, parts: Path, rows: int, shard_size: int):
    """The store at ``out`` reopened from disk, holding every shard's ids in order."""
    from mrl.retrieval import EmbeddingStore

    store = EmbeddingStore.open(out)  # every segment named by the sidecar is present
    want = np.concatenate([np.load(_shard_paths(parts, s)[1])
                           for s in range(-(-rows // shard_size))])
    if store.count != rows or not np.array_equal(store.ids, want):
        raise ValueError(f"merged store at {out} holds {store.count} rows, expected the {rows} "
                         f"rows of the shards in {parts}; the parts are kept")
    return store
