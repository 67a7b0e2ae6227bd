"""Multi-fidelity searches: `rung_runs` (one candidate's training at one rung: its key, values and the steps
the search spent on it) and `candidates.rung` (the rung a candidate's values were trained at).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 01:10:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE_KWARGS = {"sqlite_autoincrement": True}  # ids are never reused (0004)


def upgrade() -> None:
    op.create_table(
        "rung_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("candidate_id", sa.Integer(), nullable=False),
        sa.Column("rung", sa.Integer(), nullable=False),
        sa.Column("steps", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("training_key", sa.String(length=128), nullable=True),
        sa.Column("val_bpb", sa.Float(), nullable=True),
        sa.Column("objectives", sa.JSON(), nullable=True),
        sa.Column("steps_trained", sa.Integer(), nullable=True),
        sa.Column("continued_from_step", sa.Integer(), nullable=True),
        sa.Column("failure_reason", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["candidate_id"],
            ["candidates.id"],
            name="fk_rung_runs_candidate_id_candidates",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name="fk_rung_runs_job_id_jobs", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_rung_runs"),
        sa.UniqueConstraint("candidate_id", "rung", name="uq_rung_runs_candidate_id_rung"),
        **TABLE_KWARGS,
    )
    op.create_index("ix_rung_runs_job_id_status", "rung_runs", ["job_id", "status"])
    if context.is_offline_mode() and op.get_context().dialect.name == "sqlite":
        op.add_column("candidates", sa.Column("rung", sa.Integer(), nullable=True))
        return
    with op.batch_alter_table("candidates", table_kwargs=TABLE_KWARGS) as batch:
        batch.add_column(sa.Column("rung", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("candidates", table_kwargs=TABLE_KWARGS) as batch:
        batch.drop_column("rung")
    op.drop_index("ix_rung_runs_job_id_status", table_name="rung_runs")
    op.drop_table("rung_runs")
