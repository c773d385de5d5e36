"""`EmbeddingStore`: full-size embeddings on disk, memory-mapped, with a JSON sidecar.

Layout of a store folder::

    store.json              the sidecar: format, version, nesting, dtype, normalised?, centre,
                            count, dim and the list of segments (the only file that is rewritten)
    seg-<token>.npy         one immutable segment of rows [n, D] (float32 / float16 / int8)
    scale-<token>.npy       int8 only: the dequantisation scales of that segment
    ids-<token>.npy         the ids of that segment's rows (int64 or unicode)

Appending writes a *new* segment beside the old ones (fsync'ed), then atomically replaces
``store.json`` with one that also names the new segment (`mrl.io.atomic_write_json`). A crash
anywhere before that replace leaves the previous sidecar, which names only the previous, untouched
segments: the store is exactly what it was. Orphan files of a failed append are removed the next
time the store is opened for writing.

Writers (`append`, `compact`) hold an exclusive lock on ``STORE/.lock`` (``fcntl.flock``; released
when the process dies) and re-read ``store.json`` under it: several processes may append to one
store, each sees the others' segments, and none removes a segment another one committed as an
"orphan". A second writer waits for the first.

int8 quantisation (``dtype="int8"``): ``x ~= q * scale`` with ``q`` in [-127, 127]. With
``int8_scale="per-vector"`` each row has its own scale ``max|x_i| / 127`` (robust to appends, the
default); with ``"per-dim"`` each segment has one scale per column ``max_i |x_ij| / 127`` (better
when the leading MRL coordinates carry much more energy than the tail). Scales are float32.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mrl.arrays import as_numpy
from mrl.io import (
    atomic_open,
    atomic_write_json,
    check_output_path,
    exclusive_lock,
    read_json_sidecar,
)
from mrl.nesting import Nesting
from mrl.params import check_int, is_int

__all__ = [
    "EmbeddingStore",
    "STORE_FORMAT",
    "STORE_VERSION",
    "check_float16_range",
    "check_id_values",
    "check_new_store_path",
    "check_uint64_ids",
    "check_unique_ids",
    "validate_vectors",
]

def unkept_id(ident: Any) -> str | None:
    """Why numpy would not keep the Python id ``ident`` as given: ``"int64"`` for an int outside
    int64 (turned uint64, float or object), ``"nul"`` for a string ending in NUL (its str dtype
    strips it: "doc\\x00" became "doc"); None when it is kept. `mrl.embed` checks with it too."""
    if isinstance(ident, str) and ident.endswith("\x00"):
        return "nul"
    if isinstance(ident, int) and not -(2**63) <= ident < 2**63:
        return "int64"
    return None


def check_uint64_ids(arr: np.ndarray) -> None:
    """Refuse unsigned ids above int64: astype(int64) would wrap hash-like ids >= 2**63 to
    negative ones, silently."""
    if arr.dtype.kind == "u" and len(arr) and int(arr.max()) > INT64_MAX:
        raise ValueError(f"ids must fit in int64 (<= {INT64_MAX}), got {int(arr.max())}; "
                         "give such ids as strings")


def check_id_values(ids: Sequence) -> None:
    """Refuse Python ids the store would not keep as given (`unkept_id`)."""
    for i in ids:
        problem = unkept_id(i)
        if problem == "nul":
            raise ValueError(f"ids must not end with a NUL character, got {i!r}")
        if problem == "int64":
            raise ValueError(f"ids must fit in int64, got {i}; give such ids as strings")


STORE_FORMAT = "mrl-embedding-store"
STORE_VERSION = 1
SIDECAR = "store.json"
LOCK = ".lock"
DTYPES = ("float32", "float16", "int8")
INT64_MAX = int(np.iinfo(np.int64).max)
INT8_SCALES = ("per-vector", "per-dim")


def validate_vectors(x: Any, dim: int | None, name: str = "vectors") -> np.ndarray:
    """Check a [n, D] float array (finite, right width) and return it as float32."""
    arr = as_numpy(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [n, D], got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must hold numbers (float), got dtype {arr.dtype}")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"{name} must have dimension {dim}, got shape {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)  # no copy when already float32
    bad = first_nonfinite_row(arr)
    if bad is not None:
        raise ValueError(f"{name} must be finite, row {bad} has NaN or inf")
    return arr


def check_center(center: Any, dim: int) -> np.ndarray:
    """A centre: one finite number per dimension, [D] float32 (a [1, D] or [2, D] array was
    reshaped, and its error named the reshaped shape)."""
    arr = as_numpy(center)
    if arr.ndim != 1 or arr.shape[0] != dim:
        raise ValueError(f"center must be a vector of {dim} numbers [D], got shape {arr.shape}")
    return validate_vectors(arr.reshape(1, -1), dim, "center")[0]


def check_dims(dims: Any, d: int) -> int:
    """A prefix length in [1, d] (None: d), for reads and searches of a prefix."""
    if dims is None:
        return d
    if not is_int(dims) or not 1 <= dims <= d:
        raise ValueError(f"dims must be an int in [1, {d}], got dims={dims!r}")
    return int(dims)


def check_row_indices(rows: Any, count: int, name: str = "rows") -> np.ndarray:
    """Row positions as int64 ``[R]`` in [0, count): floats were truncated (1.7 read row 1) and
    negative positions counted from the end."""
    arr = np.asarray(rows)
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must be integer row positions, got dtype {arr.dtype}")
    arr = arr.astype(np.int64).ravel()
    if len(arr) and (arr.min() < 0 or arr.max() >= count):
        raise ValueError(f"{name} must be in [0, {count}), got {arr.min()}..{arr.max()}")
    return arr


def first_nonfinite_row(arr: np.ndarray, block: int = 65536) -> int | None:
    """The first row of ``arr [N, D]`` holding NaN or inf, or None; checked in row blocks (no
    [N, D] bool temporary for 1M rows, nor a copy of a memory map)."""
    for s in range(0, len(arr), block):
        ok = np.isfinite(arr[s : s + block]).all(axis=1)
        if not ok.all():
            return s + int(np.flatnonzero(~ok)[0])
    return None


def check_float16_range(x: np.ndarray, option: str, block: int = 65536) -> None:
    """float16 storage: a value beyond 65504 would be stored as inf and score inf (or NaN);
    refused, naming the ``option`` that chose float16 (checked in row blocks, no [N, D] copy)."""
    for s in range(0, len(x), block):
        if np.abs(x[s : s + block]).max(initial=0.0) > 65504:
            raise ValueError(f"vectors exceed the float16 range (65504); use {option}='float32'")


def check_unique_ids(new: np.ndarray, existing: np.ndarray, holder: str) -> None:
    """ids name rows one to one: a repeated id would make a search hit ambiguous, whether it
    repeats within the new ids or is one the ``holder`` ("store", "index") already has."""
    uniq, counts = np.unique(new, return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1][0]
        raise ValueError(f"ids must be unique, id {dup.item()!r} appears twice in the new ids")
    clash = np.isin(new, existing) if len(existing) else np.zeros(len(new), bool)
    if clash.any():  # .item(): 3, not np.int64(3), in the message
        raise ValueError(f"ids must be unique, id {new[clash][0].item()!r} is already in the "
                         f"{holder}")


@dataclass(frozen=True)
class _Segment:
    """One immutable block of rows; file names are relative to the store folder."""

    data: str
    ids: str
    count: int
    scale: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"data": self.data, "ids": self.ids, "count": self.count, "scale": self.scale}


def check_new_store_path(path: str | os.PathLike, param: str = "path") -> Path:
    """``path`` can receive a new store: it does not exist, is an empty folder, or already is a
    store (the caller decides whether to reopen it). A folder with other files (a model, an
    index) is refused, so that the store's files are never mixed into it."""
    path = check_output_path(path, param, "dir")
    if path.is_dir() and not (path / SIDECAR).exists() and any(path.iterdir()):
        raise FileExistsError(f"{param} {str(path)!r} is a non-empty folder that is not an "
                              "embedding store; write the store to a new folder")
    return path


class EmbeddingStore:
    """Append-only, crash-safe, memory-mapped store of full-size embeddings.

    Create with `EmbeddingStore.create` (or `from_array`), open with `EmbeddingStore.open`.
    Rows are read back as float32 (int8 is dequantised), optionally only the first ``dims`` columns.

    Example:
        >>> store = EmbeddingStore.create(path, Nesting.doubling(8, 64), dtype="float16")
        >>> store.append(vectors, ids=["a", "b"])       # vectors: [2, 64]
        >>> store.read(dims=16).shape                     # (2, 16), float32
    """

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path = path
        self._meta = meta
        self.nesting = Nesting.from_dict(meta["nesting"])
        self.dtype: str = meta["dtype"]
        self.int8_scale: str | None = meta.get("int8_scale")
        self.normalized: bool = bool(meta["normalized"])
        center = meta.get("center")
        self.center = None if center is None else np.asarray(center, dtype=np.float32)
        self._segments = [_Segment(**s) for s in meta["segments"]]
        self._maps: dict[str, np.ndarray] = {}

    # ------------------------------------------------------------------ creation / opening
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        nesting: Nesting,
        *,
        dtype: str = "float32",
        normalize: bool = False,
        center: np.ndarray | None = None,
        int8_scale: str = "per-vector",
    ) -> EmbeddingStore:
        """A new, empty store at ``path`` (a folder that must not hold a store already).

        Args:
            nesting: the prefix sizes; ``nesting.dim`` is the row width D.
            dtype: on-disk type, "float32", "float16" or "int8".
            normalize: L2-normalise every row (full size) before storing it.
            center: optional [D] vector subtracted from every row (and to be subtracted from
                queries by whoever searches); recorded in the sidecar.
            int8_scale: "per-vector" or "per-dim" (int8 only; see the module doc).
        """
        if not isinstance(nesting, Nesting):
            raise ValueError(f"nesting must be a mrl.Nesting, got {type(nesting).__name__}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got dtype={dtype!r}")
        if int8_scale not in INT8_SCALES:
            raise ValueError(
                f"int8_scale must be one of {list(INT8_SCALES)}, got int8_scale={int8_scale!r}"
            )
        path = Path(path)
        if (path / SIDECAR).exists():
            raise FileExistsError(
                f"a store already exists at {path}; open it with EmbeddingStore.open"
            )
        check_new_store_path(path)
        if center is not None:
            center = check_center(center, nesting.dim)
        path.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "nesting": nesting.to_dict(),
            "dtype": dtype,
            "int8_scale": int8_scale if dtype == "int8" else None,
            "normalized": bool(normalize),
            "center": None if center is None else center.tolist(),
            "dim": nesting.dim,
            "count": 0,
            "segments": [],
        }
        atomic_write_json(path / SIDECAR, meta)
        return cls(path, meta)

    @classmethod
    def from_array(
        cls,
        path: str | os.PathLike,
        vectors: np.ndarray,
        nesting: Nesting | None = None,
        *,
        ids: Sequence | np.ndarray | None = None,
        **options: Any,
    ) -> EmbeddingStore:
        """Create a store holding ``vectors`` [N, D] (nesting defaults to doubling from 8)."""
        vectors = validate_vectors(vectors, None)
        if nesting is None:
            nesting = Nesting.doubling(min(8, vectors.shape[1]), vectors.shape[1])
        store = cls.create(path, nesting, **options)
        store.append(vectors, ids=ids)
        return store

    @classmethod
    def open(cls, path: str | os.PathLike) -> EmbeddingStore:
        """Open an existing store; checks the format version and every segment's size."""
        path = Path(path)
        sidecar = path / SIDECAR
        meta = read_json_sidecar(path, SIDECAR, "embedding store")
        if meta.get("format") != STORE_FORMAT:
            raise ValueError(
                f"{sidecar} is not an mrl embedding store (format={meta.get('format')!r})"
            )
        if meta.get("version") != STORE_VERSION:
            raise ValueError(
                f"{sidecar} has format version {meta.get('version')!r}; this mrl reads version "
                f"{STORE_VERSION}"
            )
        store = cls(path, meta)
        for seg in store._segments:  # map every file now: truncation is reported at open, and a
            store._check_segment(seg)  # compaction by another process cannot pull them away
        return store

    def _check_segment(self, seg: _Segment) -> None:
        """Map a segment's files and check their rows against the sidecar's count."""
        for name in (seg.data, seg.ids, seg.scale):
            if name is None:
                continue
            arr = self._load(name)
            scale_per_dim = name == seg.scale and self.int8_scale == "per-dim"
            want = (self.dim,) if scale_per_dim else (seg.count,)
            if arr.shape[:1] != want or (name == seg.data and arr.shape[1:] != (self.dim,)):
                raise ValueError(
                    f"store file {self.path / name} has shape {arr.shape}, the sidecar says "
                    f"{seg.count} rows of {self.dim} (the store is damaged)"
                )

    # ------------------------------------------------------------------ properties
    @property
    def dim(self) -> int:
        return self.nesting.dim

    @property
    def count(self) -> int:
        return int(self._meta["count"])

    def __len__(self) -> int:
        return self.count

    @property
    def ids(self) -> np.ndarray:
        """All ids in row order (int64 row numbers unless ids were given)."""
        parts = [self._load(s.ids) for s in self._segments]
        if not parts:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate(parts)

    @property
    def nbytes(self) -> int:
        """Bytes of vector data (and scales) on disk."""
        total = 0
        for s in self._segments:
            total += self._load(s.data).nbytes + (self._load(s.scale).nbytes if s.scale else 0)
        return total

    # ------------------------------------------------------------------ writing
    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the store's writer lock and bring this object up to the sidecar on disk (another
        process may have appended or compacted since it was opened)."""
        with exclusive_lock(self.path / LOCK):  # waits for the other writer
            self._reload()
            yield

    def _reload(self) -> None:
        meta = read_json_sidecar(self.path, SIDECAR, "embedding store")
        if meta != self._meta:
            self._meta, self._segments = meta, [_Segment(**s) for s in meta["segments"]]
            self._maps = {}

    def append(self, vectors: np.ndarray, ids: Sequence | np.ndarray | None = None) -> None:
        """Append rows [n, D] (and optional ids, unique, strings or ints) atomically."""
        x = validate_vectors(vectors, self.dim)
        with self._locked():
            self._append(x, ids)

    def _append(self, x: np.ndarray, ids: Sequence | np.ndarray | None) -> None:
        ids_arr = self._new_ids(ids, len(x))  # under the lock: against every committed id
        if self.center is not None:
            x = x - self.center
        if self.normalized:
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        self._cleanup_orphans()
        token = secrets.token_hex(6)
        data, scale = self._encode(x)
        seg = _Segment(
            data=f"seg-{token}.npy",
            ids=f"ids-{token}.npy",
            count=len(x),
            scale=None if scale is None else f"scale-{token}.npy",
        )
        self._write_npy(seg.data, data)
        if scale is not None:
            self._write_npy(seg.scale, scale)
        self._write_npy(seg.ids, ids_arr)
        meta = dict(self._meta)
        meta["segments"] = [s.to_dict() for s in self._segments] + [seg.to_dict()]
        meta["count"] = self.count + len(x)
        atomic_write_json(self.path / SIDECAR, meta)  # the commit point
        self._meta = meta
        self._segments.append(seg)

    def _new_ids(self, ids: Sequence | np.ndarray | None, n: int) -> np.ndarray:
        existing = self.ids
        if ids is None:
            if existing.dtype.kind != "i":
                raise ValueError("ids must be given: this store holds explicit (string) ids")
            start = int(existing.max()) + 1 if len(existing) else 0
            return np.arange(start, start + n, dtype=np.int64)
        if not isinstance(ids, np.ndarray):
            check_id_values(ids)
        arr = np.asarray(ids)
        if arr.shape != (n,):
            raise ValueError(f"ids must have one entry per vector ({n}), got shape {arr.shape}")
        check_uint64_ids(arr)
        if arr.dtype.kind in "iu":
            arr = arr.astype(np.int64)
        elif arr.dtype.kind in "US":
            arr = arr.astype(str)
        else:
            raise ValueError(f"ids must be integers or strings, got dtype {arr.dtype}")
        if len(existing) and (existing.dtype.kind == "i") != (arr.dtype.kind == "i"):
            raise ValueError(
                f"ids must be of the same kind as the store's ({existing.dtype}), got {arr.dtype}"
            )
        check_unique_ids(arr, existing, "store")
        return arr

    def _encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        # x: [n, D] float32 -> on-disk array and (int8 only) float32 scales [n] or [D].
        if self.dtype == "float32":
            return x, None
        if self.dtype == "float16":
            check_float16_range(x, "dtype")
            return x.astype(np.float16), None
        axis = 1 if self.int8_scale == "per-vector" else 0
        scale = np.abs(x).max(axis=axis) / 127.0
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        s = scale[:, None] if axis == 1 else scale[None, :]
        q = np.clip(np.rint(x / s), -127, 127).astype(np.int8)
        return q, scale

    def _write_npy(self, name: str, arr: np.ndarray) -> None:
        with atomic_open(self.path / name, "wb") as f:
            np.save(f, arr, allow_pickle=False)

    def _cleanup_orphans(self) -> None:
        """Remove segment files that no sidecar names (left by a failed append)."""
        named = {n for s in self._segments for n in (s.data, s.ids, s.scale) if n}
        for p in self.path.iterdir():
            if p.name.startswith(("seg-", "ids-", "scale-", ".seg-", ".ids-", ".scale-")):
                if p.name not in named:
                    p.unlink(missing_ok=True)

    # ------------------------------------------------------------------ reading
    def _load(self, name: str) -> np.ndarray:
        arr = self._maps.get(name)
        if arr is None:
            file = self.path / name
            if not file.exists():
                raise FileNotFoundError(f"store file {file} is missing (the store is damaged)")
            try:
                arr = np.load(file, mmap_mode="r", allow_pickle=False)
            except ValueError as exc:
                raise ValueError(f"store file {file} is truncated or damaged ({exc})") from None
            self._maps[name] = arr
        return arr

    def _decode(self, seg: _Segment, rows: slice | np.ndarray, dims: int) -> np.ndarray:
        data = self._load(seg.data)
        out = np.asarray(data[rows, :dims], dtype=np.float32)
        if seg.scale is not None:
            scale = self._load(seg.scale)
            if self.int8_scale == "per-vector":
                out *= np.asarray(scale[rows], dtype=np.float32)[:, None]
            else:
                out *= np.asarray(scale[:dims], dtype=np.float32)[None, :]
        return out

    def _check_dims(self, dims: int | None) -> int:
        return check_dims(dims, self.dim)

    def iter_blocks(self, block: int = 65536, dims: int | None = None) -> Iterator[np.ndarray]:
        """Yield float32 blocks [<=block, dims] in row order (memory stays bounded)."""
        dims = self._check_dims(dims)
        block = check_int(block, "block", minimum=1)  # rows per block
        for seg in self._segments:
            for start in range(0, seg.count, block):
                yield self._decode(seg, slice(start, min(start + block, seg.count)), dims)

    def read(self, dims: int | None = None) -> np.ndarray:
        """All rows as one float32 array [N, dims] (in memory)."""
        dims = self._check_dims(dims)
        blocks = list(self.iter_blocks(dims=dims))
        return np.concatenate(blocks) if blocks else np.zeros((0, dims), np.float32)

    def take(self, rows: np.ndarray, dims: int | None = None) -> np.ndarray:
        """Rows by position, float32 [len(rows), dims]."""
        dims = self._check_dims(dims)
        rows = check_row_indices(rows, self.count)
        out = np.empty((len(rows), dims), np.float32)
        start = 0
        for seg in self._segments:
            sel = (rows >= start) & (rows < start + seg.count)
            if sel.any():
                out[sel] = self._decode(seg, rows[sel] - start, dims)
            start += seg.count
        return out

    def compact(self) -> None:
        """Rewrite all segments as one (same crash safety as `append`)."""
        with self._locked():
            self._compact()

    def _compact(self) -> None:
        if len(self._segments) <= 1:
            return
        if self.int8_scale == "per-dim" and self.dtype == "int8":
            scales = [np.asarray(self._load(seg.scale)) for seg in self._segments]
            if any(not np.array_equal(sc, scales[0]) for sc in scales[1:]):
                # one new per-column scale for all rows: a segment of small values lost most of
                # its precision (relative error 0.0075 -> 0.72)
                raise ValueError(
                    "compact() would re-quantise this int8 per-dim store's segments with one "
                    "shared scale and lose precision (their column scales differ); keep the "
                    "segments (reads are exact as they are) or rebuild the store from float rows"
                )
        x, ids = self.read(), self.ids
        token = secrets.token_hex(6)
        old = list(self._segments)
        # Data is already centred/normalised: encode directly.
        data, scale = self._encode(x)
        seg = _Segment(
            f"seg-{token}.npy",
            f"ids-{token}.npy",
            len(x),
            None if scale is None else f"scale-{token}.npy",
        )
        self._write_npy(seg.data, data)
        if scale is not None:
            self._write_npy(seg.scale, scale)
        self._write_npy(seg.ids, ids)
        meta = dict(self._meta, segments=[seg.to_dict()])
        atomic_write_json(self.path / SIDECAR, meta)
        self._meta, self._segments, self._maps = meta, [seg], {}
        for s in old:
            for n in (s.data, s.ids, s.scale):
                if n:
                    (self.path / n).unlink(missing_ok=True)

    def __repr__(self) -> str:
        return (
            f"EmbeddingStore({str(self.path)!r}, count={self.count}, dim={self.dim}, "
            f"dtype={self.dtype!r}, segments={len(self._segments)})"
        )
