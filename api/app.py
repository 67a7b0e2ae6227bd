"""The coordinator's FastAPI application: `create_app(settings=None, storage=None)`.

Thin routes (`api/routes/`), request/response schemas (`api/schemas.py`) kept apart from the storage records,
settings in one place (`api/settings.py`; auth's own in `api/auth.py`). OpenAPI at `/docs`.

Beside the API, one process runs the job runner (`api/runner.py`) and the scheduler (`api/scheduler.py`)
unless the settings turn them off (`HYBRIDNAS_RUNNERS=0`, `HYBRIDNAS_SCHEDULER=false`). Bad input is
never a 500: validation errors are 422 with the field path and a message; unknown ids 404; a storage
`ValueError` (an unknown status, say) 422; a `KeyError` from storage 404; `StorageError` and a database that
cannot be reached 503.
"""

from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sa_exc

from api.admission import Admission
from api.auth import Auth, AuthSettings, build_auth
from api.bodies import BodyGuard
from api.cache import ReadCache
from api.errors import NAMED_FIELD, validation_errors
from api.errors import summary as error_summary
from api.routes import ROUTERS
from api.settings import Settings, get_settings
from search.storage import Storage, StorageError
from web.assets import install_assets
from web.pages import install_pages

log = logging.getLogger("hybridnas.api")


def _install_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = validation_errors(list(exc.errors()))
        summary = error_summary(errors)
        return JSONResponse({"detail": errors, "message": summary}, status_code=422)

    @app.exception_handler(ValueError)
    async def _value_error(_request: Request, exc: ValueError) -> JSONResponse:
        # The same shape as a validation error, so clients parse one 422 format.
        named = NAMED_FIELD.match(str(exc))
        field, msg = (named.group(1), named.group(2)) if named else ("", str(exc))
        errors = [
            {"loc": field.split(".") if field else [], "field": field, "msg": msg, "type": "value_error"}
        ]
        return JSONResponse({"detail": errors, "message": f"{field or 'request'}: {msg}"}, status_code=422)

    @app.exception_handler(KeyError)
    async def _key_error(_request: Request, exc: KeyError) -> JSONResponse:
        return JSONResponse({"detail": str(exc.args[0]) if exc.args else "not found"}, status_code=404)

    @app.exception_handler(sa_exc.DataError)
    async def _out_of_range(_request: Request, exc: sa_exc.DataError) -> JSONResponse:
        # A value the database refuses (a number out of a column's range): bad input that slipped past the
        # schemas, never a 500.
        log.warning(
            "database refused a value: %s", type(exc.orig).__name__ if exc.orig else type(exc).__name__
        )
        return JSONResponse(
            {
                "detail": [
                    {
                        "loc": [],
                        "field": "",
                        "msg": "a value is out of the range the database accepts",
                        "type": "value_error",
                    }
                ],
                "message": "a value is out of range",
            },
            status_code=422,
        )

    @app.exception_handler(StorageError)
    async def _storage_error(_request: Request, exc: StorageError) -> JSONResponse:
        log.error("storage error: %s", exc)
        return JSONResponse({"detail": "storage unavailable"}, status_code=503)

    @app.exception_handler(sa_exc.OperationalError)
    async def _db_down(_request: Request, exc: sa_exc.OperationalError) -> JSONResponse:
        log.error("database error: %s", type(exc).__name__)
        return JSONResponse(
            {"detail": "database unavailable, retry later"}, status_code=503, headers={"Retry-After": "5"}
        )


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
    install_assets(app)
    install_pages(app)
    return app
