"""The read API under rising load (issue 9, part B): offered rate -> goodput, p99 of the admitted requests,
share refused (503) and how fast they are refused, per backend; the knee (capacity) and what twice the
capacity does. Run as `python benchmarks/api_load.py --sweep 50,100,...` (this module does the work, with
api_load.py's seeding, request mix and open-loop load generator).

Each backend's database is seeded once (10,000 candidates, as api_load.py does); one `hybridnas serve` per
tree under test (API only: HYBRIDNAS_RUNNERS=0, no scheduler) serves it. With `--baseline-tree PATH` (a
checkout of another commit) both trees are served at once and measured alternately at each rate, side by side
on the same database, so that the machine's drift (a shared VM) hits both alike.

The capacity is read two ways: the knee, the most goodput served at an admitted p99 <= 100 ms while under 5 %
of the offered requests were refused or failed; and the most goodput served at an admitted p99 <= 100 ms
whatever share was refused (what the server finishes in time when pushed). The overload point is the first
measured rate at or above twice the capacity's offered rate. Between measurements the harness waits until
every server is idle: a server that fell behind keeps working on requests its clients gave up on, which would
slow the next measurement. Targets: at the overload point the goodput stays >= 90 % of the capacity, the
refusals take <= 10 ms (p99) and the admitted requests keep p99 <= 250 ms; the capacity itself >= 300 req/s at
p99 <= 100 ms.

Results: benchmarks/results/api_sweep.md, api_sweep.json and api_sweep.png.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import api_load as load

RESULTS = load.RESULTS
CAPACITY_P99_MS = 100.0
OVERLOAD_P99_MS = 250.0
REFUSAL_P99_MS = 10.0
CAPACITY_TARGET_RPS = 300.0


@contextlib.contextmanager
def serve(
    url: str, tree: Path, workdir: Path, label: str, extra_env: dict[str, str]
) -> Iterator[tuple[str, subprocess.Popen]]:
    """`hybridnas serve` of `tree` (its own code on PYTHONPATH), API only, on a free port."""
    port = load.free_port()
    data_dir = workdir / f"data-{label}"
    data_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "HYBRIDNAS_DATABASE_URL": url,
        "HYBRIDNAS_DATA_DIR": str(data_dir),
        "HYBRIDNAS_TOKEN": load.TOKEN,
        "HYBRIDNAS_RUNNERS": "0",
        "HYBRIDNAS_SCHEDULER": "false",
        "PYTHONPATH": str(tree),
        "PYTHONUNBUFFERED": "1",
    }
    log_path = workdir / f"serve-{label.replace(' ', '-').replace(',', '')}.log"
    cmd = [sys.executable, "-m", "api.cli", "serve", "--port", str(port), "--log-level", "warning"]
    with load.served(cmd, tree, env, port, log_path, signal.SIGTERM, 30) as running:
        yield running


def wait_idle(pid: int, at_least_s: float, most_s: float = 120.0, idle_share: float = 0.05) -> float:
    """Sleep at least `at_least_s`, then until the server (with its worker processes) uses under
    `idle_share` of a core over half a second; the seconds waited."""
    started = time.monotonic()
    time.sleep(at_least_s)
    before = load.cpu_seconds(pid)
    while time.monotonic() - started < most_s:
        time.sleep(0.5)
        now = load.cpu_seconds(pid)
        if now - before < 0.5 * idle_share:
            break
        before = now
    return time.monotonic() - started


def point(result: load.LoadResult, rate: float) -> dict[str, Any]:
    """One measured rate: what was served, refused and lost."""
    measured = [s for s in result.samples if not s.warmup]
    window = max(1e-9, result.end - result.t0)
    ok = [s.latency * 1000 for s in measured if s.error is None and s.latency is not None]
    refused = [s.latency * 1000 for s in measured if s.status == 503 and s.latency is not None]
    failed = [s for s in measured if s.error is not None and s.status != 503]
    return {
        "offered_rps": rate,
        "sent": len(measured),
        "goodput_rps": round(len(ok) / window, 1),
        "ok_p50_ms": load.pct(ok, 50),
        "ok_p99_ms": load.pct(ok, 99),
        "refused_share": round(len(refused) / max(1, len(measured)), 4),
        "refused_p99_ms": load.pct(refused, 99),
        "failed": len(failed),
        "failed_kinds": dict(load.Counter(s.error for s in failed)),
        "server_cpu_pct": round(100 * result.server_cpu_s / max(1e-9, result.wall_s), 1),
        "client_cpu_pct": round(100 * result.client_cpu_s / max(1e-9, result.wall_s), 1),
        "sched_lag_p99_ms": load.pct([s.lag * 1000 for s in measured], 99),
    }


def knee(points: list[dict], shed_limit: float | None = 0.05) -> dict | None:
    """The capacity: the most goodput served at admitted p99 <= 100 ms while under `shed_limit` of the
    offered requests were refused or failed (above that the server sheds load rather than keeping up);
    `shed_limit=None`: whatever was refused (the most the server serves in time when pushed)."""
    good = [
        p
        for p in points
        if p["ok_p99_ms"] is not None
        and p["ok_p99_ms"] <= CAPACITY_P99_MS
        and (shed_limit is None or (p["refused_share"] * p["sent"] + p["failed"]) < shed_limit * p["sent"])
    ]
    return max(good, key=lambda p: p["goodput_rps"]) if good else None


def verdict(points: list[dict], shed_limit: float | None = 0.05) -> dict[str, Any]:
    capacity = knee(points, shed_limit)
    out: dict[str, Any] = {
        "capacity_rps": capacity["goodput_rps"] if capacity else None,
        "knee_offered_rps": capacity["offered_rps"] if capacity else None,
    }
    if capacity is None:
        return out
    over = [p for p in points if p["offered_rps"] >= 2 * capacity["offered_rps"]]
    if over:
        o = min(over, key=lambda p: p["offered_rps"])
        out.update(
            {
                "overload_offered_rps": o["offered_rps"],
                "overload_goodput_share": round(o["goodput_rps"] / capacity["goodput_rps"], 3),
                "overload_ok_p99_ms": o["ok_p99_ms"],
                "overload_refused_p99_ms": o["refused_p99_ms"],
                "overload_holds": (
                    o["goodput_rps"] >= 0.9 * capacity["goodput_rps"]
                    and (o["refused_p99_ms"] or 0) <= REFUSAL_P99_MS
                    and (o["ok_p99_ms"] or 1e9) <= OVERLOAD_P99_MS
                    and o["failed"] == 0
                ),
            }
        )
    out["capacity_holds"] = capacity["goodput_rps"] >= CAPACITY_TARGET_RPS * 0.99
    return out


def sweep_backend(backend: str, args, trees: dict[str, tuple[Path, dict]]) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"hybridnas-sweep-{backend}-"))
    try:
        with load.backend_database(backend, workdir, args.pg_admin_url) as url:
            seeded = load.seed_database(url, args.candidates, seed=args.seed)
            print(f"[{backend}] seeded {seeded.counts} in {seeded.seconds:.1f} s", flush=True)
            with contextlib.ExitStack() as stack:
                servers = {
                    label: stack.enter_context(serve(url, tree, workdir, label, env))
                    for label, (tree, env) in trees.items()
                }
                curves: dict[str, list[dict]] = {label: [] for label in trees}
                for rate in args.sweep_rates:
                    for label, (base, proc) in servers.items():
                        endpoints = load.served_endpoints(base)
                        rng = random.Random(args.seed * 1000 + int(rate))
                        warmup_n = round(args.warmup * rate)
                        plan = load.plan_requests(
                            seeded, warmup_n + round(args.duration * rate), rng, endpoints
                        )
                        result = asyncio.run(
                            load.run_load(
                                base,
                                plan,
                                rate,
                                warmup_n,
                                args.client,
                                args.arrivals,
                                args.timeout,
                                args.seed,
                                proc.pid,
                            )
                        )
                        p = point(result, rate)
                        curves[label].append(p)
                        print(
                            f"[{backend}] {label:>9} offered {rate:6.0f}: goodput {p['goodput_rps']:6.1f}, "
                            f"p99 {load._ms(p['ok_p99_ms'])} ms, refused {100 * p['refused_share']:5.1f} % "
                            f"(p99 {load._ms(p['refused_p99_ms'])} ms), failed {p['failed']}, "
                            f"server CPU {p['server_cpu_pct']} %, client CPU {p['client_cpu_pct']} %, send "
                            "lag p99 "
                            f"{load._ms(p['sched_lag_p99_ms'])} ms",
                            flush=True,
                        )
                        # A server that fell behind keeps working on requests its clients gave up on: the next
                        # measurement (of any server) starts once it is idle again.
                        wait_idle(proc.pid, args.settle)
            return {
                "database": load.server_version(url),
                "trees": {
                    label: {"points": pts, "verdict": verdict(pts), "verdict_served": verdict(pts, None)}
                    for label, pts in curves.items()
                },
            }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def summary_table(trees: dict, key: str, title: str) -> list[str]:
    lines = [
        f"| tree | {title} | at twice its offered rate: goodput share, admitted p99, refused p99 | "
        "overload target | capacity target |",
        "|---|---|---|---|---|",
    ]
    for label, tree in trees.items():
        v = tree[key]
        if v.get("capacity_rps") is None:
            lines.append(
                f"| {label} | none measured (p99 > {CAPACITY_P99_MS:g} ms at every rate) | - | no | no |"
            )
            continue
        over = (
            f"{v['overload_goodput_share']:.0%} at {v['overload_offered_rps']:g} req/s, "
            f"{load._ms(v['overload_ok_p99_ms'])} ms, {load._ms(v['overload_refused_p99_ms'])} ms"
            if "overload_offered_rps" in v
            else "not measured (no rate that high)"
        )
        capacity = (
            "met" if v["capacity_holds"] else f"missed ({v['capacity_rps']:g} of {CAPACITY_TARGET_RPS:g})"
        )
        lines.append(
            f"| {label} | {v['capacity_rps']:g} req/s (offered {v['knee_offered_rps']:g}) | {over} | "
            f"{'met' if v.get('overload_holds') else 'missed'} | {capacity} |"
        )
    return lines


def render(payload: dict) -> str:
    lines = [
        "# The read API under rising load",
        "",
        "Offered rate -> goodput, admitted p99, refusals (503 + Retry-After) and their p99; capacity = the "
        f"most goodput served at admitted p99 <= {CAPACITY_P99_MS:g} ms, with < 5 % of the offered requests "
        "refused or failed (the knee) or with any share refused; overload = the first rate at or above twice "
        "the capacity's offered rate. "
        "Targets (issue 9): at the overload point goodput "
        f">= 90 % of capacity, refusals p99 <= {REFUSAL_P99_MS:g} ms, admitted p99 <= {OVERLOAD_P99_MS:g} "
        f"ms; capacity >= {CAPACITY_TARGET_RPS:g} req/s.",
        "",
        f"- Command: `{payload['command']}`",
        f"- Machine: {payload['machine']['cpus']}-core VM ({payload['machine']['cpu']}), "
        f"{payload['machine']['memory_gib']} GiB; Python {payload['machine']['python']}; {payload['date']}. "
        "Server, load generator and PostgreSQL share the 2 cores.",
        f"- Trees: {', '.join(f'{k} = {v}' for k, v in payload['trees'].items())}; each served by its own "
        "`hybridnas serve` (API only), measured alternately at each rate on the same seeded database.",
        f"- Load: open loop, {payload['arrivals']} arrivals, {payload['duration_s']:g} s per rate after "
        f"{payload['warmup_s']:g} s of warm-up; latency from each request's due time; the api_load.py mix "
        "over a 10,000-candidate search.",
        "",
    ]
    for backend, result in payload["backends"].items():
        for tree in result["trees"].values():
            tree["verdict"] = verdict(tree["points"])  # re-rendering applies the definitions above
            tree["verdict_served"] = verdict(tree["points"], shed_limit=None)
        lines += [
            f"## {backend} ({result['database']})",
            "",
            "| tree | offered req/s | goodput req/s | admitted p50 ms | admitted p99 ms | refused % | "
            "refused p99 ms | failed | server CPU % | client CPU % |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for label, tree in result["trees"].items():
            for p in tree["points"]:
                lines.append(
                    f"| {label} | {p['offered_rps']:g} | {p['goodput_rps']:g} | {load._ms(p['ok_p50_ms'])} | "
                    f"{load._ms(p['ok_p99_ms'])} | {100 * p['refused_share']:.1f} | "
                    f"{load._ms(p['refused_p99_ms'])} | {p['failed']} | {p['server_cpu_pct']} | "
                    f"{p['client_cpu_pct']} |"
                )
        for key, title in (
            ("verdict", "capacity = the knee (< 5 % refused)"),
            ("verdict_served", "capacity = the most goodput at admitted p99 <= 100 ms (any share refused)"),
        ):
            lines += ["", *summary_table(result["trees"], key, title)]
        lines.append("")
    lines += ["![goodput and p99 against the offered rate](api_sweep.png)", ""]
    return "\n".join(lines)


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = list(payload["backends"])
    fig, axes = plt.subplots(2, len(backends), figsize=(6 * len(backends), 7), squeeze=False)
    for col, backend in enumerate(backends):
        for label, tree in payload["backends"][backend]["trees"].items():
            xs = [p["offered_rps"] for p in tree["points"]]
            axes[0][col].plot(xs, [p["goodput_rps"] for p in tree["points"]], marker="o", label=label)
            axes[1][col].plot(
                xs, [p["ok_p99_ms"] or float("nan") for p in tree["points"]], marker="o", label=label
            )
        top = max(
            p["offered_rps"] for t in payload["backends"][backend]["trees"].values() for p in t["points"]
        )
        axes[0][col].plot([0, top], [0, top], color="grey", linestyle=":", label="offered")
        axes[0][col].set(title=f"{backend}: goodput", xlabel="offered req/s", ylabel="2xx req/s")
        axes[1][col].axhline(CAPACITY_P99_MS, color="grey", linestyle=":")
        axes[1][col].set(title=f"{backend}: admitted p99", xlabel="offered req/s", ylabel="ms", yscale="log")
        for ax in axes[:, col]:
            ax.legend()
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(args, command: str) -> int:
    trees = {
        f"this tree, {n} API process{'es' if n > 1 else ''}": (load.ROOT, {"HYBRIDNAS_API_WORKERS": str(n)})
        for n in args.api_workers
    }
    if args.baseline_tree:
        trees["baseline"] = (Path(args.baseline_tree).resolve(), {})
    started = time.perf_counter()
    backends = {
        b.strip(): sweep_backend(b.strip(), args, trees) for b in args.backends.split(",") if b.strip()
    }
    payload = {
        "command": command,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "wall_s": round(time.perf_counter() - started, 1),
        "machine": load.machine(),
        "git": load.git_state(),
        "trees": {k: _describe(tree) for k, (tree, _env) in trees.items()},
        "arrivals": args.arrivals,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "backends": backends,
    }
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "api_sweep.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
        (RESULTS / "api_sweep.md").write_text(render(payload))
        plot(payload, RESULTS / "api_sweep.png")
        print(f"wrote {RESULTS / 'api_sweep.md'}")
    print(render(payload))
    return 0


def rerender() -> int:
    payload = json.loads((RESULTS / "api_sweep.json").read_text())
    (RESULTS / "api_sweep.md").write_text(render(payload))
    plot(payload, RESULTS / "api_sweep.png")
    print(f"wrote {RESULTS / 'api_sweep.md'}")
    return 0


def _describe(tree: Path) -> str:
    """The checkout and its commit."""
    out = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return f"{tree.name or tree} at {out.stdout.strip() or '?'}"
