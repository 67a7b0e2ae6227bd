"""CPU speed of the model zoo (issue 2's benchmark; prints a table, writes benchmarks/results/models_cpu.md).

1. Training tokens/s of each scaled-down preset: batch 8 x 128, AdamW, fp32 (median of timed steps).
2. Forward+backward time of each token mixer at T=256, batch 8, in its chunked (parallel) form and in its
   token-by-token recurrence (`forward_reference`), side by side in one run.

    .venv/bin/python benchmarks/models_cpu.py [--steps 12] [--repeats 5]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.hybrid import HybridLM  # noqa: E402
from models.registry import build_operator  # noqa: E402
from search.presets import CPU_PRESETS, get_preset  # noqa: E402


def timed(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    values = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        values.append(time.perf_counter() - t0)
    return statistics.median(values)


def preset_tokens_per_s(name: str, steps: int) -> float:
    torch.manual_seed(0)
    model = HybridLM(get_preset(name), 257)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 257, (8, 129))

    def step():
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 257), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()

    return 8 * 128 / timed(step, steps, warmup=2)


def mixer_times(op_name: str, repeats: int, T: int = 256) -> tuple[float, float]:
    layout = get_preset("nemotron-flash-1b-mini", swa_window=64)
    torch.manual_seed(0)
    op = build_operator(op_name, layout, backend="torch")
    x = torch.randn(8, T, layout.d_model, requires_grad=True)

    def run(fn):
        def go():
            fn(x).sum().backward()

        return go

    chunked = timed(run(lambda v: op(v)), repeats)
    recurrent = timed(run(op.forward_reference), max(1, repeats // 2))
    return chunked, recurrent


def op_times(repeats: int, B: int = 8, T: int = 256, H: int = 4, D: int = 32):
    from models.ops.delta_rule import delta_rule_chunked, delta_rule_recurrent
    from models.ops.ssd import ssd_chunked, ssd_recurrent

    torch.manual_seed(0)
    q = F.normalize(torch.randn(B, T, H, D), dim=-1).requires_grad_()
    k = F.normalize(torch.randn(B, T, H, D), dim=-1).requires_grad_()
    v = torch.randn(B, T, H, D, requires_grad=True)
    beta = torch.rand(B, T, H, requires_grad=True)
    g = (-torch.rand(B, T, H) * 0.1).requires_grad_()
    dt = (torch.rand(B, T, H) * 0.1).requires_grad_()
    A = -torch.rand(H)
    Bm, Cm = torch.randn(B, T, 1, 32, requires_grad=True), torch.randn(B, T, 1, 32, requires_grad=True)
    cases = [
        ("delta rule", lambda f: f(q, k, v, beta)[0], delta_rule_chunked, delta_rule_recurrent),
        ("gated delta rule", lambda f: f(q, k, v, beta, g)[0], delta_rule_chunked, delta_rule_recurrent),
        ("SSD (Mamba2, d_state 32)", lambda f: f(v, dt, A, Bm, Cm)[0], ssd_chunked, ssd_recurrent),
    ]
    for label, call, chunked, recurrent in cases:
        fast = timed(lambda call=call, chunked=chunked: call(chunked).sum().backward(), repeats)
        slow = timed(
            lambda call=call, recurrent=recurrent: call(recurrent).sum().backward(), max(1, repeats // 2)
        )
        yield label, fast, slow


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/models_cpu.md")
    args = parser.parse_args()
    lines = [
        f"# models_cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}",
        "",
        f"command: `.venv/bin/python benchmarks/models_cpu.py --steps {args.steps} --repeats {args.repeats}`",
        "",
        "## Training tokens/s (batch 8 x 128, AdamW, fp32; median step)",
        "",
        "| preset | params | tokens/s | vs llama |",
        "| --- | --- | --- | --- |",
    ]
    speeds = {name: preset_tokens_per_s(name, args.steps) for name in CPU_PRESETS}
    for name in CPU_PRESETS:
        params = HybridLM(get_preset(name), 257).num_parameters()
        lines.append(
            f"| {name} | {params / 1e6:.2f}M | {speeds[name]:,.0f} | {speeds[name] / speeds['llama']:.2f}x |"
        )
    lines += [
        "",
        "## Mixers at d_model 128, batch 8, T=256: forward+backward ms (median)",
        "",
        "| mixer | chunked / parallel | token-by-token recurrence | speed-up |",
        "| --- | --- | --- | --- |",
    ]
    for op_name in ("attention", "swa", "mamba2", "deltanet", "gated_deltanet"):
        chunked, recurrent = mixer_times(op_name, args.repeats)
        lines.append(
            f"| {op_name} | {chunked * 1e3:.1f} | {recurrent * 1e3:.1f} | {recurrent / chunked:.1f}x |"
        )
    lines += [
        "",
        "## The mixing ops alone (no projections/convs): B=8, T=256, 4 heads x 32, chunk 64, fwd+bwd ms",
        "",
        "| op | chunked | recurrence | speed-up |",
        "| --- | --- | --- | --- |",
    ]
    for label, chunked, recurrent in op_times(args.repeats):
        lines.append(
            f"| {label} | {chunked * 1e3:.1f} | {recurrent * 1e3:.1f} | {recurrent / chunked:.1f}x |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
