"""`hybridnas serve`: the coordinator (API + job runner + scheduler) under uvicorn.

One process by default. With `HYBRIDNAS_API_WORKERS=N` (N > 1) the API is served by N worker processes
(uvicorn's supervisor, one shared socket) while the job runner and the scheduler run once, in the supervising
process: a coordinator never runs two runners. The workers' read caches then see another process's writes
after at most `HYBRIDNAS_READ_CACHE_S` on PostgreSQL (on SQLite at once: see `Storage.generation`).

SIGTERM or Ctrl-C: at the first signal, live event streams end and the runner hands its jobs back at once
(their in-flight evaluations back to pending, leases released, so another coordinator takes them); uvicorn
then drains the remaining requests; the process exits 0. Ray's own signal handling is kept out of it
(`search.executors.import_ray`), and the local Ray is shut down from the thread that started it, so no Ray
process outlives the coordinator.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path

GRACEFUL_SHUTDOWN_S = 30
CONNECTION_BACKSTOP = 2048  # open connections and tasks uvicorn accepts before its own 503s
# The interpreter lock changes hands every 1 ms instead of 5: the event loop (which admits or refuses each
# request) waits less behind the request threads; measured in benchmarks/results/api_sweep.md.
SWITCH_INTERVAL_S = 0.001
WORKER_SETTINGS_ENV = "HYBRIDNAS_WORKER_SETTINGS"  # the supervisor's settings, as JSON, for its API workers

log = logging.getLogger("hybridnas.serve")


def _where(database: str) -> str:
    """The backend and where the database lives; never the password."""
    from sqlalchemy.engine import make_url

    url = make_url(database)
    if url.get_backend_name() == "sqlite":
        return f"sqlite {url.database}"
    return f"{url.get_backend_name()} {url.host}:{url.port or ''}/{url.database}"


def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    data_dir: Path | None = None,
    runners: int | None = None,
    scheduler: bool | None = None,
    log_level: str | None = None,
) -> None:
    from api.settings import Settings
    from search.executors import quiet_ray_signals
    from search.logs import configure_logging

    quiet_ray_signals()
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    overrides = {"runners": runners, "scheduler": scheduler, "data_dir": data_dir}
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    settings.ensure_data_dir()
    log_level = log_level or settings.log_level
    configure_logging(log_level, settings.log_format)
    log.info(
        "coordinator on http://%s:%d (dashboard at /, OpenAPI at /docs); data dir %s; database %s; "
        "runners %d; scheduler %s; API processes %d",
        host,
        port,
        settings.resolved_data_dir(),
        _where(settings.resolved_database_url()),
        settings.runners,
        "on" if settings.scheduler else "off",
        settings.api_workers,
    )
    # uvicorn restores the handlers it found and raises the signal it caught again once it has stopped: with
    # these, that second delivery does nothing, and the process exits 0 instead of dying of the signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    if settings.api_workers > 1:
        _serve_workers(settings, host, port, log_level)
    else:
        _serve_one(settings, host, port, log_level)


def _config(app, settings, host: str, port: int, log_level: str, **extra):
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        log_config=None,  # uvicorn's records go to the process's one handler (search/logs.py)
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        limit_concurrency=CONNECTION_BACKSTOP,  # admission (api/admission.py) is the real limit
        **extra,
    )


def _serve_one(settings, host: str, port: int, log_level: str) -> None:
    import uvicorn

    from api.app import begin_shutdown, create_app, quiet_collector

    app = create_app(settings)
    quiet_collector()

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame) -> None:
            begin_shutdown(app)
            super().handle_exit(sig, frame)

    Server(_config(app, settings, host, port, log_level)).run()


def worker_app():
    """The app of one API worker process (`HYBRIDNAS_API_WORKERS` > 1), from the supervisor's settings."""
    from api.app import create_app, quiet_collector
    from api.settings import Settings
    from search.logs import configure_logging

    sys.setswitchinterval(SWITCH_INTERVAL_S)
    settings = Settings.model_validate_json(os.environ[WORKER_SETTINGS_ENV])
    configure_logging(settings.log_level, settings.log_format)
    app = create_app(settings)
    quiet_collector()
    return app


def _serve_workers(settings, host: str, port: int, log_level: str) -> None:
    """API workers under uvicorn's supervisor; the runner and the scheduler here, once."""
    from uvicorn.supervisors import Multiprocess

    from api.app import start_background
    from search.storage import Storage

    storage = Storage(settings.resolved_database_url())
    storage.create_schema()  # once, before the workers start
    background = start_background(settings, storage)
    os.environ[WORKER_SETTINGS_ENV] = settings.model_copy(
        update={"runners": 0, "scheduler": False}
    ).model_dump_json()
    config = _config(
        "api.serve:worker_app", settings, host, port, log_level, factory=True, workers=settings.api_workers
    )

    class Supervisor(Multiprocess):
        def _early_stop(self) -> None:  # leases released at the signal, not after the workers drain
            threading.Thread(target=background.stop, name="hybridnas-shutdown", daemon=True).start()

        def handle_term(self) -> None:
            self._early_stop()
            super().handle_term()

        def handle_int(self) -> None:
            self._early_stop()
            super().handle_int()

    try:
        Supervisor(config, sockets=[config.bind_socket()]).run()
    finally:
        background.stop()
        storage.close()
