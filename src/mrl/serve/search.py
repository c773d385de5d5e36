"""What `/v1/search` searches: a small protocol and adapters for the in-process and Qdrant indexes.

The app hands a backend float32 queries [Q, D] and the request's funnel parameters; the backend
answers ids and scores [Q, k], the parameters it used and the time of each stage in ms.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import numpy as np

from mrl.nesting import Nesting
from mrl.retrieval.funnel.index import fit_saved_stages, hit_lists

__all__ = ["IndexBackend", "QdrantBackend", "SearchBackend", "SearchOutcome"]

# bytes of candidate rows one rerank batch of a request may gather ([batch, K, D] float32)
RERANK_BYTES = 256 << 20


@dataclass
class SearchOutcome:
    ids: list[list[Any]]  # [Q][<=k] stored ids (int or str), best first
    scores: list[list[float]]  # [Q][<=k] same shape as ids
    params: dict[str, Any]  # the funnel actually run
    timings_ms: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class SearchBackend(Protocol):
    nesting: Nesting  # the index's prefix sizes (nesting.dim = D)
    size: int  # number of indexed vectors
    configs: dict[str, dict[str, Any]]  # named configurations a request may pick
    defaults: dict[str, Any]  # what runs when a request names nothing

    def search(self, queries: np.ndarray, k: int, *, shortlist_dim: int | None = None,
               shortlist: int | None = None, stages: Sequence[Sequence[int]] | None = None,
               config: str | None = None) -> SearchOutcome: ...


def _pick(configs: dict[str, dict], name: str | None, overrides: dict[str, Any]) -> dict:
    """A named configuration (or {}) with the request's explicit fields on top."""
    if name is not None and name not in configs:
        raise ValueError(f"config {name!r} is not a configuration of this index; choose one of "
                         f"{sorted(configs)}")
    chosen = dict(configs[name]) if name is not None else {}
    chosen.update({k: v for k, v in overrides.items() if v is not None})
    return chosen


class IndexBackend:
    """An in-process `mrl.retrieval.MatryoshkaIndex`.

    Named configurations: ``"default"`` (the index's saved `SearchConfig`) and ``"tuned"`` (the
    auto-tuner's choice, when the index was tuned), plus any passed in ``configs``.
    """

    def __init__(self, index, configs: dict[str, dict[str, Any]] | None = None) -> None:
        self.index = index
        self.nesting = index.nesting
        cfg = index.config.to_dict()  # every SearchConfig field: backend, ef_search, ...
        self.defaults = {k: cfg[k] for k in ("shortlist_dim", "shortlist", "stages", "backend")}
        self.configs = {"default": cfg}
        tuned = getattr(index, "tuned", None)
        if isinstance(tuned, dict) and isinstance(tuned.get("config"), dict):
            self.configs["tuned"] = dict(tuned["config"])  # the auto-tuner's choice
        self.configs.update(configs or {})
        if index.count:  # every named configuration's structures now, not on a request
            for params in self.configs.values():
                index.build(self._config(params))

    def _config(self, params: dict[str, Any]):
        """The index's `SearchConfig` with ``params`` (fields; None = the index's) on top."""
        fields = {k: v for k, v in params.items() if v is not None}
        if "stages" in fields:
            fields["stages"] = tuple(tuple(int(v) for v in st) for st in fields["stages"])
        return replace(self.index.config, **fields)

    def check(self, *, shortlist_dim: int | None = None, shortlist: int | None = None,
              stages: Sequence[Sequence[int]] | None = None, config: str | None = None) -> None:
        """A request's configuration, before its queries are embedded: a known ``config``, and
        for the hnsw, ivf, ivfpq and torch backends a shortlist prefix built at start: another
        ``shortlist_dim`` would build a graph or an IVF inside the request (5-20 s for 20k rows,
        kept for ever, duplicated by concurrent requests). flat and numpy build at most one
        normalised prefix matrix per nesting size, in one pass: allowed."""
        if shortlist_dim is not None and shortlist_dim not in self.nesting:
            raise ValueError(f"shortlist_dim must be a prefix size in the nesting "
                             f"{list(self.nesting.sizes)}, got shortlist_dim={shortlist_dim}")
        cfg = self._config(_pick(self.configs, config, {"shortlist_dim": shortlist_dim}))
        if cfg.backend in ("flat", "numpy"):
            return
        if self.index.count and not self.index.is_built(cfg):
            built = [m for m in self.nesting.sizes  # with this backend and its build settings
                     if self.index.is_built(replace(cfg, shortlist_dim=m))]
            raise ValueError(
                f"shortlist_dim={cfg.shortlist_dim} is not built on this server for the "
                f"{cfg.backend} backend (built: {built}); use one of those, or a named config "
                f"({sorted(self.configs)})"
            )

    @property
    def size(self) -> int:
        return int(self.index.count)

    def _batch(self, params: dict[str, Any], k: int) -> int:
        """Queries per rerank batch: the rerank gathers [batch, K, D] float32 rows, so one
        in-limits request (256 queries, K = 10,000, D = 384) took 3.9 GB; kept near
        ``RERANK_BYTES``."""
        shortlist = min(max(params.get("shortlist") or self.index.config.shortlist, k), self.size)
        per_query = max(1, shortlist * self.index.nesting.dim * 4)
        return max(1, min(1024, RERANK_BYTES // per_query))

    def search(self, queries: np.ndarray, k: int, *, shortlist_dim: int | None = None,
               shortlist: int | None = None, stages: Sequence[Sequence[int]] | None = None,
               config: str | None = None) -> SearchOutcome:
        params = _pick(self.configs, config, {"shortlist_dim": shortlist_dim,
                                              "shortlist": shortlist, "stages": stages})
        if params.get("stages") is not None:
            params["stages"] = tuple(tuple(int(v) for v in s) for s in params["stages"])
        if stages is None and params.get("stages") and (shortlist, shortlist_dim) != (None, None):
            # a named configuration's saved stages under the request's own shortlist: fitted,
            # as the index fits its own (they were checked as if the client had sent them)
            cfg = self._config(params)
            params["stages"] = fit_saved_stages(cfg, min(k, self.size)).stages
        t = time.perf_counter()
        # a named configuration's funnel is widened for a larger k, like the index's own; a
        # request's explicit shortlist/stages are run (and validated) as given
        widen = shortlist is None and stages is None
        res = self.index.search(queries, k, widen=widen, batch_size=self._batch(params, k),
                                **params)  # fmt: skip
        total = (time.perf_counter() - t) * 1e3
        timings = {name: v * 1e3 for name, v in res.timings.items()}  # s -> ms
        timings["search"] = total
        used = {**self.defaults, **params}
        ran = res.config
        # what ran: an empty stages list is one rerank at D keeping k (it was reported as no
        # rerank), the last stage keeps k, and no shortlist is longer than the index
        stages = ran.stages or ((self.index.nesting.dim, k),)
        stages = (*stages[:-1], (stages[-1][0], min(k, self.size)))
        used.update(shortlist_dim=ran.shortlist_dim, shortlist=min(ran.shortlist, self.size),
                    stages=[list(s) for s in stages])  # fmt: skip
        return SearchOutcome(*hit_lists(res.ids, res.scores, res.indices), used, timings)


class QdrantBackend:
    """A Qdrant collection through `mrl.qdrant.QdrantIndex` (same funnel parameters).

    The collection size (for validating ``k``) is re-counted at most every ``size_ttl_s``
    seconds, not on every request.
    """

    def __init__(self, qindex, defaults: dict[str, Any] | None = None,
                 size_ttl_s: float = 10.0) -> None:
        self.index = qindex
        self.size_ttl_s = size_ttl_s
        self._size: tuple[float, int] | None = None  # (monotonic time, count)
        self.nesting = Nesting(qindex.layout.prefixes)
        self.defaults = {"shortlist_dim": qindex.layout.prefixes[0], "shortlist": 200,
                         "stages": None, **(defaults or {})}
        self.configs = {"default": dict(self.defaults)}

    @property
    def size(self) -> int:
        now = time.monotonic()
        if self._size is None or now - self._size[0] > self.size_ttl_s:
            self._size = (now, len(self.index))
        return self._size[1]

    def search(self, queries: np.ndarray, k: int, *, shortlist_dim: int | None = None,
               shortlist: int | None = None, stages: Sequence[Sequence[int]] | None = None,
               config: str | None = None) -> SearchOutcome:
        from mrl.qdrant import FunnelPlan

        params = _pick(self.configs, config or "default", {
            "shortlist_dim": shortlist_dim, "shortlist": shortlist, "stages": stages})
        if shortlist is None and stages is None:
            # a named configuration's funnel (K=200 by default) is widened for a larger k, as
            # IndexBackend does; a request's explicit shortlist/stages are run as given
            if params.get("shortlist") is not None:
                params["shortlist"] = max(int(params["shortlist"]), k)
            if params.get("stages") is not None:
                params["stages"] = [(m, max(int(keep), k)) for m, keep in params["stages"]]
        plan = FunnelPlan.build(self.index.layout, k, **params)  # validates; what will run
        t = time.perf_counter()
        scores, ids = self.index.search(queries, k, shortlist_dim=plan.shortlist_dim,
                                        shortlist=plan.shortlist, stages=plan.stages)
        used = {"shortlist_dim": plan.shortlist_dim, "shortlist": plan.shortlist,
                "stages": [list(s) for s in plan.stages]}
        return SearchOutcome(*hit_lists(np.asarray(ids), scores), used,
                             {"qdrant": (time.perf_counter() - t) * 1e3})
