"""Short training: the perplexity proxy of one candidate (method.md section 4: short training ranks layouts
the way full training does). Warmup + cosine over exactly the budget, AdamW (or Adam without weight decay
when weight normalization is on), grad clipping, seeded; bf16 autocast on GPU, fp32 on CPU.

Failure is data: a NaN/inf or diverging loss, out-of-memory, a timeout or an exception in an operator ends
the run with `status="failed"`, a reason, the traceback and whatever metrics existed.
"""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from models.hybrid import HybridLM
from models.weight_norm import normalize_weights
from proxies.dataset import TokenData, bits_per_byte
from search.evaluation import ProxyConfig  # noqa: F401 - re-exported beside the trainer that reads it
from search.layout import Layout


@dataclass
class TrainResult:
    status: str = "running"  # "completed" | "failed"
    failure_reason: str | None = None
    traceback: str | None = None
    steps_done: int = 0
    loss_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, train loss) every log_every
    final_train_loss: float | None = None
    val_bpb: float | None = None
    val_loss: float | None = None  # nats per token
    val_ppl: float | None = None  # token perplexity
    val_tokens: int = 0
    tokens_per_s: float | None = None
    wall_s: float = 0.0
    peak_memory_bytes: int | None = None
    n_params: int | None = None
    backends: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class TrainingFailed(Exception):
    pass


def resolve_device(device: str | None = None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def build_model(layout: Layout, vocab_size: int, config: ProxyConfig, device: torch.device) -> HybridLM:
    if config.meta_tokens is not None and config.meta_tokens != layout.meta_tokens:
        layout = layout.replace(meta_tokens=config.meta_tokens)
    torch.manual_seed(config.seed)
    model = HybridLM(layout, vocab_size).to(device)
    if config.weight_norm:
        normalize_weights(model)
    return model


def make_optimizer(model: HybridLM, config: ProxyConfig) -> torch.optim.Optimizer:
    betas = (config.beta1, config.beta2)
    if config.weight_norm:  # method.md section 5: Adam without weight decay with weight normalization
        return torch.optim.Adam(model.parameters(), lr=config.lr, betas=betas)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=betas,
    )


def sample_batch(tokens: np.ndarray, rng: np.random.Generator, batch: int, seq_len: int, device) -> tuple:
    starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch)
    window = np.stack([np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in starts])
    window = torch.from_numpy(window).to(device)
    return window[:, :-1], window[:, 1:]


def _autocast(config: ProxyConfig, device: torch.device):
    use_bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)


@torch.no_grad()
def evaluate_bpb(model: HybridLM, data: TokenData, config: ProxyConfig, device: torch.device) -> dict:
    """val_bpb over the first `eval_tokens` validation tokens, in non-overlapping windows of seq_len."""
    model.eval()
    n = min(config.eval_tokens, len(data.val) - 1)
    n_windows = max(1, n // config.seq_len)
    total_nats, total_bytes, total_tokens = 0.0, 0, 0
    for first in range(0, n_windows, config.batch_size):
        rows = range(first, min(n_windows, first + config.batch_size))
        window = np.stack(
            [
                np.asarray(data.val[r * config.seq_len : (r + 1) * config.seq_len + 1], dtype=np.int64)
                for r in rows
            ]
        )
        nbytes = np.stack(
            [
                np.asarray(
                    data.val_bytes[r * config.seq_len + 1 : (r + 1) * config.seq_len + 1], dtype=np.int64
                )
                for r in rows
            ]
        )
        x = torch.from_numpy(window[:, :-1]).to(device)
        y = torch.from_numpy(window[:, 1:]).to(device)
        with _autocast(config, device):
            logits = model(x)
        nats = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")
        total_nats += float(nats)
        total_bytes += int(nbytes.sum())
        total_tokens += y.numel()
    model.train()
    return {
        "val_loss": total_nats / total_tokens,
        "val_bpb": bits_per_byte(total_nats, total_bytes),
        "val_ppl": math.exp(min(total_nats / total_tokens, 50.0)),
        "val_tokens": total_tokens,
    }


def train_proxy(
    layout: Layout,
    config: ProxyConfig,
    data: TokenData,
    device: str | torch.device | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    on_phase: Callable[[str], None] | None = None,
) -> tuple[TrainResult, HybridLM | None]:
    """Short-train `layout` on `data`; returns the result (never raises for a failing candidate) and the
    trained model (None if it could not be built). `on_phase` hears "model", then "training"."""
    device = resolve_device(device) if not isinstance(device, torch.device) else device
    result = TrainResult()
    started = time.perf_counter()
    model = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        if on_phase is not None:
            on_phase("model")
        model = build_model(layout, data.vocab_size, config, device)
        if on_phase is not None:
            on_phase("training")
        result.n_params = model.num_parameters()
        optimizer = make_optimizer(model, config)
        rng = np.random.default_rng(config.seed)
        best = math.inf
        tokens_seen = 0
        train_time = 0.0
        for step in range(config.total_steps):
            if config.timeout_s is not None and time.perf_counter() - started > config.timeout_s:
                raise TrainingFailed(f"timeout: {config.timeout_s:.0f} s budget exceeded at step {step}")
            step_start = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = config.lr_at(step)
            x, y = sample_batch(data.train, rng, config.batch_size, config.seq_len, device)
            with _autocast(config, device):
                logits = model(x)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise TrainingFailed(f"non-finite loss ({loss_value}) at step {step}")
            if step >= config.warmup_steps and loss_value > best * config.divergence_factor:
                raise TrainingFailed(
                    f"diverged: loss {loss_value:.3f} at step {step} is more than "
                    f"{config.divergence_factor}x its best {best:.3f}"
                )
            best = min(best, loss_value)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            if config.weight_norm:
                normalize_weights(model)
            tokens_seen += x.numel()
            train_time += time.perf_counter() - step_start
            result.steps_done = step + 1
            result.final_train_loss = loss_value
            if step % config.log_every == 0 or step == config.total_steps - 1:
                result.loss_curve.append((step, round(loss_value, 6)))
            if progress is not None:
                progress(step + 1, config.total_steps, loss_value)
        result.tokens_per_s = tokens_seen / max(train_time, 1e-9)
        metrics = evaluate_bpb(model, data, config, device)
        for key, value in metrics.items():
            setattr(result, key, value)
        result.status = "completed"
    except Exception as exc:  # failure is data: record it, never crash the search
        result.status = "failed"
        if isinstance(exc, TrainingFailed):
            result.failure_reason = str(exc)
        elif isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
            result.failure_reason = f"out of memory: {str(exc).splitlines()[0][:300]}"
        else:
            result.failure_reason = (
                f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            )
        result.traceback = traceback.format_exc()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result.wall_s = time.perf_counter() - started
    if device.type == "cuda":
        result.peak_memory_bytes = int(torch.cuda.max_memory_allocated(device))
    else:
        result.peak_memory_bytes = _peak_rss_bytes()
    if model is not None:
        result.backends = model.backends()
    return result, model


def _peak_rss_bytes() -> int | None:
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB
    except Exception:
        return None
