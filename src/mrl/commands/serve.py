"""`mrl serve`: the OpenAI-compatible embeddings service with adaptive search."""

from __future__ import annotations

import argparse

from mrl.commands._options import check_minimums

NAME = "serve"
HELP = "serve embeddings (OpenAI-compatible /v1/embeddings) and adaptive search over HTTP"


# uvicorn's levels (an unknown name was a KeyError traceback from inside uvicorn)
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="default",
        help="sentence-transformers folder, 'default' (all-MiniLM-L6-v2), "
        "'hash:DIM' (a fake for demos) or 'none' (search by vector only)",
    )
    p.add_argument(
        "--nesting",
        default=None,
        help="prefix sizes 'dimensions' may ask for, e.g. '64,128,384' or "
        "'doubling:16' (default: the model's recorded nesting, else its full size)",
    )
    p.add_argument("--name", default=None, help="model id clients send (default: folder name)")
    p.add_argument("--index", default=None, help="a MatryoshkaIndex folder to serve /v1/search")
    p.add_argument(
        "--qdrant-path",
        default=None,
        help="serve /v1/search from a Qdrant Edge folder (with --collection)",
    )
    p.add_argument(
        "--qdrant-url",
        default=None,
        help="serve /v1/search from a Qdrant server/cluster (with --collection)",
    )
    p.add_argument("--collection", default=None, help="Qdrant collection name")
    p.add_argument(
        "--qdrant-hnsw",
        action="store_true",
        help="let Qdrant search the shortlist prefix with its HNSW graph (approximate; built by "
        "the export for --indexed prefixes); default: exact scans at every stage",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: localhost only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--no-batching",
        action="store_true",
        help="one encoder call per request (default: micro-batch concurrent requests)",
    )
    p.add_argument("--max-batch-size", type=int, default=64, help="texts per encoder call")
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=2.0,
        help="how long a request waits for others to batch with (ms)",
    )
    p.add_argument("--max-inputs", type=int, default=2048, help="texts per request")
    p.add_argument("--max-request-bytes", type=int, default=8 * 1024 * 1024)
    p.add_argument(
        "--truncate",
        action="store_true",
        help="let the model truncate over-long inputs (default: refuse with 400)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        type=str.lower,  # uvicorn's names are lower case; INFO works too
        choices=LOG_LEVELS,
        help="uvicorn's log level (default: info)",
    )
    add_threads_argument(p)


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    """``--threads`` for commands that run a model (serve, embed); applied by `set_threads`."""
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads for the model (default: torch's choice; 1 is "
        "often faster on a small, busy CPU)",
    )


def set_threads(n: int) -> None:
    """torch's intra-op thread count (the model's forward pass)."""
    if n < 1:
        raise ValueError(f"--threads must be >= 1, got {n}")
    import torch

    torch.set_num_threads(n)


def check_limits(args: argparse.Namespace) -> None:
    """Refuse an out-of-range limit naming the option, before the port is bound and the model
    loads (`ServeConfig` checks them too, but after the model and with the field's name)."""
    check_minimums(args, (("max_batch_size", 1), ("max_inputs", 1), ("max_request_bytes", 1)))
    if not 0 <= args.max_wait_ms < float("inf"):  # NaN fails too; inf waited for ever
        raise ValueError(f"--max-wait-ms must be finite and >= 0, got --max-wait-ms "
                         f"{args.max_wait_ms}")


def build_app(args: argparse.Namespace):
    """The app `mrl serve` would run (tests call this with parsed arguments)."""
    from mrl.serve import IndexBackend, QdrantBackend, ServeConfig, create_app, load_encoder

    if args.threads is not None:
        set_threads(args.threads)
    backend = None
    if sum(x is not None for x in (args.index, args.qdrant_path, args.qdrant_url)) > 1:
        raise ValueError("give at most one of --index, --qdrant-path, --qdrant-url")
    if args.index is not None:
        from mrl.retrieval import MatryoshkaIndex

        backend = IndexBackend(MatryoshkaIndex.load(args.index))
    elif args.qdrant_path is not None or args.qdrant_url is not None:
        from mrl.qdrant import QdrantIndex, open_target

        if not args.collection:
            raise ValueError("--collection is needed with --qdrant-path/--qdrant-url")
        target = open_target(args.collection, url=args.qdrant_url, path=args.qdrant_path)
        backend = QdrantBackend(QdrantIndex(target, exact=not args.qdrant_hnsw))
    elif args.qdrant_hnsw:  # set but unused, silently, otherwise
        raise ValueError("--qdrant-hnsw is for --qdrant-path/--qdrant-url")
    # the model loads last: a wrong index path or an unreachable server fails in a second
    encoder = None if args.model == "none" else load_encoder(args.model, args.nesting, args.name)
    config = ServeConfig(
        max_inputs=args.max_inputs,
        max_request_bytes=args.max_request_bytes,
        truncate=args.truncate,
        batching=not args.no_batching,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
    )
    return create_app(encoder, backend, config)


def _url(sock) -> str:
    host, port = sock.getsockname()[:2]
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}"


def run(args: argparse.Namespace) -> int:
    from mrl.serve.server import bind_socket, serve_forever

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got --port {args.port}")
    check_limits(args)
    sock = bind_socket(args.host, args.port)  # before the model loads: a busy port fails at once
    try:
        app = build_app(args)
        # uvicorn does not announce a socket it is handed: say where we listen (the real port
        # for --port 0)
        print(f"mrl serve: listening on {_url(sock)}", flush=True)
        serve_forever(app, host=args.host, port=args.port, log_level=args.log_level, sock=sock)
    finally:
        sock.close()
    return 0
