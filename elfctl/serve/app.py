"""The HTTP face: OpenAI's /v1/completions and /v1/models, /health, the playground at /.

FastAPI is the optional `[serve]` extra, imported when an app is built. Every error leaves
in OpenAI's shape with one sentence; a request the server refuses is a 400 (401 without
the API key), never a 500, and it leaves the server as it was.
"""

# No `from __future__ import annotations` here: FastAPI reads the route functions'
# annotations at runtime, and `Request` is imported inside build_app (an optional extra).
import asyncio
import contextlib
import hmac
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from importlib import resources

from elfctl.serve.batcher import Batcher
from elfctl.serve.engine import Engine, Job
from elfctl.serve.protocol import RequestError, completion_body, error_body

MAX_BODY_BYTES = 1 << 20


def build_app(
    engine: Engine,
    batcher: Batcher,
    api_key: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    log: Callable[[str], None] | None = None,
):
    """The ASGI app; it starts `batcher` on startup and, on shutdown (after the server has
    finished the requests in flight), samples what is queued and stops it."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        batcher.start()
        yield
        await asyncio.to_thread(batcher.stop)

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    started = int(time.time())

    def refuse(e: RequestError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestError)
    async def _refused(_request, e: RequestError):
        return refuse(e)

    @app.exception_handler(HTTPException)
    async def _http(_request, e: HTTPException):
        message = {404: "No such endpoint.", 405: "Method not allowed on this endpoint."}
        text = message.get(e.status_code, str(e.detail))
        return JSONResponse(error_body(text), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, e: RequestValidationError):
        return JSONResponse(error_body("The request is malformed."), status_code=400)

    @app.exception_handler(Exception)
    async def _crashed(_request, e: Exception):
        if log is not None:
            log(f"internal error: {type(e).__name__}: {e}")
        body = error_body(f"Internal error: {type(e).__name__}.", kind="server_error")
        return JSONResponse(body, status_code=500)

    def authorise(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise RequestError(
                "Missing or wrong API key: send the header 'Authorization: Bearer KEY'.",
                status=401,
                code="invalid_api_key",
            )

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        page = resources.files("elfctl.serve").joinpath("static/index.html")
        return HTMLResponse(page.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "model": engine.model_id,
            "defaults": {**asdict(engine.defaults), "max_tokens": engine.limits.default_tokens},
            "queued_requests": batcher.queued(),
            **batcher.stats.as_dict(),
            "freed_rows": engine.freed_rows,
        }

    @app.get("/v1/models")
    async def models(request: Request):
        authorise(request)
        entry = {"id": engine.model_id, "object": "model", "created": started, "owned_by": "elfctl"}
        return {"object": "list", "data": [entry]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorise(request)
        body = await read_json(request, max_body_bytes)
        completion = engine.parse(body)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def deliver(kind: str, payload) -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting
                loop.call_soon_threadsafe(events.put_nowait, (kind, payload))

        job = engine.job(completion, deliver)
        try:
            batcher.submit(job)
        except RuntimeError:
            raise RequestError(
                "The server is shutting down.", status=503, kind="server_error"
            ) from None
        answer = Answer(engine, job)
        if completion.stream:
            return StreamingResponse(answer.events(events), media_type="text/event-stream")
        try:
            while True:
                kind, payload = await events.get()
                if kind != "frame":
                    break
        finally:
            job.cancelled = True  # a no-op once sampled; drops it if the client left
        if kind == "error":
            return JSONResponse(error_body(payload, kind="server_error"), status_code=500)
        return answer.completion(payload)

    return app


class Answer:
    """One request's answer: the completion object, or its stream of server-sent events."""

    def __init__(self, engine: Engine, job: Job):
        self.engine, self.job = engine, job
        self.id = f"cmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def _body(self, choices: list[dict], usage: dict | None = None) -> dict:
        body = completion_body(
            self.id, self.created, self.engine.model_id, choices, usage, self.job.request.seed
        )
        if usage is None:
            body.pop("usage")
        return body

    def completion(self, tokens: list[list[int]]) -> dict:
        choices = self.engine.choices(self.job, tokens)
        return self._body(choices, self.engine.usage(self.job, tokens))

    async def events(self, events: asyncio.Queue):
        """Frames as the text forms, the final text, then [DONE]; if the client goes away
        the job is marked cancelled (no more frames are made for it)."""
        try:
            while True:
                kind, payload = await events.get()
                if kind == "frame":
                    step, tokens = payload
                    yield sse(self._body(self.engine.choices(self.job, tokens, step)))
                    continue
                if kind == "done":
                    yield sse(self.completion(payload))
                else:
                    yield sse(error_body(payload, kind="server_error"))
                yield "data: [DONE]\n\n"
                return
        finally:
            self.job.cancelled = True


def sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def read_json(request, limit: int):
    """The body as JSON, refused if it is over `limit` bytes or not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise RequestError(f"The request body is over the limit of {limit} bytes.")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(f"The request body is over the limit of {limit} bytes.")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks).decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError too
        raise RequestError(f"The request body is not valid JSON: {e}.") from None
