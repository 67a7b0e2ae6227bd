"""Alembic environment for hybridnas (models: `search.db.Base.metadata`).

The database URL, first found wins: a connection handed in by `Storage.create_schema()`
(`config.attributes["connection"]`), `alembic -x url=...`, then the service's own settings
(`HYBRIDNAS_DATABASE_URL` or `DATABASE_URL`, else SQLite under `HYBRIDNAS_DATA_DIR`), so `alembic upgrade
head`, `hybridnas db upgrade` and `hybridnas serve` always agree on the database. Connections are made
through `search.storage.Storage`, so SQLite gets the same pragmas as the application (WAL, busy timeout).

SQLite: migrations run in batch mode (`render_as_batch`: ALTERs become copy-and-move, which is why the
MetaData has a naming convention), with foreign-key enforcement off while they run (else the table copy of a
batch migration could cascade deletes), all in one transaction holding the write lock. PostgreSQL: one
transaction under an advisory lock, so coordinators starting together upgrade once.
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import JSON, Connection

from search.db import Base, UTCDateTime
from search.storage.engines import normalize_database_url

config = context.config
target_metadata = Base.metadata
MIGRATION_LOCK_ID = 0x6879626E  # "hybn": pg_advisory_xact_lock key held while migrating

if config.config_file_name is not None and config.attributes.get("configure_logging", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def render_item(type_: str, obj: object, autogen_context: object) -> str | bool:
    """Autogenerate writes plain SQLAlchemy types, so revisions do not import the application's code."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    if type_ == "type" and isinstance(obj, JSON):
        return "sa.JSON()"
    return False


def database_url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url")
    if url:
        return normalize_database_url(url)
    from api.settings import Settings

    settings = Settings()
    if settings.database_url is None:  # the embedded default: SQLite in the data dir, made on first use
        settings.ensure_data_dir()
    return settings.resolved_database_url()


def run_migrations_offline() -> None:
    url = database_url()
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=url.startswith("sqlite"),
        dialect_opts={"paramstyle": "named"},
        render_item=render_item,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_on(connection: Connection) -> None:
    sqlite = connection.dialect.name == "sqlite"
    raw = connection.connection.driver_connection if sqlite else None
    if sqlite and not connection.in_transaction():
        raw.execute("PRAGMA foreign_keys = OFF")  # no effect inside a transaction: set before it begins
    try:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=sqlite,
            transactional_ddl=True,
            compare_type=True,
            render_item=render_item,
        )
        with context.begin_transaction():
            if connection.dialect.name == "postgresql":
                connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_ID})")
            context.run_migrations()
    finally:
        if sqlite and not connection.in_transaction():
            raw.execute("PRAGMA foreign_keys = ON")


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        run_on(connection)
        return
    from search.storage import Storage

    storage = config.attributes.get("storage") or Storage(database_url())
    try:
        with storage.engine.connect() as conn:
            if storage.is_sqlite:
                conn = conn.execution_options(sqlite_begin="IMMEDIATE")
            run_on(conn)
    finally:
        if "storage" not in config.attributes:
            storage.close()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
