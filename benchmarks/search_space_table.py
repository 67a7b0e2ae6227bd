"""Evaluate every layout of the closed benchmark sub-space (search.space.benchmark_space) for real on this
CPU, at the fidelity run's short scale, so that search strategies can be replayed against look-ups.

Pass 1 trains each layout (100 steps, batch 8 x 128, d_model 48/64) in a process pool, one thread per process,
and appends a row per layout to benchmarks/data/search_space_cpu.csv. Pass 2 measures each layout's decode
latency alone on the machine (one process, one thread: a quiet device) into search_space_cpu_latency.csv.
The rungs pass trains each layout up the multi-fidelity ladder (wsd at 25, 100 and 400 steps, decay 0.2,
the warmup of the lowest rung: search.multifidelity.FidelityConfig.proxy_at), rung 0 fresh and each higher
rung continued from the stable-phase checkpoint of the rung below, one row per (layout, rung) into
search_space_cpu_rungs.csv, then prints how rung 1 (wsd@100) ranks the layouts against pass 1 (cosine@100).
All passes resume from whatever rows exist (the rungs pass redoes a layout without all its rung rows).

    .venv/bin/python benchmarks/search_space_table.py [--workers 2] [--pass train|latency|both|rungs]
    .venv/bin/python benchmarks/search_space_table.py --pass rungs-report   # the correlation so far
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proxies.fidelity import append_rows, read_rows  # noqa: E402
from proxies.pool import train_ladders, train_many  # noqa: E402
from search.evaluation import ProxyConfig  # noqa: E402
from search.multifidelity import FidelityConfig  # noqa: E402
from search.space import benchmark_space  # noqa: E402

DATA = Path("benchmarks/data")
TRAIN_COLUMNS = [
    "layout_hash",
    "operators",
    "d_model",
    "n_params",
    "steps",
    "seed",
    "status",
    "val_bpb",
    "val_loss",
    "final_train_loss",
    "wall_s",
    "failure_reason",
]
LATENCY_COLUMNS = ["layout_hash", "decode_ms_per_token", "decode_iqr_ms", "prefill_ms", "threads"]
PROXY = dict(steps=100, batch_size=8, seq_len=128, lr=3e-3, warmup_fraction=0.1, eval_tokens=65536, seed=0)
RUNGS = FidelityConfig(rungs=[25, 100, 400], decay_fraction=0.2)
# The training columns with the rung, and what the rung trained (continued from a lower rung or fresh).
RUNG_COLUMNS = [
    *TRAIN_COLUMNS[:4],
    "rung",
    "steps",
    "steps_trained",
    "continued_from_step",
    *TRAIN_COLUMNS[5:],
]


def layouts():
    space = benchmark_space()
    seen, out = set(), []
    for genome in space.enumerate():
        layout = space.to_layout(genome)
        if layout.content_hash not in seen:
            seen.add(layout.content_hash)
            out.append(layout)
    return out


def train_pass(workers: int, data_dir: Path) -> None:
    table = DATA / "search_space_cpu.csv"
    done = {r["layout_hash"] for r in read_rows(table)}
    jobs = [(lo, PROXY, {}) for lo in layouts() if lo.content_hash not in done]
    print(f"training {len(jobs)} of {len(layouts())} layouts", flush=True)
    append_rows(
        table,
        TRAIN_COLUMNS,
        train_many(jobs, workers, data_dir),
        on_row=lambda r: print(
            f"{r['operators']:<30} d{r['d_model']} bpb={r['val_bpb']} {r['wall_s']}s", flush=True
        ),
    )


def rung_proxies() -> list[dict]:
    """Each rung's training settings (the table's PROXY at the rung's budget, wsd)."""
    proxy = ProxyConfig(**PROXY)
    return [RUNGS.proxy_at(proxy, rung).to_dict() for rung in range(len(RUNGS.rungs))]


def latest_rung_rows(rows: list[dict]) -> dict[tuple[str, int], dict]:
    """(layout hash, rung) -> its last row (a redone layout's rows replace the earlier ones)."""
    return {(r["layout_hash"], int(r["rung"])): r for r in rows}


def rungs_pass(workers: int, data_dir: Path) -> None:
    table = DATA / "search_space_cpu_rungs.csv"
    have = latest_rung_rows(read_rows(table))
    n_rungs = len(RUNGS.rungs)
    todo = [lo for lo in layouts() if any((lo.content_hash, r) not in have for r in range(n_rungs))]
    print(f"laddering {len(todo)} of {len(layouts())} layouts up rungs {RUNGS.rungs}", flush=True)
    report_rung_correlation(table)
    jobs = [(lo, rung_proxies(), {}) for lo in todo]
    for rows in train_ladders(jobs, workers, data_dir):
        append_rows(table, RUNG_COLUMNS, rows)
        print(
            f"{rows[0]['operators']:<30} d{rows[0]['d_model']} "
            + " ".join(
                f"r{r['rung']}={_bpb(r)}({r['wall_s']}s){'*' if r['fresh_reason'] else ''}" for r in rows
            ),
            flush=True,
        )
    report_rung_correlation(table)


def _bpb(row: dict) -> str:
    return f"{float(row['val_bpb']):.4f}" if row["val_bpb"] not in (None, "") else row["status"]


def report_rung_correlation(table: Path) -> None:
    """Spearman of rung 1 (wsd@100) val_bpb against the cosine@100 table, over the layouts in both."""
    from search.studies.stats import rank_correlation

    cosine = {r["layout_hash"]: r for r in read_rows(DATA / "search_space_cpu.csv")}
    pairs = [
        (float(cosine[h]["val_bpb"]), float(r["val_bpb"]))
        for (h, rung), r in latest_rung_rows(read_rows(table)).items()
        if rung == 1 and r["status"] == "completed" and h in cosine and cosine[h]["status"] == "completed"
    ]
    if len(pairs) < 3:
        print(f"rung 1 vs cosine@100: {len(pairs)} pairs, not enough for a correlation", flush=True)
        return
    stat = rank_correlation([p[0] for p in pairs], [p[1] for p in pairs], bootstrap=500)
    low, high = stat["spearman_ci95"]
    print(
        f"rung 1 (wsd@100) vs cosine@100 val_bpb, n={stat['n']}: Spearman {stat['spearman']:.4f} "
        f"(95% CI {low:.4f} to {high:.4f}), Kendall {stat['kendall']:.4f}",
        flush=True,
    )


def latency_pass() -> None:
    import torch

    from latency.profiler import LatencyConfig, profile
    from models.hybrid import HybridLM

    torch.set_num_threads(1)
    table = DATA / "search_space_cpu_latency.csv"
    done = {r["layout_hash"] for r in read_rows(table)}
    config = LatencyConfig(prompt_len=128, decode_tokens=64, repeats=5, throughput=False, threads=1)

    def rows():
        for layout in layouts():
            if layout.content_hash in done:
                continue
            torch.manual_seed(0)
            result = profile(HybridLM(layout, 257), config, "cpu")
            yield {
                "layout_hash": layout.content_hash,
                "decode_ms_per_token": round(result.decode_ms_per_token.median, 4),
                "decode_iqr_ms": round(result.decode_ms_per_token.iqr, 4),
                "prefill_ms": round(result.prefill_ms.median, 3),
                "threads": 1,
            }

    append_rows(table, LATENCY_COLUMNS, rows())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--pass", dest="which", choices=("train", "latency", "both", "rungs", "rungs-report"), default="both"
    )
    parser.add_argument("--data-dir", default=".hybridnas")
    args = parser.parse_args()
    DATA.mkdir(parents=True, exist_ok=True)
    if args.which in ("train", "both"):
        train_pass(args.workers, Path(args.data_dir).resolve())
    if args.which in ("latency", "both"):
        latency_pass()
    if args.which == "rungs":
        rungs_pass(args.workers, Path(args.data_dir).resolve())
    if args.which == "rungs-report":  # the correlation over the rows so far, while the pass runs
        report_rung_correlation(DATA / "search_space_cpu_rungs.csv")


if __name__ == "__main__":
    main()
