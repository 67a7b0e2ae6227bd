"""Initial schema: jobs, candidates, shared training/latency results, hypervolume history, strategy state,
schedules and schedule fires.

Revision ID: 0001
Revises:
Create Date: 2026-11-27 08:00:39.506472
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "latency_results",
        sa.Column("latency_key", sa.String(length=128), nullable=False),
        sa.Column("layout_hash", sa.String(length=128), nullable=False),
        sa.Column("latency_config_hash", sa.String(length=128), nullable=True),
        sa.Column("device_fingerprint", sa.JSON(), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("decode_ms", sa.Float(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("latency_key", name=op.f("pk_latency_results")),
    )
    with op.batch_alter_table("latency_results", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_latency_results_layout_hash"), ["layout_hash"], unique=False)

    op.create_table(
        "schedules",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("cron", sa.String(length=200), nullable=False),
        sa.Column("timezone", sa.String(length=64), nullable=False),
        sa.Column("template", sa.JSON(), nullable=False),
        sa.Column("enabled", sa.Boolean(), server_default=sa.true(), nullable=False),
        sa.Column("warm_start", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("priority", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_due_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_schedules")),
    )
    op.create_table(
        "training_results",
        sa.Column("training_key", sa.String(length=128), nullable=False),
        sa.Column("layout_hash", sa.String(length=128), nullable=False),
        sa.Column("proxy_config_hash", sa.String(length=128), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("val_bpb", sa.Float(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("artifact_path", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("training_key", name=op.f("pk_training_results")),
    )
    with op.batch_alter_table("training_results", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_training_results_layout_hash"), ["layout_hash"], unique=False)

    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("priority", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("n_evaluations", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("budget", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("idempotency_key", sa.String(length=200), nullable=True),
        sa.Column("schedule_id", sa.Integer(), nullable=True),
        sa.Column("lease_owner", sa.String(length=200), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["schedule_id"], ["schedules.id"], name=op.f("fk_jobs_schedule_id_schedules"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_jobs_idempotency_key")),
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_jobs_kind"), ["kind"], unique=False)
        batch_op.create_index(batch_op.f("ix_jobs_schedule_id"), ["schedule_id"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_jobs_status_priority_created_at"),
            ["status", "priority", "created_at"],
            unique=False,
        )

    op.create_table(
        "candidates",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("layout_hash", sa.String(length=128), nullable=False),
        sa.Column("layout", sa.JSON(), nullable=False),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.Column("generation", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("mutation", sa.JSON(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("failure_reason", sa.Text(), nullable=True),
        sa.Column("traceback", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("training_key", sa.String(length=128), nullable=True),
        sa.Column("latency_key", sa.String(length=128), nullable=True),
        sa.Column("val_bpb", sa.Float(), nullable=True),
        sa.Column("decode_ms", sa.Float(), nullable=True),
        sa.Column("n_params", sa.BigInteger(), nullable=True),
        sa.Column("objectives", sa.JSON(), nullable=True),
        sa.Column("on_front", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_candidates_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["parent_id"],
            ["candidates.id"],
            name=op.f("fk_candidates_parent_id_candidates"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_candidates")),
        sa.UniqueConstraint("job_id", "layout_hash", name=op.f("uq_candidates_job_id_layout_hash")),
    )
    with op.batch_alter_table("candidates", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_candidates_job_id_on_front"), ["job_id", "on_front"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_candidates_job_id_status"), ["job_id", "status"], unique=False)
        batch_op.create_index(batch_op.f("ix_candidates_latency_key"), ["latency_key"], unique=False)
        batch_op.create_index(batch_op.f("ix_candidates_layout_hash"), ["layout_hash"], unique=False)
        batch_op.create_index(batch_op.f("ix_candidates_parent_id"), ["parent_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_candidates_training_key"), ["training_key"], unique=False)

    op.create_table(
        "hypervolume_history",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("n_evaluations", sa.Integer(), nullable=False),
        sa.Column("hypervolume", sa.Float(), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_hypervolume_history_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_hypervolume_history")),
        sa.UniqueConstraint(
            "job_id", "n_evaluations", name=op.f("uq_hypervolume_history_job_id_n_evaluations")
        ),
    )
    op.create_table(
        "schedule_fires",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("schedule_id", sa.Integer(), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("fired_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_schedule_fires_job_id_jobs"), ondelete="SET NULL"
        ),
        sa.ForeignKeyConstraint(
            ["schedule_id"],
            ["schedules.id"],
            name=op.f("fk_schedule_fires_schedule_id_schedules"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_schedule_fires")),
        sa.UniqueConstraint("schedule_id", "due_at", name=op.f("uq_schedule_fires_schedule_id_due_at")),
    )
    op.create_table(
        "strategy_state",
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("state", sa.JSON(), nullable=False),
        sa.Column("version", sa.Integer(), server_default=sa.text("1"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_strategy_state_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("job_id", name=op.f("pk_strategy_state")),
    )


def downgrade() -> None:
    op.drop_table("strategy_state")
    op.drop_table("schedule_fires")
    op.drop_table("hypervolume_history")
    with op.batch_alter_table("candidates", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_candidates_training_key"))
        batch_op.drop_index(batch_op.f("ix_candidates_parent_id"))
        batch_op.drop_index(batch_op.f("ix_candidates_layout_hash"))
        batch_op.drop_index(batch_op.f("ix_candidates_latency_key"))
        batch_op.drop_index(batch_op.f("ix_candidates_job_id_status"))
        batch_op.drop_index(batch_op.f("ix_candidates_job_id_on_front"))

    op.drop_table("candidates")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_jobs_status_priority_created_at"))
        batch_op.drop_index(batch_op.f("ix_jobs_schedule_id"))
        batch_op.drop_index(batch_op.f("ix_jobs_kind"))

    op.drop_table("jobs")
    with op.batch_alter_table("training_results", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_training_results_layout_hash"))

    op.drop_table("training_results")
    op.drop_table("schedules")
    with op.batch_alter_table("latency_results", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_latency_results_layout_hash"))

    op.drop_table("latency_results")
