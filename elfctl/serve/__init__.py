"""Serving: an OpenAI-compatible HTTP server with dynamic batching, streams and a playground.

`Engine` holds the loaded model and samples batches of requests' rows; `Batcher` groups
requests arriving within a window; `build_app` is the FastAPI app; `Server` runs it under
uvicorn. FastAPI and uvicorn are the optional `[serve]` extra (docs/serving.md).
"""

from __future__ import annotations

from elfctl.serve.app import MAX_BODY_BYTES, build_app
from elfctl.serve.batcher import Batcher
from elfctl.serve.engine import Engine, Job
from elfctl.serve.protocol import (
    IGNORED,
    NEEDS_LIKELIHOOD,
    CompletionRequest,
    RequestError,
    parse_request,
)
from elfctl.serve.server import Server, bind, check_extra

__all__ = [
    "Batcher",
    "CompletionRequest",
    "Engine",
    "IGNORED",
    "Job",
    "MAX_BODY_BYTES",
    "NEEDS_LIKELIHOOD",
    "RequestError",
    "Server",
    "bind",
    "build_app",
    "check_extra",
    "parse_request",
]
