"""The HTTP side: a Starlette app with OpenAI's chat-completions and models
endpoints and the web page.

    GET  /                      the web page (svlm/serve/static/index.html)
    GET  /v1/models             the one model served
    GET  /v1/models/{id}
    POST /v1/chat/completions   JSON, or server-sent events with "stream": true

Every error is OpenAI's JSON, {"error": {"message", "type", "param", "code"}},
with a 4xx status for what the client can fix (429 when the queue is full,
401 without the key that serve.api_key asks for) and 500 for the server's
own failures.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from importlib.resources import files

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from svlm.serve.engine import Engine, Job, QueueFull, Result
from svlm.serve.messages import APIError

log = logging.getLogger("svlm.serve")

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
PAGE_POLICY = (  # the page's own inline script and style, pictures from data: and blob: URLs, requests to itself
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data: blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def create_app(engine: Engine, model_name: str = "svlm", allowed_hosts: list[str] | None = None) -> Starlette:
    """The app around a running Engine; `allowed_hosts` None accepts any Host header.
    With engine.limits.api_key set, /v1/ answers only requests that bear it."""

    @asynccontextmanager
    async def lifespan(app):
        yield
        engine.close()

    app = Starlette(
        routes=[
            Route("/", page, methods=["GET"]),
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        ],
        exception_handlers={
            APIError: api_error,
            QueueFull: queue_full,
            HTTPException: http_error,
            ClientDisconnect: client_gone,
            500: server_error,
        },
        lifespan=lifespan,
    )
    app.state.engine, app.state.model_name = engine, model_name
    if engine.limits.api_key is not None:
        app.add_middleware(KeyCheck, key=engine.limits.api_key)
    if allowed_hosts is not None:
        app.add_middleware(HostCheck, allowed=allowed_hosts)  # added last: checked first
    return app


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """What to warn about when serving beyond this machine without a key."""
    if host in LOOPBACK_HOSTS or api_key is not None:
        return None
    return (
        f"serving on {host} without serve.api_key: anyone who can reach this port can run the model "
        "(and read the pictures under serve.image_root); set serve.api_key=<key> or SVLM_API_KEY, "
        "or serve on 127.0.0.1"
    )


def default_hosts(host: str, allowed: list[str] | None) -> list[str] | None:
    """The Host headers to accept: the configured list, else localhost names when
    bound to a loopback address (which stops DNS-rebinding pages), else any."""
    if allowed is not None:
        return allowed
    return list(LOOPBACK_HOSTS) if host in LOOPBACK_HOSTS else None


# ------------------------------------------------------------------- errors


def error_response(e: APIError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def api_error(request: Request, e: Exception) -> Response:
    return error_response(e)  # type: ignore[arg-type]


async def queue_full(request: Request, e: Exception) -> Response:
    engine: Engine = request.app.state.engine
    message = (
        f"the server is busy: {engine.limits.max_batch} requests run (serve.max_batch) and "
        f"{engine.limits.max_queue} wait (serve.max_queue); retry later"
    )
    return error_response(APIError(429, message, "rate_limit_error", None, "rate_limit_exceeded"), {"Retry-After": "1"})


async def http_error(request: Request, e: Exception) -> Response:
    assert isinstance(e, HTTPException)
    kind = {404: "not_found_error", 405: "invalid_request_error"}.get(e.status_code, "invalid_request_error")
    return error_response(APIError(e.status_code, str(e.detail), kind), dict(e.headers or {}))


async def client_gone(request: Request, e: Exception) -> Response:
    return Response(status_code=400)  # nobody reads it: the client left while sending its request


async def server_error(request: Request, e: Exception) -> Response:
    log.exception("request failed", exc_info=e)
    return error_response(APIError(500, "internal server error", "server_error"))


class HostCheck:
    """Refuse requests whose Host header is not one of `allowed` (port ignored)."""

    def __init__(self, app: ASGIApp, allowed: list[str]) -> None:
        self.app, self.allowed = app, {h.lower() for h in allowed}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1").lower()
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name not in self.allowed and "*" not in self.allowed:
                message = f"Host {host!r} is not served (serve.allowed_hosts)"
                response = error_response(APIError(400, message, code="host_not_allowed"))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class KeyCheck:
    """Answer /v1/ requests only with `Authorization: Bearer <key>`; else 401
    with OpenAI's error JSON (the web page at / asks for the key then)."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                message = (
                    "Incorrect API key provided." if given else
                    "You didn't provide an API key: send it as `Authorization: Bearer <key>` (serve.api_key)."
                )  # fmt: skip
                response = error_response(APIError(401, message, "invalid_request_error", None, "invalid_api_key"),
                                          {"WWW-Authenticate": "Bearer"})  # fmt: skip
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ------------------------------------------------------------------- routes


async def page(request: Request) -> Response:
    html = files("svlm.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    return HTMLResponse(html, headers={"Content-Security-Policy": PAGE_POLICY, "Cache-Control": "no-cache"})


def model_card(request: Request) -> dict:
    engine: Engine = request.app.state.engine
    created = int(engine.meta.get("finished_at", 0))
    return {"id": request.app.state.model_name, "object": "model", "created": created, "owned_by": "svlm"}


async def list_models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [model_card(request)]})


async def get_model(request: Request) -> Response:
    if request.path_params["model_id"] != request.app.state.model_name:
        raise APIError(
            404,
            f"model {request.path_params['model_id']!r} is not served",
            "not_found_error",
            "model",
            "model_not_found",
        )
    return JSONResponse(model_card(request))


async def chat_completions(request: Request) -> Response:
    engine: Engine = request.app.state.engine
    body = await read_json(request, engine.limits.max_body_bytes)
    engine.check_room()  # refuse before decoding images when the queue is already full
    prompt = await run_in_threadpool(engine.prepare, body)
    job = engine.submit(prompt)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": request.app.state.model_name}
    if prompt.request.stream:
        return EventStream(job, stream_events(job, head, prompt.request.include_usage))
    result = await wait_for(job, request)
    log.info(
        "%s: %d+%d tokens, %s, %.2fs",
        head["id"],
        result.prompt_tokens,
        result.completion_tokens,
        result.finish_reason,
        result.seconds,
    )
    return JSONResponse(
        {
            **envelope(head, "chat.completion"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result.text},
                    "logprobs": None,
                    "finish_reason": result.finish_reason,
                }
            ],
            "usage": usage(result),
        }
    )


async def read_json(request: Request, limit: int) -> object:
    """The body as JSON: 415 unless it is declared JSON, 413 past `limit` bytes, 400 when it does not parse."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":  # also keeps other sites' pages from posting here without a CORS preflight
        raise APIError(
            415,
            f"the body must be JSON with Content-Type: application/json, got {kind or 'none'!r}",
            code="unsupported_media_type",
        )
    too_large = APIError(413, f"the request body is over serve.max_body_bytes={limit} bytes", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON: {e}", code="invalid_json") from e


def usage(result: Result) -> dict:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


async def wait_for(job: Job, request: Request) -> Result:
    """The result of a job; a client that disconnects meanwhile cancels it."""

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        job.cancel()

    watcher = asyncio.create_task(watch())
    try:
        while True:
            kind, value = await job.events.get()
            if kind == "done":
                return value
            if kind == "error":
                raise value
    finally:
        watcher.cancel()
        job.cancel()  # nothing when done; stops generation when this task is cancelled


class EventStream(StreamingResponse):
    """A stream of server-sent events that cancels its job however it ends:
    when the client disconnects, Starlette cancels the response, and the
    generation stops between two tokens."""

    def __init__(self, job: Job, events) -> None:
        super().__init__(
            events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        self.job = job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()  # nothing when it has finished


async def stream_events(job: Job, head: dict, include_usage: bool):
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""

    def chunk(delta: dict, finish_reason: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return event({**envelope(head, "chat.completion.chunk"), "choices": [choice]})

    yield chunk({"role": "assistant", "content": ""})
    while True:
        kind, value = await job.events.get()
        if kind == "delta":
            yield chunk({"content": value})
        elif kind == "error":
            yield event(value.body())
            break
        else:
            log.info(
                "%s: %d+%d tokens, %s, %.2fs (stream)",
                head["id"],
                value.prompt_tokens,
                value.completion_tokens,
                value.finish_reason,
                value.seconds,
            )
            yield chunk({}, value.finish_reason)
            if include_usage:
                yield event({**envelope(head, "chat.completion.chunk"), "choices": [], "usage": usage(value)})
            break
    yield "data: [DONE]\n\n"


def envelope(head: dict, kind: str) -> dict:
    """OpenAI's first keys, in its order: id, object, created, model."""
    return {"id": head["id"], "object": kind, "created": head["created"], "model": head["model"]}


def event(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"
