"""Proxy fidelity: does short training rank layouts the way longer training does?

N layouts (random ones from the search space plus the presets at the same scale) are each trained as
independent runs, each with its own full schedule: the short budget, the short budget with another seed
(the seed-noise ceiling), and a budget K times longer. Reported: Spearman and Kendall rank correlation of
val_bpb between short and long with a bootstrap 95 % interval, the same between the two short seeds, and
the correlation within a parameter-count band (within ±25 % of the median size).

The table is written row by row (CSV) and a rerun resumes from it, so a long background run can outlive a
session; the report is recomputed from whatever rows exist.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import statistics
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from proxies.pool import train_many
from search.layout import Layout
from search.space import cpu_space

COLUMNS = [
    "layout_hash",
    "name",
    "operators",
    "n_params",
    "run",
    "steps",
    "seed",
    "status",
    "val_bpb",
    "val_loss",
    "final_train_loss",
    "wall_s",
    "failure_reason",
]


@dataclass(frozen=True)
class FidelityConfig:
    n_layouts: int = 24
    short_steps: int = 100
    long_factor: int = 10
    seed: int = 0  # the layouts' sampling seed and the training seed of the main runs
    noise_seed: int = 1  # the second short run's training seed
    workers: int = 2  # processes, one torch thread each
    bootstrap: int = 2000
    # proxy settings shared by every run (steps and seed are set per run)
    lr: float = 3e-3
    warmup_fraction: float = 0.1
    batch_size: int = 8
    seq_len: int = 128
    eval_tokens: int = 65536
    max_operators: int = 12
    d_model: int = 64


def fidelity_layouts(config: FidelityConfig) -> list[Layout]:
    """Presets re-expressed at the fidelity scale, then random layouts of the grammar, all distinct."""
    space = cpu_space(max_operators=config.max_operators, widths=(config.d_model,))
    dims = space._dims_for(config.d_model)
    n_pairs = config.max_operators // 2
    presets = {
        "llama": f"[A F] x {n_pairs}",
        "mamba2": f"[M2 F] x {n_pairs}",
        "deltanet": f"[D F] x {n_pairs}",
        "nemotron-flash-pattern": "D F M2 F A F M2 F D F M2 F",
    }
    layouts: list[Layout] = []
    for name, ops in presets.items():
        layout = Layout.from_dict({"operators": ops, "name": name, **dims})
        if len(layout.operators) <= config.max_operators:
            layouts.append(layout)
    rng = random.Random(config.seed)
    seen = {lo.content_hash for lo in layouts}
    while len(layouts) < config.n_layouts:
        layout = space.sample_layout(rng)
        if layout.content_hash not in seen:
            seen.add(layout.content_hash)
            layouts.append(layout.replace(name=f"random-{len(layouts)}"))
    return layouts[: config.n_layouts]


def planned_runs(config: FidelityConfig, layouts: list[Layout]) -> list[tuple[Layout, str, int, int]]:
    """(layout, run, steps, seed): all short runs first, then the noise seeds, then the long runs."""
    runs = [(lo, "short", config.short_steps, config.seed) for lo in layouts]
    runs += [(lo, "short_seed", config.short_steps, config.noise_seed) for lo in layouts]
    runs += [(lo, "long", config.short_steps * config.long_factor, config.seed) for lo in layouts]
    return runs


def append_rows(table: Path, columns: list[str], rows: Iterable[dict], on_row=None) -> None:
    """Append rows to a CSV as they come (flushed and synced: a killed run keeps every finished row)."""
    new_file = not table.exists()
    with table.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        if new_file:
            writer.writeheader()
        for row in rows:
            writer.writerow(row)
            fh.flush()
            os.fsync(fh.fileno())
            if on_row is not None:
                on_row(row)


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def run_fidelity(
    config: FidelityConfig,
    out_dir: Path,
    data_dir: Path,
    command: str,
    on_row: Callable[[dict], None] | None = None,
) -> dict:
    """Train what is missing from `out_dir/runs.csv`, appending row by row; then write the report."""

    out_dir.mkdir(parents=True, exist_ok=True)
    table = out_dir / "runs.csv"
    (out_dir / "config.json").write_text(json.dumps({"config": asdict(config), "command": command}, indent=1))
    done = {(r["layout_hash"], r["run"]) for r in read_rows(table)}
    proxy = dict(
        lr=config.lr,
        warmup_fraction=config.warmup_fraction,
        batch_size=config.batch_size,
        seq_len=config.seq_len,
        eval_tokens=config.eval_tokens,
    )
    jobs = [
        (lo, {**proxy, "steps": steps, "seed": seed}, {"run": run})
        for lo, run, steps, seed in planned_runs(config, fidelity_layouts(config))
        if (lo.content_hash, run) not in done
    ]
    append_rows(table, COLUMNS, train_many(jobs, config.workers, data_dir), on_row)
    report = fidelity_report(read_rows(table), config)
    write_report(report, out_dir, command)
    return report


# ---- statistics --------------------------------------------------------------------------------------------


def _paired(rows: list[dict], run_a: str, run_b: str) -> list[tuple[str, float, float, int]]:
    by_key = {(r["layout_hash"], r["run"]): r for r in rows if r["status"] == "completed" and r["val_bpb"]}
    pairs = []
    for (h, run), row in by_key.items():
        other = by_key.get((h, run_b))
        if run == run_a and other is not None:
            pairs.append((h, float(row["val_bpb"]), float(other["val_bpb"]), int(row["n_params"])))
    return sorted(pairs)


def rank_correlation(xs: list[float], ys: list[float], bootstrap: int = 2000, seed: int = 0) -> dict:
    from scipy import stats

    n = len(xs)
    if n < 3:
        return {"n": n, "spearman": None, "kendall": None, "spearman_ci95": None, "kendall_ci95": None}
    spearman = float(stats.spearmanr(xs, ys).statistic)
    kendall = float(stats.kendalltau(xs, ys).statistic)
    rng = random.Random(seed)
    boot_s, boot_k = [], []
    for _ in range(bootstrap):
        idx = [rng.randrange(n) for _ in range(n)]
        bx, by = [xs[i] for i in idx], [ys[i] for i in idx]
        if len(set(bx)) < 2 or len(set(by)) < 2:
            continue
        boot_s.append(float(stats.spearmanr(bx, by).statistic))
        boot_k.append(float(stats.kendalltau(bx, by).statistic))

    def ci(values):
        values = sorted(v for v in values if not math.isnan(v))
        if not values:
            return None
        return [values[int(0.025 * (len(values) - 1))], values[int(0.975 * (len(values) - 1))]]

    return {
        "n": n,
        "spearman": spearman,
        "kendall": kendall,
        "spearman_ci95": ci(boot_s),
        "kendall_ci95": ci(boot_k),
    }


def fidelity_report(rows: list[dict], config: FidelityConfig) -> dict:
    short_long = _paired(rows, "short", "long")
    seeds = _paired(rows, "short", "short_seed")
    overall = rank_correlation([p[1] for p in short_long], [p[2] for p in short_long], config.bootstrap)
    ceiling = rank_correlation([p[1] for p in seeds], [p[2] for p in seeds], config.bootstrap)
    band = {"n": 0}
    if short_long:
        median = statistics.median(p[3] for p in short_long)
        inside = [p for p in short_long if abs(p[3] - median) <= 0.25 * median]
        band = rank_correlation([p[1] for p in inside], [p[2] for p in inside], config.bootstrap)
        band["median_params"] = median
    failed = [r for r in rows if r["status"] != "completed"]
    target_met = None
    if overall.get("spearman") is not None and overall.get("spearman_ci95"):
        target_met = overall["spearman"] >= 0.9 and overall["spearman_ci95"][0] >= 0.75
    return {
        "short_vs_long": overall,
        "seed_noise_ceiling": ceiling,
        "within_param_band": band,
        "rows": len(rows),
        "failed_runs": len(failed),
        "target_met": target_met,
        "planned_runs": 3 * config.n_layouts,
    }


def _fmt(stat: dict) -> str:
    if stat.get("spearman") is None:
        return f"n={stat.get('n', 0)}: not enough pairs"
    s_ci, k_ci = stat["spearman_ci95"], stat["kendall_ci95"]
    return (
        f"n={stat['n']}: Spearman {stat['spearman']:.3f} (95% CI {s_ci[0]:.3f} to {s_ci[1]:.3f}), "
        f"Kendall {stat['kendall']:.3f} (95% CI {k_ci[0]:.3f} to {k_ci[1]:.3f})"
    )


def write_report(report: dict, out_dir: Path, command: str) -> None:
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    lines = [
        "# Proxy fidelity",
        "",
        f"command: `{command}`",
        "",
        f"runs: {report['rows']} of {report['planned_runs']} planned, {report['failed_runs']} failed",
        "",
        f"- short vs long val_bpb: {_fmt(report['short_vs_long'])}",
        f"- seed-noise ceiling (short seed A vs seed B): {_fmt(report['seed_noise_ceiling'])}",
        f"- within ±25% of the median parameter count "
        f"({report['within_param_band'].get('median_params', 0):,.0f}): {_fmt(report['within_param_band'])}",
        f"- target (Spearman >= 0.9, CI lower bound >= 0.75): "
        f"{ {True: 'met', False: 'missed', None: 'not yet measurable'}[report['target_met']] }",
        "",
    ]
    (out_dir / "report.md").write_text("\n".join(lines))
