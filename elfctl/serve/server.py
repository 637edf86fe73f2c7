"""Running the app: uvicorn on one address (127.0.0.1 unless told otherwise).

On SIGTERM or Ctrl-C uvicorn stops accepting connections and waits for the requests in
flight (streams included) to finish; then the app's shutdown samples whatever is still
queued and stops the sampling thread, and the process exits.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
from collections.abc import Callable

from elfctl.errors import UserError
from elfctl.serve.app import MAX_BODY_BYTES, build_app
from elfctl.serve.batcher import Batcher
from elfctl.serve.engine import Engine


def check_extra() -> None:
    """A clear error when the [serve] extra is not installed."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UserError(
            "elfctl serve needs FastAPI and uvicorn: pip install 'elfctl[serve]'."
        ) from None


class Server:
    """An engine, its batcher and app, and the uvicorn server that runs them."""

    def __init__(
        self,
        engine: Engine,
        batch_window_ms: float = 10.0,
        api_key: str | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        log: Callable[[str], None] | None = None,
    ):
        check_extra()
        import uvicorn

        self.engine = engine
        self.batcher = Batcher(
            engine.sample,
            engine.limits.max_rows,
            batch_window_ms / 1000,
            on_error=(lambda e: log(f"a batch failed: {type(e).__name__}: {e}")) if log else None,
        )
        self.app = build_app(engine, self.batcher, api_key, max_body_bytes, log)
        self._uvicorn = uvicorn
        self.server = None

    def run(self, host: str = "127.0.0.1", port: int = 8000, sock: socket.socket | None = None):
        """Serve until SIGTERM / Ctrl-C (or `stop()` from another thread); blocks."""
        config = self._uvicorn.Config(
            self.app, host=host, port=port, log_level="warning", lifespan="on"
        )
        self.server = self._uvicorn.Server(config)
        with _sigterm_is_a_stop():
            self.server.run(sockets=[sock] if sock is not None else None)

    @property
    def started(self) -> bool:
        return self.server is not None and self.server.started

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True


@contextlib.contextmanager
def _sigterm_is_a_stop():
    """uvicorn stops gracefully on SIGTERM and then raises the signal again under the handler
    that was there before: with this one the process then exits normally (status 0)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def bind(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening socket (port 0: any free port), for a server started in-process."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock
