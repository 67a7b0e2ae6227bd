"""The worker entry point: everything a worker does for one candidate.

    evaluate(layout, proxy_config, latency_config, data_dir=...) -> EvaluationResult

in four phases (`search.evaluation.PHASES`): load the data (tokenized once per process), build the model,
train it briefly (the val_bpb proxy) and keep its weights, measure its latency on this device. A wsd run
also keeps its stable-phase checkpoint (`<data_dir>/checkpoints/<training_key>/stable/`), from which a larger
budget's evaluation continues (`continue_from`, a path inside the data dir). It returns
plain data (metrics, curves, fingerprints, status, the failed phase and reason, traceback, log tail, timings,
artifact path) and never raises for a failing candidate. `result_keys` gives the keys an evaluation would
have, so that stored results are reused instead. The CLI calls these directly; Ray actors in the search reach
them by this module path. Workers are long-lived: the tokenized corpus stays loaded and compiled kernels stay
cached (TRITON_CACHE_DIR under the data dir).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from search.evaluation import DataConfig, EvaluationResult, LatencyConfig, ProxyConfig, ResultKeys
from search.keys import latency_key, training_key
from search.layout import Layout

log = logging.getLogger("hybridnas.worker")


class _TailHandler(logging.Handler):
    def __init__(self, lines: int):
        super().__init__(logging.INFO)
        self.records: collections.deque[str] = collections.deque(maxlen=lines)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(self.format(record))


_DATA_CACHE: dict = {}
_DATA_LOCK = threading.Lock()  # a threaded actor may ask for keys while it evaluates: load once


def _load_data(data_config: DataConfig, data_dir: Path, data_roots):
    from proxies.dataset import load_data

    key = (data_config, str(data_dir), tuple(map(str, data_roots)))
    with _DATA_LOCK:
        if key not in _DATA_CACHE:
            _DATA_CACHE[key] = load_data(data_config, data_dir, data_roots)
        return _DATA_CACHE[key]


@dataclass(frozen=True)
class Inputs:
    """One evaluation's inputs, each in its own type (the coercion every entry point shares)."""

    layout: Layout
    proxy: ProxyConfig
    latency: LatencyConfig
    data: DataConfig
    data_dir: Path


def coerce_inputs(layout, proxy_config, latency_config, data_config, data_dir) -> Inputs:
    """Layouts from a Layout, a dict or JSON text; settings from their models or plain dicts (validated by
    the same models as at submission); the data dir made absolute."""
    if not isinstance(layout, Layout):
        layout = Layout.from_json(layout) if isinstance(layout, str) else Layout.from_dict(layout)
    if data_dir is None:
        raise ValueError("data_dir: the worker needs the data dir (cache, artifacts, locks)")
    return Inputs(
        layout=layout,
        proxy=proxy_config if isinstance(proxy_config, ProxyConfig) else ProxyConfig.from_dict(proxy_config),
        latency=(
            latency_config
            if isinstance(latency_config, LatencyConfig)
            else LatencyConfig.from_dict(latency_config)
        ),
        data=data_config if isinstance(data_config, DataConfig) else DataConfig.from_dict(data_config),
        data_dir=Path(data_dir).resolve(),
    )


def _precision(proxy_config: ProxyConfig, torch_device) -> str:
    bf16 = proxy_config.precision == "bf16" or (
        proxy_config.precision == "auto" and torch_device.type == "cuda"
    )
    return "bf16" if bf16 else "fp32"


def _training_key(inputs: Inputs, data, torch_device) -> str:
    return training_key(
        inputs.layout,
        inputs.proxy.content_hash,
        data.fingerprint,
        torch_device.type,
        _precision(inputs.proxy, torch_device),
    )


def _device_fingerprint(config: LatencyConfig, torch_device) -> dict:
    from latency.profiler import device_fingerprint, resolve_dtype, resolve_method

    return device_fingerprint(
        torch_device, resolve_dtype(config, torch_device), resolve_method(config, torch_device)
    )


def result_keys(
    layout: Layout | dict | str,
    proxy_config: Any = None,
    latency_config: Any = None,
    *,
    data_config: Any = None,
    data_dir: str | Path | None = None,
    data_roots: tuple = (".",),
    device: str | None = None,
    on_phase: Callable[[str], None] | None = None,
) -> ResultKeys:
    """The training and latency keys `evaluate` would give these inputs on this worker (cheap once the
    corpus is loaded: it is cached per process), so a search can reuse stored results instead."""
    from proxies.train import resolve_device

    inputs = coerce_inputs(layout, proxy_config, latency_config, data_config, data_dir)
    torch_device = resolve_device(device)
    if on_phase is not None:
        on_phase("data")
    data = _load_data(inputs.data, inputs.data_dir, data_roots)
    return ResultKeys(
        training_key=_training_key(inputs, data, torch_device),
        latency_key=_latency_key(inputs, _device_fingerprint(inputs.latency, torch_device)),
    )


def _latency_key(inputs, device_fingerprint: dict) -> str:
    from latency.profiler import fingerprint_hash

    return latency_key(inputs.layout, inputs.latency.content_hash, fingerprint_hash(device_fingerprint))


class _Phases:
    """The phase an evaluation is in (told to `on_phase` as each starts) and the seconds spent in each
    (`timings["<phase>_s"]`)."""

    def __init__(self, on_phase: Callable[[str], None] | None):
        self.current, self.since, self.timings = "data", time.perf_counter(), {}
        self.on_phase = on_phase

    def __call__(self, name: str) -> None:
        self.close()
        self.current = name
        if self.on_phase is not None:
            self.on_phase(name)

    def close(self) -> None:
        now = time.perf_counter()
        key = f"{self.current}_s"
        self.timings[key] = self.timings.get(key, 0.0) + now - self.since
        self.since = now


def stable_checkpoint_dir(data_dir: Path, training_key: str) -> Path:
    """Where a wsd evaluation keeps its stable-phase checkpoint."""
    return Path(data_dir) / "checkpoints" / training_key / "stable"


def resolve_continue_from(raw: str | Path, data_dir: Path) -> Path:
    """`continue_from` as a path inside the data dir (relative ones are taken from it); ValueError naming
    the field otherwise. A path that does not exist is allowed: that run trains fresh and says why."""
    if not str(raw) or "\x00" in str(raw):
        raise ValueError("continue_from: empty or malformed path")
    root = Path(data_dir).resolve()
    try:
        path = (root / Path(raw).expanduser()).resolve()
    except (OSError, RuntimeError) as exc:
        raise ValueError(f"continue_from: not a usable path ({exc})") from None
    if not path.is_relative_to(root):
        raise ValueError(f"continue_from: {raw} is outside the data dir ({root})")
    return path


def _locked(lock: Any, mode: str):
    return getattr(lock, mode)() if lock is not None else contextlib.nullcontext()


def _train_phase(
    inputs: Inputs,
    data,
    torch_device,
    result: EvaluationResult,
    *,
    device_lock,
    progress,
    save_artifacts: bool,
    phase: _Phases,
    continue_from: Path | None = None,
):
    """Build and short-train the model (the device held shared), continued from `continue_from` when given;
    its weights (and a wsd run's stable-phase checkpoint) saved. The model, or None when training failed (the
    result then says why, and in which phase)."""
    from proxies.artifacts import ArtifactStore
    from proxies.train import train_proxy

    save_stable = None
    if save_artifacts and inputs.proxy.schedule == "wsd":
        save_stable = stable_checkpoint_dir(inputs.data_dir, result.training_key)
    with _locked(device_lock, "shared"):
        train_result, model = train_proxy(
            inputs.layout,
            inputs.proxy,
            data,
            torch_device,
            progress,
            phase,
            continue_from=continue_from,
            save_stable=save_stable,
        )
    result.training = train_result.to_dict()
    if train_result.status != "completed":
        result.failed_phase = phase.current
        result.failure_reason = f"{result.failed_phase}: {train_result.failure_reason}"
        result.traceback = train_result.traceback
        log.warning("%s", result.failure_reason)
        return None
    log.info("trained %d steps: val_bpb %.4f", train_result.steps_done, train_result.val_bpb)
    if save_artifacts:
        metadata = {
            "layout_hash": inputs.layout.content_hash,
            "proxy_config": inputs.proxy.to_dict(),
            "corpus": data.fingerprint,
            "val_bpb": train_result.val_bpb,
            "vocab_size": data.vocab_size,
        }
        path = ArtifactStore(inputs.data_dir / "artifacts").save(
            result.training_key, model, data.tokenizer, inputs.layout.to_json(), metadata
        )
        result.artifact_path = str(path)
    return model


def _latency_phase(
    inputs: Inputs, data, torch_device, model, result: EvaluationResult, *, device_lock, phase: _Phases
) -> None:
    """Measure decode latency (the device held exclusive: nothing trains during a measurement). Without a
    trained model, an untrained one of the same layout (latency does not depend on the weights)."""
    import torch

    from latency.profiler import profile
    from models.hybrid import HybridLM

    if model is None:
        phase("model")
        torch.manual_seed(0)
        model = HybridLM(inputs.layout, data.vocab_size)
    phase("latency")
    result.device_fingerprint = _device_fingerprint(inputs.latency, torch_device)
    result.latency_key = _latency_key(inputs, result.device_fingerprint)
    with _locked(device_lock, "exclusive"):
        latency = profile(model, inputs.latency, torch_device)
    result.latency = latency.to_dict()
    result.device_fingerprint = latency.fingerprint
    log.info("decode %.3f ms/token", latency.decode_ms_per_token.median)


def evaluate(
    layout: Layout | dict | str,
    proxy_config: Any = None,
    latency_config: Any = None,
    *,
    data_config: Any = None,
    data_dir: str | Path | None = None,
    data_roots: tuple = (".",),
    device: str | None = None,
    train: bool = True,
    measure_latency: bool = True,
    save_artifacts: bool = True,
    progress: Callable[[int, int, float], None] | None = None,
    device_lock: Any = None,
    on_phase: Callable[[str], None] | None = None,
    log_lines: int = 50,
    continue_from: str | Path | None = None,
) -> EvaluationResult:
    """Evaluate one candidate. Never raises for a failing candidate: failure is a result, naming its phase.

    `continue_from` (a stable-phase checkpoint inside the data dir; not part of the result keys: a continued
    run is the fresh run's result) continues a wsd training from there.

    `device_lock` (a `search.devicelock.DeviceLock`) is held shared while training and exclusive while
    latency is measured. `on_phase(name)` is told each phase as it starts (a worker reports it when a
    timeout stops it)."""
    from proxies.train import resolve_device

    started = time.perf_counter()
    tail = _TailHandler(log_lines)
    root_logger = logging.getLogger("hybridnas")
    root_logger.addHandler(tail)
    if root_logger.level == logging.NOTSET or root_logger.level > logging.INFO:
        root_logger.setLevel(logging.INFO)
    result = EvaluationResult(status="failed", layout_hash="")
    phase = _Phases(on_phase)
    try:
        phase("data")
        inputs = coerce_inputs(layout, proxy_config, latency_config, data_config, data_dir)
        result.layout_hash = inputs.layout.content_hash
        if continue_from is not None:
            continue_from = resolve_continue_from(continue_from, inputs.data_dir)
        os.environ.setdefault("TRITON_CACHE_DIR", str(inputs.data_dir / "cache" / "triton"))
        torch_device = resolve_device(device)
        log.info("evaluating %s (%s) on %s", result.layout_hash[:12], inputs.layout.compact(), torch_device)
        data = _load_data(inputs.data, inputs.data_dir, data_roots)
        result.corpus_fingerprint = dict(data.fingerprint)
        result.training_key = _training_key(inputs, data, torch_device)
        # Both keys, whichever phases run: a result that only trains (its latency is stored already) is
        # completed with the stored latency under this key.
        result.latency_key = _latency_key(inputs, _device_fingerprint(inputs.latency, torch_device))
        model = None
        if train:
            model = _train_phase(
                inputs,
                data,
                torch_device,
                result,
                device_lock=device_lock,
                progress=progress,
                save_artifacts=save_artifacts,
                phase=phase,
                continue_from=continue_from,
            )
            if model is None:
                return result
        if measure_latency:
            _latency_phase(inputs, data, torch_device, model, result, device_lock=device_lock, phase=phase)
        result.status = "completed"
    except Exception as exc:  # an operator's exception, bad config, OOM while profiling: data, not a crash
        result.status = "failed"
        result.failed_phase = phase.current
        first_line = str(exc).splitlines()[0][:300] if str(exc) else ""
        result.failure_reason = f"{phase.current}: {type(exc).__name__}: {first_line}"
        result.traceback = traceback.format_exc()
        log.error("evaluation failed: %s", result.failure_reason)
    finally:
        phase.close()
        result.timings = {
            k: round(v, 4) for k, v in {**phase.timings, "total_s": time.perf_counter() - started}.items()
        }
        result.log_tail = list(tail.records)
        root_logger.removeHandler(tail)
    return result
