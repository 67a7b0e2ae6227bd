"""Database backends for tests: SQLite in tmp_path, and a real PostgreSQL when one is configured.

PostgreSQL comes from `HYBRIDNAS_TEST_POSTGRES_URL` (`.ci/run` starts a server and sets it), e.g.
`postgresql+psycopg://hybridnas:hybridnas@127.0.0.1:5432/hybridnas_test`; that role must be allowed to create
databases. Each test gets a database of its own (`CREATE DATABASE ... TEMPLATE template0`, ~0.1 s), dropped
afterwards. Without the variable the PostgreSQL half of a test is skipped, except under `CI=true`, where it
fails: CI must never pass by skipping the real database.

Use in a test module (only for tests that touch the database):

    from tests import pg
    db_url = pg.db_url        # fixture: an empty database's URL per backend, parametrized ["sqlite",
    "postgresql"] storage = pg.storage      # fixture: a Storage per backend, schema at head, no rows (same
    parametrization)

and `with pg.backend_url("postgresql", tmp_path) as url:` (empty) or `pg.migrated_url(...)` (schema at head)
where a test needs more than one database, or a URL for a subprocess.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

POSTGRES_ENV = "HYBRIDNAS_TEST_POSTGRES_URL"
BACKENDS = ("sqlite", "postgresql")
_counter = itertools.count()


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def postgres_admin_url() -> str | None:
    return os.environ.get(POSTGRES_ENV) or None


def require_postgres() -> str:
    """The PostgreSQL URL, or skip the test (fail it under CI=true)."""
    url = postgres_admin_url()
    if url:
        return url
    message = (
        f"{POSTGRES_ENV} is not set: the PostgreSQL tests need a server "
        "(.ci/run installs and starts one; see tests/pg.py)"
    )
    if in_ci():
        pytest.fail(f"CI=true and {message}", pytrace=False)
    pytest.skip(message)


def _admin_engine(admin_url: str):
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    url = make_url(admin_url)
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    return url, create_engine(url, isolation_level="AUTOCOMMIT", poolclass=NullPool)


@contextmanager
def fresh_postgres_database(admin_url: str | None = None, template: str = "template0") -> Iterator[str]:
    """A new PostgreSQL database (a copy of `template`: empty by default) for the duration of the block;
    yields its URL (password included)."""
    url, engine = _admin_engine(admin_url or require_postgres())
    name = f"hybridnas_t_{os.getpid()}_{next(_counter)}_{uuid.uuid4().hex[:6]}"
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        _drop_database(engine, name)
        engine.dispose()


def _drop_database(engine, name: str, attempts: int = 20) -> None:
    """DROP DATABASE ... WITH (FORCE), retried while it is refused: FORCE cannot end an autovacuum worker
    (only a superuser may), and one may be cleaning the database the test just wrote a lot to."""
    from sqlalchemy.exc import OperationalError, ProgrammingError

    for attempt in range(attempts):
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            return
        except (OperationalError, ProgrammingError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.25)


@contextmanager
def backend_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """A URL of an empty database of the given backend ("sqlite" under tmp_path, or "postgresql")."""
    if backend == "sqlite":
        path = Path(tmp_path) / f"hybridnas-{next(_counter)}.db"
        yield f"sqlite:///{path}"
    elif backend == "postgresql":
        with fresh_postgres_database() as url:
            yield url
    else:
        raise ValueError(f"unknown backend {backend!r}")


# Per backend, a database migrated to head once per test process, copied for each `storage` test (a copy is
# faster than migrating); removed at exit. The migrations themselves are tested on empty databases (db_url).
_templates: dict[str, str] = {}


def _drop_templates() -> None:
    for backend, template in list(_templates.items()):
        if backend == "postgresql":
            with contextlib.suppress(Exception):
                _url, engine = _admin_engine(require_postgres())
                _drop_database(engine, template)
                engine.dispose()
        else:
            shutil.rmtree(Path(template).parent, ignore_errors=True)
        _templates.pop(backend, None)


def _schema_template(backend: str) -> str:
    from search.storage import Storage

    if backend in _templates:
        return _templates[backend]
    if not _templates:
        atexit.register(_drop_templates)
    if backend == "sqlite":
        template = str(Path(tempfile.mkdtemp(prefix="hybridnas-schema-")) / "template.db")
        url = f"sqlite:///{template}"
    else:
        admin, engine = _admin_engine(require_postgres())
        template = f"hybridnas_tpl_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        with engine.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{template}" TEMPLATE template0')
        engine.dispose()
        url = admin.set(database=template).render_as_string(hide_password=False)
    _templates[backend] = template
    store = Storage(url)
    try:
        store.create_schema()
    finally:
        store.close()  # no connection may stay open on a template database
    return template


@contextmanager
def migrated_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """A URL of a database of the given backend whose schema is at head (a copy of a migrated template)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")
    if backend == "postgresql":
        require_postgres()
    template = _schema_template(backend)
    if backend == "sqlite":
        path = Path(tmp_path) / f"hybridnas-{next(_counter)}.db"
        shutil.copyfile(template, path)
        yield f"sqlite:///{path}"
    else:
        with fresh_postgres_database(template=template) as url:
            yield url


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database per backend (no schema)."""
    with backend_url(request.param, tmp_path) as url:
        yield url


@pytest.fixture(params=BACKENDS)
def storage(request: pytest.FixtureRequest, tmp_path: Path):
    """A Storage per backend on a fresh database at the head revision, no rows."""
    from search.storage import Storage

    with migrated_url(request.param, tmp_path) as url:
        store = Storage(url)
        try:
            yield store
        finally:
            store.close()
