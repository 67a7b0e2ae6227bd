"""Latency results keep prefill ms, throughput and cache bytes per sequence as columns (the dashboard plots
them against the objectives); existing rows are filled from their result JSON.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 13:30:00
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("prefill_ms", "throughput_tokens_per_s", "cache_bytes_per_sequence")


def _number(value) -> float | None:
    if isinstance(value, dict):
        value = value.get("median")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def upgrade() -> None:
    with op.batch_alter_table("latency_results") as batch:
        for column in COLUMNS:
            batch.add_column(sa.Column(column, sa.Float(), nullable=True))
    if context.is_offline_mode():
        return  # SQL written out (--sql): there are no rows to read; run the upgrade online to fill them
    table = sa.table(
        "latency_results", sa.column("latency_key"), sa.column("result"), *map(sa.column, COLUMNS)
    )
    conn = op.get_bind()
    rows = conn.execute(sa.select(table.c.latency_key, table.c.result)).all()
    for key, result in rows:  # written as this revision's code reads a result, frozen here
        result = json.loads(result) if isinstance(result, str) else result
        if not isinstance(result, dict):
            continue
        values = {column: _number(result.get(column)) for column in COLUMNS}
        conn.execute(sa.update(table).where(table.c.latency_key == key).values(**values))


def downgrade() -> None:
    with op.batch_alter_table("latency_results") as batch:
        for column in reversed(COLUMNS):
            batch.drop_column(column)
