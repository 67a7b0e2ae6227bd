"""The operator catalog: every operator a layout may use, as data (no torch).

Adding an operator is one `register(OperatorSpec(...))` here and one module in `models/` registered under
the same name in `models/registry.py`. `param_count` must equal the built torch module's count (tests hold
them equal); it excludes the pre-norm that `HybridLM` puts before every operator.
`code_version` is part of every training key: bump it when the operator's code changes what it computes, so
that stored losses of the old code are not reused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from search.layout import Layout


@dataclass(frozen=True)
class OperatorSpec:
    name: str
    code: str  # short code used in compact layout strings, e.g. "M2"
    kind: str  # "mixer" (token mixer) or "ffn" (channel mixer)
    description: str
    param_count: Callable[[Layout], int]
    # Layout fields this operator reads: the others do not change the architecture when it is absent.
    dims: tuple[str, ...] = field(default_factory=tuple)
    code_version: int = 1
    # Cache kind, for the latency side: "kv" (grows with context), "window" (bounded), "state" (constant).
    cache: str = "none"


OPERATORS: dict[str, OperatorSpec] = {}
_BY_CODE: dict[str, str] = {}


def register(spec: OperatorSpec) -> OperatorSpec:
    if spec.name in OPERATORS or spec.code.upper() in _BY_CODE:
        raise ValueError(f"operator {spec.name!r} / code {spec.code!r} is already registered")
    if spec.kind not in ("mixer", "ffn"):
        raise ValueError(f"operator {spec.name!r}: kind must be 'mixer' or 'ffn', not {spec.kind!r}")
    OPERATORS[spec.name] = spec
    _BY_CODE[spec.code.upper()] = spec.name
    return spec


def resolve(token: str) -> str | None:
    """Canonical operator name for a name or short code (case-insensitive), or None if unknown."""
    key = token.strip()
    if key.lower() in OPERATORS:
        return key.lower()
    return _BY_CODE.get(key.upper())


def mixers() -> list[str]:
    return [name for name, spec in OPERATORS.items() if spec.kind == "mixer"]


# --- parameter counts (mirror the modules in models/; see method.md section 6) -------------------------


def _attention_params(lo: Layout) -> int:
    # q, o: d x (H*hd); k, v: d x (Hkv*hd); no biases.
    return lo.d_model * lo.head_dim * (2 * lo.n_heads + 2 * lo.n_kv_heads)


def _deltanet_params(lo: Layout) -> int:
    inner = lo.n_heads * lo.head_dim
    # q, k, v, o projections; beta projection; short convs on q, k, v; per-head output RMSNorm.
    return 4 * lo.d_model * inner + lo.d_model * lo.n_heads + 3 * inner * lo.conv_size + lo.head_dim


def _gated_deltanet_params(lo: Layout) -> int:
    inner = lo.n_heads * lo.head_dim
    # as DeltaNet + output-gate projection, decay projection (a), A_log and dt_bias per head.
    return (
        5 * lo.d_model * inner
        + 2 * lo.d_model * lo.n_heads
        + 2 * lo.n_heads
        + 3 * inner * lo.conv_size
        + lo.head_dim
    )


def _mamba2_params(lo: Layout) -> int:
    d_inner = lo.mamba_expand * lo.d_model
    n_heads = d_inner // lo.mamba_head_dim
    bc = 2 * lo.mamba_groups * lo.mamba_d_state
    conv_dim = d_inner + bc
    in_proj = lo.d_model * (2 * d_inner + bc + n_heads)
    conv = conv_dim * lo.conv_size + conv_dim  # depthwise weights + bias
    return in_proj + conv + 3 * n_heads + d_inner + d_inner * lo.d_model  # dt_bias, A_log, D; norm; out_proj


def _ffn_params(lo: Layout) -> int:
    return 3 * lo.d_model * lo.ffn_hidden


_ATTN_DIMS = ("n_heads", "n_kv_heads", "head_dim", "rope_base")
_DELTA_DIMS = ("n_heads", "head_dim", "conv_size")
_MAMBA_DIMS = ("mamba_expand", "mamba_head_dim", "mamba_d_state", "mamba_groups", "conv_size")

register(
    OperatorSpec(
        "attention",
        "A",
        "mixer",
        "Full causal attention (GQA, RoPE), KV cache.",
        _attention_params,
        _ATTN_DIMS,
        cache="kv",
    )
)
register(
    OperatorSpec(
        "swa",
        "S",
        "mixer",
        "Sliding-window attention (GQA, RoPE), ring-buffer cache; "
        "meta tokens stay visible as a permanent prefix.",
        _attention_params,
        _ATTN_DIMS + ("swa_window",),
        cache="window",
    )
)
register(
    OperatorSpec(
        "mamba2",
        "M2",
        "mixer",
        "Mamba2 (SSD) with short conv and gated RMSNorm.",
        _mamba2_params,
        _MAMBA_DIMS,
        cache="state",
    )
)
register(
    OperatorSpec(
        "deltanet",
        "D",
        "mixer",
        "DeltaNet (delta rule), short convs, L2-normalised q/k, no output gate.",
        _deltanet_params,
        _DELTA_DIMS,
        cache="state",
    )
)
register(
    OperatorSpec(
        "gated_deltanet",
        "GD",
        "mixer",
        "Gated DeltaNet (delta rule with decay) and an output gate.",
        _gated_deltanet_params,
        _DELTA_DIMS,
        cache="state",
    )
)
register(OperatorSpec("ffn", "F", "ffn", "SwiGLU feed-forward network.", _ffn_params, ("ffn_ratio",)))
