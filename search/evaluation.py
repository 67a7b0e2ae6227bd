"""The contract between the search and its workers (torch-free): what a worker is asked to do and what it
answers.

- `ProxyConfig`, `LatencyConfig`, `DataConfig`: the short-training, latency and data settings. The same
  pydantic models validate a search at submission (REST, schedule templates, `search run`) and build the
  worker's settings, so a value the worker would refuse is refused before anything runs: integers are
  integers, floats are finite numbers (never strings), values are bounded, unknown keys are refused, and the
  error names the field (`proxy.lr`).
- `ResultKeys`: the training and latency keys a worker reports for an evaluation (stored results are reused
  by these keys, across searches).
- `EvaluationResult`: a worker's answer, decoded once from its plain-data payload; the engine reads its
  typed properties (`val_bpb`, `decode_ms`, `trained_params`) and stores the nested metrics as they came.
- `PHASES`: the phases of an evaluation, named in failures and timeouts.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import AllowInfNan, BaseModel, ConfigDict, Field, Strict, model_validator

# An evaluation's phases, in order: loading (and tokenizing) the data, building the model, training it,
# measuring its latency. Keys are computed after the data phase.
PHASES = ("data", "model", "training", "latency")
Phase = Literal["data", "model", "training", "latency"]

Int = Annotated[int, Strict()]
Bool = Annotated[bool, Strict()]
Float = Annotated[float, Strict(), AllowInfNan(False)]
HOUR = 3600
WEEK = 7 * 24 * HOUR


class WorkerSettings(BaseModel):
    """Frozen, strict settings with a content hash (part of the result keys) and `replace()`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Self:
        return cls.model_validate(data or {})

    def replace(self, **changes: Any) -> Self:
        """A copy with these settings changed, validated again."""
        return type(self).model_validate({**self.model_dump(), **changes})

    # Settings added after results were stored: left out of the hash while they hold their default, so the
    # results of configs that do not use them keep their keys (and stay reusable).
    HASH_OMITS_DEFAULTS: ClassVar[tuple[str, ...]] = ()

    @property
    def content_hash(self) -> str:
        values = self.to_dict()
        for name in self.HASH_OMITS_DEFAULTS:
            if values[name] == type(self).model_fields[name].default:
                del values[name]
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


class ProxyConfig(WorkerSettings):
    """The short-training proxy: a budget in optimizer steps or in tokens, the optimizer and its schedule.

    Schedules: `cosine` (warmup, then a cosine over exactly the budget) or `wsd` (warmup-stable-decay:
    warmup, the peak rate held, then a linear decay over the last `decay_fraction` of the steps). Two wsd
    runs that differ only in their budget share every step up to the shorter one's decay (with
    `fixed_warmup_steps`), so the longer one can continue from the shorter one's stable-phase checkpoint:
    the multi-fidelity search's continuation."""

    HASH_OMITS_DEFAULTS: ClassVar[tuple[str, ...]] = ("schedule", "decay_fraction", "fixed_warmup_steps")

    steps: Int | None = Field(None, ge=1, le=10_000_000, description="optimizer steps (100 when no budget)")
    tokens: Int | None = Field(
        None,
        ge=1,
        le=10**13,
        description="or training tokens (steps = ceil(tokens / (batch_size x seq_len)))",
    )
    batch_size: Int = Field(8, ge=1, le=4096, description="sequences per optimizer step")
    seq_len: Int = Field(128, ge=1, le=1 << 17, description="tokens per training sequence")
    lr: Float = Field(3e-3, gt=0, le=10, description="peak learning rate")
    min_lr_ratio: Float = Field(
        0.1, ge=0, le=1, description="the schedule (cosine or wsd decay) ends at this share of lr"
    )
    warmup_fraction: Float = Field(0.1, ge=0, lt=1, description="share of the steps spent warming up")
    fixed_warmup_steps: Int | None = Field(
        None, ge=0, le=10_000_000, description="warmup steps, whatever the budget (None: warmup_fraction)"
    )
    schedule: Literal["cosine", "wsd"] = Field(
        "cosine", description="cosine over the budget, or warmup-stable-decay (continuable across budgets)"
    )
    decay_fraction: Float = Field(
        0.2, gt=0, le=1, description="wsd: share of the steps spent decaying, linearly to min_lr_ratio x lr"
    )
    weight_decay: Float = Field(
        0.1, ge=0, le=10, description="AdamW's, on matrices only (not with weight_norm)"
    )
    beta1: Float = Field(0.9, ge=0, lt=1, description="Adam's first-moment decay")
    beta2: Float = Field(0.95, ge=0, lt=1, description="Adam's second-moment decay")
    grad_clip: Float = Field(
        1.0, ge=0, le=1e6, description="gradient-norm clipping threshold (0: no clipping)"
    )
    seed: Int = Field(0, ge=0, le=2**32 - 1, description="seeds the model's initialization")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on GPU, fp32 on CPU"
    )
    meta_tokens: Int | None = Field(
        None,
        ge=0,
        le=1024,
        description="learned meta tokens prepended to every sequence (None: the layout's own; 0: off)",
    )
    weight_norm: Bool = Field(
        False, description="normalized weights, trained with Adam without weight decay (method.md section 5)"
    )
    eval_tokens: Int = Field(65536, ge=1, le=10**10, description="validation tokens scored for val_bpb")
    log_every: Int = Field(10, ge=1, le=10**7, description="steps between points of the loss curve")
    divergence_factor: Float = Field(
        3.0, gt=1, le=1e6, description="failed if the loss climbs this far above its best after warmup"
    )
    timeout_s: Float | None = Field(
        None, gt=0, le=WEEK, description="training wall-clock limit, seconds (None: no limit)"
    )

    @model_validator(mode="before")
    @classmethod
    def _one_budget(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if data.get("steps") is not None and data.get("tokens") is not None:
                raise ValueError("steps: give one budget, steps or tokens, not both")
            if data.get("steps") is None and data.get("tokens") is None:
                data = {**data, "steps": 100}
        return data

    @property
    def total_steps(self) -> int:
        if self.steps is not None:
            return self.steps
        return math.ceil(self.tokens / (self.batch_size * self.seq_len))

    @model_validator(mode="after")
    def _wsd_fits(self) -> Self:
        if self.schedule == "wsd" and self.stable_steps < self.warmup_steps:
            raise ValueError(
                f"decay_fraction: a wsd decay of {self.total_steps - self.stable_steps} steps leaves "
                f"less than the {self.warmup_steps} warmup steps of a {self.total_steps}-step budget"
            )
        return self

    @property
    def warmup_steps(self) -> int:
        if self.fixed_warmup_steps is not None:
            return min(self.fixed_warmup_steps, self.total_steps)
        return int(self.warmup_fraction * self.total_steps)

    @property
    def stable_steps(self) -> int:
        """The step the decay starts at (wsd); the whole budget for cosine."""
        if self.schedule != "wsd":
            return self.total_steps
        return self.total_steps - max(1, round(self.decay_fraction * self.total_steps))

    def lr_at(self, step: int) -> float:
        """Linear warmup; then cosine to min_lr_ratio * lr at the last step of exactly this budget, or (wsd)
        the peak held until `stable_steps` and a linear decay to min_lr_ratio * lr at the last step."""
        warmup = self.warmup_steps
        if step < warmup:
            return self.lr * (step + 1) / warmup
        if self.schedule == "wsd":
            if step < self.stable_steps:
                return self.lr
            decay = self.total_steps - self.stable_steps
            done = (step - self.stable_steps + 1) / decay
            return self.lr * (1 - (1 - self.min_lr_ratio) * done)
        progress = (step - warmup) / max(1, self.total_steps - warmup)
        return self.lr * (
            self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        )


class LatencyConfig(WorkerSettings):
    """The latency profiler: a prompt prefilled, then tokens decoded at batch 1, repeated."""

    prompt_len: Int = Field(128, ge=1, le=1 << 17, description="tokens prefilled before decoding")
    decode_tokens: Int = Field(64, ge=1, le=1 << 16, description="tokens decoded per repeat")
    repeats: Int = Field(5, ge=1, le=1000, description="timed repeats (their median and IQR are reported)")
    warmup: Int = Field(1, ge=0, le=100, description="untimed repeats first (GPU: also Triton's autotuning)")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on GPU, fp32 on CPU"
    )
    method: Literal["auto", "eager", "cuda-graph"] = Field(
        "auto", description="auto: cuda-graph on GPU, eager on CPU"
    )
    throughput: Bool = Field(
        True, description="also measure decode throughput at the largest batch that fits"
    )
    throughput_max_batch: Int = Field(
        64, ge=1, le=4096, description="the largest batch tried for throughput (powers of two up to it)"
    )
    memory_cap_bytes: Int = Field(
        2 * 1024**3,
        ge=1,
        le=1 << 40,
        description="weights + caches at the throughput batch must fit under this",
    )
    threads: Int | None = Field(None, ge=1, le=1024, description="CPU threads (None: torch's default)")
    vocab_size: Int = Field(
        257,
        ge=1,
        le=1 << 20,
        description="the LM head's vocabulary where no tokenizer gives one (latency tables); a search's "
        "workers use the tokenizer's",
    )


class DataConfig(WorkerSettings):
    """Where the training text comes from. A corpus or tokenizer path must resolve inside the configured data
    roots: checked at submission, and by the worker again when it loads."""

    corpus: str = Field(
        "stdlib",
        min_length=1,
        max_length=4096,
        pattern=r"^[^\x00]+$",
        description='"stdlib" (the embedded default), a file/folder/JSONL path, or "hf:PATH"',
    )
    text_field: str = Field("text", min_length=1, max_length=200, description="JSONL / datasets text column")
    tokenizer: str = Field(
        "bytes",
        max_length=4096,
        pattern=r"^(bytes|bpe:[0-9]{3,7}|file:[^\x00]+)$",
        description='"bytes", "bpe:VOCAB" or "file:PATH" (a tokenizer.json)',
    )
    val_fraction: Float = Field(
        0.05, gt=0, lt=1, description="share of the documents held out for validation"
    )
    split_seed: Int = Field(
        0, ge=0, le=2**31 - 1, description="seeds the per-document train/validation split"
    )
    min_val_tokens: Int = Field(
        4096,
        ge=1,
        le=10**9,
        description="fewer validation tokens than this: the corpus is refused as too small",
    )


@dataclass(frozen=True)
class ResultKeys:
    """The keys of an evaluation's results: training (layout, proxy config, corpus, tokenizer, device class,
    operator code versions) and latency (layout, latency config, device fingerprint)."""

    training_key: str
    latency_key: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ResultKeys:
        return cls(str(data["training_key"]), str(data["latency_key"]))


@dataclass
class EvaluationResult:
    """What a worker answers for one candidate (plain data; failure is a result, never an exception)."""

    status: Literal["completed", "failed"]
    layout_hash: str
    failure_reason: str | None = None
    failed_phase: Phase | None = None
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
    worker: dict = field(default_factory=dict)  # where it ran: pid, host, Ray node id

    @property
    def trained(self) -> bool:
        """A completed training is in this result (it may be there even when the latency phase failed)."""
        return bool(self.training) and self.training.get("status") == "completed"

    @property
    def val_bpb(self) -> float | None:
        return (self.training or {}).get("val_bpb")

    @property
    def trained_params(self) -> int | None:
        """The trained model's parameter count (its tokenizer's vocabulary)."""
        return (self.training or {}).get("n_params")

    @property
    def decode_ms(self) -> float | None:
        """The median decode ms/token the profiler measured."""
        stat = (self.latency or {}).get("decode_ms_per_token")
        return stat["median"] if stat else None

    def details(self) -> str | None:
        """The traceback and the worker's last log lines, for a failed candidate's record."""
        tail = "\n".join(self.log_tail or [])
        text = (self.traceback or "") + (f"\n--- worker log, last lines ---\n{tail}" if tail else "")
        return text or None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, default=str)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvaluationResult:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
