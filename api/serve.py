"""`hybridnas serve`: the coordinator (API + job runner + scheduler) under uvicorn.

SIGTERM or Ctrl-C: at the first signal, live event streams end and the runner hands its jobs back at once
(their in-flight evaluations back to pending, leases released, so another coordinator takes them); uvicorn
then drains the remaining requests and the app's lifespan finishes the stop; the process exits 0. Ray's own
signal handling is kept out of it (`search.executors.import_ray`), and the local Ray is shut down from the
thread that started it, so no Ray process outlives the coordinator.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

GRACEFUL_SHUTDOWN_S = 30


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
    log_level: str = "info",
) -> None:
    import uvicorn

    from api.app import begin_shutdown, create_app
    from api.settings import Settings
    from search.executors import quiet_ray_signals

    quiet_ray_signals()
    overrides = {"runners": runners, "scheduler": scheduler, "data_dir": data_dir}
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    settings.ensure_data_dir()
    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("hybridnas.serve").info(
        "coordinator on http://%s:%d (OpenAPI at /docs); data dir %s; database %s; runners %d; scheduler %s",
        host,
        port,
        settings.resolved_data_dir(),
        _where(settings.resolved_database_url()),
        settings.runners,
        "on" if settings.scheduler else "off",
    )
    app = create_app(settings)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame) -> None:
            begin_shutdown(app)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        limit_concurrency=settings.max_concurrent_requests,
    )
    # uvicorn restores the handlers it found and raises the signal it caught again once it has stopped: with
    # these, that second delivery does nothing, and the process exits 0 instead of dying of the signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    Server(config).run()
