"""A server started in this process on a free loopback port, and stopped, within the test."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the [serve] extra (fastapi, uvicorn) is not installed")
httpx = pytest.importorskip("httpx", reason="the serve tests talk to the server with httpx")

from elfctl.serve import Engine, Server, bind  # noqa: E402

START_TIMEOUT_S = 30


@contextlib.contextmanager
def running(loaded, window_ms: float = 10.0, max_batch: int = 8, frames: int = 4, **options):
    """Yields (base url, server); the server answers on 127.0.0.1 only."""
    engine = Engine(loaded, "tiny", max_batch=max_batch, frames=frames)
    server = Server(engine, window_ms, **options)
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    thread = threading.Thread(target=server.run, kwargs={"sock": sock}, daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        assert thread.is_alive(), "the server thread died"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.stop()
        thread.join(START_TIMEOUT_S)
        sock.close()
