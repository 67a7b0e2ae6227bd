"""Studies: a job may belong to another (`parent_id`: a study's runs, deleted with it) and carry a result
(`result`: a study's report, as JSON).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 16:10:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# SQLite rebuilds the table to add a foreign key: keep it an AUTOINCREMENT table (0004).
TABLE_KWARGS = {"sqlite_autoincrement": True}


def _offline_sqlite() -> bool:
    """Offline `--sql` output for SQLite: the table copy needs the live table, so the columns are added in
    place (without the foreign key, which SQLite cannot add to an existing table)."""
    return context.is_offline_mode() and op.get_context().dialect.name == "sqlite"


def upgrade() -> None:
    if _offline_sqlite():
        op.add_column("jobs", sa.Column("parent_id", sa.Integer(), nullable=True))
        op.add_column("jobs", sa.Column("result", sa.JSON(), nullable=True))
        op.create_index("ix_jobs_parent_id", "jobs", ["parent_id"])
        return
    with op.batch_alter_table("jobs", table_kwargs=TABLE_KWARGS) as batch:
        batch.add_column(sa.Column("parent_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("result", sa.JSON(), nullable=True))
        batch.create_foreign_key("fk_jobs_parent_id_jobs", "jobs", ["parent_id"], ["id"], ondelete="CASCADE")
        batch.create_index("ix_jobs_parent_id", ["parent_id"])


def downgrade() -> None:
    with op.batch_alter_table("jobs", table_kwargs=TABLE_KWARGS) as batch:
        batch.drop_index("ix_jobs_parent_id")
        batch.drop_constraint("fk_jobs_parent_id_jobs", type_="foreignkey")
        batch.drop_column("result")
        batch.drop_column("parent_id")
