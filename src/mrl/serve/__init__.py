"""HTTP service: OpenAI-compatible Matryoshka embeddings and adaptive search (``serve`` extra).

- `create_app(encoder, index=None, config=ServeConfig())`: the FastAPI app (`mrl.serve.app`).
- `mrl.serve.encoders`: the `Encoder` protocol, `SentenceTransformerEncoder`, `VisionEncoder`,
  `HashEncoder` (a deterministic fake).
- `mrl.serve.batching`: `MicroBatcher` (batches concurrent requests) and `DirectRunner`.
- `mrl.serve.search`: `SearchBackend`; `IndexBackend` (MatryoshkaIndex), `QdrantBackend`.
- `mrl.serve.server`: `serving(app)` runs it in a thread; `serve_forever` in the foreground.

fastapi/uvicorn are imported only when an app is built or served.
"""

from mrl.serve.encoders import (
    Encoder,
    HashEncoder,
    SentenceTransformerEncoder,
    VisionEncoder,
    load_encoder,
)

# The app, batching, search and server parts need the ``serve`` extra (fastapi, pydantic,
# uvicorn): they load on first use, so `mrl embed` can use the encoders without them.
_LAZY = {
    "APIError": "mrl.serve.app", "ServeConfig": "mrl.serve.app", "create_app": "mrl.serve.app",
    "truncate_normalize": "mrl.serve.app", "IndexBackend": "mrl.serve.search",
    "QdrantBackend": "mrl.serve.search", "SearchBackend": "mrl.serve.search",
    "SearchOutcome": "mrl.serve.search", "serve_forever": "mrl.serve.server",
    "serving": "mrl.serve.server",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mrl.serve' has no attribute {name!r}")

__all__ = [
    "APIError",
    "Encoder",
    "HashEncoder",
    "IndexBackend",
    "QdrantBackend",
    "SearchBackend",
    "SearchOutcome",
    "SentenceTransformerEncoder",
    "ServeConfig",
    "VisionEncoder",
    "create_app",
    "load_encoder",
    "serve_forever",
    "serving",
    "truncate_normalize",
]
