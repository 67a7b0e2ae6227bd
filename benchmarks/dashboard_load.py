"""How long the dashboard's search page takes to show a large search, in headless Chromium.

Seeds SQLite searches of the given sizes (benchmarks/api_load.py's seeder: a real aging history with
lineage, failures and a materialized front), starts the real service (`uvicorn api.app:create_app`, API only),
and measures, per run, the time from navigation start to "plot drawn and table rendered": the page sets
`window.hybridnasDrawnAt` two animation frames after `Plotly.react` resolved and the table was filled
(web/static/dashboard.js). Each size of scatter (the page's `points`) is measured twice per run, side by
side: cold, in a fresh browser context (nothing cached: plotly.js is fetched and compiled every time), and
warm, in one context that visited before (its HTTP cache and compiled-code cache, as for a user who comes
back); every run comes after a pause longer than the read cache's TTL (the server reads the database each
time); a warm-up visit is not counted. Targets (issue 10): median <= 1.0 s at 10k candidates, <= 2.0 s at
100k.

    python benchmarks/dashboard_load.py --sizes 10000,100000 --points 1000,2500,5000 --runs 5

Writes benchmarks/results/dashboard_load.md and .json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.api_load import api_server, machine, seed_database  # noqa: E402

TARGETS_S = {10_000: 1.0, 100_000: 2.0}


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    raise SystemExit("no Chromium: apt-get install chromium")


def measure(browser, base: str, path: str, width: int, height: int, context=None) -> dict:
    """One navigation: in a fresh context (cold: nothing cached), or in `context` (warm: the HTTP cache and
    the compiled-code cache of earlier visits, as for a user who comes back)."""
    fresh = context is None
    context = context or browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: m.type == "error" and errors.append(m.text))
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(base + path)
        page.wait_for_function("() => window.hybridnasDrawnAt !== undefined", timeout=60_000)
        timing = page.evaluate(
            """() => {
              const nav = performance.getEntriesByType('navigation')[0];
              const res = performance.getEntriesByType('resource');
              const one = (part) => {
                const r = res.find(e => e.name.includes(part));
                return r ? r.duration : null;
              };
              const plot = document.getElementById('scatter');
              return {
                drawn_ms: window.hybridnasDrawnAt,
                dom_content_loaded_ms: nav.domContentLoadedEventEnd,
                scatter_request_ms: one('/scatter'),
                candidates_request_ms: one('/candidates?'),
                plotly_js_ms: one('plotly'),
                points_in_plot: plot.data.reduce((n, t) => n + t.x.length, 0),
                note: document.getElementById('scatter-note').textContent,
                table_rows: document.querySelectorAll('#candidates tbody tr').length,
              };
            }"""
        )
    finally:
        page.close()
        if fresh:
            context.close()
    timing["console_errors"] = errors
    return timing


def run_size(browser, n: int, points: list[int], runs: int, workdir: Path, viewport: tuple[int, int]) -> list:
    """Seed one search of `n` candidates, serve it, and measure the page at each scatter size; side by side
    (the sizes alternate run by run), so that the machine's drift hits them alike."""
    url = f"sqlite:///{workdir / f'dash-{n}.db'}"
    seeded = seed_database(url, n, seed=7)
    print(f"seeded {n:,} candidates in {seeded.seconds:.1f} s", flush=True)
    paths = {k: f"/searches/{seeded.search_id}?points={k}" for k in points}
    samples: dict[tuple[int, str], list[dict]] = {(k, c): [] for k in points for c in ("cold", "warm")}
    with api_server(url, workdir, workdir / f"serve-{n}.log") as (base, _proc):
        warm = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
        for k in points:  # warm-up: the server's imports and SQLite page cache; the warm context's caches
            measure(browser, base, paths[k], *viewport, context=warm)
        for _ in range(runs):
            for k in points:
                for cache in ("cold", "warm"):
                    time.sleep(1.5)  # past the read cache's TTL (1 s): every run reads the database
                    context = warm if cache == "warm" else None
                    samples[(k, cache)].append(measure(browser, base, paths[k], *viewport, context=context))
        warm.close()
    return [summary(n, k, c, seeded.front_size, samples[(k, c)]) for k in points for c in ("cold", "warm")]


def summary(n: int, points: int, cache: str, front: int, samples: list[dict]) -> dict:
    drawn = [s["drawn_ms"] / 1e3 for s in samples]
    return {
        "candidates": n,
        "points_asked": points,
        "browser_cache": cache,
        "front": front,
        "median_s": statistics.median(drawn),
        "min_s": min(drawn),
        "max_s": max(drawn),
        "target_s": TARGETS_S.get(n),
        "median_scatter_request_ms": statistics.median(s["scatter_request_ms"] or 0 for s in samples),
        "median_candidates_request_ms": statistics.median(s["candidates_request_ms"] or 0 for s in samples),
        "median_plotly_js_ms": statistics.median(s["plotly_js_ms"] or 0 for s in samples),
        "median_dom_content_loaded_ms": statistics.median(s["dom_content_loaded_ms"] for s in samples),
        "points_in_plot": samples[-1]["points_in_plot"],
        "note": samples[-1]["note"],
        "table_rows": samples[-1]["table_rows"],
        "console_errors": sorted({e for s in samples for e in s["console_errors"]}),
        "runs_s": [round(d, 3) for d in drawn],
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| candidates | points asked | browser cache | drawn, median (min-max) | target | scatter request "
        "| table request | plotly.js fetched | points sent | console errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        target = f"<= {r['target_s']:.1f} s" if r["target_s"] else "-"
        met = "" if not r["target_s"] else (" (met)" if r["median_s"] <= r["target_s"] else " (missed)")
        lines.append(
            f"| {r['candidates']:,} | {r['points_asked']:,} | {r['browser_cache']} "
            f"| {r['median_s']:.2f} s ({r['min_s']:.2f}-{r['max_s']:.2f}) | {target}{met} "
            f"| {r['median_scatter_request_ms']:.0f} ms | {r['median_candidates_request_ms']:.0f} ms "
            f"| {r['median_plotly_js_ms']:.0f} ms | {r['points_in_plot']:,} | {len(r['console_errors'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", default="10000,100000", help="candidates per seeded search, comma-separated"
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--points", default="1000", help="scatter sizes to measure (the page's `points`), comma-separated"
    )
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/dashboard_load")
    parser.add_argument(
        "--render", action="store_true", help="rewrite the .md from the .json, measure nothing"
    )
    args = parser.parse_args()
    if args.render:
        args.out.with_suffix(".md").write_text(render(json.loads(args.out.with_suffix(".json").read_text())))
        return
    from playwright.sync_api import sync_playwright

    rows = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dashboard-load-") as tmp, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        try:
            for n in (int(s) for s in args.sizes.split(",")):
                points = [int(k) for k in args.points.split(",")]
                measured = run_size(browser, n, points, args.runs, Path(tmp), (args.width, args.height))
                rows += measured
                print(table(measured), flush=True)
        finally:
            browser.close()
    command = "python benchmarks/dashboard_load.py " + " ".join(sys.argv[1:])
    report = {
        "command": command,
        "machine": machine(),
        "viewport": [args.width, args.height],
        "wall_s": round(time.perf_counter() - started, 1),
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(render(report))
    print(table(rows))


def render(report: dict) -> str:
    rows, (width, height) = report["results"], report["viewport"]
    runs = len(rows[0]["runs_s"]) if rows else 0
    notes = sorted({(r["candidates"], r["points_asked"], r["note"]) for r in rows})
    md = [
        "# Dashboard load: navigation start to plot drawn and table rendered (headless Chromium)",
        "",
        f"`{report['command']}` on a {report['machine']['cpus']}-core VM ({report['machine']['cpu']}), "
        f"viewport {width}x{height}; median of {runs} runs; cold = a fresh browser context (nothing cached), "
        "warm = a context that visited before; the server's read cache cold every run; the browser and the "
        "server share the cores.",
        "",
        table(rows),
        "",
        "What the page says under the plot:",
        "",
        *(f'- {n:,} candidates, {k:,} points: "{note}"' for n, k, note in notes),
    ]
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    main()
