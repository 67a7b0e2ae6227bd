"""The whole search on one GPU: a short `pareto-aging` search with the inline executor (the same worker code a
Ray actor runs), SQLite, the fla and mamba_ssm kernels and CUDA-graph latency.

    PYTHONPATH=. python3 benchmarks/gpu_e2e.py [--budget 12] [--steps 200] [--out DIR] [--allow-cpu]

Prints the front and, per candidate, where its evaluation's time went: data, model build, training (which
holds the first use of each Triton kernel family: its autotuning, ~100 s on an H200, falls on the first
candidate with that mixer) and latency measurement (the CUDA graph's capture included), with the kernel path
each operator took. Writes DIR/gpu_e2e.{json,md}. Without CUDA it writes a "not run: no GPU" result and exits
0, unless `--allow-cpu` (a smoke run of the same pipeline on the CPU, eager latency, torch paths).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PHASES = ("data_s", "model_s", "training_s", "latency_s", "total_s")


def search_config(budget: int, steps: int, cuda: bool) -> dict:
    """A small GPU-scale space (every mixer kind) with a proxy short enough for a 15-minute device lease."""
    width = 512 if cuda else 64
    return {
        "name": "gpu-e2e",
        "executor": "inline",
        "strategy": "pareto-aging",
        "strategy_options": {"population_size": 6},
        "budget": budget,
        "seed": 0,
        "space": {
            "preset": "cpu",
            "mixers": ["attention", "mamba2", "deltanet", "gated_deltanet"],
            "widths": [width],
            "max_operators": 12,
            "dims": {
                "head_dim": 64 if cuda else 16,
                "mamba_head_dim": 64 if cuda else 16,
                "mamba_d_state": 64 if cuda else 16,
            },
        },
        "proxy": {
            "steps": steps,
            "batch_size": 16 if cuda else 4,
            "seq_len": 512 if cuda else 64,
            "eval_tokens": 32768 if cuda else 2048,
        },
        "latency": {
            "method": "cuda-graph" if cuda else "eager",
            "prompt_len": 256 if cuda else 16,
            "decode_tokens": 128 if cuda else 8,
            "repeats": 5 if cuda else 2,
            "warmup": 3 if cuda else 1,
        },
    }


def kernel_families(backends: dict) -> set[str]:
    """The kernel paths (not torch) one candidate's operators took, e.g. {"fla", "mamba_ssm"}."""
    return {path for path in backends.values() if path and path != "torch"}


def candidate_rows(storage, job_id: int) -> list[dict]:
    from search.layout import Layout

    details = storage.result_details_of(job_id)
    rows, seen_families = [], set()
    for cand in sorted(storage.candidates(job_id), key=lambda c: c.id):
        training, device = details.get(cand.id, (None, None))
        training = training or {}
        families = kernel_families(training.get("backends") or {})
        timings = training.get("timings") or {}
        rows.append(
            {
                "id": cand.id,
                "status": cand.status,
                "operators": Layout.from_dict(cand.layout).compact(),
                "val_bpb": cand.val_bpb,
                "decode_ms": cand.decode_ms,
                "backends": training.get("backends"),
                "first_use_of": sorted(families - seen_families),
                "device": device,
                **{phase: timings.get(phase) for phase in PHASES},
                "failure_reason": cand.failure_reason,
            }
        )
        seen_families |= families
    return rows


def _f(value, fmt: str = ".2f") -> str:
    return "—" if value is None else format(value, fmt)


def render(data: dict) -> str:
    meta = data["meta"]
    lines = [f"> `{meta['command']}` on {meta['device']}, {meta['date']}; {meta['status']}", ""]
    if not data.get("candidates"):
        return "\n".join(lines) + "\n"
    lines += [
        f"Search: {meta['budget']} candidates, {meta['wall_s']:.0f} s wall, hypervolume "
        f"{_f(meta.get('hypervolume'), '.4f')}.",
        "",
        "Front: "
        + "; ".join(f"#{c['id']} {c['val_bpb']:.4f} bpb at {c['decode_ms']:.3f} ms" for c in data["front"]),
        "",
        "| id | status | operators | val_bpb | decode ms | data s | model s | training s | latency s "
        "| total s | first use of |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in data["candidates"]:
        lines.append(
            f"| {r['id']} | {r['status']} | {r['operators']} | {_f(r['val_bpb'], '.4f')} "
            f"| {_f(r['decode_ms'], '.3f')} | {_f(r['data_s'])} | {_f(r['model_s'])} | {_f(r['training_s'])} "
            f"| {_f(r['latency_s'])} | {_f(r['total_s'])} | {', '.join(r['first_use_of']) or ''} |"
        )
    return "\n".join(lines) + "\n"


def run(args, command: str, cuda: bool) -> dict:
    import hybridnas
    from search.storage import Storage

    work = Path(tempfile.mkdtemp(prefix="gpu-e2e-"))
    os.environ.setdefault("HYBRIDNAS_DATA_DIR", str(work / "data"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(work / "triton"))
    database = f"sqlite:///{work / 'gpu_e2e.db'}"
    started = time.perf_counter()
    result = hybridnas.run_search(
        search_config(args.budget, args.steps, cuda), database_url=database, executor="inline"
    )
    wall = time.perf_counter() - started
    with Storage(database) as storage:
        rows = candidate_rows(storage, result.id)
    curve = result.hypervolume_history
    return {
        "meta": {
            "command": command,
            "device": _device_name(cuda),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "status": result.search.status,
            "budget": args.budget,
            "wall_s": wall,
            "hypervolume": curve[-1][1] if curve else None,
        },
        "front": [{"id": c.id, "val_bpb": c.val_bpb, "decode_ms": c.decode_ms} for c in result.front],
        "candidates": rows,
    }


def _device_name(cuda: bool) -> str:
    import torch

    if cuda:
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"CPU {platform.machine()} (torch {torch.__version__})"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=int, default=12, help="candidates (10 or more)")
    parser.add_argument("--steps", type=int, default=200, help="proxy training steps per candidate")
    parser.add_argument("--out", type=Path, default=None, help="default: $OUT, else benchmarks/results")
    parser.add_argument("--allow-cpu", action="store_true", help="run on the CPU when there is no GPU")
    args = parser.parse_args(argv)
    import torch

    out = args.out or Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results")
    command = "PYTHONPATH=. python3 benchmarks/gpu_e2e.py " + shlex.join(argv)
    cuda = torch.cuda.is_available()
    if cuda or args.allow_cpu:
        data = run(args, command, cuda)
    else:
        data = {
            "meta": {
                "command": command,
                "device": _device_name(False),
                "status": "not run: no GPU",
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            }
        }
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_e2e.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    (out / "gpu_e2e.md").write_text(render(data))
    print(render(data), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
