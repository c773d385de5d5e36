"""The HTTP service: OpenAI-compatible embeddings at any nesting size, and adaptive search.

`create_app(encoder, index=None, config=ServeConfig())` builds a FastAPI app; `mrl serve` runs it
with uvicorn. Routes:

- ``POST /v1/embeddings``  OpenAI's embeddings API; ``dimensions`` picks a prefix of the nesting.
- ``POST /v1/search``      funnel search over a loaded index (text or vector queries).
- ``GET /v1/models``, ``GET /v1/metadata``, ``GET /health``; OpenAPI docs at ``/docs``.

Every error is JSON in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` with a
4xx status for bad input; the server never crashes on a request.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from mrl._optional import require
from mrl.params import check_int, is_int
from mrl.serve import schemas  # pydantic models; module level so FastAPI resolves annotations
from mrl.serve.batching import DirectRunner, MicroBatcher, RunnerStopped
from mrl.serve.encoders import Encoder
from mrl.serve.search import SearchBackend

__all__ = ["APIError", "ServeConfig", "create_app", "truncate_normalize"]

log = logging.getLogger("mrl.serve")


@dataclass(frozen=True)
class ServeConfig:
    """Limits and batching of the service."""

    max_inputs: int = 2048  # texts per embeddings request (OpenAI's limit)
    max_request_bytes: int = 8 * 1024 * 1024  # body size limit in bytes (413 beyond)
    max_input_chars: int = 100_000  # cheap per-text pre-check before tokenising
    truncate: bool = False  # texts over the model's max_tokens: 400 (False) or model truncates
    batching: bool = True  # micro-batch concurrent requests (False: one encoder call per request)
    max_batch_size: int = 64  # texts per encoder call when batching
    max_wait_ms: float = 2.0  # how long a request waits for company when batching (ms)
    max_k: int = 1000  # largest k for /v1/search
    max_queries: int = 256  # queries per /v1/search request
    # largest shortlist (and stage keep) a request may ask for: the rerank gathers [Q*K, m]
    max_shortlist: int = 10_000

    def __post_init__(self) -> None:
        for name in ("max_inputs", "max_request_bytes", "max_input_chars", "max_batch_size",
                     "max_k", "max_queries", "max_shortlist"):
            check_int(getattr(self, name), name, minimum=1)  # True was 1 (bool is an int)
        if not 0 <= self.max_wait_ms < float("inf"):  # NaN or inf: requests waited for ever
            raise ValueError(f"max_wait_ms must be finite and >= 0, got "
                             f"max_wait_ms={self.max_wait_ms}")


class APIError(Exception):
    """An error answered as OpenAI-shaped JSON with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (
            status, message, param, code, type)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def truncate_normalize(emb: np.ndarray, m: int) -> np.ndarray:
    """First ``m`` columns of emb [B, D], each row re-normalised to unit length: [B, m].

    A truncated prefix of a unit vector is not a unit vector; cosine needs the re-normalisation.
    Zero rows stay zero.
    """
    p = np.asarray(emb[:, :m], dtype=np.float32)
    norms = np.linalg.norm(p, axis=1, keepdims=True)
    return p / np.where(norms > 0, norms, 1.0)


def _encode_rows(rows: np.ndarray, fmt: str) -> list:
    # float: plain lists; base64: little-endian float32 bytes (what the openai client decodes).
    if fmt == "base64":
        le = rows.astype("<f4", copy=False)
        return [base64.b64encode(r.tobytes()).decode("ascii") for r in le]
    return rows.tolist()


# ---------------------------------------------------------------------- input validation
def _texts_from_input(value: Any, config: ServeConfig, param: str = "input",
                      images: bool = False) -> list[str]:
    """The request's ``input`` (or ``param``) as a non-empty list of non-empty strings, or 400.
    ``images``: base64 images, bounded by the request size, not by ``max_input_chars`` (a
    640x480 JPEG is 247k characters)."""
    if isinstance(value, str):
        texts = [value]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        texts = list(value)
    else:
        raise APIError(400, "input as token arrays is not supported by this server: send text "
                       "(a string or a list of strings)", param, "unsupported_input")
    if not texts:
        raise APIError(400, f"{param} must not be an empty list", param, "empty_input")
    if len(texts) > config.max_inputs:
        raise APIError(400, f"{param} has {len(texts)} items; at most {config.max_inputs} per "
                       "request", param, "too_many_inputs")
    for i, t in enumerate(texts):
        if not t.strip():
            raise APIError(400, f"{param}[{i}] is empty; every input must contain text",
                           param, "empty_input")
        if not images and len(t) > config.max_input_chars:
            raise APIError(400, f"{param}[{i}] has {len(t)} characters; at most "
                           f"{config.max_input_chars}", param, "context_length_exceeded")
        try:  # JSON may carry a lone surrogate ("\ud83d": a client cut an emoji in half)
            t.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise APIError(400, f"{param}[{i}] is not valid Unicode text: a lone surrogate "
                           f"{t[exc.start]!r} at position {exc.start}", param,
                           "invalid_input") from None
    return texts


def _check_dimensions(dimensions: Any, sizes: Sequence[int]) -> int:
    if dimensions is None:
        return sizes[-1]
    if not is_int(dimensions) or dimensions < 1:
        raise APIError(400, f"dimensions must be a positive integer, got {dimensions!r}",
                       "dimensions", "invalid_dimensions")
    if dimensions > sizes[-1]:
        raise APIError(400, f"dimensions={dimensions} is larger than the model's embedding size "
                       f"{sizes[-1]}", "dimensions", "invalid_dimensions")
    if dimensions not in sizes:
        raise APIError(400, f"dimensions={dimensions} is not a prefix size of this model; "
                       f"choose one of {list(sizes)}", "dimensions", "invalid_dimensions")
    return int(dimensions)


def _check_tokens(counts: list[int], limit: int, param: str) -> None:
    for i, n in enumerate(counts):
        if n > limit:
            raise APIError(400, f"{param}[{i}] has {n} tokens; this model accepts at most {limit} "
                           "(shorten it, or start the server with truncation on)",
                           param, "context_length_exceeded")


# ---------------------------------------------------------------------- ASGI guard
class _BodyGuard:
    """Pure ASGI middleware: JSON content type and the body size limit for POST requests.

    Runs before FastAPI reads the body, so an oversized upload is refused (413) without being
    buffered beyond the limit, and a non-JSON body gets 415 rather than a confusing parse error.
    """

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            err = APIError(415, f"Content-Type must be application/json, got {ctype or 'none'!r}",
                           None, "unsupported_media_type")
            return await _send_json(send, err.status, err.body())
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _send_json(send, 413, _too_large(self.max_bytes))
        chunks, total, more = [], 0, True
        while more:  # read (at most max_bytes + one chunk) and replay it to the app
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            total += len(chunks[-1])
            more = message.get("more_body", False)
            if total > self.max_bytes:
                return await _send_json(send, 413, _too_large(self.max_bytes))
        body = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


def _too_large(limit: int) -> dict:
    return APIError(413, f"request body is larger than the limit of {limit} bytes", None,
                    "request_too_large").body()


async def _send_json(send, status: int, body: dict) -> None:
    import json

    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


# ---------------------------------------------------------------------- the app
def create_app(
    encoder: Encoder | None,
    index: SearchBackend | None = None,
    config: ServeConfig | None = None,
):
    """Build the FastAPI app serving ``encoder`` (and search over ``index`` if given).

    Args:
        encoder: any object with the `Encoder` attributes; None serves search by vector only.
        index: a `SearchBackend` (e.g. `mrl.serve.search.IndexBackend` over a MatryoshkaIndex).
        config: limits and batching (`ServeConfig`).
    """
    fastapi = require("fastapi", "serve")
    if encoder is None and index is None:
        raise ValueError("create_app needs an encoder, an index, or both; got neither")
    if index is not None and encoder is not None and index.nesting.dim != encoder.nesting.dim:
        raise ValueError(f"index has dimension {index.nesting.dim} but the model outputs "
                         f"{encoder.nesting.dim}")
    service = _Service(encoder, index, config or ServeConfig())
    app = fastapi.FastAPI(
        title="mrl embeddings service",
        description="OpenAI-compatible Matryoshka embeddings at any nesting size, and adaptive "
        "(funnel) search.",
        lifespan=service.lifespan,
        responses={400: {"model": schemas.ErrorResponse}},
    )
    app.state.mrl = service.state
    app.add_middleware(_BodyGuard, max_bytes=service.config.max_request_bytes)
    _add_error_handlers(app)
    _add_embeddings_route(app, service)
    _add_search_route(app, service)
    _add_info_routes(app, service)
    return app


class _Service:
    """What the routes share: the model, the index, the limits, and the running encoder queue
    (``state["runner"]``, started and stopped with the app)."""

    def __init__(self, encoder: Encoder | None, index: SearchBackend | None,
                 config: ServeConfig) -> None:
        self.encoder, self.index, self.config = encoder, index, config
        self.state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(self, app):
        if self.encoder is not None:
            await self._runner()
        yield
        if "runner" in self.state:
            await self.state.pop("runner").stop()

    async def _runner(self):
        """The encoder's runner, started at the app's startup, or at the first request where
        startup never ran (an app mounted in another: every embeddings request was a 500)."""
        if "runner" not in self.state:
            lock = self.state.setdefault("runner_lock", asyncio.Lock())
            async with lock:
                if "runner" not in self.state:
                    cfg, encode = self.config, self.encoder.encode
                    runner = (MicroBatcher(encode, cfg.max_batch_size, cfg.max_wait_ms)
                              if cfg.batching else DirectRunner(encode))  # fmt: skip
                    await runner.start()
                    self.state["runner"] = runner
        return self.state["runner"]

    def require_encoder(self) -> Encoder:
        if self.encoder is None:
            raise APIError(400, "this server has no model loaded; send query vectors instead",
                           "model", "model_not_loaded")
        return self.encoder

    def require_index(self) -> SearchBackend:
        if self.index is None:
            raise APIError(404, "no index is loaded; start the server with --index",
                           None, "index_not_loaded")
        return self.index

    async def embed(self, texts: list[str], param: str = "input") -> tuple[np.ndarray, int]:
        """Validated texts -> (raw embeddings [B, D], prompt tokens)."""
        enc = self.require_encoder()
        try:  # also validates inputs a model cannot read (e.g. an image that does not decode)
            counts = await asyncio.to_thread(enc.count_tokens, texts)
        except ValueError as exc:
            raise APIError(400, str(exc), param, "invalid_input") from None
        if not self.config.truncate:
            _check_tokens(counts, enc.max_tokens, param)
        try:
            emb = await (await self._runner()).submit(texts)
        except RunnerStopped:
            raise APIError(503, "the server is shutting down; the request was not served",
                           None, "service_unavailable", "server_error") from None
        return emb, int(sum(min(c, enc.max_tokens) for c in counts))

    async def search_queries(self, req) -> tuple[np.ndarray, dict[str, float]]:
        """The request's queries as float32 [Q, D] and the time spent embedding them."""
        if (req.query is None) == (req.vector is None):
            raise APIError(400, "give exactly one of query (text) or vector", "query",
                           "invalid_value")
        limit = self.config.max_queries
        if req.query is not None:
            texts = _texts_from_input(req.query, self.config, "query",
                                      _takes_images(self.require_encoder()))
            if len(texts) > limit:
                raise APIError(400, f"query has {len(texts)} items; at most {limit}",
                               "query", "too_many_inputs")
            t = time.perf_counter()
            emb, _ = await self.embed(texts, "query")
            return emb, {"embed": (time.perf_counter() - t) * 1e3}
        return _query_vectors(req.vector, self.require_index().nesting.dim, limit), {}


def _takes_images(encoder) -> bool:
    return getattr(encoder, "input_kind", "text") == "image"


def _query_vectors(vec: list, d: int, limit: int) -> np.ndarray:
    """A request's ``vector`` (one query or a list of them) as float32 [Q, D], checked."""
    rows = [vec] if vec and not isinstance(vec[0], list) else vec
    if not rows or len(rows) > limit:
        raise APIError(400, f"vector must hold 1 to {limit} query vectors, got "
                       f"{len(rows)}", "vector", "invalid_value")
    if any(len(r) != d for r in rows):
        bad = next(len(r) for r in rows if len(r) != d)
        raise APIError(400, f"vector must have the index's dimension {d}, got {bad}",
                       "vector", "invalid_dimensions")
    arr = np.asarray(rows, dtype=np.float32)  # [Q, D]
    if not np.isfinite(arr).all():
        raise APIError(400, "vector must be finite (no NaN or inf)", "vector", "invalid_value")
    zero = np.flatnonzero(~(arr != 0).any(1))
    if len(zero):  # no direction: every document would score 0, the "hits" arbitrary
        raise APIError(400, f"vector[{int(zero[0])}] is all zeros; a query needs a direction",
                       "vector", "invalid_value")
    return arr


def _add_error_handlers(app) -> None:
    """Every error as OpenAI's JSON error shape; an unexpected exception is logged, answered
    with a 500 and the server stays up."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
        if first.get("type") == "json_invalid":
            return JSONResponse(APIError(400, f"request body is not valid JSON: "
                                         f"{first.get('ctx', {}).get('error', first['msg'])}",
                                         None, "invalid_json").body(), status_code=400)
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = loc[0] if loc else None
        where = ".".join(loc) or "body"
        msg = f"{where}: {first['msg']}"
        if param in _TEXT_FIELDS and len(loc) > 1:  # a union's first branch ("input.str:
            # Input should be a valid string") misled for ["a", 3], null or {}
            msg = f"{param} must be {_TEXT_FIELDS[param]}"
        return JSONResponse(APIError(400, msg, param, "invalid_value").body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
        return JSONResponse(APIError(exc.status_code, str(exc.detail), None, kind).body(),
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal_error(request, exc: Exception):  # a bug: log it, answer JSON, stay up
        log.exception("internal error on %s", request.url.path)
        return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}", None,
                                     "internal_error", "server_error").body(), status_code=500)


# request fields holding text(s), and what they must be (for a readable 400)
_TEXT_FIELDS = {"input": "a string or a list of strings",
                "query": "a string or a list of strings"}  # fmt: skip


def _add_embeddings_route(app, service: _Service) -> None:
    from fastapi.responses import JSONResponse

    @app.post("/v1/embeddings", response_model=schemas.EmbeddingResponse,
              responses={413: {"model": schemas.ErrorResponse},
                         415: {"model": schemas.ErrorResponse}})
    async def embeddings(req: schemas.EmbeddingRequest):
        """Embed text(s); ``dimensions`` truncates to a nesting prefix and re-normalises."""
        enc = service.require_encoder()
        if req.model != enc.name:
            raise APIError(404, f"model {req.model!r} is not served here; this server serves "
                           f"{enc.name!r}", "model", "model_not_found")
        texts = _texts_from_input(req.input, service.config, images=_takes_images(enc))
        m = _check_dimensions(req.dimensions, enc.nesting.sizes)
        emb, tokens = await service.embed(texts)
        rows = truncate_normalize(emb, m)  # [B, m]
        data = [{"object": "embedding", "index": i, "embedding": e}
                for i, e in enumerate(_encode_rows(rows, req.encoding_format))]
        # A Response skips FastAPI's re-validation of thousands of floats (response_model still
        # documents the shape in OpenAPI; the shape is tested).
        return JSONResponse({"object": "list", "data": data, "model": enc.name,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def _add_search_route(app, service: _Service) -> None:
    @app.post("/v1/search", response_model=schemas.SearchResponse,
              responses={413: {"model": schemas.ErrorResponse}})
    async def search(req: schemas.SearchRequest) -> dict:
        """Funnel search: a shortlist on a small prefix, reranked on larger ones."""
        index = service.require_index()
        t0 = time.perf_counter()
        k = req.k
        params = {"shortlist_dim": req.shortlist_dim, "shortlist": req.shortlist,
                  "stages": None if req.stages is None else [tuple(s) for s in req.stages],
                  "config": req.config}
        _check_search_params(k, params, index, service.config)  # before any text is embedded
        queries, timings = await service.search_queries(req)
        try:
            result = await asyncio.to_thread(index.search, queries, k, **params)
        except ValueError as exc:
            raise APIError(400, str(exc), _guess_param(str(exc)), "invalid_value") from None
        timings.update(result.timings_ms)
        timings["total"] = (time.perf_counter() - t0) * 1e3
        data = [{"index": i, "ids": ids, "scores": sc}
                for i, (ids, sc) in enumerate(zip(result.ids, result.scores))]
        model = None if service.encoder is None else service.encoder.name
        return {"object": "search.result", "data": data, "params": result.params,
                "model": model, "timings_ms": timings}


def _add_info_routes(app, service: _Service) -> None:
    encoder, index = service.encoder, service.index

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models", response_model=schemas.ModelList)
    async def models() -> dict:
        ids = [] if encoder is None else [encoder.name]
        return {"object": "list", "data": [{"id": i, "object": "model", "created": 0,
                                            "owned_by": "mrl"} for i in ids]}

    @app.get("/v1/metadata")
    async def metadata() -> dict:
        """The model (name, nesting, limits), the index (size, nesting, named configs), config."""
        model = None if encoder is None else {
            "id": encoder.name, "dim": encoder.nesting.dim,
            "nesting": list(encoder.nesting.sizes), "max_tokens": encoder.max_tokens}
        idx = None if index is None else {
            "size": index.size, "dim": index.nesting.dim, "nesting": list(index.nesting.sizes),
            "configs": index.configs, "defaults": index.defaults}
        runner = service.state.get("runner")
        return {"model": model, "index": idx, "config": asdict(service.config),
                "batches": getattr(runner, "batches", 0)}


def _check_search_params(k: Any, params: dict[str, Any], index: SearchBackend,
                         config: ServeConfig) -> None:
    """A search request's k, shortlist, stages and config, checked before its queries are
    embedded (a bad k cost an encoder call first) and bounded (a shortlist of 10**9 gathered
    [Q*K, m] floats: 2.4 GB and a 500); then the backend's own check, if it has one."""
    k_max = min(config.max_k, index.size)
    if not is_int(k) or not 1 <= k <= k_max:
        raise APIError(400, f"k must be in [1, {k_max}], got k={k}", "k", "invalid_value")
    limit = config.max_shortlist
    shortlist = params.get("shortlist")
    if shortlist is not None and not 1 <= shortlist <= limit:
        raise APIError(400, f"shortlist must be in [1, {limit}] (this server's max_shortlist), "
                       f"got shortlist={shortlist}", "shortlist", "invalid_value")
    for i, stage in enumerate(params.get("stages") or ()):
        if len(stage) != 2:
            raise APIError(400, f"stages[{i}] must be a [dim, keep] pair, got {list(stage)}",
                           "stages", "invalid_value")
        if not 1 <= stage[1] <= limit:
            raise APIError(400, f"stages[{i}] keep must be in [1, {limit}] (this server's "
                           f"max_shortlist), got {stage[1]}", "stages", "invalid_value")
    check = getattr(index, "check", None)
    if check is not None:
        try:
            check(**params)
        except ValueError as exc:
            raise APIError(400, str(exc), _guess_param(str(exc)), "invalid_value") from None


def _guess_param(message: str) -> str | None:
    """The request field an index error is about (its message starts with the parameter)."""
    for name in ("shortlist_dim", "shortlist", "stages", "config", "k"):
        if message.startswith(name) or f" {name}=" in message or f"{name} " in message[:40]:
            return name
    return None

