"""Run the app with uvicorn: in the foreground (`mrl serve`) or in a background thread (tests,
benchmarks, notebooks)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

from mrl._optional import require

__all__ = ["bind_socket", "serve_forever", "serving"]


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (IPv4 or IPv6), or a one-line ValueError naming
    --host/--port: a port in use or an unknown host fails before the model loads, not as a
    uvicorn traceback after it."""
    family, addr = _resolve(host, port)
    # IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY on accepted connections only for
    # sockets that say so, and without it every response (headers and body: two writes) waited
    # for the client's delayed ACK, 40 ms on Linux (p50 44 ms for GET /health on loopback)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot listen on --host {host} --port {port}: {exc.strerror}; choose "
                         "another --port (or stop what uses it)") from None
    return sock


def _uvicorn_config(app, host: str, port: int, log_level: str):
    uvicorn = require("uvicorn", "serve")
    # One worker process (the model is loaded once); h11 keeps behaviour predictable.
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                          http="h11", lifespan="on", timeout_keep_alive=30)


def _resolve(host: str, port: int) -> tuple[socket.AddressFamily, tuple]:
    """(family, address) to bind, as uvicorn picks them: IPv6 only for hosts with a ':' (so
    'localhost' is 127.0.0.1 even where /etc/hosts lists ::1 first); '' is every interface."""
    if host == "":
        return socket.AF_INET, ("", port)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        infos = socket.getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ValueError(f"--host {host!r} is not an address this machine can resolve "
                         f"({getattr(exc, 'strerror', None) or exc})") from None
    return infos[0][0], infos[0][4]


def serve_forever(app, host: str = "127.0.0.1", port: int = 8000,
                  log_level: str = "info", sock: socket.socket | None = None) -> None:
    """Serve until interrupted (Ctrl-C); on ``sock`` when given (see `bind_socket`)."""
    uvicorn = require("uvicorn", "serve")
    server = uvicorn.Server(_uvicorn_config(app, host, port, log_level))
    server.run(sockets=None if sock is None else [sock])


@contextlib.contextmanager
def serving(app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
            timeout_s: float = 30.0) -> Iterator[str]:
    """Serve ``app`` in a daemon thread; yields its base URL (``port=0``: a free port).

    The listening socket is bound before the thread starts, so the URL is valid at once; the
    server is shut down (and the thread joined) when the block exits.
    """
    uvicorn = require("uvicorn", "serve")
    sock = bind_socket(host, port)
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
