"""The HTTP server: OpenAI's ``/v1`` routes, ``/health``, ``/metrics``, the monitor's ``/api/swarm`` and the web UI.

Every error is OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with its status
(400 bad request, 401 key, 404 model, 413 body too large, 429 busy, 503 blocks missing, 502 the
swarm failed). A stream that fails after it started ends with an error event and ``[DONE]``. A
client that goes away cancels its request: its rows leave the engine and their sessions close.

:class:`ApiServer` runs uvicorn on a thread of its own. Call order: ``start()`` (joins the swarm,
then listens; ``url`` is set), ``shutdown()``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
from importlib import resources

import uvicorn
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from sse_starlette.sse import EventSourceResponse

from efedllm.api import responses
from efedllm.api.config import ApiConfig
from efedllm.api.requests import ApiError, CompletionRequest, parse_chat_request, parse_completion_request
from efedllm.api.service import ApiService
from efedllm.common.errors import EfedllmError

MAX_BODY_BYTES = 1 << 20
DISCONNECT_POLL_S = 0.25


def create_app(service: ApiService) -> FastAPI:
    app = FastAPI(title="efedllm", docs_url=None, redoc_url=None, openapi_url=None)
    static = resources.files("efedllm.api") / "static"

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    app.add_middleware(_GuardAndCount, service=service)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _complete(service, request, parse_chat_request(await _json_body(request)))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _complete(service, request, parse_completion_request(await _json_body(request)))

    @app.get("/v1/models")
    async def models():
        covered, total = await run_in_threadpool(service.coverage)
        return {"object": "list", "data": [responses.model_card(service.config.model, int(service.started_at), covered, total)]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        service.check_model(name)
        covered, total = await run_in_threadpool(service.coverage)
        return responses.model_card(name, int(service.started_at), covered, total)

    @app.get("/health")
    async def health():
        covered, total = await run_in_threadpool(service.coverage)
        body = {"status": "ok" if covered == total else "degraded", "model": service.config.model,
                "blocks_covered": covered, "blocks_total": total}
        return JSONResponse(body, status_code=200 if covered == total else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.exposition(), media_type="text/plain; version=0.0.4")

    @app.get("/api/swarm")
    async def swarm():
        return await run_in_threadpool(service.snapshot)

    @app.get("/")
    async def index():
        return FileResponse(str(static / "index.html"))

    app.mount("/static", StaticFiles(directory=str(static)), name="static")
    return app


class _GuardAndCount:
    """ASGI middleware for ``/v1``: checks the API key and counts answers by status. A plain ASGI wrapper: the
    route gets the server's own ``receive`` (what its disconnect checks read) and its sends pass straight through."""

    def __init__(self, app, service: ApiService) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1"):
            await self.app(scope, receive, send)
            return
        status = 500

        async def counting_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            try:
                _check_key(self.service.config.api_key, Request(scope).headers.get("authorization", ""))
            except ApiError as error:
                await JSONResponse(error.body(), status_code=error.status)(scope, receive, counting_send)
                return
            await self.app(scope, receive, counting_send)
        finally:
            self.service.metrics.answered(scope["path"], status)


def _check_key(api_key: str | None, header: str) -> None:
    if api_key is None:
        return
    if not header:
        raise ApiError(401, "no API key given: send it as 'Authorization: Bearer KEY'", code="invalid_api_key")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
        raise ApiError(401, "incorrect API key provided", code="invalid_api_key")


async def _json_body(request: Request) -> object:
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise ApiError(413, f"the request body is {len(body)} bytes; at most {MAX_BODY_BYTES} are accepted")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ApiError(400, f"the request body is not valid JSON: {error}", code="invalid_json") from None


async def _complete(service: ApiService, request: Request, parsed: CompletionRequest):
    service.check_model(parsed.model)
    rows, budgets = await run_in_threadpool(service.encode, parsed)
    await run_in_threadpool(service.check_coverage)
    job, queue = service.submit(parsed, rows, budgets, asyncio.get_running_loop())
    reply = _Reply(service, parsed, sum(row.shape[1] for row in rows), len(job.prompts), job.submitted_at)
    if parsed.stream:
        return EventSourceResponse(_stream_events(reply, job, queue), ping=15, sep="\n")
    return await _whole(reply, request, job, queue)


class _Reply:
    """One request's answer as its events arrive: texts, finish reasons, token counts, its first token's time."""

    def __init__(self, service: ApiService, request: CompletionRequest, prompt_tokens: int, choices: int,
                 submitted_at: float) -> None:
        self.service, self.request, self.prompt_tokens, self.choices = service, request, prompt_tokens, choices
        self.id, self.created = responses.completion_id(request.chat), int(time.time())
        self.texts, self.reasons, self.tokens = [""] * choices, [None] * choices, 0
        self.submitted_at, self.first_seen = submitted_at, False

    @property
    def done(self) -> bool:
        return all(reason is not None for reason in self.reasons)

    def take(self, event) -> None:
        """Records ``event``; an error raises the ApiError it stands for."""
        if not self.first_seen:
            self.first_seen = True
            self.service.metrics.time_to_first_token.observe(time.perf_counter() - self.submitted_at)
        if event.error is not None:
            self.service.metrics.rejected(event.error_kind or "upstream")
            status, kind = (503, "service_unavailable") if event.error_kind == "missing_blocks" else (502, "upstream_error")
            raise ApiError(status, event.error, type=kind, code=event.error_kind)
        if event.finish_reason is not None:
            self.reasons[event.choice], self.tokens = event.finish_reason, self.tokens + event.tokens
        else:
            self.texts[event.choice] += event.text

    def chunk(self, event) -> dict:
        request = self.request
        return responses.chunk(request.chat, self.id, request.model, self.created, event.choice,
                               None if event.finish_reason is not None else event.text,
                               finish_reason=event.finish_reason, with_usage_field=request.include_usage)


async def _stream_events(reply: _Reply, job, queue: asyncio.Queue):
    request = reply.request
    try:
        if request.chat:
            for index in range(reply.choices):
                yield {"data": json.dumps(responses.chunk(True, reply.id, request.model, reply.created, index, role=True,
                                                          with_usage_field=request.include_usage))}
        while not reply.done:
            event = await queue.get()
            try:
                reply.take(event)
            except ApiError as error:
                yield {"data": json.dumps(error.body())}
                break
            yield {"data": json.dumps(reply.chunk(event))}
        else:
            if request.include_usage:
                yield {"data": json.dumps(responses.usage_chunk(request.chat, reply.id, request.model, reply.created,
                                                                reply.prompt_tokens, reply.tokens))}
        yield {"data": "[DONE]"}
    finally:
        job.cancel()  # the client went away (this generator is cancelled) or the answer is complete: rows leave


async def _whole(reply: _Reply, request: Request, job, queue: asyncio.Queue):
    checked = time.monotonic()
    try:
        while not reply.done:
            try:
                reply.take(await asyncio.wait_for(queue.get(), DISCONNECT_POLL_S))
            except asyncio.TimeoutError:
                pass
            if time.monotonic() - checked >= DISCONNECT_POLL_S:  # events may come faster than the poll: check anyway
                checked = time.monotonic()
                if await request.is_disconnected():
                    return Response(status_code=499)
    finally:
        job.cancel()
    return responses.whole_completion(reply.request.chat, reply.id, reply.request.model, reply.texts, reply.reasons,
                                      reply.prompt_tokens, reply.tokens)


class ApiStartError(EfedllmError, RuntimeError):
    """The API could not listen (the address is taken, or not this machine's)."""


class ApiServer:
    """The API over a swarm, listening on ``config.host:config.port`` (port 0: any free port; see ``url``)."""

    def __init__(self, config: ApiConfig) -> None:
        self.config = config
        self.service = ApiService(config)
        self.url: str | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 30.0) -> "ApiServer":
        try:
            self.service.start()
            app = create_app(self.service)
            self._server = uvicorn.Server(uvicorn.Config(app, host=self.config.host, port=self.config.port,
                                                         log_level="warning", lifespan="off", access_log=False))
            self._thread = threading.Thread(target=self._server.run, daemon=True, name="efedllm-api-http")
            self._thread.start()
            deadline = time.monotonic() + timeout
            while not self._server.started:
                if not self._thread.is_alive() or time.monotonic() > deadline:
                    raise ApiStartError(f"the API could not listen on {self.config.host} port {self.config.port} "
                                        "(taken, or not an address of this machine)")
                time.sleep(0.05)
            port = self._server.servers[0].sockets[0].getsockname()[1]
            self.url = f"http://{self.config.host}:{port}"
        except BaseException:
            self.shutdown()
            raise
        return self

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self.service.shutdown()
