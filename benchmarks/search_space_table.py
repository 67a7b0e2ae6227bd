"""Evaluate every layout of the closed benchmark sub-space (search.space.benchmark_space) for real on this
CPU, at the fidelity run's short scale, so that search strategies can be replayed against look-ups.

Pass 1 trains each layout (100 steps, batch 8 x 128, d_model 48/64) in a process pool, one thread per process,
and appends a row per layout to benchmarks/data/search_space_cpu.csv. Pass 2 measures each layout's decode
latency alone on the machine (one process, one thread: a quiet device) into search_space_cpu_latency.csv.
Both resume from whatever rows exist.

    .venv/bin/python benchmarks/search_space_table.py [--workers 2] [--pass train|latency|both]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proxies.fidelity import append_rows, read_rows  # noqa: E402
from proxies.pool import train_many  # noqa: E402
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
    parser.add_argument("--pass", dest="which", choices=("train", "latency", "both"), default="both")
    parser.add_argument("--data-dir", default=".hybridnas")
    args = parser.parse_args()
    DATA.mkdir(parents=True, exist_ok=True)
    if args.which in ("train", "both"):
        train_pass(args.workers, Path(args.data_dir).resolve())
    if args.which in ("latency", "both"):
        latency_pass()


if __name__ == "__main__":
    main()
