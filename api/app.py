"""The coordinator's FastAPI application: `create_app(settings=None, storage=None)`.

Thin routes (`api/routes/`), request/response schemas (`api/schemas.py`) kept apart from the storage records,
settings in one place (`api/settings.py`; auth's own in `api/auth.py`). OpenAPI at `/docs`.

This slice stores jobs only (status `queued`); the job runner and the scheduler plug in later. Bad input is
never a 500: validation errors are 422 with the field path and a message; unknown ids 404; a storage
`ValueError` (an unknown status, say) 422; a `KeyError` from storage 404; `StorageError` and a database that
cannot be reached 503.
"""
from __future__ import annotations

import logging
import re
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sa_exc

from api.auth import Auth, AuthSettings, build_auth
from api.routes import ROUTERS
from api.settings import Settings, get_settings
from search.storage import Storage, StorageError

log = logging.getLogger("hybridnas.api")
_NAMED_FIELD = re.compile(r"^([A-Za-z_][\w.]*): (.+)$", re.DOTALL)


def _field(loc: tuple | list) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    return ".".join(parts)


def _message(error: dict[str, Any]) -> str:
    msg = str(error.get("msg", "invalid value"))
    return msg.removeprefix("Value error, ")


def _validation_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for e in errors:
        loc = list(e.get("loc", ()))
        if e.get("type") == "json_invalid":
            out.append({"loc": loc, "field": "body", "msg": f"malformed JSON: {e.get('ctx', {}).get('error', '')}"
                        .rstrip(": "), "type": "json_invalid"})
            continue
        field, msg = _field(loc), _message(e)
        named = _NAMED_FIELD.match(msg)
        if not field and named:  # a model-level check that names its field ("space.widths: ...")
            field, msg = named.group(1), named.group(2)
            loc = [*loc, *field.split(".")]
        out.append({"loc": loc, "field": field, "msg": msg, "type": e.get("type", "value_error")})
    return out


def _install_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _validation_errors(list(exc.errors()))
        summary = "; ".join(f"{e['field'] or 'body'}: {e['msg']}" for e in errors)
        return JSONResponse({"detail": errors, "message": summary}, status_code=422)

    @app.exception_handler(ValueError)
    async def _value_error(_request: Request, exc: ValueError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(KeyError)
    async def _key_error(_request: Request, exc: KeyError) -> JSONResponse:
        return JSONResponse({"detail": str(exc.args[0]) if exc.args else "not found"}, status_code=404)

    @app.exception_handler(StorageError)
    async def _storage_error(_request: Request, exc: StorageError) -> JSONResponse:
        log.error("storage error: %s", exc)
        return JSONResponse({"detail": "storage unavailable"}, status_code=503)

    @app.exception_handler(sa_exc.OperationalError)
    async def _db_down(_request: Request, exc: sa_exc.OperationalError) -> JSONResponse:
        log.error("database error: %s", type(exc).__name__)
        return JSONResponse({"detail": "database unavailable, retry later"}, status_code=503,
                            headers={"Retry-After": "5"})


def create_app(settings: Settings | None = None, storage: Storage | None = None, *,
               auth: Auth | None = None) -> FastAPI:
    """The API. Without `storage`, one is opened on the settings' database and migrated to head at start-up
    (and closed at shutdown). Without `auth`, the token is taken from HYBRIDNAS_TOKEN or the data dir's token
    file (made now if missing: its path is logged, never the token)."""
    settings = settings or get_settings()
    owns_storage = storage is None
    if storage is None:
        storage = Storage(settings.resolved_database_url())
    if auth is None:
        auth = build_auth(settings.resolved_data_dir(), AuthSettings())

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        if owns_storage:
            storage.create_schema()
        try:
            yield
        finally:
            if owns_storage:
                storage.close()

    app = FastAPI(title="hybridnas coordinator", version="0.1.0", lifespan=lifespan,
                  description="Submit and inspect hybrid-architecture searches. Mutating routes need "
                              "`Authorization: Bearer <token>`.")
    app.state.settings = settings
    app.state.storage = storage
    app.state.auth = auth
    _install_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    return app
