"""The HTTP surface: OpenAI's chat completions (`/v1/chat/completions`, streamed as server-sent events on request),
`/v1/models`, `/health`, `/metrics`, and the admin endpoints that load, unload, fit and bind erasers without a
restart. With a store (store.py: `--erasers DIR`), every admin change is written there before it is acknowledged
and logged to its audit log; admin changes are serialised by one lock, and the registry work they do (fingerprint
check, stacking) runs in the thread pool, off the event loop the streams run on.

Every error is OpenAI's body `{"error": {"message", "type", "param", "code"}}` with a 4xx status for bad input
(the batcher never sees it) and 5xx for a failure of the server's own; the server stays up either way.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hmac
import io
import json
import os
import tempfile
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..core.eraser import Eraser
from ..core.inputs import Prompt, as_items, fold_system
from ..errors import UserInputError
from .audit import canonical_digest, forget_digest, short_digest
from .engine import Engine, Job
from .fitter import RequestFitter
from .metrics import CONTENT_TYPE, Metrics
from .policy import PolicyError, Registry
from .schema import AddEraser, Binding, ChatRequest, FitRequest
from .settings import Limits, ServeSettings
from .store import Store


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param, code), status_code=status)


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    return header[7:].strip() or None if header[:7].lower() == "bearer " else None


# ---- the request body (its fields' types: schema.py) -----------------------------------------------------

def decode_image(url: str, limits: Limits, param: str) -> Image.Image:
    """A data: URL's image, RGB; anything else (another scheme, not base64, not an image, too big) is a 400."""
    if not url.startswith("data:"):
        raise PolicyError(400, "only data: URLs are accepted for images (the server fetches nothing)",
                          "unsupported_image_url", param)
    header, _, payload = url.partition(",")
    if ";base64" not in header:
        raise PolicyError(400, "the image data: URL must be base64-encoded", "invalid_image", param)
    if len(payload) > limits.max_image_bytes * 4 // 3 + 4:
        raise PolicyError(400, f"image larger than {limits.max_image_bytes} bytes", "image_too_large", param)
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise PolicyError(400, "the image data: URL is not valid base64", "invalid_image", param) from None
    try:
        image = Image.open(io.BytesIO(raw))
        width, height = image.size
        if width * height > limits.max_image_pixels:
            raise PolicyError(400, f"image of {width}x{height} pixels is over the limit of {limits.max_image_pixels}",
                              "image_too_large", param)
        image.load()
        return image.convert("RGB")
    except PolicyError:
        raise
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, DecompressionBombError, ...
        raise PolicyError(400, f"the data: URL is not a readable image ({type(exc).__name__})", "invalid_image",
                          param) from None


def _message_parts(message: dict, index: int, limits: Limits) -> tuple[str, list[Image.Image]]:
    content = message.get("content")
    param = f"messages[{index}].content"
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise PolicyError(400, "a message's content must be a string or a list of parts", "invalid_type", param)
    texts, images = [], []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            spec = part.get("image_url")
            url = spec.get("url") if isinstance(spec, dict) else spec
            if not isinstance(url, str):
                raise PolicyError(400, "image_url needs a url", "invalid_type", f"{param}[{j}].image_url")
            images.append(decode_image(url, limits, f"{param}[{j}].image_url"))
        else:
            raise PolicyError(400, "a content part must be {type: text, text} or {type: image_url, image_url: {url}}",
                              "invalid_content_part", f"{param}[{j}]")
    return "\n".join(texts), images


def parse_messages(messages: Any, limits: Limits) -> Prompt:
    """OpenAI messages -> one prompt item: system text leads the first user turn, earlier (user, assistant) turns
    become the chat history, the last message must be the user's; at most one image, placed in the first user
    turn (where the model's chat template puts it)."""
    if not isinstance(messages, list) or not messages:
        raise PolicyError(400, "'messages' must be a non-empty list", "invalid_type", "messages")
    system, turns, images = [], [], []  # turns: [role, text]
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("system", "developer", "user", "assistant"):
            raise PolicyError(400, "a message's role must be system, user or assistant", "invalid_role",
                              f"messages[{index}].role")
        text, found = _message_parts(message, index, limits)
        images += found
        if role in ("system", "developer"):
            system.append(text)
        elif turns and turns[-1][0] == role:
            turns[-1][1] += "\n" + text
        else:
            turns.append([role, text])
    if not turns or turns[-1][0] != "user":
        raise PolicyError(400, "the last message must be the user's", "invalid_messages", "messages")
    if turns[0][0] != "user":
        turns.insert(0, ["user", ""])
    if len(images) > 1:
        raise PolicyError(400, "at most one image per request", "too_many_images", "messages")
    if system:
        turns[0][1] = fold_system("\n".join(system), turns[0][1])
    chars = sum(len(text) for _, text in turns)
    if chars > limits.max_prompt_chars:
        raise PolicyError(400, f"the messages hold {chars} characters, over the limit of {limits.max_prompt_chars}",
                          "prompt_too_long", "messages")
    history = tuple((turns[i][1], turns[i + 1][1]) for i in range(0, len(turns) - 1, 2))
    (item,) = as_items([(images[0] if images else None, turns[-1][1], "")])
    return dataclasses.replace(item, history=history) if history else item


# ---- the app ---------------------------------------------------------------------------------------------

def create_app(model, processor, registry: Registry, settings: ServeSettings = ServeSettings(),
               fitter: RequestFitter | None = None, store: Store | None = None) -> FastAPI:
    """The FastAPI app serving `model` with `registry`'s erasers; its batcher thread runs while the app does.
    With a `fitter`, `POST /admin/requests` fits deletion requests on the served model. With a `store` (holding
    the names the registry was built from), every admin change is persisted there and audited before its 2xx."""
    from ..core import models

    engine = Engine(model, processor, registry, settings.max_batch, settings.max_wait)
    limits = settings.limits
    metrics = Metrics()
    admin_lock = asyncio.Lock()  # one admin change at a time: store and registry move in step
    fingerprint = registry.fingerprint
    model_digest = None if fingerprint is None else canonical_digest(fingerprint)[:16]

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
        return _error(exc.status, exc.message, exc.kind, exc.param, exc.code)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error(exc.status_code, str(exc.detail), "invalid_request_error", None, code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        return _error(500, f"internal error ({type(exc).__name__})", "server_error", None, "internal_error")

    async def json_body(request: Request) -> dict:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise PolicyError(413, f"request body over {limits.max_body_bytes} bytes", "request_too_large")
        raw = bytearray()
        async for chunk in request.stream():  # a chunked body has no declared length: count as it comes
            raw += chunk
            if len(raw) > limits.max_body_bytes:
                raise PolicyError(413, f"request body over {limits.max_body_bytes} bytes", "request_too_large")
        try:
            body = json.loads(bytes(raw))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PolicyError(400, f"the request body is not valid JSON ({exc})", "invalid_json") from None
        if not isinstance(body, dict):
            raise PolicyError(400, "the request body must be a JSON object", "invalid_json")
        return body

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
        require_admin(request)  # the gate-fire series are labelled with eraser names
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
        body = ChatRequest.of(await json_body(request))
        job = await run_in_threadpool(job_from, body, _bearer(request))
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
                        return _error(500, value, "server_error", None, "generation_failed")
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

    # ---- admin ----------------------------------------------------------------------------------------

    def require_admin(request: Request) -> None:
        if not settings.admin_token:
            raise PolicyError(403, "the admin endpoints are off: start the server with --admin-token or "
                              "MLLMERASER_ADMIN_TOKEN", "admin_disabled", kind="permission_error")
        token = _bearer(request) or ""
        if not hmac.compare_digest(token.encode(), settings.admin_token.encode()):
            raise PolicyError(401, "admin token missing or wrong: send 'Authorization: Bearer TOKEN'",
                              "invalid_admin_token", kind="authentication_error")

    @app.get("/admin/erasers")
    async def admin_list(request: Request) -> dict:
        require_admin(request)
        return {"erasers": registry.describe()}

    async def install(name: str, eraser: Eraser, tenants: list, source: str, token: str | None,
                      **audit: Any) -> Path | None:
        """Persist `eraser` (the store: file, then manifest, then audit line), then serve it. Checked first, so
        an eraser the registry refuses is never written; if loading still fails, the store entry is withdrawn
        unaudited: what a restart serves is what was acknowledged."""
        async with admin_lock:
            registry.check_new(name, tenants)  # again: another call may have taken the name meanwhile
            await run_in_threadpool(registry.check, name, eraser)
            try:
                if store is not None:
                    saved = await run_in_threadpool(store.add, name, eraser, source, tenants, token,
                                                    model=model_digest, **audit)
                elif source == "fitted" and fitter is not None:  # no store: fitted requests still go to save_dir
                    saved = await run_in_threadpool(fitter.save, name, eraser)
                else:
                    saved = None
            except OSError as exc:
                raise PolicyError(500, f"the eraser could not be saved ({exc.strerror or exc}); it was not loaded",
                                  "save_failed", kind="server_error") from None
            try:
                await run_in_threadpool(registry.add, name, eraser, tenants)
            except BaseException:
                if store is not None:
                    await run_in_threadpool(store.delete, name, None, False)
                elif saved is not None:
                    saved.unlink(missing_ok=True)
                raise
            metrics.count_admin(source)
            return saved

    @app.post("/admin/erasers", status_code=201)
    async def admin_add(request: Request):
        require_admin(request)
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form(max_part_size=limits.max_eraser_bytes)
            upload, name, tenants = form.get("file"), form.get("name"), form.get("tenants") or ""
            if upload is None or isinstance(upload, str):
                raise PolicyError(400, "a multipart upload needs a 'file' part (the .safetensors)", "missing_file", "file")
            data = await upload.read(limits.max_eraser_bytes + 1)
            if len(data) > limits.max_eraser_bytes:
                raise PolicyError(400, f"eraser larger than {limits.max_eraser_bytes} bytes", "eraser_too_large", "file")
            name = name or Path(upload.filename or "").stem
            source: bytes | Path = data
            tenants = [key for key in str(tenants).split(",") if key]
        else:
            body = AddEraser.of(await json_body(request))
            path, name, tenants = body.path, body.name, body.tenants
            if path is None:
                raise PolicyError(400, "give 'path' (a .safetensors on the server) as JSON, or upload 'file' as "
                                  "multipart/form-data", "missing_path", "path")
            source, name = Path(path), name or Path(path).stem
        if not isinstance(name, str) or not name:
            raise PolicyError(400, "name the eraser ('name')", "missing_name", "name")
        registry.check_new(name, tenants)  # before the load: a taken name costs nothing
        eraser = await run_in_threadpool(_load_eraser, source)
        saved = await install(name, eraser, tenants, "added" if isinstance(source, Path) else "uploaded",
                              _bearer(request))
        return JSONResponse({"name": name, "terms": eraser.num_terms, "saved": None if saved is None else str(saved),
                             "erasers": registry.names()}, status_code=201)

    @app.post("/admin/requests", status_code=201)
    async def admin_fit(request: Request):
        """A deletion request fitted here: {"name", "forget": a split or server-side file, or [{"question",
        "answer", "image"?}], "tenants"?}. Only the forget set runs through the model (the model cache holds
        the rest), on the batcher thread between batches; the eraser applies from the next batch."""
        require_admin(request)
        if fitter is None:
            raise PolicyError(400, "this server fits no requests: start it with --data DIR (the retain, erasure "
                              "and calibration sets of the model cache)", "fitting_disabled")
        body = FitRequest.of(await json_body(request))
        name, tenants = body.name, body.tenants
        if not name:
            raise PolicyError(400, "name the request ('name')", "missing_name", "name")
        registry.check_new(name, tenants)  # what would refuse the eraser after its fit is refused before it
        items = await run_in_threadpool(fitter.items, body.forget,
                                        lambda url, param: decode_image(url, limits, param))
        digest = await run_in_threadpool(forget_digest, items)
        eraser, record = await asyncio.wrap_future(engine.call(lambda: fitter.fit(name, items)))
        metrics.count_fit(record["fit_seconds"])
        saved = await install(name, eraser, tenants, "fitted", _bearer(request), forget_sha256=digest,
                              forget_questions=len(items), fit_seconds=record["fit_seconds"])
        return JSONResponse({"name": name, "terms": eraser.num_terms, **record,
                             "saved": None if saved is None else str(saved), "erasers": registry.names()},
                            status_code=201)

    @app.delete("/admin/erasers/{name}")
    async def admin_remove(name: str, request: Request) -> dict:
        """Withdraw a request: out of the store's manifest first (a restart never serves it again), then unloaded."""
        require_admin(request)
        async with admin_lock:
            if name not in registry.names():
                raise PolicyError(404, f"no eraser named {name!r} is loaded", "unknown_eraser", "name")
            if store is not None:
                try:
                    await run_in_threadpool(store.delete, name, _bearer(request))
                except OSError as exc:
                    raise PolicyError(500, f"the deletion could not be saved ({exc.strerror or exc}); the eraser is "
                                      "still loaded", "save_failed", kind="server_error") from None
            await run_in_threadpool(registry.remove, name)
            metrics.count_admin("deleted")
        return {"name": name, "deleted": True, "erasers": registry.names()}

    @app.post("/admin/bindings")
    async def admin_bind(request: Request) -> dict:
        """{"tenant": API key, "bind": [names], "unbind": [names]}: a tenant's bound erasers changed (a new key
        is created), persisted before the answer. The key goes back only as a digest."""
        require_admin(request)
        body = Binding.of(await json_body(request))
        key, bind, unbind = body.tenant, body.bind, body.unbind
        async with admin_lock:
            registry.check_bind(key, bind, unbind)
            if store is not None:
                try:
                    await run_in_threadpool(store.bind, key, bind, unbind, _bearer(request))
                except OSError as exc:
                    raise PolicyError(500, f"the binding could not be saved ({exc.strerror or exc}); nothing "
                                      "changed", "save_failed", kind="server_error") from None
            registry.bind(key, bind, unbind)
            metrics.count_admin("bound")
        return {"tenant": short_digest(key), "erasers": registry.bindings(key)}

    return app


def _usage(done: dict) -> dict:
    return {"prompt_tokens": done["prompt_tokens"], "completion_tokens": done["completion_tokens"],
            "total_tokens": done["prompt_tokens"] + done["completion_tokens"]}


def _load_eraser(source: bytes | Path) -> Eraser:
    """Eraser.load (safetensors, validated) from a server-side path or uploaded bytes; a problem is a 400."""
    try:
        if isinstance(source, Path):
            return Eraser.load(source)
        handle, name = tempfile.mkstemp(suffix=".safetensors")
        try:
            with os.fdopen(handle, "wb") as fh:
                fh.write(source)
            return Eraser.load(name)
        finally:
            os.unlink(name)
    except UserInputError as exc:
        problem = exc.problem if not isinstance(source, Path) else str(exc)
        raise PolicyError(400, f"not a loadable eraser: {problem}", "invalid_eraser", "file" if not isinstance(
            source, Path) else "path") from None
