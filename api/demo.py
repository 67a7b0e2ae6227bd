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


def run_demo(console: Console, steps: int = 30, decode_tokens: int = 64) -> None:
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
