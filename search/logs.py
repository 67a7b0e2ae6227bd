"""Logging in one format for the whole process: hybridnas's own loggers, uvicorn's and Ray's driver-side ones
all go through the root logger's one handler on stderr, as text or as JSON lines (`HYBRIDNAS_LOG_FORMAT=json`,
one object per record: `time`, `level`, `logger`, `message`, and `exception` when there is one)."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Libraries that install handlers of their own: their records are re-routed to the root handler.
ADOPTED_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "ray", "alembic")

QUIET_LOGGERS = ("ray", "alembic", "httpx", "httpx2", "httpcore")

_configured: dict[str, str] = {}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def check_level(level: str) -> str:
    if level.lower() not in LEVELS:
        raise ValueError(f"log level {level!r} is not one of {', '.join(LEVELS)}")
    return level.lower()


def check_format(fmt: str) -> str:
    if fmt.lower() not in FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {', '.join(FORMATS)}")
    return fmt.lower()


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    """One stderr handler on the root logger, at `level`, in `fmt` (text or json)."""
    level, fmt = check_level(level), check_format(fmt)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    # On the handler too: a logger that lowers its own level (the worker's, to keep its log tail) still
    # propagates its records here.
    handler.setLevel(level.upper())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    _configured.update(level=level, format=fmt)
    adopt_library_loggers()


def adopt_library_loggers() -> None:
    """Send uvicorn's, Ray's and Alembic's records to the root handler (they install their own on import or
    start); a no-op until `configure_logging` ran, so a library user's own logging set-up stays untouched."""
    if not _configured:
        return
    for name in ADOPTED_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    # Ray, Alembic and httpx log each step (start-up, migration, request) at INFO: noise beside a command's
    # own output, unless debugging.
    debugging = _configured["level"] == "debug"
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if debugging else logging.WARNING)
