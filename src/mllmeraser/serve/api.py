"""The HTTP surface: OpenAI's chat completions (`/v1/chat/completions`, streamed as server-sent events on request),
`/v1/models`, `/health`, `/metrics`, and the admin endpoints that load, unload, fit and bind erasers without a
restart (admin.py). The messages become one prompt in messages.py; errors are OpenAI's bodies (http.py), with a
4xx status for bad input (the batcher never sees it) and 5xx for a failure of the server's own; the server
stays up either way.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .admin import add_admin_routes
from .engine import Engine, Job
from .fitter import RequestFitter
from .http import bearer, error_body, error_response, json_body, require_admin
from .messages import parse_messages
from .metrics import CONTENT_TYPE, Metrics
from .policy import PolicyError, Registry
from .schema import ChatRequest
from .settings import ServeSettings
from .store import Store


def create_app(model, processor, registry: Registry, settings: ServeSettings = ServeSettings(),
               fitter: RequestFitter | None = None, store: Store | None = None) -> FastAPI:
    """The FastAPI app serving `model` with `registry`'s erasers; its batcher thread runs while the app does.
    With a `fitter`, `POST /admin/requests` fits deletion requests on the served model. With a `store` (holding
    the names the registry was built from), every admin change is persisted there and audited before its 2xx."""
    from ..core import models

    engine = Engine(model, processor, registry, settings.max_batch, settings.max_wait)
    limits = settings.limits
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await run_in_threadpool(engine.stop)

    app = FastAPI(title="mllmeraser", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.state.registry = registry
    app.state.store = store
    app.state.metrics = metrics

    @app.exception_handler(PolicyError)
    async def policy_error(request: Request, exc: PolicyError) -> JSONResponse:
        if request.url.path == "/v1/chat/completions":
            metrics.count_request("refused" if exc.status < 500 else "error")
        return error_response(exc.status, exc.message, exc.kind, exc.param, exc.code)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(exc.status_code, str(exc.detail), "invalid_request_error", None, code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(500, f"internal error ({type(exc).__name__})", "server_error", None, "internal_error")

    @app.get("/health")
    async def health():
        # counts, not names: an eraser's name may name the person who asked to be forgotten
        body = {"status": "ok", "model": settings.model_name, "erasers": len(registry.names()), "batcher": "alive"}
        if not engine.alive:  # nothing would answer a request: tell the load balancer / supervisor
            body.update(status="unavailable", batcher="dead",
                        reason="the batcher thread is not running; restart the server")
            return JSONResponse(body, status_code=503)
        return body

    @app.get("/metrics")
    async def metrics_text(request: Request) -> PlainTextResponse:
        require_admin(request, settings)  # the gate-fire series are labelled with eraser names
        return PlainTextResponse(metrics.render(engine, registry.names()), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "mllmeraser"}]}

    def job_from(body: ChatRequest, api_key: str | None) -> Job:
        model_name = body.model if body.model is not None else settings.model_name
        if model_name != settings.model_name:
            raise PolicyError(404, f"the model {model_name!r} does not exist; this server serves "
                              f"{settings.model_name!r}", "model_not_found", "model")
        erasers = registry.resolve(api_key, body.erasers)  # 401 / unknown eraser before any decoding
        if body.n != 1:
            raise PolicyError(400, "only n=1 is supported", "unsupported_parameter", "n")
        if body.stop not in (None, [], ""):
            raise PolicyError(400, "stop sequences are not supported", "unsupported_parameter", "stop")
        max_tokens, param = body.max_completion_tokens, "max_completion_tokens"
        if max_tokens is None:
            max_tokens, param = body.max_tokens, "max_tokens"
            max_tokens = min(256, limits.max_tokens) if max_tokens is None else max_tokens
        if not 1 <= max_tokens <= limits.max_tokens:
            raise PolicyError(400, f"'{param}' must be between 1 and {limits.max_tokens}, got {max_tokens}",
                              "invalid_value", param)
        temperature, top_p = float(body.temperature), float(body.top_p)
        if not 0.0 <= temperature <= 2.0:
            raise PolicyError(400, "'temperature' must be between 0 and 2", "invalid_value", "temperature")
        if not 0.0 < top_p <= 1.0:
            raise PolicyError(400, "'top_p' must be in (0, 1]", "invalid_value", "top_p")
        seed = body.seed
        item = parse_messages(body.messages, limits)
        tokens = len(processor.tokenizer(models.chat_text(processor, item.text, False, item.history))["input_ids"])
        if tokens > limits.max_prompt_tokens:
            raise PolicyError(400, f"the prompt is {tokens} tokens, over the limit of {limits.max_prompt_tokens}",
                              "prompt_too_long", "messages")
        return Job(item=item, erasers=erasers, max_tokens=max_tokens, emit=lambda event: None,
                   temperature=temperature, top_p=top_p, seed=seed)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = ChatRequest.of(await json_body(request, limits))
        job = await run_in_threadpool(job_from, body, bearer(request))
        stream, options = body.stream, body.stream_options
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(event: tuple[str, Any]) -> None:  # called from the batcher thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is gone (shutting down): stop the row instead
                job.cancelled.set()

        job.emit = emit
        try:
            engine.submit(job)
        except RuntimeError as exc:  # stopping, or the batcher has died
            code = "batcher_dead" if "died" in str(exc) else "shutting_down"
            raise PolicyError(503, str(exc), code, kind="server_error") from None
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": ident, "created": created, "model": settings.model_name}
        if not stream:
            try:
                while True:
                    kind, value = await events.get()
                    if kind == "done":
                        break
                    if kind == "error":
                        metrics.count_request("error")
                        return error_response(500, value, "server_error", None, "generation_failed")
            except asyncio.CancelledError:
                job.cancelled.set()
                raise
            metrics.count_request("ok")
            return {**head, "object": "chat.completion",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": value["text"]},
                                 "finish_reason": value["finish_reason"], "logprobs": None}],
                    "usage": _usage(value)}

        def chunk(delta: dict, finish: str | None = None) -> str:
            data = {**head, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
            return f"data: {json.dumps(data)}\n\n"

        async def sse():
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    kind, value = await events.get()
                    if kind == "delta":
                        yield chunk({"content": value})
                    elif kind == "error":
                        metrics.count_request("error")
                        yield f"data: {json.dumps(error_body(value, 'server_error', None, 'generation_failed'))}\n\n"
                        break
                    else:
                        metrics.count_request("ok")
                        yield chunk({}, value["finish_reason"])
                        if options.get("include_usage"):
                            yield f"data: {json.dumps({**head, 'object': 'chat.completion.chunk', 'choices': [], 'usage': _usage(value)})}\n\n"
                        break
                yield "data: [DONE]\n\n"
            finally:
                job.cancelled.set()  # a no-op once finished; frees the row if the client went away

        return StreamingResponse(sse(), media_type="text/event-stream")

    add_admin_routes(app, engine, registry, settings, metrics, fitter, store)
    return app


def _usage(done: dict) -> dict:
    return {"prompt_tokens": done["prompt_tokens"], "completion_tokens": done["completion_tokens"],
            "total_tokens": done["prompt_tokens"] + done["completion_tokens"]}

