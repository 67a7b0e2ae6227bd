"""The coordinator's FastAPI application: `create_app(settings=None, storage=None)`.

Thin routes (`api/routes/`), request/response schemas (`api/schemas.py`) kept apart from the storage records,
settings in one place (`api/settings.py`; auth's own in `api/auth.py`). OpenAPI at `/docs`.

Beside the API, one process runs the job runner (`api/runner.py`) and the scheduler (`api/scheduler.py`)
unless the settings turn them off (`HYBRIDNAS_RUNNERS=0`, `HYBRIDNAS_SCHEDULER=false`).

Every 4xx and 5xx is RFC 9457 problem details (`application/problem+json`, `api/errors.py`), documented per
route in the OpenAPI document. Bad input is never a 500: validation errors are 422 with `errors[]` naming each
field; unknown ids and routes 404; a storage `ValueError` (an unknown status, say) 422; a `KeyError` from
storage 404; `StorageError` and a database that cannot be reached 503; anything unexpected a 500 with a
generic detail (the traceback goes to the server's log only).
"""

from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.admission import Admission
from api.auth import Auth, AuthSettings, build_auth
from api.bodies import BodyGuard
from api.cache import ReadCache
from api.errors import NAMED_FIELD, problem, problem_media_types, validation_errors
from api.errors import summary as error_summary
from api.routes import ROUTERS
from api.routes.tunes import router as tunes_router
from api.settings import Settings, get_settings
from search.storage import Storage, StorageError
from web.assets import install_assets
from web.pages import install_pages

log = logging.getLogger("hybridnas.api")


_PHRASES = {s.value: s.phrase for s in HTTPStatus}


def _path(request: Request) -> str:
    return request.url.path


def _install_handlers(app: FastAPI) -> None:
    """Every error as RFC 9457 problem details (`api.errors.problem`, `application/problem+json`)."""

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        status = exc.status_code
        if status < 400:  # (not raised by this app; Starlette's own handling)
            return Response(status_code=status, headers=exc.headers)
        detail = str(exc.detail)
        generic = status in _PHRASES and detail == _PHRASES[status]  # raised by the router, not a route
        if generic and status == 404:
            detail = f"no such route: {request.url.path}"
        elif generic and status == 405:
            allowed = (exc.headers or {}).get("Allow")
            detail = f"{request.method} is not allowed on {request.url.path}" + (
                f" (allowed: {allowed})" if allowed else ""
            )
        return problem(status, detail=detail, instance=_path(request), headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        errors = validation_errors(list(exc.errors()))
        return problem(422, detail=error_summary(errors), errors=errors, instance=_path(request))

    @app.exception_handler(ValueError)
    async def _value_error(request: Request, exc: ValueError) -> Response:
        # The same shape as a validation error, so clients parse one 422 format.
        named = NAMED_FIELD.match(str(exc))
        field, msg = (named.group(1), named.group(2)) if named else ("", str(exc))
        errors = [
            {"loc": field.split(".") if field else [], "field": field, "msg": msg, "type": "value_error"}
        ]
        return problem(422, detail=f"{field or 'request'}: {msg}", errors=errors, instance=_path(request))

    @app.exception_handler(KeyError)
    async def _key_error(request: Request, exc: KeyError) -> Response:
        detail = str(exc.args[0]) if exc.args else "not found"
        return problem(404, detail=detail, instance=_path(request))

    @app.exception_handler(sa_exc.DataError)
    async def _out_of_range(request: Request, exc: sa_exc.DataError) -> Response:
        # A value the database refuses (a number out of a column's range): bad input that slipped past the
        # schemas, never a 500.
        log.warning(
            "database refused a value: %s", type(exc.orig).__name__ if exc.orig else type(exc).__name__
        )
        message = "a value is out of the range the database accepts"
        errors = [{"loc": [], "field": "", "msg": message, "type": "value_error"}]
        return problem(422, detail=message, errors=errors, instance=_path(request))

    @app.exception_handler(StorageError)
    async def _storage_error(request: Request, exc: StorageError) -> Response:
        log.error("storage error: %s", exc)
        return problem(503, detail="storage unavailable", type="unavailable", instance=_path(request))

    @app.exception_handler(sa_exc.OperationalError)
    async def _db_down(request: Request, exc: sa_exc.OperationalError) -> Response:
        log.error("database error: %s", type(exc).__name__)
        return problem(
            503,
            detail="database unavailable, retry later",
            type="unavailable",
            instance=_path(request),
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, _exc: Exception) -> Response:
        # Starlette's outermost middleware sends this, then re-raises: the server logs the traceback. The
        # client sees nothing of it (no trace, no message: it may hold paths or secrets).
        return problem(
            500,
            detail="an unexpected error occurred on the server; its log has the details",
            instance=_path(request),
        )


def _install_openapi(app: FastAPI) -> None:
    """The OpenAPI document with every error response as `application/problem+json` (api.errors)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = problem_media_types(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


class Background:
    """What runs beside the API in one coordinator process: the job runner and the scheduler (each
    optional)."""

    def __init__(self, runner: Any = None, scheduler: Any = None):
        self.runner, self.scheduler = runner, scheduler
        self._scheduler_stop = threading.Event()
        self._scheduler_thread: threading.Thread | None = None
        self._stop_lock = threading.Lock()
        self._stopped = False

    def start(self, interval_s: float) -> None:
        if self.runner is not None:
            self.runner.start()
        if self.scheduler is not None:
            self._scheduler_thread = threading.Thread(
                target=self.scheduler.run,
                args=(self._scheduler_stop, interval_s),
                name="hybridnas-scheduler",
                daemon=True,
            )
            self._scheduler_thread.start()

    def stop(self) -> None:
        """Idempotent, and safe from two threads at once (the signal's early stop and the lifespan's): the
        second caller waits for the first to finish."""
        with self._stop_lock:
            if self._stopped:
                return
            self._scheduler_stop.set()  # first: no new jobs while the runner hands its jobs back
            if self._scheduler_thread is not None:
                self._scheduler_thread.join(30)
            if self.runner is not None:
                self.runner.stop()
            self._stopped = True


def start_background(settings: Settings, storage: Storage) -> Background:
    runner = scheduler = None
    if settings.runners > 0:
        from api.runner import JobRunner

        runner = JobRunner(
            storage,
            settings.resolved_data_dir(),
            slots=settings.runners,
            max_running=settings.max_running_jobs,
            lease_s=settings.lease_s,
            poll_s=settings.poll_s,
            ray_num_cpus=settings.ray_num_cpus,
            data_roots=settings.resolved_data_roots(),
            tracking_uri=settings.mlflow_tracking_uri or "",  # these settings', not the environment's
        )
    if settings.scheduler:
        from datetime import timedelta

        from api.scheduler import Scheduler

        scheduler = Scheduler(storage, grace=timedelta(seconds=settings.scheduler_grace_s))
    background = Background(runner, scheduler)
    background.start(settings.scheduler_interval_s)
    return background


def quiet_collector() -> None:
    """For a server process (`hybridnas serve`, its API workers), once the app is built: keep the garbage
    collector from stalling requests: everything alive at start-up (modules, the
    SQLAlchemy metadata, the routes: over 100,000 objects) moves out of the collector's sight
    (`gc.freeze`), and full collections come ten times less often. Measured under load, full collections
    otherwise paused every thread for 60-100 ms several times a minute (benchmarks/results/api_sweep.md)."""
    import gc

    gc.collect()
    gc.freeze()
    young, middle, _old = gc.get_threshold()
    gc.set_threshold(young, middle, 100)


def begin_shutdown(app: FastAPI) -> None:
    """The first shutdown signal: live streams end, and the runner hands its jobs back at once (in a thread),
    without waiting for uvicorn to drain connections. The lifespan's own stop then finds it done."""
    if app.state.shutting_down.is_set():
        return
    app.state.shutting_down.set()
    background = app.state.background
    if background is not None:
        threading.Thread(target=background.stop, name="hybridnas-shutdown", daemon=True).start()


def create_app(
    settings: Settings | None = None, storage: Storage | None = None, *, auth: Auth | None = None
) -> FastAPI:
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
        import anyio.to_thread

        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.request_threads
        if owns_storage:
            storage.create_schema()
        background = start_background(settings, storage)
        _app.state.runner = background.runner
        _app.state.background = background
        try:
            yield
        finally:
            _app.state.shutting_down.set()
            background.stop()  # graceful (SIGTERM under uvicorn): leases released, jobs back in the queue
            if owns_storage:
                storage.close()

    app = FastAPI(
        title="hybridnas coordinator",
        version="0.1.0",
        lifespan=lifespan,
        description="Submit and inspect hybrid-architecture searches. Mutating routes need "
        "`Authorization: Bearer <token>`. The dashboard is at `/`.",
        docs_url=None,  # served from local files by web.assets (the machine may be offline)
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.storage = storage
    app.state.auth = auth
    app.state.shutting_down = threading.Event()  # set at the first shutdown signal: streams end
    app.state.background = None
    _install_handlers(app)
    _install_openapi(app)
    app.add_middleware(BodyGuard, max_bytes=settings.max_body_bytes)
    app.add_middleware(
        ReadCache,
        generation=lambda: storage.generation,
        ttl_s=settings.read_cache_s,
        key_on_auth=auth.require_token_for_reads,
    )
    app.add_middleware(Admission, limit=settings.max_concurrent_requests)  # outermost: refusals cost least
    for router in ROUTERS:
        app.include_router(router)
    app.include_router(tunes_router)
    install_assets(app)
    install_pages(app)
    return app
