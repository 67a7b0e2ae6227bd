"""The latency profiler's settings (torch-free, so the coordinator can validate a search before it runs)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class LatencyConfig:
    prompt_len: int = 128  # tokens prefilled before decoding
    decode_tokens: int = 64  # N tokens decoded per repeat
    repeats: int = 5
    warmup: int = 1  # untimed repeats first (GPU: also the Triton autotuning)
    dtype: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU) | "fp32" | "bf16" | "fp16"
    method: str = "auto"  # "auto" (cuda-graph on GPU, eager on CPU) | "eager" | "cuda-graph"
    throughput: bool = True
    throughput_max_batch: int = 64
    memory_cap_bytes: int = 2 * 1024**3  # weights + caches at the throughput batch must fit under this
    threads: int | None = None  # CPU threads (None: torch's default)
    vocab_size: int = 257

    def __post_init__(self) -> None:
        for name in ("prompt_len", "decode_tokens", "repeats", "throughput_max_batch", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1")
        if self.warmup < 0:
            raise ValueError("warmup: must be non-negative")
        if self.dtype not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"dtype: {self.dtype!r} is not auto, fp32, bf16 or fp16")
        if self.method not in ("auto", "eager", "cuda-graph"):
            raise ValueError(f"method: {self.method!r} is not auto, eager or cuda-graph")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def content_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()
