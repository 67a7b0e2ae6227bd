"""Indexes for candidate pages sorted by a metric and for the live evaluation feed (10,000-candidate
searches).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 10:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("val_bpb", "decode_ms", "n_params", "finished_at", "generation")


def upgrade() -> None:
    for column in COLUMNS:
        op.create_index(
            f"ix_candidates_job_id_{column}_id", "candidates", ["job_id", column, "id"], unique=False
        )


def downgrade() -> None:
    for column in reversed(COLUMNS):
        op.drop_index(f"ix_candidates_job_id_{column}_id", table_name="candidates")
