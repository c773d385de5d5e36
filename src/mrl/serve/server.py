"""Run the app with uvicorn: in the foreground (`mrl serve`) or in a background thread (tests,
benchmarks, notebooks)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

from mrl._optional import require

__all__ = ["serve_forever", "serving"]


def _uvicorn_config(app, host: str, port: int, log_level: str):
    uvicorn = require("uvicorn", "serve")
    # One worker process (the model is loaded once); h11 keeps behaviour predictable.
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                          http="h11", lifespan="on", timeout_keep_alive=30)


def serve_forever(app, host: str = "127.0.0.1", port: int = 8000,
                  log_level: str = "info") -> None:
    """Serve until interrupted (Ctrl-C)."""
    uvicorn = require("uvicorn", "serve")
    uvicorn.Server(_uvicorn_config(app, host, port, log_level)).run()


@contextlib.contextmanager
def serving(app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
            timeout_s: float = 30.0) -> Iterator[str]:
    """Serve ``app`` in a daemon thread; yields its base URL (``port=0``: a free port).

    The listening socket is bound before the thread starts, so the URL is valid at once; the
    server is shut down (and the thread joined) when the block exits.
    """
    uvicorn = require("uvicorn", "serve")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    port = sock.getsockname()[1]
    server = uvicorn.Server(_uvicorn_config(app, host, port, log_level))
    server.install_signal_handlers = lambda: None  # not the main thread
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                              name="mrl-serve")
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout_s)
        sock.close()
