"""The worker entry point: everything a worker does for one candidate.

    evaluate(layout, proxy_config, latency_config) -> EvaluationResult

train it briefly (the val_bpb proxy), keep its weights, measure its latency on this device, and return plain
data (metrics, curves, fingerprints, status, failure reason, traceback, log tail, timings, artifact path).
The CLI calls it now; Ray actors in the search reach it by this module path. Workers are meant to be
long-lived: the tokenized corpus is loaded once per process and compiled kernels stay cached
(TRITON_CACHE_DIR under the data dir).
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from search.keys import latency_key, training_key
from search.layout import Layout

log = logging.getLogger("hybridnas.worker")


@dataclass
class EvaluationResult:
    status: str  # "completed" | "failed"
    layout_hash: str
    failure_reason: str | None = None
    traceback: str | None = None
    training_key: str | None = None
    latency_key: str | None = None
    training: dict | None = None  # proxies.train.TrainResult as a dict
    latency: dict | None = None  # latency.profiler.LatencyResult as a dict
    corpus_fingerprint: dict = field(default_factory=dict)
    device_fingerprint: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    artifact_path: str | None = None
    log_tail: list[str] = field(default_factory=list)

    @property
    def val_bpb(self) -> float | None:
        return (self.training or {}).get("val_bpb")

    @property
    def decode_ms_per_token(self) -> float | None:
        stat = (self.latency or {}).get("decode_ms_per_token")
        return stat["median"] if stat else None

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, default=str)


class _TailHandler(logging.Handler):
    def __init__(self, lines: int):
        super().__init__(logging.INFO)
        self.records: collections.deque[str] = collections.deque(maxlen=lines)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(self.format(record))


_DATA_CACHE: dict = {}


def _load_data(data_config, data_dir: Path, data_roots):
    from proxies.dataset import load_data

    key = (data_config, str(data_dir), tuple(map(str, data_roots)))
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = load_data(data_config, data_dir, data_roots)
    return _DATA_CACHE[key]


def _as_layout(layout: Layout | dict | str) -> Layout:
    if isinstance(layout, Layout):
        return layout
    if isinstance(layout, str):
        return Layout.from_json(layout)
    return Layout.from_dict(layout)


def result_keys(
    layout: Layout | dict | str,
    proxy_config: Any = None,
    latency_config: Any = None,
    *,
    data_config: Any = None,
    data_dir: str | Path | None = None,
    data_roots: tuple = (".",),
    device: str | None = None,
) -> dict:
    """The training and latency keys `evaluate` would give these inputs on this worker (cheap: the corpus is
    cached per process), so a search can reuse stored results instead of evaluating again."""
    from latency.profiler import (
        LatencyConfig,
        device_fingerprint,
        fingerprint_hash,
        resolve_dtype,
        resolve_method,
    )
    from proxies.dataset import DataConfig
    from proxies.train import ProxyConfig, resolve_device

    layout = _as_layout(layout)
    proxy_config = (
        proxy_config if isinstance(proxy_config, ProxyConfig) else ProxyConfig.from_dict(proxy_config or {})
    )
    latency_config = (
        latency_config
        if isinstance(latency_config, LatencyConfig)
        else LatencyConfig(**(latency_config or {}))
    )
    data_config = data_config if isinstance(data_config, DataConfig) else DataConfig(**(data_config or {}))
    data_dir = Path(data_dir or os.environ.get("HYBRIDNAS_DATA_DIR", ".hybridnas")).resolve()
    torch_device = resolve_device(device)
    data = _load_data(data_config, data_dir, data_roots)
    fingerprint = device_fingerprint(
        torch_device,
        resolve_dtype(latency_config, torch_device),
        resolve_method(latency_config, torch_device),
    )
    return {
        "training_key": training_key(
            layout,
            proxy_config.content_hash,
            data.fingerprint,
            torch_device.type,
            _precision(proxy_config, torch_device),
        ),
        "latency_key": latency_key(layout, latency_config.content_hash, fingerprint_hash(fingerprint)),
    }


def _precision(proxy_config, torch_device) -> str:
    bf16 = proxy_config.precision == "bf16" or (
        proxy_config.precision == "auto" and torch_device.type == "cuda"
    )
    return "bf16" if bf16 else "fp32"


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
    log_lines: int = 50,
) -> EvaluationResult:
    """Evaluate one candidate. Never raises for a failing candidate: failure is a result.

    `device_lock` (a `search.devicelock.DeviceLock`) is held shared while training and exclusive while
    latency is measured, so that nothing trains on the node's devices during a measurement."""
    import torch

    from latency.profiler import (
        LatencyConfig,
        device_fingerprint,
        fingerprint_hash,
        profile,
        resolve_dtype,
        resolve_method,
    )
    from proxies.artifacts import ArtifactStore
    from proxies.dataset import DataConfig
    from proxies.train import ProxyConfig, resolve_device, train_proxy

    started = time.perf_counter()
    tail = _TailHandler(log_lines)
    root_logger = logging.getLogger("hybridnas")
    root_logger.addHandler(tail)
    if root_logger.level == logging.NOTSET or root_logger.level > logging.INFO:
        root_logger.setLevel(logging.INFO)
    result = EvaluationResult(status="failed", layout_hash="")
    timings: dict[str, float] = {}
    try:
        layout = _as_layout(layout)
        result.layout_hash = layout.content_hash
        proxy_config = (
            proxy_config
            if isinstance(proxy_config, ProxyConfig)
            else ProxyConfig.from_dict(proxy_config or {})
        )
        latency_config = (
            latency_config
            if isinstance(latency_config, LatencyConfig)
            else LatencyConfig(**(latency_config or {}))
        )
        data_config = (
            data_config if isinstance(data_config, DataConfig) else DataConfig(**(data_config or {}))
        )
        data_dir = Path(data_dir or os.environ.get("HYBRIDNAS_DATA_DIR", ".hybridnas")).resolve()
        os.environ.setdefault("TRITON_CACHE_DIR", str(data_dir / "cache" / "triton"))
        torch_device = resolve_device(device)
        log.info("evaluating %s (%s) on %s", layout.content_hash[:12], layout.compact(), torch_device)

        t0 = time.perf_counter()
        data = _load_data(data_config, data_dir, data_roots)
        timings["data_s"] = time.perf_counter() - t0
        result.corpus_fingerprint = dict(data.fingerprint)
        result.training_key = training_key(
            layout,
            proxy_config.content_hash,
            data.fingerprint,
            torch_device.type,
            _precision(proxy_config, torch_device),
        )
        model = None
        if train:
            t0 = time.perf_counter()
            with device_lock.shared() if device_lock is not None else contextlib.nullcontext():
                train_result, model = train_proxy(layout, proxy_config, data, torch_device, progress)
            timings["train_s"] = time.perf_counter() - t0
            result.training = train_result.to_dict()
            if train_result.status != "completed":
                result.failure_reason = f"training: {train_result.failure_reason}"
                result.traceback = train_result.traceback
                log.warning("training failed: %s", train_result.failure_reason)
                return result
            log.info("trained %d steps: val_bpb %.4f", train_result.steps_done, train_result.val_bpb)
            if save_artifacts:
                store = ArtifactStore(data_dir / "artifacts")
                path = store.save(
                    result.training_key,
                    model,
                    data.tokenizer,
                    layout.to_json(),
                    {
                        "layout_hash": layout.content_hash,
                        "proxy_config": proxy_config.to_dict(),
                        "corpus": data.fingerprint,
                        "val_bpb": train_result.val_bpb,
                        "vocab_size": data.vocab_size,
                    },
                )
                result.artifact_path = str(path)
        if measure_latency:
            from models.hybrid import HybridLM

            t0 = time.perf_counter()
            if model is None:
                torch.manual_seed(0)
                model = HybridLM(layout, data.vocab_size)
            dtype = resolve_dtype(latency_config, torch_device)
            method = resolve_method(latency_config, torch_device)
            result.device_fingerprint = device_fingerprint(torch_device, dtype, method)
            result.latency_key = latency_key(
                layout, latency_config.content_hash, fingerprint_hash(result.device_fingerprint)
            )
            with device_lock.exclusive() if device_lock is not None else contextlib.nullcontext():
                latency = profile(model, latency_config, torch_device)
            result.latency = latency.to_dict()
            result.device_fingerprint = latency.fingerprint
            timings["latency_s"] = time.perf_counter() - t0
            log.info("decode %.3f ms/token", latency.decode_ms_per_token.median)
        result.status = "completed"
    except Exception as exc:  # an operator's exception, bad config, OOM while profiling: data, not a crash
        result.status = "failed"
        first_line = str(exc).splitlines()[0][:300] if str(exc) else ""
        result.failure_reason = f"{type(exc).__name__}: {first_line}"
        result.traceback = traceback.format_exc()
        log.error("evaluation failed: %s", result.failure_reason)
    finally:
        timings["total_s"] = time.perf_counter() - started
        result.timings = {k: round(v, 4) for k, v in timings.items()}
        result.log_tail = list(tail.records)
        root_logger.removeHandler(tail)
    return result
