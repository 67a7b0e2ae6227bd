"""The short-training proxy's settings (torch-free, so the coordinator can validate a search before it
runs)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ProxyConfig:
    steps: int | None = None  # budget in optimizer steps (100 when neither budget is given) ...
    tokens: int | None = None  # ... or in training tokens (steps = ceil(tokens / (batch * seq_len)))
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_fraction: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    precision: str = "auto"  # "auto" (bf16 autocast on GPU, fp32 on CPU) | "fp32" | "bf16"
    meta_tokens: int | None = None  # None: the layout's own; 0: off; N: N meta tokens
    weight_norm: bool = False
    eval_tokens: int = 65536  # validation tokens scored for val_bpb (from the start of the split)
    log_every: int = 10
    divergence_factor: float = 3.0  # failed if the loss climbs this far above its best after warmup
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        if self.steps is not None and self.tokens is not None:
            raise ValueError("steps/tokens: give one budget, not both")
        if self.steps is None and self.tokens is None:
            object.__setattr__(self, "steps", 100)
        for name in ("batch_size", "seq_len", "eval_tokens", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1")
        if self.total_steps < 1:
            raise ValueError("steps/tokens: the budget must allow at least one step")
        if not self.lr > 0:
            raise ValueError("lr: must be positive")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError("warmup_fraction: must be in [0, 1)")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision: {self.precision!r} is not auto, fp32 or bf16")

    @property
    def total_steps(self) -> int:
        if self.steps is not None:
            return self.steps
        return math.ceil(self.tokens / (self.batch_size * self.seq_len))

    @property
    def warmup_steps(self) -> int:
        return int(self.warmup_fraction * self.total_steps)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ProxyConfig:
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown proxy setting")
        return cls(**data)

    @property
    def content_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def lr_at(self, step: int) -> float:
        """Linear warmup, then cosine to min_lr_ratio * lr at the last step of exactly this budget."""
        warmup = self.warmup_steps
        if step < warmup:
            return self.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, self.total_steps - warmup)
        return self.lr * (
            self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        )
