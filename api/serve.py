"""`hybridnas serve`: the coordinator (API + job runner + scheduler) under uvicorn.

SIGTERM or Ctrl-C: uvicorn stops taking requests, then the app's lifespan stops the scheduler and the runner,
whose running jobs go back to the queue with their leases released (see `api/runner.py`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path


def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    data_dir: Path | None = None,
    runners: int | None = None,
    scheduler: bool | None = None,
    log_level: str = "info",
) -> None:
    import uvicorn

    from api.app import create_app
    from api.settings import Settings

    if data_dir is not None:
        os.environ["HYBRIDNAS_DATA_DIR"] = str(data_dir)  # Ray workers and child processes see the same one
    overrides = {k: v for k, v in {"runners": runners, "scheduler": scheduler}.items() if v is not None}
    settings = Settings(**overrides)
    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    database = settings.resolved_database_url()
    # The URL may hold a password: show only the backend and where it lives.
    from sqlalchemy.engine import make_url

    url = make_url(database)
    where = (
        url.database if url.get_backend_name() == "sqlite" else f"{url.host}:{url.port or ''}/{url.database}"
    )
    logging.getLogger("hybridnas.serve").info(
        "coordinator on http://%s:%d (OpenAPI at /docs); data dir %s; database %s %s; runners %d; scheduler "
        "%s",
        host,
        port,
        settings.resolved_data_dir(),
        url.get_backend_name(),
        where,
        settings.runners,
        "on" if settings.scheduler else "off",
    )
    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=30,
        limit_concurrency=settings.max_concurrent_requests,
    )
