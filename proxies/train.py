"""Short training: the perplexity proxy of one candidate (method.md section 4: short training ranks layouts
the way full training does). Warmup + cosine over exactly the budget (or warmup-stable-decay), AdamW (or
Adam without weight decay when weight normalization is on), grad clipping, seeded; bf16 autocast on GPU,
fp32 on CPU.

Continuation (wsd, the multi-fidelity rungs): a run given `save_stable` writes a checkpoint
(proxies.checkpoints) when it reaches its stable-phase end, before training that step; a run of a larger
budget given `continue_from` loads it and goes on from that step. Up to there the two runs are the same run
(same warmup, the peak rate held, same data order), so the continued result is the fresh one's. The
checkpoint's plan (every training setting but the budget, the layout, the data) must match, and its step
must not pass this run's stable end; otherwise the run trains fresh and says why (`fresh_reason`).

Failure is data: a NaN/inf or diverging loss, out-of-memory, a timeout or an exception in an operator ends
the run with `status="failed"`, a reason, the traceback and whatever metrics existed.
"""

from __future__ import annotations

import json
import logging
import math
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.hybrid import HybridLM
from models.weight_norm import normalize_weights
from proxies.checkpoints import load_checkpoint, read_state, write_checkpoint
from proxies.dataset import TokenData, bits_per_byte
from search.evaluation import ProxyConfig  # noqa: F401 - re-exported beside the trainer that reads it
from search.layout import Layout

log = logging.getLogger("hybridnas.train")


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
    steps_trained: int = 0  # optimizer steps run in this call (fewer than steps_done when continued)
    continued_from_step: int | None = None  # the checkpoint step this run went on from
    fresh_reason: str | None = None  # why a continue_from checkpoint was not used
    stable_step: int | None = None  # wsd: the step the decay starts at (where save_stable checkpoints)
    stable_checkpoint: str | None = None  # the stable-phase checkpoint saved

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


def checked_loss(
    model: HybridLM, x, y, config: ProxyConfig, device: torch.device, step: int, best: float, warmup: int
) -> tuple[torch.Tensor, float]:
    """The training loss of one batch and its value; TrainingFailed when it is not finite, or (after
    `warmup` steps) more than `divergence_factor` times the `best` loss so far."""
    with _autocast(config, device):
        logits = model(x)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
    loss_value = loss.item()
    if not math.isfinite(loss_value):
        raise TrainingFailed(f"non-finite loss ({loss_value}) at step {step}")
    if step >= warmup and loss_value > best * config.divergence_factor:
        raise TrainingFailed(
            f"diverged: loss {loss_value:.3f} at step {step} is more than "
            f"{config.divergence_factor}x its best {best:.3f}"
        )
    return loss, loss_value


def apply_update(model: HybridLM, optimizer: torch.optim.Optimizer, loss: torch.Tensor, config: ProxyConfig):
    """Backward, clip, step; the weights normalized again when weight normalization is on."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    optimizer.step()
    if config.weight_norm:
        normalize_weights(model)


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


# Settings a run of another budget may differ in and still share the steps up to the stable-phase end.
_BUDGET_SETTINGS = ("steps", "tokens", "timeout_s", "log_every")


def continuation_plan(layout: Layout, config: ProxyConfig, data: TokenData, device: torch.device) -> dict:
    """What a stable-phase checkpoint must share with the run that continues from it: every training
    setting but the budget and the run's limits, the warmup it ran, the layout, the data and the device
    class (plain JSON values, compared with a checkpoint's state.json)."""
    settings = {k: v for k, v in config.to_dict().items() if k not in _BUDGET_SETTINGS}
    plan = {
        "proxy": settings,
        "warmup_steps": config.warmup_steps,
        "layout_hash": layout.content_hash,
        "data": data.fingerprint,
        "vocab_size": data.vocab_size,
        "device": device.type,
    }
    return json.loads(json.dumps(plan))


def _plan_differences(mine: dict, theirs: dict) -> list[str]:
    """The plan entries that differ (`proxy.lr`, `layout_hash`), sorted."""
    out = []
    for key in sorted(set(mine) | set(theirs)):
        a, b = mine.get(key), theirs.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(f"{key}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
        elif a != b:
            out.append(key)
    return out


@dataclass
class _Run:
    """Where the loop starts: the step, the data sampler, the best loss so far."""

    step: int
    rng: np.random.Generator
    best: float


def _usable_state(path: Path, plan: dict, config: ProxyConfig) -> tuple[dict | None, str | None]:
    """The checkpoint's state.json if this run can continue from it, else None and why."""
    try:
        state = read_state(path)
    except (OSError, ValueError) as exc:
        return None, f"continue_from: no readable checkpoint at {path} ({type(exc).__name__})"
    if not isinstance(state, dict) or not isinstance(state.get("plan"), dict) or "step" not in state:
        return None, f"continue_from: {path} holds no stable-phase checkpoint (no plan or step in state.json)"
    differences = _plan_differences(plan, state["plan"])
    if differences:
        return (
            None,
            f"continue_from: the checkpoint was made by another plan (differs in {', '.join(differences)})",
        )
    if state["step"] > config.stable_steps:
        return None, (
            f"continue_from: the checkpoint's step {state['step']} is past this run's stable-phase end "
            f"(step {config.stable_steps})"
        )
    return state, None


def _resume(path: Path, plan: dict, config: ProxyConfig, model, optimizer, device, result) -> _Run | None:
    """The run continued from the checkpoint at `path` (weights, optimizer, RNGs, best loss and loss curve
    restored), or None with `result.fresh_reason` when it cannot be used."""
    state, reason = _usable_state(Path(path), plan, config)
    if state is not None:
        try:
            state, rng = load_checkpoint(Path(path), model, optimizer, device)
        except Exception as exc:  # a damaged file: the run is still trainable from scratch
            state, reason = (
                None,
                f"continue_from: the checkpoint at {path} did not load ({type(exc).__name__})",
            )
    if state is None:
        result.fresh_reason = reason
        log.warning("training fresh: %s", reason)
        return None
    result.loss_curve = [tuple(point) for point in state["loss_curve"]]
    result.continued_from_step = result.steps_done = state["step"]
    return _Run(state["step"], rng, state["best_loss"])


def _start(
    layout, config, data, device, plan, continue_from, result
) -> tuple[HybridLM, torch.optim.Optimizer, _Run]:
    """The model, optimizer and starting point: continued from `continue_from` when usable, else fresh."""
    model = build_model(layout, data.vocab_size, config, device)
    optimizer = make_optimizer(model, config)
    if continue_from is not None:
        run = _resume(continue_from, plan, config, model, optimizer, device, result)
        if run is not None:
            return model, optimizer, run
        model = build_model(
            layout, data.vocab_size, config, device
        )  # a failed load may have left some weights
        optimizer = make_optimizer(model, config)
    return model, optimizer, _Run(0, np.random.default_rng(config.seed), math.inf)


def train_proxy(
    layout: Layout,
    config: ProxyConfig,
    data: TokenData,
    device: str | torch.device | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    on_phase: Callable[[str], None] | None = None,
    evaluate_every: int = 0,
    on_evaluate: Callable[[int, dict], None] | None = None,
    continue_from: Path | None = None,
    save_stable: Path | None = None,
) -> tuple[TrainResult, HybridLM | None]:
    """Short-train `layout` on `data`; returns the result (never raises for a failing candidate) and the
    trained model (None if it could not be built). `on_phase` hears "model", then "training".
    `on_evaluate(steps_done, metrics)` hears the validation metrics every `evaluate_every` steps (the
    evaluation draws no random numbers: the run's result is the same with it or without). A wsd run saves
    its stable-phase checkpoint to the folder `save_stable`, and continues from `continue_from`'s."""
    device = resolve_device(device) if not isinstance(device, torch.device) else device
    result = TrainResult()
    started = time.perf_counter()
    model = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        if on_phase is not None:
            on_phase("model")
        plan = continuation_plan(layout, config, data, device)
        model, optimizer, run = _start(layout, config, data, device, plan, continue_from, result)
        if on_phase is not None:
            on_phase("training")
        result.n_params = model.num_parameters()
        if config.schedule == "wsd":
            result.stable_step = config.stable_steps
        tokens_seen = 0
        train_time = 0.0
        for step in range(run.step, config.total_steps):
            if config.timeout_s is not None and time.perf_counter() - started > config.timeout_s:
                raise TrainingFailed(f"timeout: {config.timeout_s:.0f} s budget exceeded at step {step}")
            if save_stable is not None and step == result.stable_step:
                progress_so_far = {"plan": plan, "best_loss": run.best, "loss_curve": result.loss_curve}
                write_checkpoint(Path(save_stable), step, model, optimizer, run.rng, progress_so_far)
                result.stable_checkpoint = str(save_stable)
            step_start = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = config.lr_at(step)
            x, y = sample_batch(data.train, run.rng, config.batch_size, config.seq_len, device)
            loss, loss_value = checked_loss(model, x, y, config, device, step, run.best, config.warmup_steps)
            run.best = min(run.best, loss_value)
            apply_update(model, optimizer, loss, config)
            tokens_seen += x.numel()
            train_time += time.perf_counter() - step_start
            result.steps_done = step + 1
            result.steps_trained += 1
            result.final_train_loss = loss_value
            if step % config.log_every == 0 or step == config.total_steps - 1:
                result.loss_curve.append((step, round(loss_value, 6)))
            if progress is not None:
                progress(step + 1, config.total_steps, loss_value)
            if on_evaluate is not None and evaluate_every and (step + 1) % evaluate_every == 0:
                on_evaluate(step + 1, evaluate_bpb(model, data, config, device))
        result.tokens_per_s = tokens_seen / max(train_time, 1e-9)
        metrics = evaluate_bpb(model, data, config, device)
        for key, value in metrics.items():
            setattr(result, key, value)
        result.status = "completed"
    except Exception as exc:  # failure is data: record it, never crash the search
        _record_failure(result, exc, device)
    result.wall_s = time.perf_counter() - started
    if device.type == "cuda":
        result.peak_memory_bytes = int(torch.cuda.max_memory_allocated(device))
    else:
        result.peak_memory_bytes = _peak_rss_bytes()
    if model is not None:
        result.backends = model.backends()
    return result, model


def _record_failure(result: TrainResult, exc: Exception, device: torch.device) -> None:
    result.status = "failed"
    if isinstance(exc, TrainingFailed):
        result.failure_reason = str(exc)
    elif isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
        result.failure_reason = f"out of memory: {str(exc).splitlines()[0][:300]}"
    else:
        result.failure_reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    result.traceback = traceback.format_exc()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _peak_rss_bytes() -> int | None:
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB
    except Exception:
        return None
