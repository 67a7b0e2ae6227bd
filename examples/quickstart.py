"""Quickstart: a tiny architecture search from Python, with `import hybridnas` only.

    python examples/quickstart.py              # 6 evaluations, in this process (under a minute on a CPU)
    python examples/quickstart.py --budget 2   # or HYBRIDNAS_EXAMPLE_BUDGET=2

1. `hybridnas.run_search` runs the search here (no server; SQLite under HYBRIDNAS_DATA_DIR, else ./.hybridnas)
   on the embedded corpus (the Python standard library's source) and prints its Pareto front.
2. With HYBRIDNAS_URL set (a coordinator from `hybridnas serve`; the token from HYBRIDNAS_TOKEN or the data
   dir's token file), the same config is submitted to it with `hybridnas.Client` and followed to its end.
"""

import argparse
import os

import hybridnas

# The smallest meaningful search: scaled-down layouts, a few training steps, a short latency probe.
CONFIG = {
    "name": "quickstart",
    "space": {"preset": "benchmark"},
    "strategy": "pareto-aging",
    "strategy_options": {"population_size": 4, "sample_size": 2},
    "executor": "inline",
    "workers": 1,
    "proxy": {"steps": 2, "batch_size": 2, "seq_len": 16, "eval_tokens": 64},
    "latency": {"prompt_len": 4, "decode_tokens": 2, "repeats": 1, "warmup": 0, "throughput": False},
}


def print_front(title, front, layout_of):
    print(f"{title}: {len(front)} candidate(s) on the Pareto front (val_bpb vs decode_ms)")
    for c in front:
        print(
            f"  candidate {c.id}: val_bpb {c.val_bpb:.4f}, decode {c.decode_ms:.3f} ms/token, "
            f"{c.n_params:,} params, operators {layout_of(c.id).compact()}"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=int(os.environ.get("HYBRIDNAS_EXAMPLE_BUDGET", 6)))
    config = {**CONFIG, "budget": parser.parse_args().budget}

    # 1. In this process.
    result = hybridnas.run_search(config, executor="inline")
    print(f"local search {result.id}: {result.search.status}, {result.search.n_evaluations} evaluations")
    print_front("local", result.front, result.layout)
    if result.front:
        best = min(result.front, key=lambda c: c.val_bpb)
        print(f"lowest val_bpb: candidate {best.id}, layout {result.layout(best.id).compact()}")
    try:  # one row per candidate, indexed by its id
        print(result.to_dataframe()[["status", "val_bpb", "decode_ms", "n_params", "operators"]])
    except ImportError:
        print("(pip install 'hybridnas[pandas]' for result.to_dataframe())")

    # 2. On a coordinator, if there is one.
    if os.environ.get("HYBRIDNAS_URL"):
        with hybridnas.Client() as client:
            created = client.submit(config)
            print(f"remote search {created.id} submitted to {client.url}")
            search = client.wait(created.id)
            print(f"remote search {search.id}: {search.status}, {search.n_evaluations} evaluations")
            print_front("remote", client.pareto(search.id).items, client.layout)


if __name__ == "__main__":
    main()
