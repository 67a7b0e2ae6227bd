"""Load test of the coordinator's read API (issue 5, "Load and durability").

Target: with 10,000 candidates in one search (seeded directly into the database), an open-loop load of
100 requests/s for 30 s on loopback keeps p99 <= 100 ms, with throughput and errors reported, on SQLite and
PostgreSQL.

Per backend:

1. Seed a fresh database (schema by `Storage.create_schema()`): one big search (`--candidates`, 10,000) whose
   candidates are realistic layouts of the CPU search space (the history aging evolution makes: a uniform
   initial population of 20, then one-factor mutations of tournament winners among the 20 newest results, so
   lineages are hundreds deep; distinct layout hashes), with val_bpb / decode_ms / n_params / objectives
   filled, their stored training results (loss curve, log tail) and latency results, the materialized Pareto
   front (`Storage.set_front`; computed by a 2-D sweep checked against `search.pareto.pareto_front`, which is
   O(N^2)) and one hypervolume point per evaluation, as the engine records them. A few percent are `reused`
   or `failed` (with a traceback), so the status filters select something. A handful of other jobs (queued,
   running, finished searches and other kinds) fill the queue and the searches list. Rows go in by bulk
   (executemany) inserts.
2. Start the real server: `python -m uvicorn api.app:create_app --factory` on 127.0.0.1 and a free port
   (HYBRIDNAS_DATABASE_URL, a temporary HYBRIDNAS_DATA_DIR, HYBRIDNAS_TOKEN, HYBRIDNAS_RUNNERS=0,
   HYBRIDNAS_SCHEDULER=0: no job runner, no scheduler), one worker, access log off; wait for /api/health.
3. Open-loop load: request i is due at t0 + i / rate (or Poisson arrivals with `--arrivals poisson`) and is
   sent then whether or not earlier ones have finished; its latency is measured from its DUE time, so a
   stalled server (or a stalled client) shows up in the latency instead of silently lowering the offered
   load (no coordinated omission). The mix is a dashboard's: search detail, Pareto front, pages of candidates
   (sort orders, offsets up to the end, status filters, page sizes), candidate detail, its layout.json, the
   jobs queue, the searches list, health, and the live evaluation feed when the server has that route (the
   mix keeps only routes the server's OpenAPI document lists). Targets are drawn up front (seeded), so the
   client only sends.
   A short warm-up at the same rate (`--warmup`, excluded from the statistics) precedes the measured window.
4. Report per backend: requests sent, completed, errors by kind (non-2xx status, exception class, timeout),
   achieved throughput, p50/p90/p99/max latency overall and per endpoint, and the load generator's own health:
   scheduling lag (how late each request actually left, p99/max) and the client's, the server's and the rest
   of the machine's CPU use (the VM may be shared). Then stop the server and drop the PostgreSQL database.

Results: benchmarks/results/api_load.md (tables, command, machine, date) and api_load.json.

    .venv/bin/python benchmarks/api_load.py [--backends sqlite,postgresql] [--rate 100] [--duration 30]
        [--candidates 10000] [--pg-admin-url
        postgresql+psycopg://hybridnas:hybridnas@127.0.0.1:5432/hybridnas_test]

`--profile` also measures each endpoint's cost one request at a time (latency on an idle server and the
server's CPU per request: the sustainable rate of one worker follows), times the storage calls behind the
endpoints in-process (no HTTP) and EXPLAINs the candidate queries, to attribute a slow endpoint to its query.
`--attach LABEL=PATH` adds another run's api_load.json (e.g. of a patched copy of the tree) to the report as a
section; `--render` re-renders api_load.md from api_load.json. A hand-written `## Findings` section at the end
of api_load.md survives both and a rerun.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_PG_ADMIN = "postgresql+psycopg://hybridnas:hybridnas@127.0.0.1:5432/hybridnas_test"
TARGET_P99_MS = 100.0
TOKEN = "api-load-benchmark-token"
OBJECTIVES = ("val_bpb", "decode_ms")
VOCAB = 256  # the CPU proxy's byte vocabulary (for the analytic parameter count)

# The request mix (weights): what a dashboard polling a large search asks for.
MIX = {
    "candidates_page": 26,
    "candidate_detail": 14,
    "search_detail": 14,
    "pareto": 14,
    "layout_json": 10,
    "jobs_queue": 8,
    "searches_list": 8,
    "health": 6,
    # the live-progress feed (a dashboard polls it with the cursor it got last); only when the API has it
    "evaluations_feed": 8,
}
# endpoint -> the route (OpenAPI path) it needs; an endpoint whose route the server lacks is left out of the
# mix
ROUTES = {
    "candidates_page": "/api/searches/{search_id}/candidates",
    "candidate_detail": "/api/candidates/{candidate_id}",
    "search_detail": "/api/searches/{search_id}",
    "pareto": "/api/searches/{search_id}/pareto",
    "layout_json": "/api/candidates/{candidate_id}/layout.json",
    "jobs_queue": "/api/jobs",
    "searches_list": "/api/searches",
    "health": "/api/health",
    "evaluations_feed": "/api/searches/{search_id}/evaluations",
}
SORTS = (
    "id",
    "-id",
    "val_bpb",
    "-val_bpb",
    "decode_ms",
    "-n_params",
    "-finished_at",
    "generation",
    "status",
    "attempts",
)
PAGE_SIZES = (20, 50, 50, 50, 100, 200)
STATUS_FILTERS = (None, None, None, "completed", "completed", "failed", "reused")


# ------------------------------------------------------------------------------------------------- seeding


@dataclass
class Seeded:
    url: str
    search_id: int
    candidate_ids: list[int]
    n_candidates: int
    counts: dict[str, int]
    front_size: int
    hv_points: int
    other_jobs: int
    seconds: float
    db_bytes: int | None = None
    cursors: list[str] = field(default_factory=list)  # feed cursors of the last-finished candidates
    training_results: int = 0
    latency_results: int = 0


def _objectives(layout: Any, rng: random.Random) -> tuple[float, float, int]:
    """Plausible (val_bpb, decode_ms, n_params) for a CPU-scale layout: deeper/wider is better but slower;
    attention costs the most per token, mixers differ a little in quality; multiplicative noise."""
    from search.params import count_parameters

    n_params = count_parameters(layout, VOCAB).total
    cost = {"attention": 0.11, "mamba2": 0.085, "deltanet": 0.09, "ffn": 0.04}
    quality = {"attention": 0.030, "mamba2": 0.026, "deltanet": 0.028, "ffn": 0.012}
    ops = layout.operators
    decode_ms = (0.35 + sum(cost.get(op, 0.06) for op in ops) * (layout.d_model / 64)) * rng.lognormvariate(
        0, 0.06
    )
    gain = sum(quality.get(op, 0.01) for op in ops) ** 0.8
    kinds = len({op for op in ops if op != "ffn"})
    val_bpb = (2.55 - 0.55 * gain - 0.02 * (kinds - 1)) * rng.lognormvariate(0, 0.015)
    return round(val_bpb, 6), round(decode_ms, 6), n_params


@dataclass
class Step:
    """One candidate of the synthetic search history."""

    layout: Any
    mutation: dict | None
    parent: int | None  # index into the history
    generation: int
    status: str  # completed | reused | failed
    outcome: tuple[float, float, int] | None  # (val_bpb, decode_ms, n_params); None when failed


def _history(n: int, seed: int, population: int = 20, sample_size: int = 5) -> list[Step]:
    """n distinct layouts as the engine's aging evolution makes them (search/strategies/aging.py: population
    20, tournaments of 5): a uniform initial population, then each child a one-factor mutation of the best
    (lowest val_bpb) of 5 members drawn from the 20 newest results. So lineages are long, as in a real 10k
    search."""
    from search.space import cpu_space

    space = cpu_space()
    rng = random.Random(seed)
    out: list[Step] = []
    seen: set[str] = set()
    alive: list[int] = []  # the aging population: indices of the newest results

    def add(layout: Any, mutation: dict | None, parent: int | None) -> None:
        roll = rng.random()
        status = "failed" if roll < 0.02 else "reused" if roll < 0.05 else "completed"
        outcome = None if status == "failed" else _objectives(layout, rng)
        seen.add(layout.content_hash)
        generation = 0 if parent is None else out[parent].generation + 1
        out.append(Step(layout, mutation, parent, generation, status, outcome))
        if outcome is not None:
            alive.append(len(out) - 1)
            del alive[:-population]

    while len(out) < min(population, n):
        layout = space.sample_uniform_layout(rng)
        if layout.content_hash not in seen:
            add(layout, None, None)
    while len(out) < n:
        for _attempt in range(20):
            contenders = rng.sample(alive, min(sample_size, len(alive)))
            parent = min(contenders, key=lambda i: out[i].outcome[0])
            layout, mutation = space.mutate_layout(out[parent].layout, rng)
            if layout.content_hash not in seen:
                add(layout, mutation.as_dict(), parent)
                break
        else:  # the neighbourhood is exhausted: a fresh sample keeps the history moving
            layout = space.sample_uniform_layout(rng)
            if layout.content_hash not in seen:
                add(layout, None, None)
    return out


def front_2d(points: list[list[float]]) -> list[int]:
    """Indices of the non-dominated points (minimization, 2 objectives), as search.pareto.pareto_front returns
    them (equal points are all kept), by a sort and a sweep: O(N log N)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best_y, k = [], math.inf, 0
    while k < len(order):
        x = points[order[k]][0]
        group = []
        while k < len(order) and points[order[k]][0] == x:
            group.append(order[k])
            k += 1
        y_min = min(points[i][1] for i in group)
        if y_min < best_y:
            front += [i for i in group if points[i][1] == y_min]
        best_y = min(best_y, y_min)
    return sorted(front)


def seed_database(url: str, n_candidates: int, seed: int = 0) -> Seeded:
    from sqlalchemy import insert, select, update

    from api.schemas import SearchCreate
    from search import db
    from search.pareto import HypervolumeSpace, HypervolumeTracker, pareto_front
    from search.storage import Storage

    started = time.perf_counter()
    rng = random.Random(seed + 1)
    storage = Storage(url)
    try:
        storage.create_schema()
        base = SearchCreate(budget=n_candidates, strategy="pareto-aging", name="load-test search")
        config = base.search_config()
        search_id = storage.create_job("search", config, name="load-test search", budget=n_candidates)

        history = _history(n_candidates, seed)
        t0 = datetime.now(UTC) - timedelta(hours=30)
        rows: list[dict[str, Any]] = []
        outcomes = [step.outcome for step in history]
        for index, step in enumerate(history):
            layout = step.layout
            created = t0 + timedelta(seconds=10 * index)
            row: dict[str, Any] = {
                "job_id": search_id,
                "layout_hash": layout.content_hash,
                "layout": json.loads(layout.to_json(None)),
                "parent_id": None,
                "generation": step.generation,
                "mutation": step.mutation,
                "status": step.status,
                "failure_reason": None,
                "traceback": None,
                "attempts": 1,
                "training_key": None,
                "latency_key": None,
                "val_bpb": None,
                "decode_ms": None,
                "n_params": None,
                "objectives": None,
                "on_front": False,
                "created_at": created,
                "started_at": created + timedelta(seconds=1),
                "finished_at": created + timedelta(seconds=1 + rng.uniform(20, 90)),
            }
            if step.outcome is None:
                row["attempts"] = 2
                row["failure_reason"] = "worker_died: the Ray worker exited (OOM?)"
                row["traceback"] = (
                    "Traceback (most recent call last):\n"
                    + "".join(
                        f'  File "/work/main/models/hybrid.py", line {100 + k}, in forward\n'
                        "    x = block(x)\n"
                        for k in range(12)
                    )
                    + "RuntimeError: out of memory (synthetic)\n"
                )
            else:
                val_bpb, decode_ms, n_params = step.outcome
                row.update(
                    val_bpb=val_bpb,
                    decode_ms=decode_ms,
                    n_params=n_params,
                    objectives={"val_bpb": val_bpb, "decode_ms": decode_ms},
                    training_key=hashlib.sha256(f"t{layout.content_hash}".encode()).hexdigest(),
                    latency_key=hashlib.sha256(f"l{layout.content_hash}".encode()).hexdigest(),
                )
            rows.append(row)

        # The stored results behind the candidates (the candidate detail shows them): a training result with
        # its loss curve and worker log tail, a latency measurement with its repeats and device fingerprint.
        fingerprint = {
            "device": "AMD EPYC (synthetic)",
            "device_type": "cpu",
            "driver": None,
            "torch": "2.5.1",
            "triton": None,
            "fla": None,
            "mamba_ssm": None,
            "dtype": "float32",
            "threads": 1,
            "method": "eager",
            "machine": "x86_64",
        }
        training_rows, latency_rows = [], []
        for row, step in zip(rows, history):
            layout = step.layout
            if row["status"] == "failed":
                continue
            val_bpb, decode_ms = row["val_bpb"], row["decode_ms"]
            curve = [
                [step, round(5.5 * math.exp(-step / 30) + val_bpb * 0.69 + rng.uniform(-0.02, 0.02), 6)]
                for step in range(0, 101, 5)
            ]
            training_rows.append(
                {
                    "training_key": row["training_key"],
                    "layout_hash": row["layout_hash"],
                    "proxy_config_hash": hashlib.sha256(b"proxy steps=100").hexdigest(),
                    "val_bpb": val_bpb,
                    "status": "completed",
                    "artifact_path": f"artifacts/{row['layout_hash'][:16]}/model.pt",
                    "created_at": row["finished_at"],
                    "result": {
                        "status": "completed",
                        "failure_reason": None,
                        "traceback": None,
                        "steps_done": 100,
                        "loss_curve": curve,
                        "final_train_loss": curve[-1][1],
                        "val_bpb": val_bpb,
                        "val_loss": round(val_bpb * 0.69, 6),
                        "val_ppl": round(math.exp(val_bpb * 0.69), 4),
                        "val_tokens": 65536,
                        "tokens_per_s": round(rng.uniform(2e3, 9e3), 1),
                        "wall_s": round(rng.uniform(20, 90), 2),
                        "peak_memory_bytes": rng.randrange(10**8, 10**9),
                        "n_params": row["n_params"],
                        "backends": {op: "torch" for op in set(layout.operators)},
                        "log_tail": [
                            f"2026-01-01 00:00:{k:02d} INFO step {k * 5}/100 loss {curve[k][1]:.4f}"
                            for k in range(len(curve))
                        ],
                    },
                }
            )
            values = [round(decode_ms * rng.uniform(0.97, 1.03), 6) for _ in range(3)]
            latency_rows.append(
                {
                    "latency_key": row["latency_key"],
                    "layout_hash": row["layout_hash"],
                    "latency_config_hash": hashlib.sha256(b"prompt 128 decode 32").hexdigest(),
                    "device_fingerprint": fingerprint,
                    "decode_ms": decode_ms,
                    "status": "completed",
                    "created_at": row["finished_at"],
                    "result": {
                        "decode_ms_per_token": {
                            "median": decode_ms,
                            "iqr": round(max(values) - min(values), 6),
                            "repeats": 3,
                            "values": values,
                        },
                        "prefill_ms": {
                            "median": round(decode_ms * 9, 4),
                            "iqr": 0.01,
                            "repeats": 3,
                            "values": [round(decode_ms * 9, 4)] * 3,
                        },
                        "throughput_tokens_per_s": None,
                        "throughput_batch": None,
                        "cache_bytes_per_sequence": 4096 * len(layout.operators),
                        "cache_buffer_tokens": 160,
                        "fingerprint": fingerprint,
                    },
                }
            )

        t = db.candidates
        with storage.transaction() as conn:
            for start in range(0, len(training_rows), 2000):
                conn.execute(insert(db.training_results), training_rows[start : start + 2000])
                conn.execute(insert(db.latency_results), latency_rows[start : start + 2000])
            for start in range(0, len(rows), 2000):
                conn.execute(insert(t), rows[start : start + 2000])
            ids = [
                int(i)
                for i in conn.execute(
                    select(t.c.id).where(t.c.job_id == search_id).order_by(t.c.id)
                ).scalars()
            ]
            # parent links (ids exist only now)
            parents = [
                {"cid": ids[i], "pid": ids[step.parent]}
                for i, step in enumerate(history)
                if step.parent is not None
            ]
            from sqlalchemy import bindparam

            conn.execute(
                update(t).where(t.c.id == bindparam("cid")).values(parent_id=bindparam("pid")), parents
            )

        done = [(ids[i], o) for i, o in enumerate(outcomes) if o is not None]
        points = [[o[0], o[1]] for _cid, o in done]
        front = front_2d(points)
        # search.pareto.pareto_front is the reference (but O(N^2): ~18 s at 10k points): it must agree with
        # the sweep on a sample that contains the whole front.
        sample = sorted(
            set(front) | set(random.Random(seed).sample(range(len(points)), min(1500, len(points))))
        )
        expected = {sample[i] for i in pareto_front([points[i] for i in sample])}
        if expected != set(front):
            raise AssertionError("the 2-D sweep disagrees with search.pareto.pareto_front")
        storage.set_front(search_id, [done[i][0] for i in front])

        # One hypervolume point per evaluation, bounds fixed after the initial population (as the engine
        # does).
        initial = [list(o[:2]) for o in outcomes[:20] if o is not None]
        space = HypervolumeSpace(
            OBJECTIVES, (0.0, 0.0), tuple(1.2 * max(p[i] for p in initial) for i in range(2))
        )
        tracker = HypervolumeTracker(space)
        hv_rows = []
        for index, outcome in enumerate(outcomes):
            value = tracker.record(None if outcome is None else outcome[:2])
            hv_rows.append(
                {
                    "job_id": search_id,
                    "n_evaluations": index + 1,
                    "hypervolume": value,
                    "recorded_at": t0 + timedelta(seconds=10 * index + 60),
                }
            )
        with storage.transaction() as conn:
            for start in range(0, len(hv_rows), 5000):
                conn.execute(insert(db.hypervolume_history), hv_rows[start : start + 5000])
            conn.execute(
                update(db.jobs)
                .where(db.jobs.c.id == search_id)
                .values(status="running", started_at=t0, n_evaluations=n_candidates, priority=0)
            )
        storage.save_strategy_state(
            search_id,
            {"population": [r["layout_hash"] for r in rows[-32:]], "rng": list(range(625)), "asked": []},
        )

        # Other jobs: the queue and the searches list are not empty.
        other = 0
        for k in range(12):
            job_status = (
                "queued",
                "queued",
                "queued",
                "completed",
                "completed",
                "failed",
                "cancelled",
                "archived",
            )[k % 8]
            jid = storage.create_job(
                "search",
                SearchCreate(seed=k, budget=16 + k).search_config(),
                name=f"search {k}",
                priority=k % 3,
                budget=16 + k,
            )
            if job_status != "queued":
                storage.set_job_status(jid, "running")
                storage.set_job_status(jid, job_status, error="synthetic" if job_status == "failed" else None)
            other += 1
        for kind in ("fidelity", "depth-width", "ablation"):
            storage.create_job(kind, {"note": f"synthetic {kind} job"}, name=kind)
            other += 1
        if storage.is_sqlite:
            import sqlite3

            raw = sqlite3.connect(storage.engine.url.database, isolation_level=None)
            try:
                raw.execute("ANALYZE")
                raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                raw.close()
        else:
            with storage.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.exec_driver_sql("VACUUM ANALYZE")
        counts = storage.candidate_counts(search_id)
        db_bytes = None
        if storage.is_sqlite:
            db_bytes = Path(storage.engine.url.database).stat().st_size
        else:
            with storage.engine.connect() as conn:
                db_bytes = int(
                    conn.exec_driver_sql("SELECT pg_database_size(current_database())").scalar_one()
                )
        # feed cursors (finished_at, id) of the last-finished candidates: where a polling dashboard resumes
        finished = sorted((r["finished_at"], ids[i]) for i, r in enumerate(rows))
        cursors = [
            f"{at.astimezone(UTC).strftime('%Y-%m-%dT%H:%M:%S.%f')}Z~{cid}" for at, cid in finished[-300:]
        ]
        return Seeded(
            url,
            search_id,
            ids,
            len(ids),
            counts,
            len(front),
            len(hv_rows),
            other,
            time.perf_counter() - started,
            db_bytes,
            cursors,
            len(training_rows),
            len(latency_rows),
        )
    finally:
        storage.close()


# ------------------------------------------------------------------------------------------------- backends


@contextlib.contextmanager
def backend_database(backend: str, workdir: Path, pg_admin_url: str) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{workdir / 'hybridnas.db'}"
        return
    if backend != "postgresql":
        raise SystemExit(f"unknown backend {backend!r} (sqlite, postgresql)")
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    admin = make_url(pg_admin_url)
    if admin.drivername == "postgresql":
        admin = admin.set(drivername="postgresql+psycopg")
    engine = create_engine(admin, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    name = f"hybridnas_load_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with engine.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}" TEMPLATE template0')
    try:
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        for attempt in range(30):  # the server may be restarting (another test restarts it): retry
            try:
                with engine.connect() as conn:
                    conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                break
            except Exception as exc:  # noqa: BLE001
                if attempt == 29:
                    print(f"could not drop the database {name}: {exc}", file=sys.stderr)
                time.sleep(1)
        engine.dispose()


def database_started_at(url: str) -> str | None:
    """When the PostgreSQL server started (None on SQLite): compared before and after the load, it tells
    whether something restarted the database during the run (errors would then not be the API's)."""
    from search.storage import Storage

    storage = Storage(url)
    try:
        if storage.is_sqlite:
            return None
        with storage.engine.connect() as conn:
            return str(conn.exec_driver_sql("select pg_postmaster_start_time()").scalar_one())
    except Exception as exc:  # noqa: BLE001
        return f"unreachable: {type(exc).__name__}"
    finally:
        storage.close()


def server_version(url: str) -> str:
    from search.storage import Storage

    storage = Storage(url)
    try:
        with storage.engine.connect() as conn:
            if storage.is_sqlite:
                return "SQLite " + conn.exec_driver_sql("select sqlite_version()").scalar_one()
            return "PostgreSQL " + conn.exec_driver_sql("show server_version").scalar_one().split()[0]
    finally:
        storage.close()


# ------------------------------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int | None = None) -> float:
    """utime + stime of a process and its live descendants (a server's API worker processes), or of this
    process when pid is None, from /proc."""
    if pid is None:
        usage = os.times()
        return usage.user + usage.system
    children: dict[int, list[int]] = defaultdict(list)
    stats: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                stats[int(entry.name)] = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                children[int(stats[int(entry.name)][1])].append(int(entry.name))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        if current in stats:
            total += int(stats[current][11]) + int(stats[current][12])
        todo.extend(children.get(current, []))
    return total / os.sysconf("SC_CLK_TCK")


def threads_cpu_seconds(pid: int) -> float:
    """CPU time of a process's live threads, in ns resolution (/proc/PID/task/*/schedstat): for short
    measurements, where /proc/PID/stat's 10 ms ticks are too coarse."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def system_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat (all cores)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    total = sum(values[:8])
    tick = os.sysconf("SC_CLK_TCK")
    return (total - idle) / tick, total / tick


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


@contextlib.contextmanager
def api_server(url: str, workdir: Path, log_path: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    port = free_port()
    data_dir = workdir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "HYBRIDNAS_DATABASE_URL": url,
        "HYBRIDNAS_DATA_DIR": str(data_dir),
        "HYBRIDNAS_TOKEN": TOKEN,
        "HYBRIDNAS_RUNNERS": "0",
        "HYBRIDNAS_SCHEDULER": "0",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("HYBRIDNAS_REQUIRE_TOKEN_FOR_READS", None)
    cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        "api.app:create_app",
        "--factory",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    with served(cmd, ROOT, env, port, log_path, signal.SIGINT, 15) as running:
        yield running


@contextlib.contextmanager
def served(
    cmd: list[str], cwd: Path, env: dict, port: int, log_path: Path, stop: int, stop_wait_s: float
) -> Iterator[tuple[str, subprocess.Popen]]:
    """A server process started with `cmd`, its output in `log_path`: (base URL, process) once healthy;
    stopped with the signal `stop` (killed after `stop_wait_s`)."""
    log = log_path.open("wb")
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, log_path)
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(stop)
            try:
                proc.wait(timeout=stop_wait_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def wait_healthy(base: str, proc: subprocess.Popen, log_path: Path, timeout: float = 60.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(
                f"the server exited ({proc.returncode}) before it was healthy:\n"
                f"{log_path.read_text(errors='replace')[-4000:]}"
            )
        try:
            with urllib.request.urlopen(f"{base}/api/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(
        f"the server was not healthy after {timeout:.0f} s:\n{log_path.read_text(errors='replace')[-4000:]}"
    )


# ------------------------------------------------------------------------------------------------- load


def plan_requests(
    seeded: Seeded, n: int, rng: random.Random, endpoints: set[str] | None = None
) -> list[tuple[str, str]]:
    """(endpoint name, path) of each request, drawn from MIX (restricted to `endpoints`)."""
    names, weights = zip(*[(k, v) for k, v in MIX.items() if endpoints is None or k in endpoints])
    sid = seeded.search_id
    total = seeded.n_candidates
    out = []
    for name in rng.choices(names, weights=weights, k=n):
        if name == "candidates_page":
            limit = rng.choice(PAGE_SIZES)
            status = rng.choice(STATUS_FILTERS)
            n_rows = seeded.counts.get(status, 0) if status else total
            # half the pages near the top, half anywhere (deep offsets too)
            offset = 0 if rng.random() < 0.3 else rng.randrange(0, max(1, n_rows - limit))
            if rng.random() < 0.2:
                offset = rng.randrange(0, 5) * limit
            path = f"/api/searches/{sid}/candidates?limit={limit}&offset={offset}&sort={rng.choice(SORTS)}"
            if status:
                path += f"&status={status}"
        elif name == "candidate_detail":
            path = f"/api/candidates/{rng.choice(seeded.candidate_ids)}"
        elif name == "layout_json":
            path = f"/api/candidates/{rng.choice(seeded.candidate_ids)}/layout.json"
        elif name == "search_detail":
            path = f"/api/searches/{sid}"
        elif name == "pareto":
            path = f"/api/searches/{sid}/pareto"
        elif name == "jobs_queue":
            path = rng.choice(
                (
                    "/api/jobs",
                    "/api/jobs",
                    "/api/jobs?status=completed&status=failed",
                    "/api/jobs?kind=search",
                )
            )
        elif name == "evaluations_feed":
            # mostly a poll from a recent cursor (a few new items), sometimes a dashboard opening (from the
            # start)
            if rng.random() < 0.15 or not seeded.cursors:
                path = f"/api/searches/{sid}/evaluations?limit=50"
            else:
                path = f"/api/searches/{sid}/evaluations?since={rng.choice(seeded.cursors)}&limit=50"
        elif name == "searches_list":
            path = rng.choice(("/api/searches", "/api/searches?limit=20", "/api/searches?status=completed"))
        else:
            path = "/api/health"
        out.append((name, path))
    return out


@dataclass
class Sample:
    endpoint: str
    due: float  # scheduled send time (s, loop clock)
    lag: float  # how late it actually left (s)
    latency: float | None  # completion - due (s); None when it did not complete
    status: int | None
    error: str | None
    nbytes: int = 0
    warmup: bool = False


@dataclass
class LoadResult:
    samples: list[Sample] = field(default_factory=list)
    t0: float = 0.0
    end: float = 0.0
    client_cpu_s: float = 0.0
    server_cpu_s: float = 0.0
    machine_busy_s: float = 0.0  # every process on the machine (other users' work included)
    machine_total_s: float = 0.0
    load_avg: tuple[float, float] = (0.0, 0.0)  # 1-min load average at the start and the end
    wall_s: float = 0.0
    loop_lag_max_ms: float = 0.0


async def _send(
    client: Any,
    kind: str,
    base: str,
    endpoint: str,
    path: str,
    due: float,
    warmup: bool,
    timeout: float,
    loop: asyncio.AbstractEventLoop,
) -> Sample:
    started = loop.time()
    lag = started - due
    try:
        if kind == "aiohttp":
            async with client.get(base + path) as resp:
                body = await resp.read()
                status = resp.status
        else:
            resp = await client.get(base + path)
            body, status = resp.content, resp.status_code
        latency = loop.time() - due
        error = None if 200 <= status < 300 else f"HTTP {status}"
        return Sample(endpoint, due, lag, latency, status, error, len(body), warmup)
    except TimeoutError:
        return Sample(endpoint, due, lag, None, None, f"timeout (>{timeout:g} s)", 0, warmup)
    except Exception as exc:  # noqa: BLE001 - every failure is counted by its kind
        name = type(exc).__name__
        if "Timeout" in name:
            name = f"timeout (>{timeout:g} s)"
        return Sample(endpoint, due, lag, None, None, name, 0, warmup)


async def run_load(
    base: str,
    plan: list[tuple[str, str]],
    rate: float,
    warmup_n: int,
    client_kind: str,
    arrivals: str,
    timeout: float,
    seed: int,
    server_pid: int,
) -> LoadResult:
    loop = asyncio.get_running_loop()
    rng = random.Random(seed)
    gaps = [1.0 / rate] * len(plan) if arrivals == "uniform" else [rng.expovariate(rate) for _ in plan]
    if client_kind == "aiohttp":
        import aiohttp

        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30)
        client = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout))
    else:
        import httpx

        client = httpx.AsyncClient(
            timeout=timeout, limits=httpx.Limits(max_connections=None, max_keepalive_connections=200)
        )
    result = LoadResult()
    tasks: list[asyncio.Task] = []
    stop_monitor = asyncio.Event()
    loop_lag = [0.0]

    async def monitor() -> None:  # the event loop's own responsiveness (a busy client shows here)
        while not stop_monitor.is_set():
            before = loop.time()
            await asyncio.sleep(0.005)
            loop_lag[0] = max(loop_lag[0], loop.time() - before - 0.005)

    monitor_task = asyncio.create_task(monitor())
    try:
        start = loop.time() + 0.05
        due = start
        cpu0, server0, wall0, sys0 = cpu_seconds(), cpu_seconds(server_pid), time.perf_counter(), system_cpu()
        load0 = load_average()
        for index, (endpoint, path) in enumerate(plan):
            if index == warmup_n:
                result.t0 = due
                cpu0, server0, wall0, sys0 = (
                    cpu_seconds(),
                    cpu_seconds(server_pid),
                    time.perf_counter(),
                    system_cpu(),
                )
                load0 = load_average()
                loop_lag[0] = 0.0
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(
                asyncio.create_task(
                    _send(client, client_kind, base, endpoint, path, due, index < warmup_n, timeout, loop)
                )
            )
            due += gaps[index]
        if warmup_n >= len(plan):
            result.t0 = start
        samples = await asyncio.gather(*tasks)
        result.end = loop.time()
        result.client_cpu_s = cpu_seconds() - cpu0
        result.server_cpu_s = cpu_seconds(server_pid) - server0
        result.wall_s = time.perf_counter() - wall0
        sys1 = system_cpu()
        result.machine_busy_s, result.machine_total_s = sys1[0] - sys0[0], sys1[1] - sys0[1]
        result.load_avg = (load0, load_average())
        result.samples = list(samples)
    finally:
        stop_monitor.set()
        await monitor_task
        if client_kind == "aiohttp":
            await client.close()
        else:
            await client.aclose()
    result.loop_lag_max_ms = loop_lag[0] * 1000
    return result


def served_endpoints(base: str) -> set[str]:
    """The MIX endpoints whose routes the running server has (from its OpenAPI document)."""
    import urllib.request

    with urllib.request.urlopen(f"{base}/openapi.json", timeout=30) as resp:
        paths = set(json.loads(resp.read())["paths"])
    return {name for name, route in ROUTES.items() if route in paths}


def endpoint_costs(base: str, plan: list[tuple[str, str]], server_pid: int, per_endpoint: int = 40) -> dict:
    """Closed loop, one request at a time: each endpoint's latency on an idle server and the server CPU it
    costs (ms of CPU per request, from /proc). Tells whether the server can sustain the offered mix at all."""
    import urllib.request

    by_endpoint: dict[str, list[str]] = defaultdict(list)
    for endpoint, path in plan:
        if len(by_endpoint[endpoint]) < per_endpoint:
            by_endpoint[endpoint].append(path)
    out = {}
    for endpoint in MIX:
        paths = by_endpoint.get(endpoint) or []
        if not paths:
            continue
        for path in paths[:3]:  # warm
            urllib.request.urlopen(base + path, timeout=30).read()
        times = []
        cpu0 = threads_cpu_seconds(server_pid)
        for path in paths:
            t = time.perf_counter()
            urllib.request.urlopen(base + path, timeout=30).read()
            times.append((time.perf_counter() - t) * 1000)
        cpu = (threads_cpu_seconds(server_pid) - cpu0) * 1000 / len(paths)
        out[endpoint] = {
            "n": len(paths),
            "idle_p50_ms": round(statistics.median(times), 2),
            "idle_max_ms": round(max(times), 2),
            "server_cpu_ms": round(cpu, 2),
        }
    weights = sum(MIX[e] for e in out)
    mix_cpu = sum(MIX[e] * out[e]["server_cpu_ms"] for e in out) / weights
    return {
        "endpoints": out,
        "mix_server_cpu_ms": round(mix_cpu, 2),
        "capacity_rps_one_core": round(1000 / mix_cpu, 1) if mix_cpu > 0 else None,
    }


# ------------------------------------------------------------------------------------------------- stats


def pct(values: list[float], q: float) -> float | None:
    """The q-th percentile (nearest rank, as load tools report it)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def latency_stats(samples: list[Sample]) -> dict[str, Any]:
    ok = [s.latency * 1000 for s in samples if s.error is None and s.latency is not None]
    errors = Counter(s.error for s in samples if s.error is not None)
    return {
        "sent": len(samples),
        "completed": sum(1 for s in samples if s.latency is not None),
        "ok": len(ok),
        "errors": sum(errors.values()),
        "errors_by_kind": dict(errors),
        "p50_ms": pct(ok, 50),
        "p90_ms": pct(ok, 90),
        "p99_ms": pct(ok, 99),
        "max_ms": max(ok) if ok else None,
        "mean_ms": statistics.fmean(ok) if ok else None,
        "mean_bytes": statistics.fmean([s.nbytes for s in samples if s.error is None]) if ok else None,
    }


def summarize(result: LoadResult, rate: float, duration: float) -> dict[str, Any]:
    measured = [s for s in result.samples if not s.warmup]
    overall = latency_stats(measured)
    lags = [s.lag * 1000 for s in measured]
    window = max(1e-9, result.end - result.t0)
    overall.update(
        {
            "offered_rps": rate,
            "duration_s": duration,
            "achieved_rps": overall["ok"]
            / window,  # 2xx responses per second, first due time to last response
            "completion_window_s": window,
            "sched_lag_p50_ms": pct(lags, 50),
            "sched_lag_p99_ms": pct(lags, 99),
            "sched_lag_max_ms": max(lags) if lags else None,
            "loop_lag_max_ms": result.loop_lag_max_ms,
            "client_cpu_pct": 100 * result.client_cpu_s / max(1e-9, result.wall_s),
            "server_cpu_pct": 100 * result.server_cpu_s / max(1e-9, result.wall_s),
            # the whole machine (all cores = 100 %), and what the server and the client do not account for:
            # the database server and anything else running (other users' jobs)
            "machine_cpu_pct": 100 * result.machine_busy_s / max(1e-9, result.machine_total_s),
            "machine_cores_busy": result.machine_busy_s / max(1e-9, result.wall_s),
            "other_cores_busy": (result.machine_busy_s - result.server_cpu_s - result.client_cpu_s)
            / max(1e-9, result.wall_s),
            "load_avg_start_end": list(result.load_avg),
        }
    )
    by_endpoint = defaultdict(list)
    for s in measured:
        by_endpoint[s.endpoint].append(s)
    endpoints = {name: latency_stats(by_endpoint[name]) for name in MIX if name in by_endpoint}
    # Worst seconds: the p99 over each one-second slice of the run (finds stalls: GC, checkpoints, vacuum).
    slices: dict[int, list[float]] = defaultdict(list)
    for s in measured:
        if s.latency is not None and s.error is None:
            slices[int(s.due - result.t0)].append(s.latency * 1000)
    per_second = {str(k): round(pct(v, 99) or 0, 2) for k, v in sorted(slices.items())}
    return {"overall": overall, "endpoints": endpoints, "p99_by_second_ms": per_second}


# ------------------------------------------------------------------------------------------------- profile


def profile_storage(url: str, seeded: Seeded, repeats: int = 30) -> dict[str, Any]:
    """Time the storage calls behind each endpoint in-process (median ms over `repeats`), and EXPLAIN the
    candidate queries: attributes an endpoint's latency to its queries."""
    from sqlalchemy.dialects import postgresql, sqlite

    from search import db
    from search.storage import Storage

    storage = Storage(url)
    sid = seeded.search_id
    cid = seeded.candidate_ids[len(seeded.candidate_ids) // 2]
    calls = {
        "get_job": lambda: storage.get_job(sid),
        "hypervolume_history (search detail)": lambda: storage.hypervolume_history(sid),
        "candidate_counts (search detail)": lambda: storage.candidate_counts(sid),
        "candidates on_front (pareto)": lambda: storage.candidates(sid, on_front=True, order_by="val_bpb"),
        "candidates page id offset 0": lambda: storage.candidates(sid, order_by="id", limit=50),
        "candidates page id offset 9000": lambda: storage.candidates(
            sid, order_by="id", limit=50, offset=9000
        ),
        "candidates page -val_bpb offset 5000": lambda: storage.candidates(
            sid, order_by="-val_bpb", limit=50, offset=5000
        ),
        "candidates page decode_ms limit 200": lambda: storage.candidates(
            sid, order_by="decode_ms", limit=200
        ),
        "count_candidates": lambda: storage.count_candidates(sid),
        "count_candidates status=completed": lambda: storage.count_candidates(sid, status="completed"),
        "get_candidate": lambda: storage.get_candidate(cid),
        "queue": lambda: storage.queue(["queued", "running"], None, limit=50),
        "list_jobs": lambda: storage.list_jobs(kind="search", limit=50),
    }
    # calls that only some versions of the API make
    if hasattr(storage, "lineage"):
        calls["lineage (candidate detail)"] = lambda: storage.lineage(cid)
    if hasattr(storage, "children"):
        calls["children (candidate detail)"] = lambda: storage.child_ids(cid)
    if hasattr(storage, "finished_since"):
        calls["finished_since from start (feed)"] = lambda: storage.finished_since(sid, None, limit=50)
    timings: dict[str, float] = {}
    fastest: dict[str, float] = {}  # the minimum: what a call costs when nothing else competes for the CPU
    try:
        for name, call in calls.items():
            call()
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                call()
                times.append((time.perf_counter() - t) * 1000)
            timings[name] = round(statistics.median(times), 3)
            fastest[name] = round(min(times), 3)
        from sqlalchemy import select

        t = db.candidates
        plans = {}
        queries = {
            "page sort -val_bpb": select(t)
            .where(t.c.job_id == sid)
            .order_by(t.c.val_bpb.desc().nulls_last(), t.c.id.desc())
            .offset(5000)
            .limit(50),
            "page sort id": select(t).where(t.c.job_id == sid).order_by(t.c.id.asc()).offset(9000).limit(50),
            "hypervolume history": select(db.hypervolume_history)
            .where(db.hypervolume_history.c.job_id == sid)
            .order_by(db.hypervolume_history.c.n_evaluations),
            "pareto": select(t).where(t.c.job_id == sid, t.c.on_front.is_(True)).order_by(t.c.val_bpb),
        }
        dialect = sqlite.dialect() if storage.is_sqlite else postgresql.dialect()
        with storage.engine.connect() as conn:
            for name, query in queries.items():
                compiled = query.compile(dialect=dialect, compile_kwargs={"literal_binds": True})
                prefix = "EXPLAIN QUERY PLAN " if storage.is_sqlite else "EXPLAIN ANALYZE "
                rows = conn.exec_driver_sql(prefix + str(compiled)).fetchall()
                plans[name] = [" ".join(str(c) for c in row) for row in rows]
    finally:
        storage.close()
    return {"median_ms": timings, "min_ms": fastest, "plans": plans}


# ------------------------------------------------------------------------------------------------- report


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def overall_table(results: dict[str, dict]) -> str:
    head = (
        "| backend | sent | completed | errors | achieved rps | p50 ms | p90 ms | p99 ms | max ms | "
        "p99 <= 100 ms | sched lag p99 / max ms | client CPU | server CPU | other CPU (cores) | load avg |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for backend, r in results.items():
        o = r["summary"]["overall"]
        errors = o["errors"]
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(o["errors_by_kind"].items()))
        if r.get("database_restarted_during_load"):
            kinds += "; the database server was restarted by another process during the run"
        lines.append(
            f"| {backend} | {o['sent']} | {o['completed']} | {errors}{f' ({kinds})' if kinds else ''} | "
            f"{o['achieved_rps']:.1f} | {_ms(o['p50_ms'])} | {_ms(o['p90_ms'])} | {_ms(o['p99_ms'])} | "
            f"{_ms(o['max_ms'])} | "
            f"{'yes' if o['p99_ms'] is not None and o['p99_ms'] <= TARGET_P99_MS and not errors else 'NO'} | "
            f"{_ms(o['sched_lag_p99_ms'])} / {_ms(o['sched_lag_max_ms'])} | {o['client_cpu_pct']:.0f} % | "
            f"{o['server_cpu_pct']:.0f} % | {max(0.0, o['other_cores_busy']):.2f} | "
            f"{o['load_avg_start_end'][0]:.1f} -> {o['load_avg_start_end'][1]:.1f} |"
        )
    return "\n".join(lines)


def endpoint_table(results: dict[str, dict]) -> str:
    lines = [
        "| backend | endpoint | n | errors | p50 ms | p90 ms | p99 ms | max ms | mean bytes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for backend, r in results.items():
        for name, e in r["summary"]["endpoints"].items():
            lines.append(
                f"| {backend} | {name} | {e['sent']} | {e['errors']} | {_ms(e['p50_ms'])} | "
                f"{_ms(e['p90_ms'])} | {_ms(e['p99_ms'])} | {_ms(e['max_ms'])} | "
                f"{'-' if e['mean_bytes'] is None else round(e['mean_bytes'])} |"
            )
    return "\n".join(lines)


def costs_table(results: dict[str, dict]) -> str:
    rows = {b: r["endpoint_costs"] for b, r in results.items() if r.get("endpoint_costs")}
    if not rows:
        return ""
    names = [n for n in MIX if any(n in c["endpoints"] for c in rows.values())]
    lines = [
        "| endpoint | " + " | ".join(f"{b}: idle p50 ms / server CPU ms" for b in rows) + " |",
        "|---|" + "---|" * len(rows),
    ]
    for name in names:
        cells = []
        for c in rows.values():
            e = c["endpoints"].get(name)
            cells.append("-" if e is None else f"{e['idle_p50_ms']:.1f} / {e['server_cpu_ms']:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append(
        "| **the mix, per request** | "
        + " | ".join(
            f"server CPU {c['mix_server_cpu_ms']:.2f} ms: at most ~{c['capacity_rps_one_core']:.0f} req/s on "
            "one core"
            for c in rows.values()
        )
        + " |"
    )
    return "\n".join(lines)


def git_state() -> dict[str, Any]:
    def git(*cmd: str) -> str:
        try:
            return subprocess.run(
                ["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=30, check=False
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = [
        line[3:] for line in git("status", "--porcelain", "--", "api", "search", "migrations").splitlines()
    ]
    return {"commit": git("rev-parse", "--short", "HEAD"), "uncommitted_in_api_search_migrations": dirty}


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = None
    with contextlib.suppress(OSError, ValueError):
        mem = int(Path("/proc/meminfo").read_text().split()[1]) // 1024 // 1024
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": mem,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def write_results(results: dict[str, dict], args: argparse.Namespace, command: str, wall_s: float) -> None:
    import aiohttp
    import fastapi
    import sqlalchemy
    import uvicorn

    RESULTS.mkdir(parents=True, exist_ok=True)
    versions = {
        "uvicorn": uvicorn.__version__,
        "fastapi": fastapi.__version__,
        "sqlalchemy": sqlalchemy.__version__,
        "aiohttp": aiohttp.__version__,
    }
    payload = {
        "target": {
            "candidates": args.candidates,
            "rate_rps": args.rate,
            "duration_s": args.duration,
            "p99_ms": TARGET_P99_MS,
        },
        "command": command,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "wall_s": round(wall_s, 1),
        "machine": machine(),
        "git": git_state(),
        "versions": versions,
        "mix": MIX,
        "client": args.client,
        "arrivals": args.arrivals,
        "warmup_s": args.warmup,
        "backends": results,
    }
    (RESULTS / "api_load.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    (RESULTS / "api_load.md").write_text(render_markdown(payload))


def attach(label: str, path: Path) -> None:
    """Store another run's results (e.g. of a patched tree) in api_load.json under attached[label] and
    re-render api_load.md with them: a before/after comparison in one report."""
    payload = json.loads((RESULTS / "api_load.json").read_text())
    other = json.loads(Path(path).read_text())
    other.pop("attached", None)
    payload.setdefault("attached", {})[label] = other
    (RESULTS / "api_load.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    (RESULTS / "api_load.md").write_text(render_markdown(payload))


def _run_tables(results: dict[str, dict], level: str = "##") -> list[str]:
    md = [
        f"{level} Overall",
        "",
        overall_table(results),
        "",
        f"{level} Per endpoint",
        "",
        endpoint_table(results),
        "",
    ]
    costs = costs_table(results)
    if costs:
        md += [
            f"{level} Cost per request (closed loop, one request at a time, before the load)",
            "",
            (
                "Latency on an otherwise idle server, and the server process's CPU time per request (from "
                "/proc/PID/task/*/schedstat): with one worker, the GIL makes one core the ceiling, so the "
                "mix's "
                "CPU per request bounds the sustainable rate."
            ),
            "",
            costs,
            "",
        ]
    profiles = {b: r["profile"] for b, r in results.items() if r.get("profile")}
    if profiles:
        md += [
            f"{level} Storage calls behind the endpoints (in-process, no HTTP; min / median ms of 30)",
            "",
            "| call | " + " | ".join(profiles) + " |",
            "|---|" + "---|" * len(profiles),
        ]
        names = list(next(iter(profiles.values()))["median_ms"])
        for name in names:
            md.append(
                f"| {name} | "
                + " | ".join(
                    f"{p['min_ms'].get(name, '-')} / {p['median_ms'].get(name, '-')}"
                    for p in profiles.values()
                )
                + " |"
            )
        md.append("")
    return md


def _describe_code(git: dict) -> str:
    if git.get("description"):  # set by hand for a run on a copy of the tree (its own commit means nothing)
        return git["description"]
    dirty = git.get("uncommitted_in_api_search_migrations") or []
    return f"commit {git.get('commit')}" + (
        f" plus uncommitted changes to {len(dirty)} file(s) under api/, search/, "
        "migrations/ (the shared working tree as it was)"
        if dirty
        else ""
    )


def render_markdown(payload: dict[str, Any]) -> str:
    target, info, results = payload["target"], payload["machine"], payload["backends"]
    versions = payload["versions"]
    md = [
        "# Coordinator API under load",
        "",
        (
            f"Target (issue 5): {target['candidates']:,} candidates in one search, open-loop "
            f"{target['rate_rps']:g} "
            f"requests/s for {target['duration_s']:g} s on loopback, p99 <= {target['p99_ms']:g} ms, on "
            "SQLite and "
            "PostgreSQL."
        ),
        "",
        f"- Command: `{payload['command']}` (wall time {payload['wall_s']:.0f} s, seeding included)",
        (
            f"- Machine: {info['cpus']}-core VM ({info['cpu']}), {info['memory_gib']} GiB; Python "
            f"{info['python']}; "
            f"{payload['date']}. Server, load generator and PostgreSQL share the same {info['cpus']} cores. "
            "Databases: " + ", ".join(f"{b}: {r['database']}" for b, r in results.items()) + "."
        ),
        f"- Code: {_describe_code(payload['git'])}.",
        (
            f"- Server: one uvicorn worker (h11, asyncio; access log off), FastAPI {versions['fastapi']}, "
            f"SQLAlchemy {versions['sqlalchemy']}; no job runner, no scheduler (HYBRIDNAS_RUNNERS=0, "
            "HYBRIDNAS_SCHEDULER=0)."
        ),
        (
            f"- Load: open loop, {payload['arrivals']} arrivals; latency measured from each request's "
            "scheduled send "
            f"time (no coordinated omission); {payload['client']} client, 10 s timeout per request; "
            f"{payload['warmup_s']:g} s warm-up at the same rate excluded. Mix (weights): "
            + ", ".join(f"{k} {v}" for k, v in payload["mix"].items())
            + "."
        ),
        "- Data: "
        + "; ".join(
            f"{b}: {r['seed']['n_candidates']:,} candidates ("
            + ", ".join(f"{k} {v}" for k, v in r["seed"]["counts"].items() if v)
            + f"), front {r['seed']['front_size']}, {r['seed']['hv_points']:,} hypervolume points, "
            f"{r['seed'].get('training_results', 0):,} training and {r['seed'].get('latency_results', 0):,} "
            "latency "
            f"results, {r['seed']['other_jobs']} other jobs, seeded in {r['seed']['seconds']:.1f} s"
            for b, r in results.items()
        )
        + ".",
        (
            "- Achieved rps = 2xx responses / (first due time to last response). Scheduling lag = how late a "
            "request actually left its due time (the load generator's own health); client/server CPU = % of "
            "one core over the measured window; other CPU = cores busy with anything else (the database "
            "server, and other users' work on this shared VM); load avg = the 1-minute load average at the "
            "window's start and end."
        ),
        "",
        *_run_tables(results),
    ]
    for label, other in (payload.get("attached") or {}).items():
        md += [
            f"## {label}",
            "",
            (
                f"`{other['command']}` run on {_describe_code(other['git'])}, {other['date']}, same machine "
                f"(wall time {other['wall_s']:.0f} s)."
            ),
            "",
            *_run_tables(other["backends"], "###"),
        ]
    # A hand-written "## Findings" section (analysis of the numbers) survives a rerun.
    previous = RESULTS / "api_load.md"
    if previous.exists() and "\n## Findings" in previous.read_text():
        md += ["## Findings" + previous.read_text().split("\n## Findings", 1)[1].rstrip(), ""]
    return "\n".join(md)


# ------------------------------------------------------------------------------------------------- main


def run_backend(backend: str, args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"hybridnas-load-{backend}-"))
    try:
        with backend_database(backend, workdir, args.pg_admin_url) as url:
            print(f"[{backend}] seeding {args.candidates:,} candidates ...", flush=True)
            seeded = seed_database(url, args.candidates, seed=args.seed)
            print(
                f"[{backend}] seeded in {seeded.seconds:.1f} s: {seeded.counts}, front {seeded.front_size}, "
                f"{seeded.hv_points} hypervolume points, db {seeded.db_bytes / 1e6:.1f} MB",
                flush=True,
            )
            version = server_version(url)
            profile = profile_storage(url, seeded) if args.profile else None
            if profile:
                for name, ms in profile["median_ms"].items():
                    print(
                        f"[{backend}]   {name:45s} min {profile['min_ms'][name]:8.3f} ms, median {ms:8.3f} ms"
                    )
                for name, plan in profile["plans"].items():
                    print(f"[{backend}]   plan {name}:\n" + "\n".join(f"        {line}" for line in plan))
            rng = random.Random(args.seed)
            warmup_n = round(args.warmup * args.rate)
            with api_server(url, workdir, workdir / "server.log") as (base, proc):
                endpoints = served_endpoints(base)
                missing = sorted(set(MIX) - endpoints)
                if missing:
                    print(
                        f"[{backend}] the server has no route for {', '.join(missing)}: left out of the mix"
                    )
                plan = plan_requests(seeded, warmup_n + round(args.duration * args.rate), rng, endpoints)
                costs = endpoint_costs(base, plan, proc.pid) if args.profile else None
                if costs:
                    for name, c in costs["endpoints"].items():
                        print(
                            f"[{backend}]   {name:18s} idle p50 {c['idle_p50_ms']:7.2f} ms, server CPU "
                            f"{c['server_cpu_ms']:6.2f} ms/request"
                        )
                    print(
                        f"[{backend}]   the mix costs {costs['mix_server_cpu_ms']} ms of server CPU per "
                        "request: "
                        f"at most ~{costs['capacity_rps_one_core']} req/s on one core (the GIL)",
                        flush=True,
                    )
                print(
                    f"[{backend}] server up at {base}; {args.rate:g} req/s for {args.duration:g} s "
                    f"(+{args.warmup:g} s warm-up) ...",
                    flush=True,
                )
                db_started = database_started_at(url)
                load = asyncio.run(
                    run_load(
                        base,
                        plan,
                        args.rate,
                        warmup_n,
                        args.client,
                        args.arrivals,
                        args.timeout,
                        args.seed,
                        proc.pid,
                    )
                )
                db_restarted = database_started_at(url) != db_started
                if db_restarted:
                    print(
                        f"[{backend}] WARNING: the database server restarted during the load (not by this "
                        "benchmark): errors around then are the restart's",
                        flush=True,
                    )
            server_log = (workdir / "server.log").read_text(errors="replace")
            summary = summarize(load, args.rate, args.duration)
            return {
                "database": version,
                "endpoints_left_out": missing,
                "database_restarted_during_load": db_restarted,
                "seed": {
                    k: v for k, v in seeded.__dict__.items() if k not in ("candidate_ids", "url", "cursors")
                },
                "summary": summary,
                "profile": profile,
                "endpoint_costs": costs,
                "server_log_tail": server_log[-3000:] if server_log.strip() else "",
            }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backends", default="sqlite,postgresql", help="comma-separated: sqlite,postgresql")
    parser.add_argument("--rate", type=float, default=100.0, help="offered load, requests/s")
    parser.add_argument("--duration", type=float, default=30.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds at the same rate before measuring")
    parser.add_argument("--candidates", type=int, default=10_000)
    parser.add_argument("--arrivals", choices=("uniform", "poisson"), default="uniform")
    parser.add_argument("--client", choices=("aiohttp", "httpx"), default="aiohttp")
    parser.add_argument("--timeout", type=float, default=10.0, help="per-request timeout, s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--pg-admin-url",
        default=os.environ.get("HYBRIDNAS_TEST_POSTGRES_URL") or DEFAULT_PG_ADMIN,
        help="a PostgreSQL role that may CREATE DATABASE (a fresh one is made and dropped)",
    )
    parser.add_argument("--profile", action="store_true", help="also time the storage calls and EXPLAIN them")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write benchmarks/results")
    parser.add_argument(
        "--attach",
        metavar="LABEL=PATH",
        default=None,
        help="no run: add another run's api_load.json (e.g. of a patched tree) to this one's, "
        "as a section titled LABEL, and re-render api_load.md",
    )
    parser.add_argument(
        "--render", action="store_true", help="no run: re-render api_load.md from api_load.json"
    )
    parser.add_argument(
        "--sweep",
        default=None,
        metavar="RATES",
        help="comma-separated offered rates: the sweep of benchmarks/api_sweep.py (goodput, "
        "p99 "
        "and refusals per rate; --duration per rate) instead of one run",
    )
    parser.add_argument(
        "--baseline-tree",
        default=None,
        metavar="PATH",
        help="with --sweep: also serve this checkout (another commit) and measure it alternately",
    )
    parser.add_argument("--settle", type=float, default=3.0, help="with --sweep: seconds idle between rates")
    parser.add_argument(
        "--api-workers",
        default="1",
        help="with --sweep: comma-separated HYBRIDNAS_API_WORKERS values, each served and measured",
    )
    parser.add_argument(
        "--render-sweep",
        action="store_true",
        help="no run: re-render api_sweep.md and its PNG from api_sweep.json",
    )
    args = parser.parse_args(argv)
    if args.render_sweep:
        import api_sweep

        return api_sweep.rerender()
    if args.sweep:
        import api_sweep

        args.sweep_rates = [float(r) for r in args.sweep.split(",") if r.strip()]
        args.api_workers = [int(n) for n in args.api_workers.split(",") if n.strip()]
        command = "python benchmarks/api_load.py " + " ".join(argv if argv is not None else sys.argv[1:])
        return api_sweep.main(args, command)
    if args.attach:
        label, _, path = args.attach.partition("=")
        if not label or not path:
            parser.error("--attach wants LABEL=PATH")
        attach(label, Path(path))
        print(f"attached {path} as {label!r}; wrote {RESULTS / 'api_load.md'}")
        return 0
    if args.render:
        (RESULTS / "api_load.md").write_text(
            render_markdown(json.loads((RESULTS / "api_load.json").read_text()))
        )
        print(f"wrote {RESULTS / 'api_load.md'}")
        return 0
    if args.rate <= 0 or args.duration <= 0:
        parser.error("--rate and --duration must be positive")

    command = "python benchmarks/api_load.py " + " ".join(argv if argv is not None else sys.argv[1:])
    started = time.perf_counter()
    results: dict[str, dict] = {}
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        results[backend] = run_backend(backend, args)
        print()
        print(overall_table({backend: results[backend]}))
        print()
        print(endpoint_table({backend: results[backend]}))
        print(flush=True)
        if results[backend]["server_log_tail"]:
            print(f"[{backend}] server log (tail):\n{results[backend]['server_log_tail']}")
    wall = time.perf_counter() - started
    print("## all backends")
    print(overall_table(results))
    print(f"\nwall time {wall:.0f} s")
    if not args.no_write:
        write_results(results, args, command.strip(), wall)
        print(f"wrote {RESULTS / 'api_load.md'} and {RESULTS / 'api_load.json'}")
    failed = [
        b
        for b, r in results.items()
        if r["summary"]["overall"]["p99_ms"] is None
        or r["summary"]["overall"]["p99_ms"] > TARGET_P99_MS
        or r["summary"]["overall"]["errors"]
    ]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
