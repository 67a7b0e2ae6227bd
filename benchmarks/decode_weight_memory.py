"""Memory and time of the decode step's fused weights: views of one storage against separate copies.

    PYTHONPATH=. python3 benchmarks/decode_weight_memory.py [--steps 32] [--rounds 5] [--out DIR]

The decode step (autograd off) multiplies each attention's q/k/v, each SwiGLU's gate/up and each DeltaNet's
input projections as one matrix. The operators lay each such group in one storage (`share_storage`), so the
fused matrix is a view; before, it was a concatenated copy made at the first decode step (`cached_cat`), about
+45 % of a 12-layer Llama's weights. This script builds each of gpu_check's anchor models twice from one
seed: as the operators build it (shared) and with every weight moved to its own storage (separate, the old
layout), decodes on both, and reports the bytes of distinct storages held (weights plus decode copies) and
the eager decode ms/token, both models timed alternately in the same run (medians over rounds).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.gpu_check import ANCHOR_MODELS, anchor_layout  # noqa: E402
from models.hybrid import HybridLM  # noqa: E402

START, BUFFER = 64, 256


def held_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct storages behind the parameters and every decode copy (`_cat_cache`)."""
    tensors = list(model.parameters())
    for module in model.modules():
        for _sig, out, _sources in module.__dict__.get("_cat_cache", {}).values():
            tensors.append(out)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def build(kinds: str, shared: bool) -> HybridLM:
    torch.manual_seed(0)
    model = HybridLM(anchor_layout(kinds), 32000).eval()
    if not shared:
        for p in model.parameters():
            p.data = p.data.clone()  # each weight its own storage: decode concatenates copies
    return model


def decode_ms(model: HybridLM, steps: int) -> float:
    with torch.no_grad():
        caches = model.init_cache(1, BUFFER)
        prompt = torch.randint(0, model.vocab_size, (1, START), generator=torch.Generator().manual_seed(1))
        tok = model.prefill(prompt, caches)[:, -1].argmax(-1)
        pos = torch.tensor(model.next_position(0, START))
        t0 = time.perf_counter()
        for _ in range(steps):
            tok = model.decode_step(tok, caches, pos).argmax(-1)
            pos += 1
        return (time.perf_counter() - t0) / steps * 1e3


def measure(kinds: str, steps: int, rounds: int) -> dict:
    models = {"shared": build(kinds, True), "separate": build(kinds, False)}
    times: dict[str, list[float]] = {name: [] for name in models}
    for model in models.values():
        decode_ms(model, 1)  # the separate model makes its decode copies here, outside the timing
    for _ in range(rounds):  # alternate, so both see the same machine load
        for name, model in models.items():
            times[name].append(decode_ms(model, steps))
    weights = sum(p.numel() * p.element_size() for p in models["shared"].parameters())
    out = {"params": models["shared"].num_parameters(), "weight_bytes": weights}
    for name, model in models.items():
        out[f"{name}_held_bytes"] = held_bytes(model)
        out[f"{name}_ms_per_token"] = round(statistics.median(times[name]), 3)
    out["extra_shared"] = out["shared_held_bytes"] / weights - 1
    out["extra_separate"] = out["separate_held_bytes"] / weights - 1
    out["time_ratio_shared_over_separate"] = out["shared_ms_per_token"] / out["separate_ms_per_token"]
    return out


def render(results: dict, args) -> str:
    lines = [
        f"> `PYTHONPATH=. python3 benchmarks/decode_weight_memory.py --steps {args.steps} --rounds "
        f"{args.rounds}` on {platform.machine()} ({torch.get_num_threads()} threads), "
        f"torch {torch.__version__}, "
        f"float32, batch 1, prompt {START}, buffer {BUFFER}; medians over {args.rounds} alternating rounds.",
        "",
        "| model | params | weights MB | held MB, shared (extra) | held MB, separate copies (extra) "
        "| decode ms/token shared | separate | ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    mb = 1 / 2**20
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['params'] / 1e6:.1f} M | {r['weight_bytes'] * mb:.0f} "
            f"| {r['shared_held_bytes'] * mb:.0f} ({r['extra_shared']:+.1%}) "
            f"| {r['separate_held_bytes'] * mb:.0f} ({r['extra_separate']:+.1%}) "
            f"| {r['shared_ms_per_token']:.2f} | {r['separate_ms_per_token']:.2f} "
            f"| {r['time_ratio_shared_over_separate']:.3f} |"
        )
    lines += [
        "",
        "The CUDA-graph decode time against the reference (`../shared/bench/gpu_anchor.py`, target <= 1.2x",
        "for both models) is `benchmarks/gpu_check.py --steps decode` on a GPU; not run here: no GPU.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    results = {name: measure(kinds, args.steps, args.rounds) for name, kinds in ANCHOR_MODELS.items()}
    table = render(results, args)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "decode_weight_memory.json").write_text(json.dumps(results, indent=1))
        (args.out / "decode_weight_memory.md").write_text(table)


if __name__ == "__main__":
    main()
