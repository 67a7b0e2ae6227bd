"""The Alembic migrations (migrations/) against the models (search/db.py), on SQLite and PostgreSQL
(tests/pg.py).

- an empty database upgrades to head: every table of the models' MetaData is there, and nothing else but
  `alembic_version`;
- the live schema matches the models: autogenerate's `compare_metadata` (types, nullability, server defaults,
  indexes, unique constraints, foreign keys with their ON DELETE) finds no difference, and every constraint
  and index has the name the naming convention gives it (SQLite batch migrations find them by name) — with a
  check that the comparison is not vacuous (it does see a changed type, a missing column and a missing index);
- downgrade to base leaves no table (an empty `alembic_version` may stay), with rows in the tables;
- upgrade again (round trip) gives the same schema, and the database is usable;
- one revision at a time, up then down, through the whole history;
- the `alembic` command-line path of migrations/env.py (`-x url=...`, and offline `--sql`).

The concurrent-migration tests (several coordinators starting on one empty database) live in test_storage.py.
"""

from __future__ import annotations

import argparse
import io
import json

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Column, Integer, MetaData, String, func, inspect, select, text

from search import db
from search.storage import MIGRATIONS_DIR, Storage
from tests import pg

db_url = pg.db_url

METADATA = db.Base.metadata
TABLES = set(METADATA.tables)
VERSION_TABLE = "alembic_version"
COMPARE_OPTS = {"compare_type": True, "compare_server_default": True}


# ---------------------------------------------------------------------------------------------- helpers


def _diffs(store: Storage, metadata: MetaData = METADATA) -> list:
    with store.engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn, opts=COMPARE_OPTS), metadata)


def _tables(store: Storage) -> set[str]:
    return set(inspect(store.engine).get_table_names())


def _version_rows(store: Storage) -> list[str]:
    with store.engine.connect() as conn:
        return [r[0] for r in conn.exec_driver_sql(f"SELECT version_num FROM {VERSION_TABLE}")]


def _model_names(metadata: MetaData = METADATA, dialect: str = "postgresql") -> dict[str, dict[str, set]]:
    """Per table: the names of its primary key, indexes, unique constraints and foreign keys in the models.
    (SQLite's AUTOINCREMENT key is declared inline on its column, where the syntax has no constraint name.)"""
    from sqlalchemy import ForeignKeyConstraint, PrimaryKeyConstraint, UniqueConstraint

    def pk_name(table, constraint) -> str | None:
        inline = dialect == "sqlite" and table.dialect_options["sqlite"]["autoincrement"]
        return None if inline else constraint.name

    out: dict[str, dict[str, set]] = {}
    for name, table in metadata.tables.items():
        out[name] = {
            "pk": {pk_name(table, c) for c in table.constraints if isinstance(c, PrimaryKeyConstraint)},
            "ix": {i.name for i in table.indexes},
            "uq": {c.name for c in table.constraints if isinstance(c, UniqueConstraint)},
            "fk": {
                (c.name, (c.ondelete or "").upper() or None)
                for c in table.constraints
                if isinstance(c, ForeignKeyConstraint)
            },
        }
    return out


def _live_names(store: Storage) -> dict[str, dict[str, set]]:
    insp = inspect(store.engine)
    out: dict[str, dict[str, set]] = {}
    for name in TABLES:
        out[name] = {
            "pk": {insp.get_pk_constraint(name)["name"]},
            # PostgreSQL also lists the index behind each unique constraint: that one is the constraint's
            "ix": {i["name"] for i in insp.get_indexes(name) if not i.get("duplicates_constraint")},
            "uq": {u["name"] for u in insp.get_unique_constraints(name)},
            "fk": {
                (f["name"], (f.get("options", {}).get("ondelete") or "").upper() or None)
                for f in insp.get_foreign_keys(name)
            },
        }
    return out


def _assert_at_head(store: Storage) -> None:
    assert store.schema_revision() == store.head_revision() and store.schema_is_current()
    assert _version_rows(store) == [store.head_revision()]
    assert _tables(store) == TABLES | {VERSION_TABLE}
    diffs = _diffs(store)
    assert diffs == [], f"the migrated schema differs from search/db.py: {diffs}"
    assert _live_names(store) == _model_names(dialect=store.engine.dialect.name)


def _assert_at_base(store: Storage) -> None:
    assert store.schema_revision() is None
    left = _tables(store)
    assert left <= {VERSION_TABLE}, f"tables left after downgrade to base: {sorted(left - {VERSION_TABLE})}"
    if left:
        assert _version_rows(store) == []


def _fill(store: Storage) -> int:
    """A few rows in every table (so downgrades run against data, as in production)."""
    with store.transaction() as conn:
        schedule = conn.execute(
            db.schedules.insert()
            .values(
                name="nightly",
                cron="0 3 * * *",
                template={"budget": 2},
                created_at=db.utcnow(),
                updated_at=db.utcnow(),
            )
            .returning(db.schedules.c.id)
        ).scalar_one()
    job = store.create_job("search", {"budget": 4}, name="m", idempotency_key="k", schedule_id=schedule)
    parent = store.add_candidate(job, {"operators": ["attention"]}, "h0")
    child = store.add_candidate(job, {"operators": ["mamba2"]}, "h1", parent_id=parent, generation=1)
    store.put_training_result("t0", layout_hash="h0", result={"val_bpb": 1.5}, val_bpb=1.5)
    store.put_latency_result("l0", layout_hash="h0", result={"decode_ms": 2.0}, decode_ms=2.0)
    store.complete_candidate(child, "t0", "l0", 1.5, 2.0, 1000, {"val_bpb": 1.5, "decode_ms": 2.0})
    store.begin_rung(job, child, 0, 25, status="running")
    store.record_hypervolume(job, 1, 0.5)
    store.save_strategy_state(job, {"population": [parent, child]})
    with store.transaction() as conn:
        conn.execute(
            db.schedule_fires.insert().values(
                schedule_id=schedule, due_at=db.utcnow(), fired_at=db.utcnow(), status="fired", job_id=job
            )
        )
    return job


def _row_counts(store: Storage) -> dict[str, int]:
    with store.engine.connect() as conn:
        return {
            name: conn.execute(select(func.count()).select_from(table)).scalar_one()
            for name, table in METADATA.tables.items()
        }


def _revisions() -> list[str]:
    """Every revision id, base first."""
    script = ScriptDirectory(str(MIGRATIONS_DIR))
    return [r.revision for r in reversed(list(script.walk_revisions("base", "heads")))]


# ---------------------------------------------------------------------------------------------- tests


def test_history_is_linear():
    script = ScriptDirectory(str(MIGRATIONS_DIR))
    assert len(script.get_heads()) == 1, f"several heads: {script.get_heads()} (merge them)"
    assert len(script.get_bases()) == 1


def test_empty_database_upgrades_to_head_matching_the_models(db_url):
    with Storage(db_url) as store:
        assert store.schema_revision() is None
        assert _tables(store) == set()
        store.create_schema()
        _assert_at_head(store)
        job = _fill(store)
        before = _row_counts(store)
        assert all(before.values()), before
        store.create_schema()  # idempotent: no change, rows kept
        _assert_at_head(store)
        assert _row_counts(store) == before
        assert store.get_job(job).idempotency_key == "k"


def test_downgrade_to_base_and_upgrade_again(db_url):
    with Storage(db_url) as store:
        store.create_schema()
        _fill(store)
        store.downgrade_schema("base")
        _assert_at_base(store)
        store.downgrade_schema("base")  # at base already: a no-op
        _assert_at_base(store)

        store.create_schema()  # the round trip
        _assert_at_head(store)
        assert set(_row_counts(store).values()) == {0}
        _fill(store)  # usable again (sequences, defaults, constraints)
        assert all(_row_counts(store).values())

        store.downgrade_schema("base")  # and a second cycle
        _assert_at_base(store)
        store.create_schema()
        _assert_at_head(store)


def test_one_revision_at_a_time(db_url):
    revisions = _revisions()
    assert revisions and revisions[-1] == ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
    with Storage(db_url) as store:
        for rev in revisions:
            store.create_schema(rev)
            assert store.schema_revision() == rev
        _assert_at_head(store)
        _fill(store)
        for rev in reversed(revisions[:-1]):
            store.downgrade_schema("-1")
            assert store.schema_revision() == rev
        store.downgrade_schema("-1")
        _assert_at_base(store)


def test_comparison_is_not_vacuous(db_url):
    """The schema check above would pass on a comparison that sees nothing: make sure it sees drift."""
    with Storage(db_url) as store:
        store.create_schema()
        drifted = MetaData(naming_convention=db.NAMING_CONVENTION)
        for table in METADATA.sorted_tables:
            table.to_metadata(drifted)
        jobs = drifted.tables["jobs"]
        jobs.c.status.type = String(64)  # was String(16)
        jobs.append_column(Column("extra", Integer, nullable=True))
        jobs.indexes.discard(next(i for i in jobs.indexes if i.name == "ix_jobs_kind"))
        drifted.tables["candidates"].c.n_params.type = Integer()  # was BigInteger (SQLite affinity: INTEGER)
        kinds = {(d[0] if isinstance(d, tuple) else d[0][0]) for d in _diffs(store, drifted)}
        described = repr(_diffs(store, drifted))
        assert {"add_column", "remove_index", "modify_type"} <= kinds, described
        assert "status" in described and "n_params" in described


def test_alembic_command_line_path(db_url):
    """`alembic -x url=... upgrade head` / `downgrade base` (env.py opens its own Storage), and `--sql`."""

    def config(buffer: io.StringIO | None = None) -> Config:
        cfg = Config(cmd_opts=argparse.Namespace(x=[f"url={db_url}"]), output_buffer=buffer)
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        return cfg

    command.upgrade(config(), "head")
    with Storage(db_url) as store:
        _assert_at_head(store)
    command.downgrade(config(), "base")
    with Storage(db_url) as store:
        _assert_at_base(store)

    sql = io.StringIO()
    command.upgrade(config(sql), "head", sql=True)  # offline: the DDL as text, nothing executed
    ddl = sql.getvalue()
    for table in TABLES:
        assert f"CREATE TABLE {table}" in ddl, table
    with Storage(db_url) as store:
        _assert_at_base(store)
        with store.engine.connect() as conn:  # really nothing executed
            assert conn.execute(text("SELECT 1")).scalar_one() == 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(pytest.main([__file__, "-q"]))


def test_the_latency_metric_columns_are_filled_from_stored_results(db_url):
    """0003 adds prefill, throughput and cache bytes as columns and fills them from each stored result (a
    statistic's median, a plain number; anything else stays null)."""
    from datetime import UTC, datetime

    results = {
        "full": {
            "prefill_ms": {"median": 12.5, "iqr": 0.4},
            "throughput_tokens_per_s": {"median": 880.0},
            "cache_bytes_per_sequence": 4096,
        },
        "partial": {"prefill_ms": {"median": 3.0}, "throughput_tokens_per_s": None},
        "odd": {"prefill_ms": "fast", "cache_bytes_per_sequence": True},
    }
    with Storage(db_url) as store:
        store.create_schema("0002")
        with store.engine.begin() as conn:
            for key, result in results.items():
                conn.execute(
                    text(
                        "INSERT INTO latency_results (latency_key, layout_hash, result, status, created_at) "
                        "VALUES (:key, 'h', :result, 'completed', :at)"
                    ),
                    {"key": key, "result": json.dumps(result), "at": datetime.now(UTC)},
                )
        store.create_schema()
        t = db.latency_results
        columns = (t.c.prefill_ms, t.c.throughput_tokens_per_s, t.c.cache_bytes_per_sequence)
        with store.engine.connect() as conn:
            rows = {k: tuple(r) for k, *r in conn.execute(select(t.c.latency_key, *columns))}
        assert rows == {
            "full": (12.5, 880.0, 4096.0),
            "partial": (3.0, None, None),
            "odd": (None, None, None),
        }
        # new results fill the columns as they are stored
        store.put_latency_result("new", layout_hash="h", result=results["full"], decode_ms=1.0)
        assert store.get_latency_result("new").prefill_ms == 12.5


def _job_ids(store: Storage) -> list[int]:
    with store.engine.connect() as conn:
        return [r[0] for r in conn.exec_driver_sql("SELECT id FROM jobs ORDER BY id")]


def test_deleted_ids_are_never_reused(db_url):
    """A deleted search's id never names a new one: delete the newest job (the case SQLite's plain rowid
    reuses), make another; its id is larger. And 0004 keeps the rows and ids it copies on SQLite."""
    from datetime import UTC, datetime

    with Storage(db_url) as store:
        store.create_schema("0003")
        with store.engine.begin() as conn:  # rows as 0003 knew them (the application writes newer columns)
            for name in ("a", "b"):
                conn.execute(
                    text(
                        "INSERT INTO jobs (kind, name, status, priority, config, created_at, n_evaluations) "
                        "VALUES ('search', :name, 'queued', 0, '{}', :at, 0)"
                    ),
                    {"name": name, "at": datetime.now(UTC)},
                )
        first, second = _job_ids(store)
        store.create_schema()
        assert _job_ids(store) == [first, second]
        assert store.delete_job(second)
        third = store.create_job("search", {"budget": 1}, name="c")
        assert third > second, (first, second, third)
        assert store.get_job(first).name == "a"
        store.downgrade_schema("0003")  # and back: the rows stay
        assert _job_ids(store) == [first, third]
