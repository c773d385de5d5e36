"""`MatryoshkaIndex`: shortlist on a small prefix, then rerank on larger prefixes (the funnel).

Search for queries [Q, D]:

1. **shortlist**: the K best rows at prefix D_s, scanned over a contiguous, pre-normalised copy of
   the prefix columns [N, D_s] (tiny and cache friendly compared with [N, D]). Backends:
   ``"flat"`` (FAISS exact inner product, fused heap selection), ``"numpy"`` (BLAS matmul +
   block-max selection), ``"hnsw"`` (FAISS HNSW graph built on the D_s prefix only: sublinear),
   ``"ivf"`` (FAISS inverted file on the D_s prefix only: k-means into ``nlist`` cells, a query
   scans the rows of its ``nprobe`` nearest cells, so its heap sees ~nprobe/nlist of the rows),
   ``"ivfpq"`` (the same inverted file holding 4-bit product-quantised codes of the prefix, D_s/4
   bytes per row, scanned with FAISS fast-scan SIMD kernels: ~5-10x faster per row than ``"ivf"``
   but approximate, so the shortlist is larger and the first rerank stage re-scores it exactly
   at D_s; it also takes the least memory),
   ``"torch"`` (matmul + block-max top-k on ``device``, CPU or CUDA).
2. **rerank stages** ``[(m_1, K_1), ..., (m_S, K_S)]``: gather only the candidate rows at prefix
   m_j, score them with cosine at m_j (per-prefix inverse norms are precomputed at build time,
   [N, G]) and keep the best K_j. The last stage keeps k. The paper's funnel halves K and doubles
   m at every stage (`funnel_stages`).

A funnel whose shortlist is the whole database with one stage at D is exact search (tested
against `mrl.retrieval.exact.exact_search`).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from mrl.arrays import as_numpy
from mrl.devices import check_device
from mrl.io import (
    atomic_open,
    atomic_write_json,
    check_output_path,
    first_line,
    load_npy,
    read_json_sidecar,
)
from mrl.nesting import Nesting
from mrl.params import check_flag, check_int, is_int
from mrl.retrieval.exact import (
    METRICS,
    check_queries,
    normalize_prefix,
    topk_sorted,
    unit_peak,
)
from mrl.retrieval.funnel.select import blockmax_topk_numpy, blockmax_topk_torch, topk_numpy
from mrl.retrieval.store import (
    check_center,
    check_dims,
    check_float16_range,
    check_id_values,
    check_row_indices,
    check_uint64_ids,
    check_unique_ids,
    validate_vectors,
)

__all__ = [
    "MatryoshkaIndex",
    "SearchConfig",
    "SearchResult",
    "funnel_stages",
    "pq_subquantizers",
    "INDEX_VERSION",
]

INDEX_FORMAT = "mrl-matryoshka-index"
INDEX_VERSION = 1
SIDECAR = "index.json"
# The files `MatryoshkaIndex.save` writes (data files carry a per-save token) and the temporary
# siblings `atomic_open` leaves when a save is killed: a folder holding only these is an
# interrupted save of ours, which a new save may take over and clean.
_OWN_FILE = re.compile(
    r"(?:vectors|inv_norms|ids|col_scale|short-\d+|hnsw-\d+-\d+-\d+|ivf(?:pq)?-\d+-\d+)"
    r"-[0-9a-f]{12}\.(?:npy|faiss)"
)
_OWN_TEMP = re.compile(r"\.(?:" + _OWN_FILE.pattern + r"|index\.json)\.[^/]+\.tmp")


def _is_own_file(name: str) -> bool:
    return bool(_OWN_FILE.fullmatch(name) or _OWN_TEMP.fullmatch(name))
BACKENDS = ("flat", "numpy", "hnsw", "ivf", "ivfpq", "torch")
IVF_BACKENDS = ("ivf", "ivfpq")
VECTOR_DTYPES = ("float32", "float16", "int8")


def funnel_stages(
    shortlist_dim: int,
    shortlist: int,
    dim: int,
    k: int,
    nesting: Nesting,
    min_keep: int | None = None,
) -> tuple[tuple[int, int], ...]:
    """The paper's funnel: double the prefix and halve K at each stage (K >= k), ending at D.

    Intermediate stages keep at least ``min_keep`` (default k). Only prefixes in the nesting
    are used. Example for D_s=16, K=200, D=128, k=10:
    ((32, 100), (64, 50), (128, 10)).
    """
    stages = []
    keep = shortlist
    for m in nesting.sizes:
        if m <= shortlist_dim:
            continue
        keep = min(keep, max(min_keep or k, keep // 2))  # never more than the stage before
        stages.append((m, keep))
    if not stages or stages[-1][0] != dim:
        stages.append((dim, k))
    stages[-1] = (stages[-1][0], k)
    return tuple(stages)


@dataclass(frozen=True)
class SearchConfig:
    """How a search runs; every field can be overridden per call.

    Attributes:
        shortlist_dim: D_s, the prefix (dims) scanned over the whole database.
        shortlist: K, candidates kept by the shortlist scan.
        stages: rerank stages ((m, keep), ...); empty = one rerank at D keeping k.
        backend: shortlist scan: "flat", "numpy", "hnsw", "ivf", "ivfpq" or "torch".
        ef_search: HNSW search breadth (>= shortlist); None = 2 * shortlist.
        hnsw_m: HNSW graph degree (neighbours per node) used when building.
        ef_construction: HNSW build breadth.
        nlist: IVF / IVF-PQ cells (k-means centroids on the D_s prefix) used when building;
            None = round(4 * sqrt(N)) at build time (capped by N).
        nprobe: IVF cells scanned per query (a search parameter; capped by nlist).
    """

    shortlist_dim: int = 16
    shortlist: int = 200
    stages: tuple[tuple[int, int], ...] = ()
    backend: str = "flat"
    ef_search: int | None = None
    hnsw_m: int = 32
    ef_construction: int = 80
    nlist: int | None = None
    nprobe: int = 16

    def __post_init__(self) -> None:
        # numpy integers (np.int64 from an array) made FAISS raise a SWIG TypeError and the
        # saved index.json unwritable; list stages (to_dict's own form) failed every search
        for name in ("shortlist_dim", "shortlist", "ef_search", "hnsw_m", "ef_construction",
                     "nlist", "nprobe"):  # fmt: skip
            value = getattr(self, name)
            if is_int(value):
                object.__setattr__(self, name, int(value))
        if isinstance(self.stages, (list, tuple)):
            object.__setattr__(self, "stages", tuple(
                tuple(int(v) if is_int(v) else v for v in st) if isinstance(st, (list, tuple))
                else st for st in self.stages
            ))  # fmt: skip  (a non-pair is named by MatryoshkaIndex's check)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stages"] = [list(s) for s in self.stages]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SearchConfig:
        """From `to_dict`'s output; an unknown key or a stage that is not a pair of ints is a
        ValueError naming it (a hand-edited index.json gave a TypeError traceback)."""
        d = dict(d)
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown search config keys {unknown}; known: "
                             f"{sorted(cls.__dataclass_fields__)}")
        stages = d.get("stages", ())
        if not isinstance(stages, (list, tuple)) or not all(
            isinstance(st, (list, tuple)) and len(st) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in st)
            for st in stages
        ):
            raise ValueError(f"stages must be a list of [dim, keep] int pairs, got {stages!r}")
        d["stages"] = tuple(tuple(st) for st in stages)
        for name, value in d.items():  # "16" read as a string printed as 16 in later errors
            want = str if name == "backend" else int
            optional = name in ("ef_search", "nlist") and value is None
            if name != "stages" and not optional and (
                not isinstance(value, want) or isinstance(value, bool)
            ):
                raise ValueError(f"{name} must be {want.__name__}, got {value!r}")
        return cls(**d)


@dataclass
class SearchResult:
    """Scores and row indices [Q, k], best first; ids are the stored ids of those rows.

    An approximate shortlist (IVF, IVF-PQ, HNSW) can find fewer than k rows for a query (its
    probed cells hold fewer); those trailing slots have index -1, score -inf and id -1 (integer
    ids) or "" (string ids). `found` masks the real hits and `hits` lists them per query.
    """

    scores: np.ndarray
    indices: np.ndarray
    ids: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)
    config: SearchConfig | None = None  # what ran: the overrides applied, widened for k

    @property
    def found(self) -> np.ndarray:
        """[Q, k] bool: True where the slot holds a real row."""
        return self.indices >= 0

    def hits(self, j: int) -> tuple[list[Any], list[float]]:
        """Query j's ids and scores, best first, without the empty slots."""
        rows = slice(j, j + 1)
        ids, scores = hit_lists(self.ids[rows], self.scores[rows], self.indices[rows])
        return ids[0], scores[0]


def hit_lists(
    ids: np.ndarray, scores: np.ndarray, indices: np.ndarray | None = None
) -> tuple[list[list[Any]], list[list[float]]]:
    """ids/scores [Q, k] -> ragged Python lists [Q][<=k] without the empty slots (an
    approximate shortlist or a tiny collection found fewer than k rows for that query).
    For `SearchResult` and for any backend answering padded arrays (Qdrant).

    Empty slots are those with ``indices < 0`` when row indices are given, else those padded
    with score -inf. Never "not finite": a real hit can score +inf or NaN (overflowing dot
    products), and dropping it would hide the best match."""
    out_ids, out_scores = [], []
    found = np.asarray(indices) >= 0 if indices is not None else np.asarray(scores) != -np.inf
    for row_ids, row_s, keep in zip(ids, scores, found):
        out_ids.append([x.item() if isinstance(x, np.generic) else x for x in row_ids[keep]])
        out_scores.append([float(v) for v in row_s[keep]])
    return out_ids, out_scores


class MatryoshkaIndex:
    """Adaptive-retrieval index over Matryoshka embeddings (cosine similarity per prefix).

    Args:
        nesting: prefix sizes; ``nesting.dim`` = D. Shortlist and stage prefixes must be in it.
        config: default `SearchConfig` (override any field per `search` call); None = defaults
            with D_s = 16, or the smallest nesting size when 16 is not in the nesting.
        metric: "cosine" (re-normalise every prefix) or "dot".
        vector_dtype: the stored full-size vectors used for reranking: "float32", "float16" or
            "int8" (codes ``round(x_j / s_j)`` with one scale per column
            ``s_j = max_i |x_ij| / 127`` fixed by the first `add`, later rows are clipped to it;
            per column because MRL's leading coordinates are much larger than the tail. The
            scale is folded into the query: ``q . (c * s) = (q * s) . c``. 1/4 of float32's
            memory, and faster to widen than float16).
        device: torch device for backend "torch" ("cpu", "cuda", ...).
        threads: worker threads for reranking and FAISS (None = all cores).
        center: optional [D] vector subtracted from every added row and every query before
            scoring (centring: post-ReLU features are all positive, and cosine on them gains from
            it); saved with the index, so a loaded index centres raw queries itself. Rows and
            queries that already had it subtracted (an `EmbeddingStore` created with the same
            ``center``) are passed with ``centered=True``.
        normalize: L2-normalise every added row and every query (full size) before the
            ``center`` is subtracted: the space of rows that were unit vectors when their center
            was taken (an `EmbeddingStore` created with ``normalize=True``, then ``--center``).
            Saved with the index. Without a center it changes no cosine ranking.

    Example:
        >>> index = MatryoshkaIndex(Nesting.doubling(8, 2048), SearchConfig(shortlist_dim=16))
        >>> index.add(db)                                   # db: [N, 2048]
        >>> res = index.search(queries, k=10)               # res.indices: [Q, 10]
        >>> index.save("my.index"); MatryoshkaIndex.load("my.index")
    """

    def __init__(
        self,
        nesting: Nesting,
        config: SearchConfig | None = None,
        *,
        metric: str = "cosine",
        vector_dtype: str = "float32",
        device: str = "cpu",
        threads: int | None = None,
        center: np.ndarray | Sequence[float] | None = None,
        normalize: bool = False,
    ) -> None:
        if not isinstance(nesting, Nesting):
            raise ValueError(f"nesting must be a mrl.Nesting, got {type(nesting).__name__}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {list(METRICS)}, got metric={metric!r}")
        if vector_dtype not in VECTOR_DTYPES:
            raise ValueError(
                f"vector_dtype must be one of {list(VECTOR_DTYPES)}, "
                f"got vector_dtype={vector_dtype!r}"
            )
        if vector_dtype == "int8" and metric != "cosine":
            raise ValueError(f"vector_dtype='int8' needs metric='cosine', got metric={metric!r}")
        self.nesting = nesting
        self.metric = metric
        self.vector_dtype = vector_dtype
        # checked now, not at the first torch search (an AssertionError deep in torch); "cpu"
        # needs no check, which keeps torch unimported for the numpy/FAISS backends
        self.device = device if device == "cpu" else check_device(device, "device")
        if config is not None and not isinstance(config, SearchConfig):  # a dict: AttributeError
            raise ValueError(f"config must be a SearchConfig (SearchConfig.from_dict for a dict), "
                             f"got {type(config).__name__}")
        # threads=-1 failed at the first search (ThreadPoolExecutor), 2.5 inside FAISS
        self.threads = check_int(threads, "threads", 1) if threads is not None else (
            os.cpu_count() or 1)
        # default D_s: 16, or the smallest size where the nesting lacks 16 (e.g. one size [D])
        self.config = config or SearchConfig(16 if 16 in nesting else nesting.sizes[0])
        self.tuned: dict[str, Any] | None = None
        self._check_config(self.config, k=1, n=None)
        self.center = None if center is None else check_center(center, nesting.dim)  # [D]
        self.normalize = check_flag(normalize, "normalize")
        d, g = nesting.dim, len(nesting)
        self._vectors = np.zeros((0, d), vector_dtype)  # [N, D] full size (raw, or memmap)
        self._col_scale = np.ones(d, np.float32)  # [D] int8 dequantisation scale per column
        self._inv_norms = np.zeros((0, g), np.float32)  # [N, G] 1/|x[:m_g]| (1 for "dot")
        self._ids = np.zeros(0, np.int64)
        self._short: dict[int, np.ndarray] = {}  # m -> [N, m] normalised prefix, contiguous
        self._hnsw: dict[tuple[int, int, int], Any] = {}  # (m, M, efC) -> faiss index
        self._ivf: dict[tuple[int, int], Any] = {}  # (m, nlist or 0 = auto) -> faiss IVF index
        self._ivfpq: dict[tuple[int, int], Any] = {}  # the same for IVF-PQ fast-scan indexes
        self._torch: dict[str, Any] = {}  # device copies for backend "torch"
        self.build_seconds: dict[str, float] = {}  # "short-16", "hnsw-16-32-80": build times

    # ------------------------------------------------------------------ building
    @property
    def count(self) -> int:
        return len(self._vectors)

    def __len__(self) -> int:
        return self.count

    @property
    def ids(self) -> np.ndarray:
        return self._ids

    def add(
        self,
        vectors: np.ndarray,
        ids: Sequence | np.ndarray | None = None,
        *,
        copy: bool = True,
        centered: bool = False,
    ) -> None:
        """Add rows [n, D] (any time, also after building or loading).

        ``copy=False`` lets the first `add` keep a float32 C-contiguous input as the index's own
        storage (no second copy of a large database); the caller must not modify it afterwards.
        With a ``center``, rows are centred first, unless ``centered=True`` says they already are.
        """
        src = as_numpy(vectors)  # detached / widened once; a CPU tensor stays shared memory
        x = validate_vectors(src, self.nesting.dim)  # [n, D] float32
        x = self._centred(x, centered)
        new_ids = self._check_ids(ids, len(x))
        if self.metric == "cosine":
            _warn_zero_rows(x, self.count)
        if self.vector_dtype == "float16":
            check_float16_range(x, "vector_dtype")
        if self.vector_dtype == "int8":
            if self.count == 0:
                self._col_scale = _column_scale(x)
            else:
                _warn_int8_clipping(x, self._col_scale)
                _warn_int8_unscaled_columns(x, self._vectors, self._col_scale)
            x_store = _quantize_int8(x, self._col_scale)  # [n, D] int8 codes
        else:
            x_store = x.astype(self.vector_dtype, copy=False)  # no copy for float32 input
        x = x_store  # norms and shortlist prefixes come from what is stored (rounded, quantised)
        inv = self._prefix_inv_norms(x)  # [n, G]
        if self.count == 0 and not copy:  # first add: keep the caller's array (1M x 2048 is 8 GB)
            self._vectors, self._inv_norms = x_store, inv
        elif self.count == 0:
            # x_store may be the caller's memory (an ndarray, a CPU tensor's buffer, a memmap):
            # a later change to it would desync the stored rows from their norms and shortlist
            shared = np.may_share_memory(x_store, src)
            self._vectors, self._inv_norms = (x_store.copy() if shared else x_store), inv
        else:
            self._vectors = np.concatenate([np.asarray(self._vectors), x_store])
            self._inv_norms = np.concatenate([np.asarray(self._inv_norms), inv])
        self._ids = np.concatenate([self._ids, new_ids]) if len(self._ids) else new_ids
        for m in list(self._short):  # extend cached shortlist matrices
            part = self._widen(x[:, :m]) * inv[:, self.nesting.index(m), None]
            self._short[m] = np.ascontiguousarray(np.concatenate([self._short[m], part]))
        structures = [*self._hnsw.items(), *self._ivf.items(), *self._ivfpq.items()]
        for key, idx in structures:  # graphs / cells / PQ codes: no retraining
            g = self.nesting.index(key[0])
            idx.add(np.ascontiguousarray(self._widen(x[:, : key[0]]) * inv[:, g, None]))
        self._torch.clear()

    def _check_ids(self, ids: Sequence | np.ndarray | None, n: int) -> np.ndarray:
        if ids is None:
            if len(self._ids) and self._ids.dtype.kind != "i":
                raise ValueError("ids must be given: this index holds string ids")
            start = int(self._ids.max()) + 1 if len(self._ids) else 0
            return np.arange(start, start + n, dtype=np.int64)
        if not isinstance(ids, np.ndarray):
            check_id_values(ids)  # 2**64-1 became -1 (the "no hit" id), "doc\x00" became "doc"
        arr = np.asarray(ids)
        if arr.shape != (n,):
            raise ValueError(f"ids must have one entry per vector ({n}), got shape {arr.shape}")
        if arr.dtype.kind not in "iuUS":
            raise ValueError(f"ids must be integers or strings, got dtype {arr.dtype}")
        check_uint64_ids(arr)
        arr = arr.astype(np.int64) if arr.dtype.kind in "iu" else arr.astype(str)
        if len(self._ids) and (self._ids.dtype.kind == "i") != (arr.dtype.kind == "i"):
            raise ValueError(
                f"ids must be of the index's kind ({self._ids.dtype}), got {arr.dtype}"
            )
        check_unique_ids(arr, self._ids, "index")
        return arr

    def _prefix_inv_norms(self, x: np.ndarray) -> np.ndarray:
        # x: [n, D] -> [n, G]: 1/|x[:, :m_g]| for every nesting size (cumulative squared sums).
        g = len(self.nesting)
        if self.metric == "dot":
            return np.ones((len(x), g), np.float32)
        sq = np.empty((len(x), g), np.float64)
        for s in range(0, len(x), 16384):  # blocks: bounded float64 temporaries
            blk = self._widen(x[s : s + 16384])  # dequantised for int8
            for j, (a, b) in enumerate(self.nesting.chunks):  # squared norm of each chunk
                sq[s : s + 16384, j] = np.square(blk[:, a:b], dtype=np.float64).sum(1)
        norms = np.sqrt(np.cumsum(sq, axis=1))  # [n, G] norms of the prefixes
        return np.where(norms > 0, 1.0 / np.where(norms > 0, norms, 1.0), 0.0).astype(np.float32)

    def _widen(self, x: np.ndarray) -> np.ndarray:
        """Stored rows [n, m] (a prefix) as float32; int8 codes are dequantised."""
        out = np.asarray(x, dtype=np.float32)
        if self.vector_dtype == "int8":
            out *= self._col_scale[: out.shape[1]]
        return out

    def vectors(self, rows: np.ndarray | None = None, dims: int | None = None) -> np.ndarray:
        """Stored full-size vectors as float32 [len(rows), dims] (dequantised for int8; centred
        when the index has a ``center``)."""
        rows = np.arange(self.count) if rows is None else check_row_indices(rows, self.count)
        dims = check_dims(dims, self.nesting.dim)  # 100 gave D columns silently
        return self._widen(self._vectors[rows, :dims])

    def shortlist_matrix(self, m: int) -> np.ndarray:
        """The contiguous normalised prefix [N, m] (built once, then cached and saved)."""
        if m not in self._short:
            t = time.perf_counter()
            self._short[m] = self._prefix_matrix(m)
            self.build_seconds[f"short-{m}"] = time.perf_counter() - t
        return self._short[m]

    def _prefix_matrix(self, m: int) -> np.ndarray:
        """The normalised prefix [N, m] float32, computed (not cached) unless already cached."""
        if m in self._short:
            return self._short[m]
        g = self.nesting.index(m)
        rows = []
        for s in range(0, self.count, 65536):  # blocks: no [N, D] float32 temporary
            blk = self._widen(self._vectors[s : s + 65536, :m])
            rows.append(blk * self._inv_norms[s : s + 65536, g, None])
        return np.ascontiguousarray(np.concatenate(rows) if rows else np.zeros((0, m), np.float32))

    def ivf_nlist(self, config: SearchConfig | None = None) -> int:
        """Cells of the IVF for ``config``: the built index's, else what a build would use."""
        cfg = config or self.config
        store = self._ivfpq if cfg.backend == "ivfpq" else self._ivf
        built = store.get((cfg.shortlist_dim, cfg.nlist or 0))
        if built is not None:
            return int(built.nlist)
        return cfg.nlist or auto_nlist(self.count)

    def _ivf_index(self, m: int, nlist: int | None, pq: bool = False):
        """FAISS IVF over the normalised prefix [N, m] (inner product), trained on a sample.

        The codes are float16 (`IndexIVFScalarQuantizer`, half the bytes) when the rerank
        vectors are float16, else float32 (`IndexIVFFlat`); with ``pq`` 4-bit product codes of
        `pq_subquantizers` (m) sub-vectors (`IndexIVFPQFastScan`: m/4 bytes per row, scored from
        in-register lookup tables). k-means uses <= 32 * nlist rows.
        """
        key = (m, nlist or 0)
        store = self._ivfpq if pq else self._ivf
        if key not in store:
            if self.count == 0:
                raise ValueError("the index is empty: add vectors before building an IVF")
            cells = nlist or auto_nlist(self.count)
            if pq and self.count < 16:  # 4-bit codes: 16 k-means centroids per sub-vector
                raise ValueError(
                    f"the ivfpq backend needs at least 16 database items to train its 4-bit "
                    f"product codes, got {self.count}; use the ivf or flat backend"
                )
            if cells > self.count:
                raise ValueError(
                    f"nlist must be <= number of database items ({self.count}), got nlist={cells}"
                )
            faiss = _faiss()
            faiss.omp_set_num_threads(self.threads)
            t = time.perf_counter()
            xs = self._prefix_matrix(m)  # [N, m]
            quantizer = faiss.IndexFlatIP(m)
            ip = faiss.METRIC_INNER_PRODUCT
            if pq:
                idx = faiss.IndexIVFPQFastScan(quantizer, m, cells, pq_subquantizers(m), 4, ip)
            elif self.vector_dtype == "float16":
                qt = faiss.ScalarQuantizer.QT_fp16
                idx = faiss.IndexIVFScalarQuantizer(quantizer, m, cells, qt, ip)
            else:
                idx = faiss.IndexIVFFlat(quantizer, m, cells, ip)
            idx.cp.niter = 20
            # FAISS warns below min_points_per_centroid rows per cell: with the default nlist
            # (4 sqrt(N)) a database under ~400 rows has fewer than 5 per cell (N=300: 4.3)
            idx.cp.min_points_per_centroid = 1
            ntrain = min(self.count, 32 * cells)
            rows = np.sort(np.random.default_rng(0).choice(self.count, ntrain, replace=False))
            idx.train(np.ascontiguousarray(xs[rows]))
            idx.add(xs)
            idx.own_fields = True  # the IVF owns its quantizer (kept alive with it)
            quantizer.this.disown()
            name = "ivfpq" if pq else "ivf"
            self.build_seconds[f"{name}-{m}-{nlist or 0}"] = time.perf_counter() - t
            store[key] = idx
        return store[key]

    def _hnsw_index(self, m: int, hnsw_m: int, ef_construction: int):
        key = (m, hnsw_m, ef_construction)
        if key not in self._hnsw:
            faiss = _faiss()
            idx = faiss.IndexHNSWFlat(m, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            idx.hnsw.efConstruction = ef_construction
            faiss.omp_set_num_threads(self.threads)
            xs = self.shortlist_matrix(m)
            t = time.perf_counter()
            idx.add(xs)
            self.build_seconds[f"hnsw-{m}-{hnsw_m}-{ef_construction}"] = time.perf_counter() - t
            self._hnsw[key] = idx
        return self._hnsw[key]

    def is_built(self, config: SearchConfig | None = None) -> bool:
        """Whether a search with ``config`` (default: the index's) finds every structure it
        scans already built (`build`), so that it builds nothing (a server checks this: a
        request's shortlist_dim would otherwise build and keep a new graph or matrix)."""
        cfg = config or self.config
        m = cfg.shortlist_dim
        if cfg.backend in IVF_BACKENDS:
            return (m, cfg.nlist or 0) in (self._ivfpq if cfg.backend == "ivfpq" else self._ivf)
        if cfg.backend == "hnsw":
            return (m, cfg.hnsw_m, cfg.ef_construction) in self._hnsw
        if cfg.backend == "torch":
            return f"short{m}" in self._torch
        return m in self._short

    def release(self, keep: SearchConfig | None = None) -> None:
        """Drop cached shortlist matrices / HNSW graphs unused by ``keep`` (default: config)."""
        cfg = keep or self.config
        self._short = {m: a for m, a in self._short.items() if m == cfg.shortlist_dim}
        hkey = (cfg.shortlist_dim, cfg.hnsw_m, cfg.ef_construction)
        self._hnsw = {
            key: v for key, v in self._hnsw.items() if cfg.backend == "hnsw" and key == hkey
        }
        ikey = (cfg.shortlist_dim, cfg.nlist or 0)
        self._ivf = {key: v for key, v in self._ivf.items() if cfg.backend == "ivf" and key == ikey}
        self._ivfpq = {k: v for k, v in self._ivfpq.items() if cfg.backend == "ivfpq" and k == ikey}
        if cfg.backend in IVF_BACKENDS:  # the IVF holds its own copy (or codes) of the prefix
            self._short.clear()
        self._torch.clear()

    def _built(self) -> dict[str, set]:
        """The keys of every cached structure (shortlist matrices, graphs, IVFs)."""
        return {"short": set(self._short), "hnsw": set(self._hnsw), "ivf": set(self._ivf),
                "ivfpq": set(self._ivfpq)}  # fmt: skip

    def _drop_built(self, before: dict[str, set]) -> None:
        """Drop the structures built since ``before`` (`_built`'s keys then)."""
        for name in ("short", "hnsw", "ivf", "ivfpq"):
            store = getattr(self, f"_{name}")
            for key in set(store) - before[name]:
                del store[key]
        self._torch.clear()

    def build(self, config: SearchConfig | None = None) -> float:
        """Build what ``config`` (default: the index's) needs (shortlist matrix, HNSW graph).

        Returns the build time in seconds. Search builds lazily too; this makes timing explicit.
        """
        cfg = config or self.config
        self._check_config(cfg, k=1, n=None)
        t = time.perf_counter()
        if cfg.backend in IVF_BACKENDS:  # the IVF holds its own copy (or codes) of the prefix
            self._ivf_index(cfg.shortlist_dim, cfg.nlist, pq=cfg.backend == "ivfpq")
            return time.perf_counter() - t
        self.shortlist_matrix(cfg.shortlist_dim)
        if cfg.backend == "hnsw":
            self._hnsw_index(cfg.shortlist_dim, cfg.hnsw_m, cfg.ef_construction)
        if cfg.backend == "torch":
            self._torch_arrays(cfg.shortlist_dim)
        return time.perf_counter() - t

    # ------------------------------------------------------------------ validation
    def _check_config(self, cfg: SearchConfig, k: int, n: int | None) -> None:
        nest = self.nesting
        if cfg.backend not in BACKENDS:
            raise ValueError(
                f"backend must be one of {list(BACKENDS)}, got backend={cfg.backend!r}"
            )
        check_int(cfg.shortlist_dim, "shortlist_dim", 1)  # 8.0 passed `in` and broke slicing
        if cfg.shortlist_dim not in nest:
            raise ValueError(
                f"shortlist_dim must be a prefix size in the nesting {list(nest.sizes)}, "
                f"got shortlist_dim={cfg.shortlist_dim}"
            )
        if n is not None and k > n:
            raise ValueError(f"k must be <= number of database items ({n}), got k={k}")
        check_int(cfg.shortlist, "shortlist", 1)
        if cfg.shortlist < k:
            raise ValueError(f"shortlist must be >= k ({k}), got shortlist={cfg.shortlist}")
        prev_m, prev_keep = cfg.shortlist_dim, cfg.shortlist
        for i, stage in enumerate(cfg.stages):
            if not isinstance(stage, (tuple, list)) or len(stage) != 2:  # an int: a len() error
                raise ValueError(f"stages[{i}] must be a (dim, keep) pair, got {stage!r}")
            m, keep = stage
            check_int(m, f"stages[{i}] dim", 1)
            check_int(keep, f"stages[{i}] keep", 1)  # 10.5 failed inside torch.topk
            if m not in nest:
                raise ValueError(
                    f"stages[{i}] dim must be a prefix size in the nesting {list(nest.sizes)}, "
                    f"got {m}"
                )
            if m <= prev_m and not (i == 0 and m == prev_m):
                raise ValueError(
                    f"stages dims must increase, got stages[{i}] dim={m} after {prev_m}"
                )
            if i < len(cfg.stages) - 1 and not k <= keep <= prev_keep:
                raise ValueError(
                    f"stages[{i}] keep must be in [k={k}, {prev_keep}], got keep={keep}"
                )
            prev_m, prev_keep = m, keep
        if cfg.ef_search is not None:
            check_int(cfg.ef_search, "ef_search", 1)
        # FAISS aborts the process on hnsw_m=0, segfaults on 1 and hangs on negative values
        check_int(cfg.hnsw_m, "hnsw_m", 2)
        check_int(cfg.ef_construction, "ef_construction", 1)
        if cfg.nlist is not None:
            check_int(cfg.nlist, "nlist", 1, n)
        check_int(cfg.nprobe, "nprobe", 1)

    def _check_queries(self, queries: Any) -> np.ndarray:
        return check_queries(queries, self.nesting.dim)

    def _check_centered(self, centered: bool) -> None:
        """``centered`` (inputs had ``center`` subtracted already) is a bool this index allows."""
        check_flag(centered, "centered")
        if centered and self.center is None:
            raise ValueError("centered=True, but this index has no center: pass the rows as "
                             "they are (centered=False)")

    def _centred(self, x: np.ndarray, centered: bool) -> np.ndarray:
        """Rows or queries [n, D] float32 in the index's space: L2-normalised if ``normalize``,
        then minus ``center`` (a new array), unless ``centered`` says the caller did both."""
        self._check_centered(centered)
        if centered:
            return x
        if self.normalize:  # full size, zero rows kept, no float32 overflow in the norm
            x = normalize_prefix(x, x.shape[1])
        return x if self.center is None else x - self.center

    def _norm_q(self, q: np.ndarray, m: int) -> np.ndarray:
        p = q[:, :m]
        if self.metric == "dot":
            return np.ascontiguousarray(p)
        n = np.linalg.norm(p, axis=1, keepdims=True)
        return np.ascontiguousarray(p / np.where(n > 0, n, 1.0))

    # ------------------------------------------------------------------ searching
    def search(
        self,
        queries: np.ndarray,
        k: int = 10,
        *,
        batch_size: int = 1024,
        widen: bool | None = None,
        centered: bool = False,
        **overrides: Any,
    ) -> SearchResult:
        """Top-k rows for each query [Q, D]; ``overrides`` are `SearchConfig` fields (None = the
        index's own value). With a ``center``, queries are centred first, unless ``centered=True``
        says they already are (e.g. read from a store created with the same center).

        ``widen``: raise the shortlist and stage keeps to k where they are smaller (a funnel
        tuned for a smaller k). None = only when the call overrides neither ``shortlist`` nor
        ``stages``; True = also for overrides that come from a saved configuration. A call that
        gives ``shortlist`` or ``shortlist_dim`` but not ``stages`` runs the saved stages fitted
        to them (`fit_saved_stages`); its ``shortlist`` itself is validated as given.

        Returns a `SearchResult` with scores/indices/ids [Q, k] (cosine at the last stage's
        prefix), ``timings`` (seconds in shortlist and rerank) and the ``config`` that ran.
        """
        unknown = set(overrides) - set(SearchConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown search options {sorted(unknown)}")
        # An option passed as None means "the index's own setting" (callers forward optional args).
        overrides = {name: v for name, v in overrides.items() if v is not None}
        cfg = replace(self.config, **overrides)  # list stages made tuples by SearchConfig
        k = check_int(k, "k", 1)
        n = self.count
        if n == 0:
            raise ValueError("the index is empty: add vectors before searching")
        if widen or (widen is None and "stages" not in overrides and "shortlist" not in overrides):
            cfg = _widen_for_k(cfg, min(k, n))  # the saved funnel, asked for more than it keeps
        if "stages" not in overrides and {"shortlist", "shortlist_dim"} & overrides.keys():
            cfg = fit_saved_stages(cfg, min(k, n))
        self._check_config(cfg, k, n)
        batch_size = check_int(batch_size, "batch_size", 1)
        q = self._centred(self._check_queries(queries), centered)
        if self.metric == "cosine":
            q = unit_peak(q)  # a query of 1e20 overflowed its float32 norm: arbitrary hits
        shortlist = min(cfg.shortlist, n)
        stages = cfg.stages or ((self.nesting.dim, k),)
        stages = stages[:-1] + ((stages[-1][0], k),)
        timings = {"shortlist": 0.0, "rerank": 0.0}
        out_s, out_i = [], []
        for start in range(0, len(q), batch_size):
            qb = q[start : start + batch_size]
            t0 = time.perf_counter()
            cand = self._shortlist(qb, cfg, shortlist)  # [Qb, K] row indices (-1 = none)
            t1 = time.perf_counter()
            s, i = self._rerank(qb, cand, stages, cfg.backend)
            timings["shortlist"] += t1 - t0
            timings["rerank"] += time.perf_counter() - t1
            out_s.append(s)
            out_i.append(i)
        scores, indices = np.concatenate(out_s), np.concatenate(out_i)  # [Q, k]; -1 = no row
        ids = self._ids[np.maximum(indices, 0)]
        ids[indices < 0] = -1 if ids.dtype.kind == "i" else ""
        return SearchResult(scores, indices, ids, timings, cfg)

    def _shortlist(self, q: np.ndarray, cfg: SearchConfig, kk: int) -> np.ndarray:
        m = cfg.shortlist_dim
        qs = self._norm_q(q, m)  # [Q, m]
        if cfg.backend == "torch":
            return self._torch_shortlist(qs, m, kk)
        if cfg.backend == "numpy" or (cfg.backend == "flat" and kk >= self.count):
            return self._numpy_shortlist(qs, m, kk)
        faiss = _faiss()
        faiss.omp_set_num_threads(self.threads)
        if cfg.backend == "flat":
            _, idx = faiss.knn(qs, self.shortlist_matrix(m), kk, metric=faiss.METRIC_INNER_PRODUCT)
            return idx
        if cfg.backend in IVF_BACKENDS:
            ivf = self._ivf_index(m, cfg.nlist, pq=cfg.backend == "ivfpq")
            params = faiss.SearchParametersIVF()  # per call: no shared state between searches
            params.nprobe = min(cfg.nprobe, ivf.nlist)
            _, idx = ivf.search(qs, kk, params=params)  # [Q, K]; -1: probed cells hold < K rows
            return idx
        index = self._hnsw_index(m, cfg.hnsw_m, cfg.ef_construction)
        params = faiss.SearchParametersHNSW()
        params.efSearch = max(kk, cfg.ef_search or 2 * kk)
        _, idx = index.search(qs, kk, params=params)
        return idx

    def _numpy_shortlist(self, qs: np.ndarray, m: int, kk: int) -> np.ndarray:
        xs = self.shortlist_matrix(m)  # [N, m]
        if kk >= self.count:
            return np.broadcast_to(np.arange(self.count), (len(qs), self.count)).copy()

        def one(chunk: np.ndarray) -> np.ndarray:
            return blockmax_topk_numpy(chunk @ xs.T, kk)[1]  # [q, N] -> [q, K]

        chunks = [qs[i : i + 64] for i in range(0, len(qs), 64)]  # [64, N] scores ~ 256 MB at 1M
        with ThreadPoolExecutor(self.threads) as pool:
            return np.concatenate(list(pool.map(one, chunks)))

    def _rerank(self, q: np.ndarray, cand: np.ndarray, stages, backend: str):
        if backend == "torch":
            return self._torch_rerank(q, cand, stages)
        rows = np.array_split(np.arange(len(q)), min(self.threads, max(1, len(q) // 16)))
        rows = [r for r in rows if len(r)]

        def one(r: np.ndarray):
            return self._rerank_rows(q[r], cand[r], stages)

        if len(rows) == 1:
            return one(rows[0])
        with ThreadPoolExecutor(len(rows)) as pool:
            parts = list(pool.map(one, rows))
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _rerank_rows(self, q: np.ndarray, cand: np.ndarray, stages):
        # q: [Q, D]; cand: [Q, K] row ids, -1 where the shortlist found fewer than K.
        valid = cand >= 0
        cand = np.where(valid, cand, 0)
        qn, kc = cand.shape
        scores = None
        for m, keep in stages:
            g = self.nesting.index(m)
            qm = self._norm_q(q, m) * self._col_scale[:m]  # [Q, m]; int8 scale folded in
            s = self._candidate_dots(qm, cand)  # [Q, K] raw dot products at prefix m
            s *= self._inv_norms[cand, g]
            scores = np.where(valid, s, -np.inf).astype(np.float32)
            scores, pos = _topk_tiebreak(scores, cand, min(keep, kc))
            cand = np.take_along_axis(cand, pos, axis=1)
            valid = np.take_along_axis(valid, pos, axis=1)
            qn, kc = cand.shape
        return scores, np.where(valid, cand, -1)

    def _candidate_dots(self, qm: np.ndarray, cand: np.ndarray) -> np.ndarray:
        """Dot products [Q, K] of queries qm [Q, m] with their candidate rows cand [Q, K] at
        prefix m, as one batched matmul (no per-query loop), accumulated in float32.

        float16 rows are widened by torch (vectorised and multi-threaded; numpy's float16 cast is
        a slow scalar loop). Not a float16 GEMM: its float16 *output* rounds scores near 0.9 to
        ~5e-4, which swapped near-tied neighbours and cost ~0.8 points of recall@10.

        `np.einsum`, not `np.matmul`: the batched matrix-vector product rounds a row's dot
        product differently by its position among the candidates (the kernel's tail rows), so
        two identical rows scored 1 ulp apart and duplicates came back out of row order; einsum
        sums every row in the same order (as fast here).
        """
        qn, kc = cand.shape
        m = qm.shape[1]
        x = self._vectors[cand.ravel(), :m]  # [Q*K, m] gathered in the stored dtype
        if x.dtype == np.float16:
            import torch

            x = torch.from_numpy(np.ascontiguousarray(x)).float().numpy()
        x = np.asarray(x, dtype=np.float32).reshape(qn, kc, m)
        return np.einsum("qkm,qm->qk", x, qm)

    def _candidate_dots_reference(self, qm: np.ndarray, cand: np.ndarray) -> np.ndarray:
        """Plain reference for `_candidate_dots`: widen each candidate row, one dot per pair."""
        out = np.empty(cand.shape, np.float64)
        for i, row in enumerate(cand):
            x = np.asarray(self._vectors[row, : qm.shape[1]], dtype=np.float64)
            out[i] = x @ qm[i].astype(np.float64)
        return out

    # ------------------------------------------------------------------ torch (CPU or CUDA)
    def _torch_arrays(self, m: int) -> dict[str, Any]:
        import torch

        key = f"short{m}"
        if key not in self._torch:
            dev = torch.device(self.device)
            half = dev.type == "cuda"
            if "vectors" not in self._torch:
                dt = torch.float16 if (half or self.vector_dtype == "float16") else torch.float32
                self._torch["vectors"] = _read_only_tensor(self._vectors).to(dev, dt)
                self._torch["inv"] = _read_only_tensor(self._inv_norms).to(dev)
                self._torch["scale"] = torch.as_tensor(self._col_scale).to(dev)
            dt = torch.float16 if half else torch.float32
            self._torch[key] = torch.as_tensor(self.shortlist_matrix(m)).to(dev, dt)
        return self._torch

    def _torch_shortlist(self, qs: np.ndarray, m: int, kk: int) -> np.ndarray:
        import torch

        arrs = self._torch_arrays(m)
        xs = arrs[f"short{m}"]  # [N, m]
        qt = torch.as_tensor(qs).to(xs.device, xs.dtype)
        with torch.no_grad():
            s = qt @ xs.T  # [Q, N]
            _, idx = blockmax_topk_torch(s.float() if s.device.type == "cpu" else s, kk)
        return idx.cpu().numpy()

    def _torch_rerank(self, q: np.ndarray, cand: np.ndarray, stages):
        import torch

        arrs = self._torch_arrays(self.config.shortlist_dim)
        vec, inv = arrs["vectors"], arrs["inv"]
        qt = torch.as_tensor(q).to(vec.device)
        ct = torch.as_tensor(cand).to(vec.device)
        with torch.no_grad():
            for m, keep in stages:
                g = self.nesting.index(m)
                qm = qt[:, :m]
                if self.metric == "cosine":
                    qm = qm / qm.norm(dim=1, keepdim=True).clamp_min(1e-30)
                qm = qm * arrs["scale"][:m]  # int8: dequantisation folded into the query
                # [Q, K, m] candidate rows, scored in float32 on every device: a float16 bmm
                # rounds its output to ~3 digits, which ties and reorders close neighbours
                x = vec[ct.reshape(-1), :m].reshape(ct.shape[0], ct.shape[1], m)
                s = torch.bmm(x.float(), qm.float().unsqueeze(2)).squeeze(2)
                s = s * inv[ct, g]  # [Q, K] cosine at prefix m
                keep = min(keep, ct.shape[1])
                # score desc, ties by the smaller row (as `exact_search` and the numpy path;
                # topk kept any of them): candidates by row, then a stable sort by score
                ct, by_row = torch.sort(ct, dim=1)
                s = torch.gather(s, 1, by_row)
                s, pos = torch.sort(s, dim=1, descending=True, stable=True)
                s, pos = s[:, :keep], pos[:, :keep]
                ct = torch.gather(ct, 1, pos)
        return s.cpu().numpy().astype(np.float32), ct.cpu().numpy().astype(np.int64)

    def _fastscan_rows(self, cfg: SearchConfig) -> int:
        """Code slots of a built IVF-PQ fast-scan index: each cell is padded to a block of 32."""
        idx = self._ivfpq.get((cfg.shortlist_dim, cfg.nlist or 0))
        if idx is None:  # not built: the expected padding, half a block per cell
            return self.count + 16 * self.ivf_nlist(cfg)
        sizes = [idx.invlists.list_size(i) for i in range(idx.nlist)]
        return int(sum(-(-s // 32) * 32 for s in sizes))

    # ------------------------------------------------------------------ persistence
    def memory_bytes(self, config: SearchConfig | None = None) -> int:
        """Bytes held for search with ``config``: rerank vectors, norms, ids, int8 scale, and the
        shortlist structure (prefix matrix [+ HNSW graph], or the IVF: codes, row ids,
        centroids)."""
        cfg = config or self.config
        total = self._vectors.nbytes + self._inv_norms.nbytes + self._ids.nbytes
        total += self._col_scale.nbytes
        m = cfg.shortlist_dim
        if cfg.backend in IVF_BACKENDS:  # codes + a row id per row, centroids [nlist, m] float32
            rows = self.count
            if cfg.backend == "ivfpq":  # 4-bit codes; codebooks [subquantizers, 16, m / subq]
                row = -(-pq_subquantizers(m) // 2)
                total += 16 * m * 4
                rows = self._fastscan_rows(cfg)
            else:
                row = m * (2 if self.vector_dtype == "float16" else 4)
            return total + rows * row + self.count * 8 + self.ivf_nlist(cfg) * m * 4
        total += self.count * cfg.shortlist_dim * 4
        if cfg.backend == "hnsw":  # links: ~ 2 * M int32 per node at level 0 (+ upper levels),
            # and the graph's own copy of the prefix [N, m] float32 beside the matrix above (it
            # was left out: a max_memory budget could be exceeded by 1.2x)
            total += self.count * (2 * cfg.hnsw_m * 4 + 8) + self.count * m * 4
        return total

    def save(self, path: str | os.PathLike) -> None:
        """Write the index to folder ``path`` atomically (sidecar last; old files removed after).

        ``path`` must be new, empty or an index folder (replaced); any other folder (an embedding
        store, a model) is refused, so that nothing in it is mixed up or removed.
        """
        path = check_index_path(path)
        path.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(6)
        files: dict[str, dict[str, Any]] = {}
        arrays = {
            "vectors": self._vectors,
            "inv_norms": self._inv_norms,
            "ids": self._ids,
            "col_scale": self._col_scale,
        }
        for m, arr in self._short.items():
            arrays[f"short-{m}"] = arr
        for name, arr in arrays.items():
            fname = f"{name}-{token}.npy"
            with atomic_open(path / fname, "wb") as f:
                np.save(f, np.asarray(arr), allow_pickle=False)
            files[name] = {"file": fname, "bytes": (path / fname).stat().st_size}
        for (m, hm, efc), idx in self._hnsw.items():
            fname = f"hnsw-{m}-{hm}-{efc}-{token}.faiss"
            faiss = _faiss()
            with atomic_open(path / fname, "wb") as f:
                f.write(faiss.serialize_index(idx).tobytes())
            files[f"hnsw-{m}-{hm}-{efc}"] = {"file": fname, "bytes": (path / fname).stat().st_size}
        for kind, store in (("ivf", self._ivf), ("ivfpq", self._ivfpq)):
            for (m, nl), idx in store.items():
                fname = f"{kind}-{m}-{nl}-{token}.faiss"
                with atomic_open(path / fname, "wb") as f:
                    f.write(_faiss().serialize_index(idx).tobytes())
                files[f"{kind}-{m}-{nl}"] = {"file": fname, "bytes": (path / fname).stat().st_size}
        meta = {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "nesting": self.nesting.to_dict(),
            "metric": self.metric,
            "vector_dtype": self.vector_dtype,
            "count": self.count,
            "config": self.config.to_dict(),
            "tuned": self.tuned,
            "center": None if self.center is None else self.center.tolist(),
            "normalize": self.normalize,
            "files": files,
        }
        atomic_write_json(path / SIDECAR, meta)
        # The previous save's files and those of saves killed midway: every file of ours that
        # the new sidecar does not name (reading the old sidecar is not needed, and a damaged
        # one would block the save).
        keep = {entry["file"] for entry in files.values()}
        for leftover in path.iterdir():
            if leftover.is_file() and _is_own_file(leftover.name) and leftover.name not in keep:
                leftover.unlink(missing_ok=True)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        mmap: bool = True,
        device: str = "cpu",
        threads: int | None = None,
    ) -> MatryoshkaIndex:
        """Open a saved index; ``mmap`` keeps the full-size vectors on disk (paged on demand)."""
        path = Path(path)
        meta = _read_sidecar(path)
        index = cls(
            Nesting.from_dict(meta["nesting"]),
            _config_from_sidecar(meta["config"], path / SIDECAR),
            metric=meta["metric"],
            vector_dtype=meta["vector_dtype"],
            device=device,
            threads=threads,
            center=meta.get("center"),
            normalize=meta.get("normalize", False),  # absent in indexes saved before it existed
        )
        index.tuned = meta.get("tuned")
        files = meta["files"]
        for entry in files.values():
            f = path / entry["file"]
            if not f.exists():
                raise FileNotFoundError(f"index file {f} is missing (the index is damaged)")
            size = f.stat().st_size
            if size != entry["bytes"]:
                raise ValueError(
                    f"index file {f} is truncated or damaged: expected {entry['bytes']} bytes, "
                    f"found {size}"
                )
        arrays = {}
        for name, entry in files.items():
            if name.startswith(("hnsw-", "ivf-", "ivfpq-")):
                continue
            mode = "r" if mmap and name == "vectors" else None
            arrays[name] = _load_part(path / entry["file"], lambda f, mode=mode: load_npy(f, mode))
        index._vectors, index._inv_norms, index._ids = (
            arrays["vectors"],
            arrays["inv_norms"],
            arrays["ids"],
        )
        index._col_scale = np.asarray(arrays["col_scale"], np.float32)
        for name, arr in arrays.items():
            if name.startswith("short-"):
                index._short[int(name.split("-")[1])] = arr
        for name, entry in files.items():
            if name.startswith("hnsw-"):
                _, m, hm, efc = name.split("-")
                index._hnsw[(int(m), int(hm), int(efc))] = _load_part(
                    path / entry["file"], _read_faiss)
            if name.startswith(("ivf-", "ivfpq-")):
                kind, m, nl = name.split("-")
                store = index._ivfpq if kind == "ivfpq" else index._ivf
                store[(int(m), int(nl))] = _load_part(path / entry["file"], _read_faiss)
        if len(index._vectors) != meta["count"] or len(index._inv_norms) != meta["count"]:
            raise ValueError(
                f"index at {path} is inconsistent: count {meta['count']} does not match its arrays"
            )
        if index._vectors.ndim != 2 or index._vectors.shape[1] != index.nesting.dim:
            raise ValueError(
                f"index at {path} is inconsistent: its nesting ends at {index.nesting.dim} but "
                f"its vectors have shape {index._vectors.shape}"
            )
        return index

    def __repr__(self) -> str:
        return (
            f"MatryoshkaIndex(count={self.count}, nesting={list(self.nesting.sizes)}, "
            f"config={self.config})"
        )


def _warn_zero_rows(x: np.ndarray, offset: int) -> None:
    """All-zero rows have no direction: under cosine they score 0 against every query, which
    usually means a failed encoding upstream; say so instead of indexing them silently."""
    zero = np.flatnonzero(~x.any(axis=1))
    if len(zero):
        import warnings

        warnings.warn(f"{len(zero)} of {len(x)} added rows are all zeros (first: row "
                      f"{offset + int(zero[0])}); cosine gives them score 0 for every query",
                      stacklevel=3)


def _read_only_tensor(arr: np.ndarray) -> Any:
    """A CPU tensor over ``arr`` without a copy. A loaded index's arrays are read-only memory
    maps, which torch warns about (it cannot promise not to write); nothing here writes them."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.as_tensor(np.asarray(arr))


def _widen_for_k(cfg: SearchConfig, k: int) -> SearchConfig:
    """The index's own funnel (tuned for a smaller k) asked for k results: the shortlist and
    every stage keep at least k (non-increasing keeps stay non-increasing). Explicit
    ``shortlist``/``stages`` of a call are left alone and validated as given."""
    if cfg.shortlist >= k and all(keep >= k for _, keep in cfg.stages[:-1]):
        return cfg
    stages = tuple((m, max(keep, k)) for m, keep in cfg.stages)
    return replace(cfg, shortlist=max(cfg.shortlist, k), stages=stages)


def fit_saved_stages(cfg: SearchConfig, k: int) -> SearchConfig:
    """The saved stages under a call's own ``shortlist``/``shortlist_dim``: stages below the
    shortlist prefix are dropped, and each intermediate keep is brought into [k, the previous
    keep] (the shortlist first). They were tuned for the saved shortlist: a user who only widened
    it was told "stages[1] keep must be in [k=60, 100]", naming stages never typed."""
    # a first stage at the shortlist prefix itself stays (IVF-PQ's exact re-score at D_s)
    stages = [(m, keep) for m, keep in cfg.stages if m >= cfg.shortlist_dim]
    prev, fitted = cfg.shortlist, []
    for i, (m, keep) in enumerate(stages):
        # the last keep is the call's k when it runs: recorded as such
        keep = prev = min(max(keep, k), prev) if i < len(stages) - 1 else k
        fitted.append((m, keep))
    return replace(cfg, stages=tuple(fitted))


def _read_faiss(path: Path) -> Any:
    return _faiss().deserialize_index(np.fromfile(path, dtype=np.uint8))


def _load_part(path: Path, read: Callable[[Path], Any]) -> Any:
    """One file of a saved index; a damaged one is a ValueError naming it (the size check
    above cannot see a same-size corruption)."""
    try:
        return read(path)
    except (ValueError, RuntimeError, OSError, EOFError) as exc:  # numpy / faiss / IO
        reason = first_line(exc)
        raise ValueError(f"index file {path} is damaged or unreadable: {reason}") from None


def pq_subquantizers(m: int) -> int:
    """IVF-PQ sub-vectors for an m-dim prefix: 2 dims each (4 bits per 2 dims), 1 if m is odd."""
    return m // 2 if m % 2 == 0 else m


def auto_nlist(n: int) -> int:
    """Default IVF cells for N rows: round(4 * sqrt(N)), at least 1 and at most N."""
    return max(1, min(n, round(4 * np.sqrt(n))))


def _column_scale(x: np.ndarray) -> np.ndarray:
    """Per-column int8 scale [D]: max_i |x_ij| / 127 (1 for all-zero columns), in blocks."""
    peak = np.zeros(x.shape[1], np.float32)
    for s in range(0, len(x), 65536):
        np.maximum(peak, np.abs(x[s : s + 65536]).max(axis=0), out=peak)
    return np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)


def _warn_int8_clipping(x: np.ndarray, scale: np.ndarray) -> None:
    """Warn when rows added later exceed the column scale the first `add` fixed: their codes clip
    at +-127 (silently, before: a first add of 1 row then 2999 cut recall@10 from 0.98 to 0.22)."""
    clipped = sum(int((np.abs(x[s : s + 65536]) > 127.5 * scale).sum())
                  for s in range(0, len(x), 65536))
    if clipped:
        import warnings

        warnings.warn(
            f"int8 index: {clipped} of {x.size} values ({100 * clipped / x.size:.2g}%) of this add "
            "exceed the column scale fixed by the first add and were clipped, which costs "
            "recall; add a representative first batch (or all rows at once), or use "
            "vector_dtype float16",
            stacklevel=3,
        )


def _warn_int8_unscaled_columns(x: np.ndarray, stored: np.ndarray, scale: np.ndarray) -> None:
    """Warn when a later add puts non-zero values in a column that is all zero so far: the first
    add gave it scale 1 (no peak to scale to), so values there are rounded to whole numbers
    (an embedding's |x| < 0.5 becomes 0, silently, before)."""
    cols = np.flatnonzero(scale == 1.0)  # [c] candidates: all-zero so far, or a peak of 127
    if not len(cols):
        return
    cols = cols[np.any(x[:, cols], axis=0)]  # of those, the ones this add fills
    new = [int(j) for j in cols if not np.any(stored[:, j])]  # strided, but only these columns
    if new:
        import warnings

        warnings.warn(
            f"int8 index: {len(new)} column(s) (first: {new[0]}) were all zero in the first add, "
            "so their scale is 1 and this add's values there are rounded to whole numbers "
            "(|x| < 0.5 becomes 0), which costs recall; add a representative first batch (or "
            "all rows at once), or use vector_dtype float16",
            stacklevel=3,
        )


def _quantize_int8(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """int8 codes round(x / scale) of x [n, D] (clipped to +-127), in blocks."""
    out = np.empty(x.shape, np.int8)
    for s in range(0, len(x), 65536):
        out[s : s + 65536] = np.clip(np.rint(x[s : s + 65536] / scale), -127, 127)
    return out


def _topk_tiebreak(scores: np.ndarray, cand: np.ndarray, keep: int):
    """(scores, positions) of the best ``keep`` per row of scores [Q, K]: score desc, then row
    index asc, also among the rows tied at the keep-th place (the rule of `exact_search`)."""
    return topk_sorted(scores, keep, keys=cand)


def _read_sidecar(path: Path) -> dict[str, Any]:
    sidecar = path / SIDECAR
    meta = read_json_sidecar(path, SIDECAR, "MatryoshkaIndex")
    if meta.get("format") != INDEX_FORMAT:
        raise ValueError(f"{sidecar} is not a MatryoshkaIndex (format={meta.get('format')!r})")
    if meta.get("version") != INDEX_VERSION:
        raise ValueError(
            f"{sidecar} has index format version {meta.get('version')!r}; this mrl "
            f"reads version {INDEX_VERSION}"
        )
    _check_sidecar_fields(meta, sidecar)
    return meta


_SIDECAR_FIELDS = {"nesting": dict, "config": dict, "metric": str, "vector_dtype": str,
                   "count": int, "files": dict}
_REQUIRED_FILES = ("vectors", "inv_norms", "ids", "col_scale")


def _config_from_sidecar(d: dict[str, Any], sidecar: Path) -> SearchConfig:
    """The saved `SearchConfig`; a damaged one is one error naming the file and the problem."""
    try:
        return SearchConfig.from_dict(d)
    except ValueError as exc:
        raise ValueError(f"{sidecar} is damaged: config: {exc}") from None


def _check_sidecar_fields(meta: dict[str, Any], sidecar: Path) -> None:
    """Every field `load` reads, with its type: a hand-edited or damaged index.json fails here,
    naming the field, instead of with a KeyError or TypeError deep inside `load`."""
    for name, kind in _SIDECAR_FIELDS.items():
        if not isinstance(meta.get(name), kind) or isinstance(meta.get(name), bool):
            raise ValueError(f"{sidecar} is damaged: {name!r} must be a {kind.__name__}, got "
                             f"{meta.get(name)!r}")
    for name in _REQUIRED_FILES:
        entry = meta["files"].get(name)
        if not (isinstance(entry, dict) and isinstance(entry.get("file"), str)
                and isinstance(entry.get("bytes"), int)):
            raise ValueError(f"{sidecar} is damaged: files.{name} must be "
                             f"{{'file': name, 'bytes': size}}, got {entry!r}")


def check_index_path(path: str | os.PathLike, param: str = "path") -> Path:
    """``path`` can receive an index: new, an empty folder or an index folder (to replace).

    A folder holding only the files of a killed save (no index.json yet) is taken over too. Any
    other folder (an embedding store, a model) is refused, so that saving never mixes files into
    it nor removes any; the error names ``param`` (e.g. ``--out``) and the value.
    """
    path = check_output_path(path, param, "dir")
    if not path.is_dir():
        return path
    side = _read_sidecar_json(path / SIDECAR)  # None: missing or damaged
    if isinstance(side, dict) and side.get("format") == INDEX_FORMAT:
        return path  # an index (any version): replaced
    ours = all(p.is_file() and (_is_own_file(p.name) or p.name == SIDECAR)
               for p in path.iterdir())  # fmt: skip
    if (path / SIDECAR).exists() and (side is not None or not ours):
        # another program's index.json was replaced before, and files mixed in beside its own
        raise FileExistsError(
            f"{param} {str(path)!r} holds a {SIDECAR} that is not a MatryoshkaIndex's (not an "
            "index to replace); save the index to a new folder"
        )
    if not ours:
        raise FileExistsError(
            f"{param} {str(path)!r} is a non-empty folder without {SIDECAR} (not an index to "
            "replace); save the index to a new folder"
        )
    return path  # new, empty, a killed save's files, or an index whose index.json is damaged


def _read_sidecar_json(side: Path) -> Any:
    """The parsed index.json, or None where it is missing or not readable JSON."""
    try:
        return json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, unreadable, not JSON or not UTF-8
        return None


def _faiss():
    from mrl._optional import require

    return require("faiss", "faiss")


_ = topk_numpy  # re-exported for callers that want the plain selection
