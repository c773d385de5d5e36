"""Scale-out search on Qdrant: export an embedding store as named prefix vectors, query the funnel.

Layout of a collection (`QdrantLayout`): one *named vector* per chosen prefix size, ``"d16"``
holding ``x[:16]``, ``"d384"`` holding ``x[:384]`` ..., all with cosine (or dot) distance; Qdrant
normalises cosine vectors on upload, which is exactly the prefix re-normalisation MRL needs.
Point id = the row number in the store (deterministic, so re-sending a batch overwrites rather
than duplicates); the payload holds ``{"id": <store id>, "row": <row>}``.

The Matryoshka funnel is one Qdrant query: nested prefetches, the innermost a nearest-neighbour
search on the smallest named vector with ``limit=shortlist``, each outer one rescoring the
candidates of the one inside with a larger named vector::

    QueryRequest(query=Nearest(q[:D], using="dD"), limit=k,
                 prefetches=[Prefetch(query=Nearest(q[:m2], using="dm2"), limit=K2,
                                      prefetches=[Prefetch(query=Nearest(q[:Ds], using="dDs"),
                                                           limit=K)])])

Two targets share that code: `EdgeTarget` (qdrant-edge-py, the Qdrant engine in-process, one shard
in a local folder) and `ClientTarget` (qdrant-client: a server or cluster by URL, or its local
``":memory:"`` mode).

`export_qdrant` writes in batches with retries and keeps a progress marker (a JSON file, written
atomically after each acknowledged batch); a killed export resumes from the marker, and because
point ids are row numbers, the batch that was in flight is simply written again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mrl._optional import require
from mrl.io import atomic_write_json, first_line
from mrl.nesting import Nesting
from mrl.params import check_int

__all__ = [
    "ClientTarget",
    "EdgeTarget",
    "ExportReport",
    "FunnelPlan",
    "QdrantIndex",
    "QdrantLayout",
    "check_progress_file",
    "export_qdrant",
    "open_rows",
    "open_target",
    "refuse_centred",
]

MARKER_FORMAT = "mrl-qdrant-export"
MARKER_VERSION = 1
DISTANCES = ("cosine", "dot")


@dataclass(frozen=True)
class QdrantLayout:
    """Which prefixes a collection stores (one named vector each), which of them get an HNSW
    graph, and the distance.

    Only shortlist prefixes need a graph: rescoring reads the vectors of the candidates directly.
    So by default only the smallest prefix is indexed (the others are created with ``m=0``, no
    graph), which keeps Qdrant's optimiser from building useless graphs over the large vectors.
    """

    prefixes: tuple[int, ...]  # strictly increasing prefix sizes; the last is usually D
    distance: str = "cosine"  # "cosine" (prefix re-normalised by Qdrant) or "dot"
    indexed: tuple[int, ...] | None = None  # prefixes with an HNSW graph (None: the smallest)

    def __post_init__(self) -> None:
        Nesting(tuple(self.prefixes))  # validates: positive, strictly increasing
        object.__setattr__(self, "prefixes", tuple(int(p) for p in self.prefixes))
        if self.distance not in DISTANCES:
            raise ValueError(f"distance must be one of {list(DISTANCES)}, got {self.distance!r}")
        indexed = (self.prefixes[0],) if self.indexed is None else tuple(
            sorted(int(m) for m in self.indexed))
        bad = [m for m in indexed if m not in self.prefixes]
        if bad:
            raise ValueError(f"indexed prefixes {bad} are not among the stored prefixes "
                             f"{list(self.prefixes)}")
        object.__setattr__(self, "indexed", indexed)

    @staticmethod
    def name(m: int) -> str:
        """Named vector holding prefix ``m``."""
        return f"d{m}"

    @property
    def dim(self) -> int:
        return self.prefixes[-1]

    def to_dict(self) -> dict[str, Any]:
        return {"prefixes": list(self.prefixes), "distance": self.distance,
                "indexed": list(self.indexed)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QdrantLayout:
        indexed = data.get("indexed")
        return cls(tuple(data["prefixes"]), data.get("distance", "cosine"),
                   None if indexed is None else tuple(indexed))


@dataclass(frozen=True)
class FunnelPlan:
    """A funnel: shortlist ``shortlist`` points on prefix ``shortlist_dim``, then rerank stages.

    ``stages`` are ``(prefix, keep)`` pairs with growing prefixes; the last stage's ``keep`` is
    ``k``. The default rerank (``stages`` None or empty, as in `MatryoshkaIndex`) is one stage at
    the layout's largest prefix (the paper's D_s -> D).
    """

    k: int
    shortlist_dim: int
    shortlist: int
    stages: tuple[tuple[int, int], ...]

    @classmethod
    def build(cls, layout: QdrantLayout, k: int, shortlist_dim: int | None = None,
              shortlist: int | None = None,
              stages: Sequence[Sequence[int]] | None = None) -> FunnelPlan:
        """Fill defaults and validate against ``layout`` (errors name the parameter)."""
        k = check_int(k, "k", minimum=1)
        # int() made 16.7 into 16 and "abc" a bare int() error
        ds = layout.prefixes[0] if shortlist_dim is None else check_int(shortlist_dim,
                                                                         "shortlist_dim")
        if ds not in layout.prefixes:
            raise ValueError(f"shortlist_dim={ds} is not stored in the collection; stored "
                             f"prefixes: {list(layout.prefixes)}")
        K = max(10 * k, 200) if shortlist is None else check_int(shortlist, "shortlist")
        if K < k:
            raise ValueError(f"shortlist must be >= k ({k}), got shortlist={K}")
        if stages is None or len(stages) == 0:  # [] returned the shortlist's own scores
            plan = ((layout.dim, k),) if ds != layout.dim else ()
        else:
            for i, st in enumerate(stages):  # [[16]] failed as "not enough values to unpack"
                if isinstance(st, (str, bytes)) or not hasattr(st, "__len__") or len(st) != 2:
                    raise ValueError(f"stages[{i}] must be a (prefix, keep) pair, got {st!r}")
            plan = tuple((int(m), int(n)) for m, n in stages)
        prev_m, prev_n = ds, K
        for i, (m, n) in enumerate(plan):
            if m not in layout.prefixes:
                raise ValueError(f"stages[{i}] prefix {m} is not stored in the collection; "
                                 f"stored prefixes: {list(layout.prefixes)}")
            if m <= prev_m or n > prev_n or n < 1:
                raise ValueError(f"stages[{i}]=({m}, {n}) must grow the prefix (> {prev_m}) and "
                                 f"keep between 1 and {prev_n} points")
            prev_m, prev_n = m, n
        if plan and plan[-1][1] != k:
            plan = plan[:-1] + ((plan[-1][0], k),)  # the last stage returns k results
        return cls(int(k), ds, K, plan)


class Target(Protocol):
    """One Qdrant collection, whichever engine holds it."""

    def ensure(self, layout: QdrantLayout) -> None: ...
    def count(self) -> int: ...
    def upsert(self, rows: np.ndarray, vectors: dict[str, np.ndarray],
               payloads: list[dict]) -> None: ...
    def funnel(self, queries: np.ndarray, plan: FunnelPlan, layout: QdrantLayout,
               exact: bool) -> list[list[tuple[int, float, dict]]]: ...
    def point_ids(self) -> np.ndarray: ...
    def layout(self) -> QdrantLayout | None: ...
    def commit(self) -> None: ...
    def finish(self) -> None: ...
    def close(self) -> None: ...


# ---------------------------------------------------------------------- qdrant-edge-py
class EdgeTarget:
    """A collection held in-process by Qdrant Edge (one shard in folder ``path``).

    The folder holds the shard (``path/shard``) and the layout (``path/layout.json``).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.qe = require("qdrant_edge", "qdrant")
        self.path = Path(path)
        self.location = str(self.path.resolve())  # which collection: in export markers
        self.shard = None
        if (self.path / "shard").is_dir() and self._layout_file.is_file():
            self.shard = self._load(self.path / "shard")

    def _load(self, shard: Path) -> Any:
        """Open the shard; a shard another process (or handle) holds is a one-line error (Edge
        raised a bare Exception with a traceback: "failed to open WAL ... WouldBlock")."""
        try:
            return self.qe.EdgeShard.load(str(shard))
        except Exception as exc:  # noqa: BLE001 (qdrant_edge raises plain Exception)
            if "WouldBlock" not in str(exc):
                raise
            raise FileExistsError(
                f"Qdrant Edge folder {str(self.path)!r} is open elsewhere (another process, or "
                "another handle in this one: an Edge shard has one user; stop the other, e.g. "
                "`mrl serve --qdrant-path`, or use a Qdrant server with --url)"
            ) from None

    @property
    def _layout_file(self) -> Path:
        return self.path / "layout.json"

    def layout(self) -> QdrantLayout | None:
        if not self._layout_file.is_file():
            return None
        return QdrantLayout.from_dict(json.loads(self._layout_file.read_text()))

    def ensure(self, layout: QdrantLayout) -> None:
        existing = self.layout()
        if existing is not None and existing != layout:
            raise ValueError(f"collection at {self.path} has layout {existing.to_dict()}, "
                             f"not {layout.to_dict()}")
        if existing is None:  # the layout first: a crash before the shard exists is harmless
            self._check_new_folder()
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self._layout_file, layout.to_dict())
        if self.shard is not None:
            return
        shard_dir = self.path / "shard"
        if shard_dir.is_dir() and any(shard_dir.iterdir()):
            self.shard = self._load(shard_dir)
            return
        qe = self.qe
        dist = qe.Distance.Cosine if layout.distance == "cosine" else qe.Distance.Dot
        no_graph = qe.HnswIndexConfig(m=0, ef_construct=100, full_scan_threshold=10_000)
        vectors = {layout.name(m): qe.EdgeVectorParams(
            m, dist, hnsw_config=None if m in layout.indexed else no_graph)
            for m in layout.prefixes}
        self.shard = qe.EdgeShard.create(str(shard_dir), qe.EdgeConfig(vectors=vectors))

    def _check_new_folder(self) -> None:
        """The collection's folder (PATH/COLLECTION) is new or empty: a file there was a bare
        "File exists" error, and a folder of other files got the shard mixed in."""
        if self.path.exists() and not self.path.is_dir():
            raise FileExistsError(f"the collection's folder {str(self.path)!r} (--path/"
                                  "--collection) is a file; give another --collection or --path")
        if self.path.is_dir() and any(self.path.iterdir()):
            raise FileExistsError(f"the collection's folder {str(self.path)!r} (--path/"
                                  "--collection) holds other files and no layout.json (not a "
                                  "Qdrant Edge collection); give another --collection or --path")

    def count(self) -> int:
        return 0 if self.shard is None else int(self.shard.count(self.qe.CountRequest(exact=True)))

    def finish(self) -> None:
        """Build Qdrant's indexes now: Edge has no background optimiser, so without this call
        every search stays a plain scan (fine for small collections)."""
        self.shard.optimize()
        self.shard.flush()

    def upsert(self, rows: np.ndarray, vectors: dict[str, np.ndarray],
               payloads: list[dict]) -> None:
        qe = self.qe
        lists = {name: v.tolist() for name, v in vectors.items()}
        points = [qe.Point(int(r), {name: lists[name][i] for name in lists}, payloads[i])
                  for i, r in enumerate(rows)]
        self.shard.update(qe.UpdateOperation.upsert_points(points))

    def commit(self) -> None:
        """Make every upsert so far durable (before the progress marker moves past it)."""
        self.shard.flush()

    def _nearest(self, vec: np.ndarray, name: str):
        return self.qe.Query.Nearest(vec.tolist(), using=name)

    def funnel(self, queries: np.ndarray, plan: FunnelPlan, layout: QdrantLayout,
               exact: bool) -> list[list[tuple[int, float, dict]]]:
        qe = self.qe
        params = qe.SearchParams(exact=exact)
        requests = []
        for q in queries:  # q: [D]
            inner = qe.Prefetch(limit=plan.shortlist, params=params, query=self._nearest(
                q[: plan.shortlist_dim], layout.name(plan.shortlist_dim)))
            if not plan.stages:  # shortlist only: the shortlist stage is the answer
                requests.append(qe.QueryRequest(limit=plan.k, params=params, with_payload=True,
                                                query=inner.query))
                continue
            for m, keep in plan.stages[:-1]:
                inner = qe.Prefetch(limit=keep, prefetches=[inner],
                                    query=self._nearest(q[:m], layout.name(m)))
            m_last = plan.stages[-1][0]
            requests.append(qe.QueryRequest(limit=plan.k, prefetches=[inner], with_payload=True,
                                            query=self._nearest(q[:m_last], layout.name(m_last))))
        results = self.shard.query_batch(qe.QueryBatchRequest(requests))
        return [[(int(p.id), float(p.score), p.payload or {}) for p in r] for r in results]

    def point_ids(self) -> np.ndarray:
        ids, offset = [], None
        while True:
            recs, offset = self.shard.scroll(self.qe.ScrollRequest(
                offset=offset, limit=10_000, with_payload=False, with_vector=False))
            ids.extend(int(r.id) for r in recs)
            if offset is None:
                return np.asarray(ids, dtype=np.int64)

    def close(self) -> None:
        if self.shard is not None:
            self.shard.close()
            self.shard = None


# ---------------------------------------------------------------------- qdrant-client
def _check_reachable(client: Any, url: str | None) -> None:
    """One cheap request now, so that a wrong URL or a stopped server is one clear error
    (ConnectionError naming the URL) instead of a client traceback in the middle of a job."""
    try:
        client.get_collections()
    except Exception as exc:  # the client wraps httpx/grpc errors in its own types
        reason = first_line(exc)
        raise ConnectionError(f"cannot reach the Qdrant server at url={url!r}: {reason}") from None


class ClientTarget:
    """A collection on a Qdrant server or cluster (``url``), or qdrant-client's ``":memory:"``."""

    def __init__(self, collection: str, url: str | None = None, client: Any = None,
                 timeout_s: float = 60.0, shard_number: int | None = None,
                 replication_factor: int | None = None) -> None:
        qc = require("qdrant_client", "qdrant")
        self.models = qc.models
        self.collection = collection
        self.shard_number, self.replication_factor = shard_number, replication_factor
        if client is None and url == ":memory:":
            client = qc.QdrantClient(location=":memory:")
        elif client is None:
            # the client's own version check warns from a background thread when the server
            # is down; _check_reachable turns that case into one error instead
            client = qc.QdrantClient(url=url, timeout=int(timeout_s), check_compatibility=False)
            _check_reachable(client, url)
        self.client = client
        # which server: in export markers (None for a client passed in: unknown)
        self.location = None if url is None else target_location(url)

    def layout(self) -> QdrantLayout | None:
        if not self.client.collection_exists(self.collection):
            return None
        info = self.client.get_collection(self.collection)
        vectors = info.config.params.vectors
        if not isinstance(vectors, dict):
            raise ValueError(f"collection {self.collection!r} has no named vectors; it was not "
                             "written by mrl export")
        sizes = sorted(v.size for v in vectors.values())
        indexed = sorted(v.size for v in vectors.values()
                         if v.hnsw_config is None or v.hnsw_config.m != 0)
        dist = next(iter(vectors.values())).distance
        return QdrantLayout(tuple(sizes), "cosine" if dist == self.models.Distance.COSINE
                            else "dot", tuple(indexed))

    def ensure(self, layout: QdrantLayout) -> None:
        existing = self.layout()
        if existing is not None:
            if existing != layout:
                raise ValueError(f"collection {self.collection!r} has layout "
                                 f"{existing.to_dict()}, not {layout.to_dict()}")
            return
        m = self.models
        dist = m.Distance.COSINE if layout.distance == "cosine" else m.Distance.DOT
        self.client.create_collection(
            self.collection,
            vectors_config={layout.name(p): m.VectorParams(
                size=p, distance=dist,
                hnsw_config=None if p in layout.indexed else m.HnswConfigDiff(m=0))
                for p in layout.prefixes},
            shard_number=self.shard_number, replication_factor=self.replication_factor)

    def count(self) -> int:
        if not self.client.collection_exists(self.collection):
            return 0
        return int(self.client.count(self.collection, exact=True).count)

    def commit(self) -> None:
        """Nothing to do: upserts use ``wait=True``, acknowledged once in the server's WAL."""

    def finish(self) -> None:
        """Nothing to do: a Qdrant server optimises (builds HNSW) in the background."""

    def upsert(self, rows: np.ndarray, vectors: dict[str, np.ndarray],
               payloads: list[dict]) -> None:
        lists = {name: v.tolist() for name, v in vectors.items()}
        points = [self.models.PointStruct(id=int(r), vector={n: lists[n][i] for n in lists},
                                          payload=payloads[i]) for i, r in enumerate(rows)]
        self.client.upsert(self.collection, points=points, wait=True)

    def funnel(self, queries: np.ndarray, plan: FunnelPlan, layout: QdrantLayout,
               exact: bool) -> list[list[tuple[int, float, dict]]]:
        m = self.models
        params = m.SearchParams(exact=exact)
        requests = []
        for q in queries:  # q: [D]
            inner = m.Prefetch(query=q[: plan.shortlist_dim].tolist(), params=params,
                               using=layout.name(plan.shortlist_dim), limit=plan.shortlist)
            if not plan.stages:
                requests.append(m.QueryRequest(query=inner.query, using=inner.using, params=params,
                                               limit=plan.k, with_payload=True))
                continue
            for dim, keep in plan.stages[:-1]:
                inner = m.Prefetch(prefetch=[inner], query=q[:dim].tolist(),
                                   using=layout.name(dim), limit=keep)
            dim = plan.stages[-1][0]
            requests.append(m.QueryRequest(prefetch=[inner], query=q[:dim].tolist(),
                                           using=layout.name(dim), limit=plan.k,
                                           with_payload=True))
        responses = self.client.query_batch_points(self.collection, requests=requests)
        return [[(int(p.id), float(p.score), p.payload or {}) for p in r.points]
                for r in responses]

    def point_ids(self) -> np.ndarray:
        ids, offset = [], None
        while True:
            recs, offset = self.client.scroll(self.collection, limit=10_000, offset=offset,
                                              with_payload=False, with_vectors=False)
            ids.extend(int(r.id) for r in recs)
            if offset is None:
                return np.asarray(ids, dtype=np.int64)

    def close(self) -> None:
        self.client.close()


def open_target(collection: str, url: str | None = None, path: str | os.PathLike | None = None,
                **client_options: Any) -> Target:
    """``path``: an Edge folder (the collection lives in ``path/collection``); ``url``: a server,
    a cluster node, or ``":memory:"``. Exactly one of the two."""
    if (url is None) == (path is None):
        raise ValueError(f"give exactly one of url or path, got url={url!r}, path={path!r}")
    if not collection or "/" in collection or "\\" in collection or collection in (".", ".."):
        # ".." put the Edge collection in the parent of path
        raise ValueError(f"collection must be a non-empty name without '/' (not '.' or '..'), "
                         f"got {collection!r}")
    if path is not None:
        return EdgeTarget(Path(path) / collection)
    return ClientTarget(collection, url=url, **client_options)


# ---------------------------------------------------------------------- what is exported
class _IndexRows:
    """A `MatryoshkaIndex` seen as rows to export (count, dim, ids, take)."""

    def __init__(self, index) -> None:
        self.index = index
        self.nesting = index.nesting

    @property
    def count(self) -> int:
        return int(self.index.count)

    @property
    def dim(self) -> int:
        return self.nesting.dim

    @property
    def ids(self) -> np.ndarray:
        return self.index.ids

    @property
    def center(self) -> np.ndarray | None:
        return self.index.center

    @property
    def metric(self) -> str:
        return self.index.metric

    def take(self, rows: np.ndarray, dims: int | None = None) -> np.ndarray:
        # float32 [len(rows), dims], dequantised when the index stores int8
        return np.asarray(self.index.vectors(rows, dims), dtype=np.float32)


def open_rows(path: str | os.PathLike):
    """An `EmbeddingStore` folder (``store.json``) or a `MatryoshkaIndex` folder
    (``index.json``), as a row source with ``count``, ``dim``, ``nesting``, ``ids``, ``take``."""
    path = Path(path)
    if (path / "store.json").is_file():
        from mrl.retrieval import EmbeddingStore

        return EmbeddingStore.open(path)
    if (path / "index.json").is_file():
        from mrl.retrieval import MatryoshkaIndex

        return _IndexRows(MatryoshkaIndex.load(path, mmap=True))
    raise FileNotFoundError(f"no embedding store (store.json) or MatryoshkaIndex (index.json) "
                            f"at {path}")


def refuse_centred(rows, source: str) -> None:
    """Refuse rows whose store or index subtracted a center: Qdrant would compare raw queries
    with them (mrl serve's Qdrant backend and every other client send raw embeddings), giving
    wrong neighbours. ``source`` names the rows in the message."""
    if getattr(rows, "center", None) is not None:
        raise ValueError(f"{source} holds centred rows (it records a center), but a Qdrant "
                         "collection cannot centre queries; export an uncentred store or index")


# ---------------------------------------------------------------------- export
@dataclass
class ExportReport:
    """What `export_qdrant` did."""

    total: int  # rows in the store (= points in the collection at the end)
    written: int  # rows sent by this call (0 when everything was already exported)
    resumed_from: int  # first row this call wrote (0 = fresh start)
    batches: int  # batches sent by this call
    retries: int  # failed attempts that were retried
    seconds: float  # the whole call, finish included
    finish_seconds: float = 0.0  # building the engine's indexes at the end (Edge: optimize)


def _with_retries(fn: Callable[[], None], retries: int, backoff_s: float) -> int:
    """Run ``fn``; on an exception retry up to ``retries`` times with exponential backoff.

    Returns the number of failed attempts; re-raises the last error when all attempts fail.
    """
    if retries < 0:  # the loop would not run at all: no call, and no error to re-raise
        raise ValueError(f"retries must be >= 0, got retries={retries}")
    for attempt in range(retries + 1):
        try:
            fn()
            return attempt
        except Exception:
            if attempt == retries:
                raise
            time.sleep(backoff_s * 2**attempt)
    raise AssertionError("unreachable")


_SAMPLE_ROWS = 16  # rows whose vectors (and ids) the marker's fingerprint hashes


def target_location(url: str) -> str:
    """A server URL as export markers record it (no trailing slash)."""
    return url.rstrip("/")


def _fingerprint(
    store, layout: QdrantLayout, collection: str, location: str | None = None
) -> dict[str, Any]:
    """What identifies an export: the target (server URL or Edge folder), the collection, the
    layout, the store's shape and ids, and a hash of the vectors (and ids) of up to 16 evenly
    spaced rows. Without the vectors, a store re-embedded by another model (same count, same
    ids) matched the marker of the old export, and the collection silently kept the old
    vectors; without the target, an export to a second server skipped every row there."""
    ids = store.ids
    first = ids[:1].tolist()
    last = ids[-1:].tolist()
    fp = {"collection": collection, "count": int(store.count), "dim": int(store.dim),
          "layout": layout.to_dict(), "first_id": first, "last_id": last}
    if location is not None:
        fp["target"] = location
    n = int(store.count)
    if n:
        rows = np.unique(np.linspace(0, n - 1, min(n, _SAMPLE_ROWS)).round().astype(np.int64))
        x = np.ascontiguousarray(store.take(rows, dims=layout.dim), dtype="<f4")  # [s, D]
        digest = hashlib.blake2b(x.tobytes(), digest_size=16)
        digest.update(json.dumps([_jsonable(ids[r]) for r in rows]).encode())
        fp["sample"] = digest.hexdigest()
    return fp


def _same_export(recorded: Any, fingerprint: dict[str, Any]) -> bool:
    """The marker's fingerprint is this export's (a marker written before the vector sample or
    the target was recorded is compared on the rest)."""
    if isinstance(recorded, dict):
        fingerprint = {k: v for k, v in fingerprint.items()
                       if k in recorded or k not in ("sample", "target")}  # fmt: skip
    return recorded == fingerprint


def check_progress_file(path: str | os.PathLike, param: str = "progress_path") -> dict | None:
    """The export marker at ``path``, None when there is none yet.

    Refuses (naming ``param``) a folder there and a file that is not a marker, before the export
    creates anything: otherwise the first commit fails after the collection was set up.
    """
    path = Path(path)
    if path.is_dir():
        raise FileExistsError(f"{param} {str(path)!r} is a folder; give a file path")
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{param} {str(path)!r} is not a progress file "
                         f"({first_line(exc)})") from None
    if not isinstance(data, dict) or not _is_marker(data):
        raise ValueError(f"{param} {str(path)!r} is not a progress file (not an "
                         f"{MARKER_FORMAT} v{MARKER_VERSION} marker)")
    return data


def _is_marker(data: dict) -> bool:
    """Our format and version, and a row count the export can resume from."""
    done = data.get("done")
    return ((data.get("format"), data.get("version")) == (MARKER_FORMAT, MARKER_VERSION)
            and isinstance(done, int) and not isinstance(done, bool) and done >= 0)


def _read_marker(path: Path, fingerprint: dict, param: str) -> tuple[int, bool]:
    """(rows already exported, whether ``finish`` completed after the last row) according to
    the marker ((0, False) without one); refuses a foreign one."""
    data = check_progress_file(path, param)
    if data is None:
        return 0, False
    if not _same_export(data.get("fingerprint"), fingerprint):
        raise ValueError(f"progress file {path} belongs to another export "
                         f"({data.get('fingerprint')}); remove it or pass another --progress")
    return int(data["done"]), data.get("finished") is True


def _write_marker(path: Path, fingerprint: dict, done: int, finished: bool = False) -> None:
    atomic_write_json(path, {"format": MARKER_FORMAT, "version": MARKER_VERSION,
                             "fingerprint": fingerprint, "done": done, "finished": finished})


def export_qdrant(
    store,
    target: Target,
    layout: QdrantLayout,
    progress_path: str | os.PathLike,
    *,
    collection: str = "",
    batch_size: int = 1024,
    retries: int = 5,
    backoff_s: float = 0.5,
    commit_every: int = 8,
    on_batch: Callable[[int, int], None] | None = None,
    show_progress: bool = False,
) -> ExportReport:
    """Write every row of ``store`` (an `EmbeddingStore`) into ``target`` with ``layout``.

    Resumable: every ``commit_every`` batches (and at the end) the target makes the upserts
    durable (Edge: ``flush()``, the slow part of an upload) and then the marker at
    ``progress_path`` records the rows done; a new call starts there and rewrites the batches
    after it, harmlessly: point ids are row numbers. When the collection holds fewer points than
    the marker claims (a server lost data), the export starts again from row 0. ``target.finish()``
    (Edge: building the HNSW graph) runs after the last row and is recorded in the marker too, so
    a run killed during it finishes it when started again. A marker of another export (another
    collection, layout, or store: its count, ids and a hash of some rows' vectors) is refused.
    ``on_batch(done, total)`` is called after each marker update.
    """
    refuse_centred(store, "the store or index to export")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got batch_size={batch_size}")
    if commit_every < 1:
        raise ValueError(f"commit_every must be >= 1, got commit_every={commit_every}")
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got retries={retries}")
    if layout.dim > store.dim:
        raise ValueError(f"layout prefixes {list(layout.prefixes)} exceed the store's "
                         f"dimension {store.dim}")
    t0 = time.perf_counter()
    progress_path = Path(progress_path)
    check_progress_file(progress_path, "progress_path")  # before the target is touched
    fingerprint = _fingerprint(store, layout, collection, getattr(target, "location", None))
    done, finished = _read_marker(progress_path, fingerprint, "progress_path")
    target.ensure(layout)
    if target.count() < done:  # marker ahead of the data: trust the data, start over
        done, finished = 0, False
    start, total, ids = done, store.count, store.ids
    report = ExportReport(total, 0, start, 0, 0, 0.0)
    bar = _progress_bar(total, start, show_progress)
    while done < total:
        end = min(done + batch_size, total)
        rows = np.arange(done, end, dtype=np.int64)
        x = store.take(rows, dims=layout.dim)  # [b, D_layout] float32
        vectors = {layout.name(m): x[:, :m] for m in layout.prefixes}
        payloads = [{"id": _jsonable(ids[r]), "row": int(r)} for r in rows]
        report.retries += _with_retries(
            functools.partial(target.upsert, rows, vectors, payloads), retries, backoff_s)
        report.batches += 1
        report.written += end - done
        done = end
        if bar is not None:
            bar.update(end - rows[0])
        if report.batches % commit_every == 0 or done == total:
            target.commit()
            _write_marker(progress_path, fingerprint, done)
            if on_batch is not None:
                on_batch(done, total)
    if bar is not None:
        bar.close()
    t1 = time.perf_counter()
    if report.written or not finished:  # also when a killed run wrote every row, not finish
        target.finish()
        _write_marker(progress_path, fingerprint, done, finished=True)
    report.finish_seconds = time.perf_counter() - t1
    report.seconds = time.perf_counter() - t0
    return report


def _jsonable(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _progress_bar(total: int, initial: int, show: bool):
    if not show:
        return None
    tqdm = require("tqdm", "vision").tqdm
    return tqdm(total=total, initial=initial, unit="pt", desc="export")


# ---------------------------------------------------------------------- search
@dataclass
class QdrantIndex:
    """`MatryoshkaIndex`-like search against a Qdrant collection written by `export_qdrant`.

    Example:
        >>> index = QdrantIndex(open_target("docs", path="qdrant/"))
        >>> scores, ids = index.search(queries, k=10, shortlist_dim=16, shortlist=200)
    """

    target: Target
    layout: QdrantLayout = field(default=None)  # read from the collection when None
    exact: bool = True  # exact scan of each stage (True) or Qdrant's HNSW on the shortlist prefix

    def __post_init__(self) -> None:
        if self.layout is None:
            self.layout = self.target.layout()
            if self.layout is None:
                where = getattr(self.target, "location", None)
                name = getattr(self.target, "collection", None)
                what = (f"collection {name!r} at {where}" if name else
                        f"collection at {where}" if where else "collection")  # fmt: skip
                raise FileNotFoundError(f"the Qdrant {what} does not exist (export it first, or "
                                        "check --collection)")

    def __len__(self) -> int:
        return self.target.count()

    def search(self, queries: np.ndarray, k: int = 10, *, shortlist_dim: int | None = None,
               shortlist: int | None = None, stages: Sequence[Sequence[int]] | None = None):
        """Funnel search; returns (scores [Q, k], store ids [Q, k]) like the in-process index.

        ``queries`` are [Q, D] (D >= the layout's largest prefix). Rows with fewer than k hits
        (a tiny collection) are padded with score -inf and id -1, or "" for string ids (as
        `MatryoshkaIndex` pads them; "-1" could be a real string id).
        """
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] < self.layout.dim:
            raise ValueError(f"queries must have shape [Q, >= {self.layout.dim}], got {q.shape}")
        if not np.isfinite(q).all():
            raise ValueError("queries must be finite (no NaN or inf)")
        plan = FunnelPlan.build(self.layout, k, shortlist_dim, shortlist, stages)
        hits = self.target.funnel(q, plan, self.layout, self.exact)
        scores = np.full((len(q), k), -np.inf, dtype=np.float32)  # [Q, k]
        ids: list[list[Any]] = [[None] * k for _ in hits]
        for i, row in enumerate(hits):
            for j, (point, score, payload) in enumerate(row[:k]):
                scores[i, j] = score
                ids[i][j] = payload.get("id", point)
        text = any(isinstance(v, str) for row in ids for v in row)
        pad = "" if text else -1
        # int64 ids, or str ids for a store with string ids
        return scores, np.asarray([[pad if v is None else v for v in row] for row in ids])
