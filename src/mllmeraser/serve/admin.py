"""The admin endpoints: load, upload, fit, unload and bind erasers without a restart.

With a store (store.py: `--erasers DIR`), every admin change is written there before it is acknowledged and
logged to its audit log; admin changes are serialised by one lock, and the registry work they do (fingerprint
check, stacking) runs in the thread pool, off the event loop the streams run on.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ..core.eraser import Eraser
from ..errors import UserInputError
from .audit import canonical_digest, forget_digest, short_digest
from .engine import Engine
from .fitter import RequestFitter
from .http import bearer, json_body, require_admin
from .messages import decode_image
from .metrics import Metrics
from .policy import PolicyError, Registry
from .schema import AddEraser, Binding, FitRequest
from .settings import ServeSettings
from .store import Store


def add_admin_routes(app: FastAPI, engine: Engine, registry: Registry, settings: ServeSettings, metrics: Metrics,
                     fitter: RequestFitter | None = None, store: Store | None = None) -> None:
    """The admin endpoints on `app`. With a `fitter`, `POST /admin/requests` fits deletion requests on the served
    model (on the batcher thread, `engine`). With a `store` (holding the names the registry was built from),
    every admin change is persisted there and audited before its 2xx."""
    limits = settings.limits
    admin_lock = asyncio.Lock()  # one admin change at a time: store and registry move in step
    fingerprint = registry.fingerprint
    model_digest = None if fingerprint is None else canonical_digest(fingerprint)[:16]

    @app.get("/admin/erasers")
    async def admin_list(request: Request) -> dict:
        require_admin(request, settings)
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
        require_admin(request, settings)
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
            body = AddEraser.of(await json_body(request, limits))
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
                              bearer(request))
        return JSONResponse({"name": name, "terms": eraser.num_terms, "saved": None if saved is None else str(saved),
                             "erasers": registry.names()}, status_code=201)

    @app.post("/admin/requests", status_code=201)
    async def admin_fit(request: Request):
        """A deletion request fitted here: {"name", "forget": a split or server-side file, or [{"question",
        "answer", "image"?}], "tenants"?}. Only the forget set runs through the model (the model cache holds
        the rest), on the batcher thread between batches; the eraser applies from the next batch."""
        require_admin(request, settings)
        if fitter is None:
            raise PolicyError(400, "this server fits no requests: start it with --data DIR (the retain, erasure "
                              "and calibration sets of the model cache)", "fitting_disabled")
        body = FitRequest.of(await json_body(request, limits))
        name, tenants = body.name, body.tenants
        if not name:
            raise PolicyError(400, "name the request ('name')", "missing_name", "name")
        registry.check_new(name, tenants)  # what would refuse the eraser after its fit is refused before it
        items = await run_in_threadpool(fitter.items, body.forget,
                                        lambda url, param: decode_image(url, limits, param))
        digest = await run_in_threadpool(forget_digest, items)
        eraser, record = await asyncio.wrap_future(engine.call(lambda: fitter.fit(name, items)))
        metrics.count_fit(record["fit_seconds"])
        saved = await install(name, eraser, tenants, "fitted", bearer(request), forget_sha256=digest,
                              forget_questions=len(items), fit_seconds=record["fit_seconds"])
        return JSONResponse({"name": name, "terms": eraser.num_terms, **record,
                             "saved": None if saved is None else str(saved), "erasers": registry.names()},
                            status_code=201)

    @app.delete("/admin/erasers/{name}")
    async def admin_remove(name: str, request: Request) -> dict:
        """Withdraw a request: out of the store's manifest first (a restart never serves it again), then unloaded."""
        require_admin(request, settings)
        async with admin_lock:
            if name not in registry.names():
                raise PolicyError(404, f"no eraser named {name!r} is loaded", "unknown_eraser", "name")
            if store is not None:
                try:
                    await run_in_threadpool(store.delete, name, bearer(request))
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
        require_admin(request, settings)
        body = Binding.of(await json_body(request, limits))
        key, bind, unbind = body.tenant, body.bind, body.unbind
        async with admin_lock:
            registry.check_bind(key, bind, unbind)
            if store is not None:
                try:
                    await run_in_threadpool(store.bind, key, bind, unbind, bearer(request))
                except OSError as exc:
                    raise PolicyError(500, f"the binding could not be saved ({exc.strerror or exc}); nothing "
                                      "changed", "save_failed", kind="server_error") from None
            registry.bind(key, bind, unbind)
            metrics.count_admin("bound")
        return {"tenant": short_digest(key), "erasers": registry.bindings(key)}


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
