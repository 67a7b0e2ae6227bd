"""Real-device latency of a HybridLM: decode ms/token at batch 1 after a prompt (the paper's metric),
prefill ms, throughput at the largest batch that fits a memory cap, and cache bytes per sequence.

On GPU the whole decode step (every operator's recurrent step, the LM head and the greedy feedback) is
captured in ONE CUDA graph after warm-up (so Triton autotuning has finished), with static caches and the
position as a device tensor: eager timing of small models measures Python and launch overhead and can rank
layouts wrongly (gpu-notes.md). On CPU: eager under `torch.inference_mode`.

Imports only the standard library and torch (a GPU machine may have nothing else).
"""

from __future__ import annotations

import hashlib
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from models.hybrid import HybridLM
from models.kernels import kernel_versions
from search.evaluation import LatencyConfig  # noqa: F401 - re-exported beside the profiler that reads it


@dataclass
class Stat:
    median: float
    iqr: float
    repeats: int
    values: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, values: list[float]) -> Stat:
        if len(values) >= 2:
            q = statistics.quantiles(values, n=4, method="inclusive")
            iqr = q[2] - q[0]
        else:
            iqr = 0.0
        return cls(statistics.median(values), iqr, len(values), [round(v, 6) for v in values])


@dataclass
class LatencyResult:
    decode_ms_per_token: Stat
    prefill_ms: Stat
    throughput_tokens_per_s: Stat | None
    throughput_batch: int | None
    cache_bytes_per_sequence: int
    cache_buffer_tokens: int  # the static buffer the caches were sized for (meta tokens included)
    fingerprint: dict

    def to_dict(self) -> dict:
        return asdict(self)


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(config: LatencyConfig, device: torch.device) -> torch.dtype:
    if config.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[config.dtype]


def resolve_method(config: LatencyConfig, device: torch.device) -> str:
    if config.method == "auto":
        return "cuda-graph" if device.type == "cuda" else "eager"
    if config.method == "cuda-graph" and device.type != "cuda":
        raise ValueError("method: cuda-graph needs a CUDA device")
    return config.method


def device_fingerprint(device: torch.device, dtype: torch.dtype, method: str) -> dict:
    """What a latency figure means: device, driver, library versions, dtype, threads, method."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name, driver = props.name, _nvidia_driver()
        extra = {
            "cuda": torch.version.cuda,
            "capability": f"{props.major}.{props.minor}",
            "memory_bytes": props.total_memory,
        }
    else:
        name, driver, extra = _cpu_name(), None, {"machine": platform.machine()}
    return {
        "device": name,
        "device_type": device.type,
        "driver": driver,
        **kernel_versions(),
        "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "method": method,
        **extra,
    }


def fingerprint_hash(fingerprint: dict) -> str:
    keys = (
        "device",
        "device_type",
        "driver",
        "torch",
        "triton",
        "fla",
        "mamba_ssm",
        "dtype",
        "threads",
        "method",
    )
    return hashlib.sha256(
        json.dumps({k: fingerprint.get(k) for k in keys}, sort_keys=True).encode()
    ).hexdigest()


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_driver() -> str | None:
    try:
        with open("/proc/driver/nvidia/version") as fh:
            return fh.readline().strip()
    except OSError:
        return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cache_bytes(caches: list[dict], batch: int) -> int:
    return (
        sum(
            t.numel() * t.element_size()
            for cache in caches
            for t in cache.values()
            if isinstance(t, torch.Tensor)
        )
        // batch
    )


class _Decoder:
    """Greedy decode of `n` tokens after a prompt, the whole step in one CUDA graph when asked."""

    def __init__(self, model: HybridLM, batch: int, config: LatencyConfig, method: str, device, dtype):
        self.model, self.batch, self.method, self.device = model, batch, method, device
        self.buffer_tokens = config.prompt_len + config.decode_tokens
        self.caches = model.init_cache(batch, self.buffer_tokens, device, dtype)
        # A pristine copy to reset from in place (a captured graph holds the caches' addresses).
        self.fresh = [{k: v.clone() for k, v in cache.items()} for cache in self.caches]
        gen = torch.Generator().manual_seed(0)
        self.prompt = torch.randint(0, model.vocab_size, (batch, config.prompt_len), generator=gen).to(device)
        self.start_pos = model.next_position(0, config.prompt_len)
        self.token = torch.zeros(batch, dtype=torch.long, device=device)
        self.pos = torch.tensor(self.start_pos, dtype=torch.long, device=device)
        self.graph = None

    def _step(self) -> None:
        logits = self.model.decode_step(self.token, self.caches, self.pos)
        self.token.copy_(logits.argmax(-1))
        self.pos.add_(1)

    def reset_and_prefill(self) -> float:
        for cache, fresh in zip(self.caches, self.fresh):
            for key, tensor in cache.items():
                tensor.copy_(fresh[key])
        _sync(self.device)
        t0 = time.perf_counter()
        logits = self.model.prefill(self.prompt, self.caches)
        self.token.copy_(logits[:, -1].argmax(-1))
        _sync(self.device)
        elapsed = time.perf_counter() - t0
        self.pos.fill_(self.start_pos)
        return elapsed

    def capture(self) -> None:
        if self.method != "cuda-graph" or self.graph is not None:
            return
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm-up on a side stream: kernels compiled and autotuned before capture
                self._step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()
        _sync(self.device)

    def decode(self, n: int) -> float:
        _sync(self.device)
        t0 = time.perf_counter()
        for _ in range(n):
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step()
        _sync(self.device)
        return time.perf_counter() - t0


def profile(
    model: HybridLM, config: LatencyConfig, device: str | torch.device | None = None
) -> LatencyResult:
    """Measure `model` (its weights are cast to the measurement dtype on the device)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = resolve_dtype(config, device)
    method = resolve_method(config, device)
    previous_threads = torch.get_num_threads()
    if config.threads is not None and device.type == "cpu":
        torch.set_num_threads(config.threads)
    try:
        model = model.to(device=device, dtype=dtype).eval()
        with torch.inference_mode() if method == "eager" else torch.no_grad():
            decoder = _Decoder(model, 1, config, method, device, dtype)
            per_token, prefill = [], []
            for rep in range(config.warmup + config.repeats):
                prefill_s = decoder.reset_and_prefill()
                if rep == 0:
                    decoder.capture()
                    decoder.reset_and_prefill()
                decode_s = decoder.decode(config.decode_tokens)
                if rep >= config.warmup:
                    per_token.append(decode_s / config.decode_tokens * 1e3)
                    prefill.append(prefill_s * 1e3)
            per_seq = cache_bytes(decoder.caches, 1)
            buffer_tokens = decoder.buffer_tokens + model.n_meta
            del decoder
            throughput, batch = None, None
            if config.throughput:
                throughput, batch = _throughput(model, config, method, device, dtype, per_seq)
        fingerprint = device_fingerprint(device, dtype, method)  # while the configured threads are in force
    finally:
        torch.set_num_threads(previous_threads)
    return LatencyResult(
        Stat.of(per_token), Stat.of(prefill), throughput, batch, per_seq, buffer_tokens, fingerprint
    )


def _throughput(model, config, method, device, dtype, per_seq_bytes) -> tuple[Stat | None, int | None]:
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    batch = 1
    while (
        batch * 2 <= config.throughput_max_batch
        and weight_bytes + batch * 2 * per_seq_bytes * 2 <= config.memory_cap_bytes
    ):  # x2: activations headroom
        batch *= 2
    if weight_bytes + batch * per_seq_bytes > config.memory_cap_bytes:
        return None, None
    try:
        decoder = _Decoder(model, batch, config, method, device, dtype)
        values = []
        for rep in range(config.warmup + max(1, config.repeats // 2)):
            decoder.reset_and_prefill()
            if rep == 0:
                decoder.capture()
                decoder.reset_and_prefill()
            elapsed = decoder.decode(config.decode_tokens)
            if rep >= config.warmup:
                values.append(batch * config.decode_tokens / elapsed)
        return Stat.of(values), batch
    except torch.OutOfMemoryError:
        return None, None
