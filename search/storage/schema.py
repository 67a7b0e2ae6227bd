"""The storage seam's schema: the Alembic migrations in `migrations/` create and change it (never
`metadata.create_all`), safely when several processes start at once."""

from __future__ import annotations

import threading
from importlib.resources import files
from pathlib import Path
from typing import Any

from sqlalchemy import Connection

from search.storage.engines import Connected
from search.storage.records import StorageError

# The installed `migrations` package (a source checkout's folder, or the wheel's copy): a real folder
# either way, which Alembic's script directory needs.
MIGRATIONS_DIR = Path(str(files("migrations")))
# Alembic's `context` and `op` are module-level proxies: one migration at a time per process. Across processes
# the database serializes them (see migrations/env.py).
_ALEMBIC_LOCK = threading.Lock()


class SchemaStore(Connected):
    def alembic_config(self, connection: Connection | None = None) -> Any:
        from alembic.config import Config

        if not (MIGRATIONS_DIR / "env.py").exists():
            raise StorageError(
                f"migrations not found at {MIGRATIONS_DIR}: the installed hybridnas package is incomplete "
                "(reinstall it)"
            )
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        config.attributes["storage"] = self
        if connection is not None:
            config.attributes["connection"] = connection
        return config

    def _run_alembic(self, action: str, revision: str) -> None:
        from alembic import command

        with _ALEMBIC_LOCK, self.engine.connect() as conn:
            if self.is_sqlite:
                conn = conn.execution_options(sqlite_begin="IMMEDIATE")
            getattr(command, action)(self.alembic_config(conn), revision)
        self.wrote()

    def create_schema(self, revision: str = "head") -> None:
        """Upgrade the database to `revision` (head): creates every table on an empty database. Idempotent,
        and safe when several processes start at once (SQLite: the write lock; PostgreSQL: an advisory
        lock)."""
        self._run_alembic("upgrade", revision)

    upgrade_schema = create_schema

    def downgrade_schema(self, revision: str = "base") -> None:
        self._run_alembic("downgrade", revision)

    def schema_revision(self) -> str | None:
        """The database's current Alembic revision (None: no schema)."""
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def head_revision(self) -> str | None:
        from alembic.script import ScriptDirectory

        return ScriptDirectory.from_config(self.alembic_config()).get_current_head()

    def schema_is_current(self) -> bool:
        return self.schema_revision() == self.head_revision()
