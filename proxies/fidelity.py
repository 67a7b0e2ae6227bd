"""Proxy fidelity: does short training rank layouts the way longer training does?

N layouts (random ones from the search space plus the presets at the same scale) are each trained as
independent runs, each with its own full schedule: the short budget, the short budget with another seed
(the seed-noise ceiling), and a budget K times longer. Reported: Spearman and Kendall rank correlation of
val_bpb between short and long with a bootstrap 95 % interval, the same between the two short seeds, and
the correlation within a parameter-count band (within ±25 % of the median size).

The table is written row by row (CSV) and a rerun resumes from it, so a long background run can outlive a
session; the report is recomputed from whatever rows exist. Resuming is keyed by the run's whole config
(`run_key`: every setting that changes a row's numbers, the full proxy settings and the corpus/tokenizer
fingerprint): each row carries that key, and rows of another key are never reused nor reported, so a change
of steps, learning rate, corpus, tokenizer, seq_len... trains afresh. The CLI keeps each config's runs in a
folder named by its key.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from search.evaluation import DataConfig, ProxyConfig
from search.layout import Layout
from search.studies.fidelity import fidelity_layouts as sampled_layouts
from search.studies.fidelity import fidelity_statistics

COLUMNS = [
    "config_hash",
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
# The key's format: bump when what a row means changes, so that older rows are not reused.
KEY_FORMAT = 1
# Settings that change no row: how many layouts (the layouts are a prefix of one seeded sequence, so the rows
# of a smaller run are rows of a bigger one), how many processes train them, the report's bootstrap.
NOT_IN_KEY = ("n_layouts", "workers", "bootstrap")


class FidelityTableError(ValueError):
    """A runs table this version cannot resume (another format); names the file."""


@dataclass(frozen=True)
class FidelityConfig:
    n_layouts: int = 24
    short_steps: int = 100
    long_factor: int = 10
    seed: int = 0  # the layouts' sampling seed and the training seed of the main runs
    noise_seed: int = 1  # the second short run's training seed
    workers: int = 2  # processes, one torch thread each (0: train in this process)
    bootstrap: int = 2000
    # proxy settings shared by every run (steps and seed are set per run)
    lr: float = 3e-3
    warmup_fraction: float = 0.1
    batch_size: int = 8
    seq_len: int = 128
    eval_tokens: int = 65536
    max_operators: int = 12
    d_model: int = 64
    # the training text, as a search's `data` section chooses it (search.evaluation.DataConfig)
    corpus: str = "stdlib"
    tokenizer: str = "bytes"

    def data_config(self) -> DataConfig:
        """The data settings (pydantic: raises ValidationError naming `corpus` / `tokenizer`)."""
        return DataConfig(corpus=self.corpus, tokenizer=self.tokenizer)

    def proxy_settings(self, steps: int, seed: int) -> dict[str, Any]:
        return dict(
            lr=self.lr,
            warmup_fraction=self.warmup_fraction,
            batch_size=self.batch_size,
            seq_len=self.seq_len,
            eval_tokens=self.eval_tokens,
            steps=steps,
            seed=seed,
        )

    def validate(self) -> None:
        """Refuse settings no run could train with, before anything runs: ValueError naming the setting, or
        pydantic's ValidationError naming the proxy/data field."""
        for name in ("n_layouts", "short_steps", "long_factor", "max_operators", "d_model"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1")
        if self.workers < 0:
            raise ValueError("workers: must be 0 (this process) or more")
        self.data_config()
        ProxyConfig.from_dict(self.proxy_settings(self.short_steps, self.seed))
        ProxyConfig.from_dict(self.proxy_settings(self.short_steps * self.long_factor, self.seed))


def run_key(config: FidelityConfig, data_fingerprint: dict) -> str:
    """The content hash of everything that makes a row's numbers: the fidelity settings (but NOT_IN_KEY), the
    full proxy settings of a run (defaults included, so a changed default trains afresh) and the data's
    fingerprint (corpus and tokenizer content hashes, split)."""
    settings = {k: v for k, v in asdict(config).items() if k not in NOT_IN_KEY}
    payload = {
        "format": KEY_FORMAT,
        "config": settings,
        "proxy": ProxyConfig.from_dict(config.proxy_settings(config.short_steps, config.seed)).to_dict(),
        "data": data_fingerprint,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def load_fidelity_data(config: FidelityConfig, data_dir: Path, data_roots: Iterable[str | Path] = (".",)):
    """The tokenized corpus (cached under `data_dir`); its fingerprint goes into `run_key`. Raises
    CorpusError (naming the path) or ValueError (a bad tokenizer)."""
    from proxies.dataset import load_data

    return load_data(config.data_config(), data_dir, tuple(data_roots))


def fidelity_layouts(config: FidelityConfig) -> list[Layout]:
    """The study's layouts (search/studies/fidelity.py) at this config's scale and seed."""
    return sampled_layouts(config.n_layouts, config.seed, config.max_operators, config.d_model)


def planned_runs(config: FidelityConfig, layouts: list[Layout]) -> list[tuple[Layout, str, int, int]]:
    """(layout, run, steps, seed): all short runs first, then the noise seeds, then the long runs."""
    runs = [(lo, "short", config.short_steps, config.seed) for lo in layouts]
    runs += [(lo, "short_seed", config.short_steps, config.noise_seed) for lo in layouts]
    runs += [(lo, "long", config.short_steps * config.long_factor, config.seed) for lo in layouts]
    return runs


def _end_with_newline(table: Path) -> None:
    """A run killed in the middle of a row leaves a partial last line: end it, so the next row starts on a
    line of its own (the partial row is then skipped by `read_rows`)."""
    if not table.exists() or table.stat().st_size == 0:
        return
    with table.open("rb+") as fh:
        fh.seek(-1, os.SEEK_END)
        if fh.read(1) != b"\n":
            fh.write(b"\n")


def check_table(table: Path, columns: list[str] = COLUMNS) -> None:
    """A runs table this version can append to: missing, empty, or with exactly these columns. Otherwise
    FidelityTableError (an older table's rows carry no config key, so they could not be told apart)."""
    if not table.exists() or table.stat().st_size == 0:
        return
    with table.open(newline="") as fh:
        header = next(csv.reader(fh), [])
    if header != columns:
        missing = [c for c in columns if c not in header]
        raise FidelityTableError(
            f"{table}: its columns differ from this version's"
            + (f" (no {', '.join(missing)})" if missing else "")
            + "; its rows cannot be resumed: choose another folder"
        )


def append_rows(table: Path, columns: list[str], rows: Iterable[dict], on_row=None) -> None:
    """Append rows to a CSV as they come (flushed and synced: a killed run keeps every finished row)."""
    _end_with_newline(table)
    new_file = not table.exists() or table.stat().st_size == 0
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
    """The table's complete rows (a partial last row, left by a killed run, is skipped)."""
    if not path.exists():
        return []
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        return [row for row in reader if None not in row.values() and None not in row]


def rows_of(rows: Iterable[dict], key: str, layouts: Iterable[Layout] | None = None) -> list[dict]:
    """The rows trained under this config key (and, given `layouts`, of those layouts only)."""
    wanted = None if layouts is None else {lo.content_hash for lo in layouts}
    return [
        r for r in rows if r.get("config_hash") == key and (wanted is None or r.get("layout_hash") in wanted)
    ]


def pending_runs(
    planned: list[tuple[Layout, str, int, int]], rows: Iterable[dict], key: str
) -> list[tuple[Layout, str, int, int]]:
    """The planned runs without a row of this config key (rows of other keys never count as done)."""
    done = {(r["layout_hash"], r["run"]) for r in rows_of(rows, key)}
    return [p for p in planned if (p[0].content_hash, p[1]) not in done]


def _init_worker(data_dir: str, data_config: dict, data_roots: tuple[str, ...]) -> None:
    """A training process: one torch thread, Ctrl-C left to the parent (it stops the pool), the corpus
    mapped from the cache the parent filled."""
    import signal

    import torch

    from proxies import pool
    from proxies.dataset import load_data

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    pool._STATE["data"] = load_data(DataConfig.from_dict(data_config), data_dir, data_roots)


def train_rows(
    jobs: list[tuple[Layout, dict, dict]],
    workers: int,
    data_dir: Path,
    data_config: DataConfig,
    data_roots: Iterable[str | Path],
    data=None,
) -> Iterator[dict]:
    """Train (layout, proxy settings, extra columns) jobs on this corpus; one row per job as it completes.
    `workers` 0: one after another in this process (with `data`, the corpus already loaded)."""
    import multiprocessing as mp

    from proxies import pool

    payload = [(layout.to_json(None), proxy, extra) for layout, proxy, extra in jobs]
    if not payload:
        return
    roots = tuple(str(Path(r).expanduser().resolve()) for r in data_roots)
    if workers == 0:
        if data is None:
            from proxies.dataset import load_data

            data = load_data(data_config, data_dir, roots)
        previous = pool._STATE.get("data")
        pool._STATE["data"] = data
        try:
            for job in payload:
                yield pool._train(job)
        finally:
            pool._STATE["data"] = previous
        return
    initargs = (str(data_dir), data_config.to_dict(), roots)
    with mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=initargs) as procs:
        yield from procs.imap_unordered(pool._train, payload)


def run_fidelity(
    config: FidelityConfig,
    out_dir: Path,
    data_dir: Path,
    command: str,
    on_row: Callable[[dict], None] | None = None,
    *,
    data_roots: Iterable[str | Path] = (".",),
    data=None,
    on_start: Callable[[int, int], None] | None = None,
) -> dict:
    """Train what this config is missing from `out_dir/runs.csv`, appending row by row (each row carries the
    config key); then write the report of this config's rows. `data`: the corpus, if already loaded (its
    fingerprint keys the rows). `on_start(done, planned)` is told how many runs are already there."""
    config.validate()
    data_roots = tuple(data_roots)
    if data is None:
        data = load_fidelity_data(config, data_dir, data_roots)
    key = run_key(config, data.fingerprint)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = out_dir / "runs.csv"
    check_table(table)
    (out_dir / "config.json").write_text(
        json.dumps(
            {"config": asdict(config), "config_hash": key, "data": data.fingerprint, "command": command},
            indent=1,
        )
    )
    layouts = fidelity_layouts(config)
    planned = planned_runs(config, layouts)
    pending = pending_runs(planned, read_rows(table), key)
    if on_start is not None:
        on_start(len(planned) - len(pending), len(planned))
    jobs = [
        (lo, config.proxy_settings(steps, seed), {"run": run, "config_hash": key})
        for lo, run, steps, seed in pending
    ]
    rows = train_rows(jobs, config.workers, data_dir, config.data_config(), data_roots, data)
    append_rows(table, COLUMNS, rows, on_row)
    report = fidelity_report(rows_of(read_rows(table), key, layouts), config)
    report["config_hash"] = key
    write_report(report, out_dir, command)
    return report


def report_from_table(config: FidelityConfig, out_dir: Path, key: str) -> dict:
    """The report of this config's rows in `out_dir/runs.csv` (nothing is trained)."""
    table = out_dir / "runs.csv"
    check_table(table)
    report = fidelity_report(rows_of(read_rows(table), key, fidelity_layouts(config)), config)
    report["config_hash"] = key
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


def fidelity_report(rows: list[dict], config: FidelityConfig) -> dict:
    report = fidelity_statistics(
        _paired(rows, "short", "long"), _paired(rows, "short", "short_seed"), config.bootstrap
    )
    return {
        **report,
        "rows": len(rows),
        "failed_runs": sum(1 for r in rows if r["status"] != "completed"),
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
        *([f"config key: `{report['config_hash']}`", ""] if report.get("config_hash") else []),
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
