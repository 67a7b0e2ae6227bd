"""`make demo`: the project's main job on the embedded defaults, as far as the project goes today.

Builds every preset (the full Nemotron-Flash models only on the `meta` device, to count them), short-trains
the scaled-down ones on the embedded corpus (the Python standard library's source, as bytes), and profiles
their decode latency on this machine.
"""
from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console
from rich.table import Table

from search.params import count_parameters, format_count
from search.presets import CPU_PRESETS, get_preset, preset_names


def data_dir() -> Path:
    return Path(os.environ.get("HYBRIDNAS_DATA_DIR", ".hybridnas")).resolve()


def run_demo(console: Console, steps: int = 30, decode_tokens: int = 64) -> None:
    import torch

    from latency.profiler import LatencyConfig, profile
    from models.hybrid import HybridLM
    from proxies.dataset import DataConfig, load_data
    from proxies.train import ProxyConfig, train_proxy

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

    console.rule("scaled-down presets: short training on the embedded corpus, decode latency on this CPU")
    data = load_data(DataConfig(), data_dir())
    console.print(f"corpus: Python stdlib source, {len(data.train):,} train / {len(data.val):,} validation "
                  f"byte tokens (cached under {data_dir()})")
    proxy = ProxyConfig(steps=steps, batch_size=8, seq_len=128, lr=3e-3, eval_tokens=16384, log_every=max(1, steps // 3))
    latency = LatencyConfig(prompt_len=128, decode_tokens=decode_tokens, repeats=3, throughput=False,
                            vocab_size=data.vocab_size)
    results = Table("preset", "params", "loss (first -> last)", "val_bpb", "train tok/s", "decode ms/token",
                    "prefill ms (128)", "status")
    for name in CPU_PRESETS:
        layout = get_preset(name)
        result, model = train_proxy(layout, proxy, data, device="cpu")
        if result.status != "completed":
            results.add_row(name, "-", "-", "-", "-", "-", "-", f"failed: {result.failure_reason}")
            continue
        lat = profile(model, latency, device="cpu")
        curve = result.loss_curve
        results.add_row(name, format_count(result.n_params), f"{curve[0][1]:.3f} -> {curve[-1][1]:.3f}",
                        f"{result.val_bpb:.3f}", f"{result.tokens_per_s:,.0f}",
                        f"{lat.decode_ms_per_token.median:.2f} ± {lat.decode_ms_per_token.iqr:.2f}",
                        f"{lat.prefill_ms.median:.1f}", result.status)
        console.print(f"  {name}: done ({result.wall_s:.1f} s)")
    console.print(results)
