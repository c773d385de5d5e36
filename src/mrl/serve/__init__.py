"""HTTP service: OpenAI-compatible Matryoshka embeddings and adaptive search (``serve`` extra).

- `create_app(encoder, index=None, config=ServeConfig())`: the FastAPI app (`mrl.serve.app`).
- `mrl.serve.encoders`: the `Encoder` protocol, `SentenceTransformerEncoder`, `HashEncoder` (fake).
- `mrl.serve.batching`: `MicroBatcher` (batches concurrent requests) and `DirectRunner`.
- `mrl.serve.search`: `SearchBackend`; `IndexBackend` (MatryoshkaIndex), `QdrantBackend`.
- `mrl.serve.server`: `serving(app)` runs it in a thread; `serve_forever` in the foreground.

fastapi/uvicorn are imported only when an app is built or served.
"""

from mrl.serve.app import APIError, ServeConfig, create_app, truncate_normalize
from mrl.serve.encoders import Encoder, HashEncoder, SentenceTransformerEncoder, load_encoder
from mrl.serve.search import IndexBackend, QdrantBackend, SearchBackend, SearchOutcome
from mrl.serve.server import serve_forever, serving

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
    "create_app",
    "load_encoder",
    "serve_forever",
    "serving",
    "truncate_normalize",
]
