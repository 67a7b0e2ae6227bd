"""`make demo`: the project's main job on the embedded defaults, as far as the project goes today.

Builds every preset (the full Nemotron-Flash models only on the `meta` device, to count them), short-trains
the scaled-down ones on the embedded corpus (the Python standard library's source, as bytes), and profiles
their decode latency on this machine.
"""
from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from search.params import count_parameters, format_count
from search.presets import CPU_PRESETS, get_preset, preset_names


def data_dir() -> Path:
    from api.settings import get_settings
    return get_settings().resolved_data_dir()


DEMO_SEARCH = {
    "name": "demo", "space": {"preset": "cpu"}, "strategy": "pareto-aging",
    "strategy_options": {"population_size": 6, "sample_size": 3}, "budget": 14, "executor": "ray", "workers": 2,
    "proxy": {"steps": 60, "batch_size": 8, "seq_len": 128, "eval_tokens": 16384},
    "latency": {"prompt_len": 64, "decode_tokens": 32, "repeats": 3, "throughput": False, "threads": 1},
}


def run_demo_search(console: Console) -> int:
    """A real pareto-aging search on the embedded corpus through a local Ray, stored in the default database."""
    import json

    from api.search_cli import _storage, run_engine
    from search.config import SearchConfig
    config = SearchConfig.model_validate(DEMO_SEARCH)
    storage = _storage(None)
    job_id = storage.create_job("search", json.loads(config.model_dump_json()), name="demo", budget=config.budget)
    console.print(f"search {job_id}: {config.strategy}, {config.budget} evaluations on {config.workers} Ray workers "
                  f"({storage!r}; resume with `hybridnas search resume {job_id}`)")
    run_engine(storage, job_id, data_dir())
    return job_id


def run_demo(console: Console, steps: int = 30, decode_tokens: int = 64, search: bool = True) -> None:
    import torch

    from models.hybrid import HybridLM

    console.rule("presets: analytic parameter count vs the built model")
    table = Table("preset", "operators", "d_model", "vocab", "analytic total", "built (meta device)", "non-embedding")
    for name in preset_names():
        layout = get_preset(name)
        vocab = layout.vocab_size or 257
        count = count_parameters(layout, vocab)
        with torch.device("meta"):
            built = HybridLM(layout, vocab).num_parameters()
        table.add_row(name, str(len(layout.operators)), str(layout.d_model), str(vocab), format_count(count.total),
                      f"{format_count(built)} ({'=' if built == count.total else '!='})",
                      format_count(count.non_embedding))
    console.print(table)

    console.rule("scaled-down presets: evaluated end to end on the embedded corpus (this CPU)")
    from proxies.worker import evaluate
    proxy = dict(steps=steps, batch_size=8, seq_len=128, lr=3e-3, eval_tokens=16384, log_every=max(1, steps // 3))
    latency = dict(prompt_len=128, decode_tokens=decode_tokens, repeats=3, throughput_max_batch=8)
    results = Table("preset", "params", "loss first -> last", "val_bpb", "train tok/s", "decode ms/token (IQR)",
                    "prefill ms (128)", "throughput tok/s (batch)", "status")
    for name in CPU_PRESETS:
        result = evaluate(get_preset(name), proxy, latency, data_dir=data_dir())
        if result.status != "completed":
            results.add_row(name, "-", "-", "-", "-", "-", "-", "-", f"failed: {result.failure_reason}")
            continue
        train, lat = result.training, result.latency
        curve = train["loss_curve"]
        tput = lat["throughput_tokens_per_s"]
        results.add_row(name, format_count(train["n_params"]), f"{curve[0][1]:.2f} -> {curve[-1][1]:.2f}",
                        f"{train['val_bpb']:.3f}", f"{train['tokens_per_s']:,.0f}",
                        f"{lat['decode_ms_per_token']['median']:.2f} ({lat['decode_ms_per_token']['iqr']:.2f})",
                        f"{lat['prefill_ms']['median']:.1f}",
                        f"{tput['median']:,.0f} ({lat['throughput_batch']})" if tput else "-", result.status)
        console.print(f"  {name}: val_bpb {train['val_bpb']:.3f}, {result.timings['total_s']:.1f} s")
    console.print(results)
    console.print(f"weights and tokenizers saved under {data_dir() / 'artifacts'}")
    if search:
        console.rule("a pareto-aging search (val_bpb vs decode ms/token) on local Ray")
        run_demo_search(console)
