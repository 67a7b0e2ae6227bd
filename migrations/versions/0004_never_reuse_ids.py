"""Ids are never reused after a delete: SQLite tables keyed by an integer id become AUTOINCREMENT tables
(PostgreSQL's sequences already never hand out a value twice, so nothing changes there).

SQLite cannot add AUTOINCREMENT to a table in place: each table is copied into a new one declared with it
(batch mode), keeping its rows, ids, indexes and constraints; the sequence starts after the largest id. The
copy reflects the live table, so offline `--sql` output for SQLite leaves the tables as they are.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 16:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import context, op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID_TABLES = ("schedules", "jobs", "schedule_fires", "candidates", "hypervolume_history")


def _recreate(autoincrement: bool) -> None:
    if context.is_offline_mode() or op.get_bind().dialect.name != "sqlite":
        return
    for table in ID_TABLES:
        with op.batch_alter_table(
            table, recreate="always", table_kwargs={"sqlite_autoincrement": autoincrement}
        ):
            pass


def upgrade() -> None:
    _recreate(True)


def downgrade() -> None:
    _recreate(False)
