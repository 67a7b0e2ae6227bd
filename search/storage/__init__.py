"""The storage seam: every read and write of search and service state goes through `Storage(url)` (as
Optuna's RDBStorage), one facade over the parts of this package:

- `records`: the frozen dataclasses methods return (never ORM objects, so nothing leaks a session) and the
  helpers every part shares;
- `engines`: SQLite / PostgreSQL engines and `Connected`, the transaction helpers;
- `schema`: the Alembic migrations in `migrations/` (`Storage.create_schema()`), never `metadata.create_all`;
- `jobs`: the queue, job status and the runners' leases;
- `candidates`: candidates, the results shared across searches, hypervolume history, strategy state;
- `rungs`: a multi-fidelity search's runs of each candidate at each rung;
- `schedules`: cron schedules and their fire records.

Backends: SQLite (`sqlite:///path.db`, the embedded default) and PostgreSQL (`postgresql+psycopg://user:pw@
host/db`). Every write is one short transaction; the ones that must be atomic across processes (job
idempotency keys, candidate de-duplication, result puts, lease claims, schedule fires) are settled by single
SQL statements (`INSERT ... ON CONFLICT DO NOTHING`, conditional `UPDATE`s), so two writers racing on the same
key leave one row. Non-finite floats (NaN, inf) are stored as NULL, in JSON too (PostgreSQL's json type has
no NaN).

`Storage.transaction()` hands out a Core connection inside a write transaction; on SQLite it begins with
`BEGIN IMMEDIATE`, holding the write lock throughout, so a conditional `UPDATE` read-checked in the same
transaction is atomic. `sqlite://` (in memory) shares one connection between threads: for quick experiments,
not for concurrency.
"""

from search.storage.candidates import CandidateStore
from search.storage.engines import normalize_database_url, sqlite_path
from search.storage.jobs import JobStore
from search.storage.records import (
    CandidateRecord,
    CandidateSummaryRecord,
    DatabaseUnavailable,
    HypervolumeRecord,
    JobRecord,
    LatencyResultRecord,
    LineageRecord,
    PointRecord,
    RungRunRecord,
    ScheduleFireRecord,
    ScheduleRecord,
    StorageError,
    TrainingResultRecord,
    is_unavailable,
    json_dumps,
)
from search.storage.rungs import RungStore
from search.storage.schedules import ScheduleStore, check_cron, check_timezone
from search.storage.schema import MIGRATIONS_DIR, SchemaStore


class Storage(SchemaStore, JobStore, CandidateStore, RungStore, ScheduleStore):
    """All search and service state in one SQL database (SQLite or PostgreSQL)."""


__all__ = [
    "MIGRATIONS_DIR",
    "CandidateRecord",
    "CandidateSummaryRecord",
    "DatabaseUnavailable",
    "HypervolumeRecord",
    "JobRecord",
    "LatencyResultRecord",
    "LineageRecord",
    "PointRecord",
    "RungRunRecord",
    "ScheduleFireRecord",
    "ScheduleRecord",
    "Storage",
    "StorageError",
    "TrainingResultRecord",
    "check_cron",
    "check_timezone",
    "is_unavailable",
    "json_dumps",
    "normalize_database_url",
    "sqlite_path",
]
