"""The long chaos run (issue 9): a real search through `hybridnas serve` on local Ray while a seeded harness
(tests/chaos.py) kill -9s a random Ray worker or the coordinator at random moments, at least 10 times per
backend, and restarts PostgreSQL once in the PostgreSQL run. Prints a table and writes
benchmarks/results/chaos.md and chaos.json.

    .venv/bin/python benchmarks/chaos.py [--kills 12] [--budget 30] [--seed 1] [--backends sqlite,postgresql]
        [--pg-admin-url postgresql+psycopg://hybridnas:hybridnas@127.0.0.1:5432/hybridnas_test]

PostgreSQL: a fresh database per run under the admin URL (HYBRIDNAS_TEST_POSTGRES_URL by default); the
restart uses Debian's pg_ctlcluster (root), as `.ci/run` starts the server.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import pg  # noqa: E402
from tests.chaos import run_chaos  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def _machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem = (
        int(
            next(
                line.split()[1]
                for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")
            )
        )
        / 2**20
    )
    return f"{os.cpu_count()}-core VM ({cpu}), {mem:.0f} GiB; Python {platform.python_version()}"


def _commit() -> str:
    out = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True)
    return out.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def render(runs: list[dict], command: str) -> str:
    lines = [
        "# Chaos run",
        "",
        "A real search through `hybridnas serve` on local Ray (2 workers) while a seeded harness "
        "(`tests/chaos.py`) kill -9s a random Ray worker or the coordinator (restarted at once) at random "
        "moments while evaluations are in flight; PostgreSQL is restarted once in its run. Checks after each "
        "run: the budget is met, no result key has two results, no completed result was lost or changed, "
        "every failed candidate has a reason, the job holds no lease, the last coordinator exits 0 on "
        "SIGTERM, and no process of the run is left.",
        "",
        f"- Command: `{command}`",
        f"- Machine: {_machine()}; {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; commit {_commit()}",
        "",
        "| backend | seed | budget | worker kills | coordinator kills | PostgreSQL restarts | status | "
        "evaluations | completed | failed | reruns | wall s | checks |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        checks = "all hold" if not r["problems"] else "; ".join(r["problems"])
        lines.append(
            f"| {r['backend']} | {r['seed']} | {r['budget']} | {r['kills'].get('worker', 0)} | "
            f"{r['kills'].get('coordinator', 0)} | {r['postgres_restarts']} | {r['status']} | "
            f"{r['evaluations']} | "
            f"{r['completed']} | {r['failed']} | {r['reruns']} | {r['wall_s']} | {checks} |"
        )
    lines += [
        "",
        "Reruns: attempts beyond the first, summed over the candidates (an evaluation in flight at a "
        "kill runs again; a failed one is retried up to `max_retries` = 3).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=12)
    parser.add_argument("--budget", type=int, default=30)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--pg-admin-url", default=os.environ.get(pg.POSTGRES_ENV))
    args = parser.parse_args()
    if args.pg_admin_url:
        os.environ[pg.POSTGRES_ENV] = args.pg_admin_url
    command = "python benchmarks/chaos.py " + " ".join(sys.argv[1:])
    runs = []
    for i, backend in enumerate(args.backends.split(",")):
        with tempfile.TemporaryDirectory(prefix=f"chaos-{backend}-") as tmp:
            started = time.monotonic()
            with pg.migrated_url(backend, Path(tmp)) as url:
                report = run_chaos(
                    url,
                    backend,
                    Path(tmp),
                    seed=args.seed + i,
                    kills=args.kills,
                    budget=args.budget,
                    postgres_restarts=int(backend == "postgresql"),
                    timeout_s=1800,
                )
            row = report.to_dict()
            runs.append(row)
            print(f"{backend}: {json.dumps(row)} ({time.monotonic() - started:.0f} s)", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "chaos.json").write_text(json.dumps({"command": command, "runs": runs}, indent=1) + "\n")
    text = render(runs, command)
    (RESULTS / "chaos.md").write_text(text)
    print(text)
    if any(r["problems"] for r in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
