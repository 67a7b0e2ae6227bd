"""A layout: one candidate architecture, as data (pure Python, no torch).

A `Layout` is the flat operator sequence plus the architecture dims. It can be written in several ways —
names or short codes, a compact string with repeat groups ("[D F M2 F] x 3"), nested repeat groups, or
stages — and always expands to one canonical form, whose content hash is how the service de-duplicates
candidates: the same architecture gives the same hash however it was written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from search.operators import OPERATORS, resolve


class LayoutError(ValueError):
    """Invalid layout input. `field` names the offending field (e.g. 'operators[3]', 'n_heads')."""

    def __init__(self, field: str, reason: str):
        self.field, self.reason = field, reason
        super().__init__(f"{field}: {reason}")


@dataclass(frozen=True)
class LayoutLimits:
    """Size limits a layout must respect (the service passes its configured limits)."""

    max_operators: int = 128
    max_d_model: int = 16384
    max_heads: int = 256
    max_head_dim: int = 512
    max_ffn_ratio: float = 16.0
    max_meta_tokens: int = 4096
    max_swa_window: int = 1 << 20
    max_vocab_size: int = 1 << 21
    max_d_state: int = 1024
    max_conv_size: int = 16


DEFAULT_LIMITS = LayoutLimits()

# Architecture dims with their defaults. `head_dim=None` means d_model // n_heads.
_DIM_DEFAULTS: dict[str, Any] = {
    "d_model": 2048,
    "n_heads": 16,
    "n_kv_heads": 4,
    "head_dim": None,
    "ffn_ratio": 3.0,
    "mamba_expand": 2,
    "mamba_head_dim": 64,
    "mamba_d_state": 128,
    "mamba_groups": 1,
    "conv_size": 4,
    "swa_window": 512,
    "rope_base": 10000.0,
    "tied_embeddings": True,
    "meta_tokens": 0,
}
# Model-level dims that every layout uses, whatever its operators.
_ALWAYS_USED = ("d_model", "tied_embeddings", "meta_tokens")
_FIELDS = ("name", "operators", "stages", "vocab_size", *_DIM_DEFAULTS)


@dataclass(frozen=True, eq=False)
class Layout:
    operators: tuple[str, ...]
    d_model: int = 2048
    n_heads: int = 16
    n_kv_heads: int = 4
    head_dim: int = 128
    ffn_ratio: float = 3.0
    mamba_expand: int = 2
    mamba_head_dim: int = 64
    mamba_d_state: int = 128
    mamba_groups: int = 1
    conv_size: int = 4
    swa_window: int = 512
    rope_base: float = 10000.0
    tied_embeddings: bool = True
    meta_tokens: int = 0
    # Not architecture: the vocabulary comes from the tokenizer at build time (presets carry their published
    # vocabulary for counting), and a name is a label.
    vocab_size: int | None = field(default=None, compare=False)
    name: str | None = field(default=None, compare=False)

    # Two layouts are equal when their architectures are (the dims of absent operators do not matter).
    def __eq__(self, other: object) -> bool:
        return isinstance(other, Layout) and self.canonical_json() == other.canonical_json()

    def __hash__(self) -> int:
        return hash(self.canonical_json())

    # ---- derived -------------------------------------------------------------------------------------
    @property
    def ffn_hidden(self) -> int:
        return int(round(self.ffn_ratio * self.d_model))

    @property
    def mixers(self) -> tuple[str, ...]:
        return tuple(op for op in self.operators if OPERATORS[op].kind == "mixer")

    @property
    def depth(self) -> int:
        """Number of token-mixer layers (the depth of the depth-width study)."""
        return len(self.mixers)

    def compact(self) -> str:
        """Short-code string, e.g. 'D F M2 F A F'."""
        return " ".join(OPERATORS[op].code for op in self.operators)

    # ---- construction --------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any, limits: LayoutLimits = DEFAULT_LIMITS) -> Layout:
        if not isinstance(data, dict):
            raise LayoutError("layout", f"must be a JSON object, not {type(data).__name__}")
        unknown = sorted(set(data) - set(_FIELDS))
        if unknown:
            raise LayoutError(unknown[0], f"unknown field (known fields: {', '.join(_FIELDS)})")
        if ("operators" in data) == ("stages" in data):
            raise LayoutError("operators", "give exactly one of 'operators' or 'stages'")
        if "operators" in data:
            ops = expand_operators(data["operators"], "operators", limits)
        else:
            ops = _expand_stages(data["stages"], limits)
        dims = {key: data.get(key, default) for key, default in _DIM_DEFAULTS.items()}
        for key in (
            "d_model",
            "n_heads",
            "n_kv_heads",
            "mamba_expand",
            "mamba_head_dim",
            "mamba_d_state",
            "mamba_groups",
            "conv_size",
            "swa_window",
            "meta_tokens",
        ):
            dims[key] = _as_int(dims[key], key)
        if dims["head_dim"] is not None:
            dims["head_dim"] = _as_int(dims["head_dim"], "head_dim")
        for key in ("ffn_ratio", "rope_base"):
            dims[key] = _as_float(dims[key], key)
        if not isinstance(dims["tied_embeddings"], bool):
            raise LayoutError("tied_embeddings", "must be true or false")
        vocab = data.get("vocab_size")
        if vocab is not None:
            vocab = _as_int(vocab, "vocab_size")
        name = data.get("name")
        if name is not None and (not isinstance(name, str) or len(name) > 200):
            raise LayoutError("name", "must be a string of at most 200 characters")
        _check_positive(dims, limits)  # before head_dim's division
        if dims["head_dim"] is None:
            if dims["d_model"] % dims["n_heads"]:
                raise LayoutError(
                    "n_heads", f"{dims['n_heads']} heads do not divide d_model={dims['d_model']}"
                )
            dims["head_dim"] = dims["d_model"] // dims["n_heads"]
        layout = cls(operators=ops, vocab_size=vocab, name=name, **dims)
        layout.validate(limits)
        return layout

    @classmethod
    def from_json(cls, text: str, limits: LayoutLimits = DEFAULT_LIMITS) -> Layout:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LayoutError("layout", f"not valid JSON: {exc}") from None
        return cls.from_dict(data, limits)

    def replace(self, **changes: Any) -> Layout:
        """A copy with some fields changed, validated (e.g. another width for the same pattern)."""
        data = self.to_dict()
        data.update(changes)
        if "operators" in changes:
            data["operators"] = list(changes["operators"])
        return Layout.from_dict(data)

    # ---- validation ----------------------------------------------------------------------------------
    def validate(self, limits: LayoutLimits = DEFAULT_LIMITS) -> None:
        """Raise LayoutError naming the field if this layout cannot be built. Invalid input never reaches
        torch."""
        if not self.operators:
            raise LayoutError("operators", "is empty")
        if len(self.operators) > limits.max_operators:
            raise LayoutError(
                "operators", f"{len(self.operators)} operators exceed the limit of {limits.max_operators}"
            )
        for index, op in enumerate(self.operators):
            if op not in OPERATORS:
                raise LayoutError(f"operators[{index}]", f"unknown operator {op!r}")
        if not self.mixers:
            raise LayoutError("operators", "needs at least one token mixer (only FFNs given)")
        dims = {key: getattr(self, key) for key in _DIM_DEFAULTS}
        _check_positive(dims, limits)
        used = self.used_dims()
        if "n_heads" in used or "n_kv_heads" in used:
            if self.head_dim > limits.max_head_dim:
                raise LayoutError("head_dim", f"{self.head_dim} exceeds the limit of {limits.max_head_dim}")
        if "n_kv_heads" in used and self.n_heads % self.n_kv_heads:
            raise LayoutError(
                "n_kv_heads", f"{self.n_kv_heads} KV heads do not divide n_heads={self.n_heads}"
            )
        if "mamba_expand" in used:
            d_inner = self.mamba_expand * self.d_model
            if d_inner % self.mamba_head_dim:
                raise LayoutError(
                    "mamba_head_dim",
                    f"{self.mamba_head_dim} does not divide the Mamba2 inner "
                    f"width mamba_expand*d_model={d_inner}",
                )
            if (d_inner // self.mamba_head_dim) % self.mamba_groups:
                raise LayoutError(
                    "mamba_groups",
                    f"{self.mamba_groups} groups do not divide the "
                    f"{d_inner // self.mamba_head_dim} Mamba2 heads",
                )
        if self.vocab_size is not None and not 1 <= self.vocab_size <= limits.max_vocab_size:
            raise LayoutError("vocab_size", f"must be between 1 and {limits.max_vocab_size}")

    def used_dims(self) -> set[str]:
        used = set(_ALWAYS_USED)
        for op in set(self.operators):
            used.update(OPERATORS[op].dims)
        return used

    # ---- canonical form and hash ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Every field, operators expanded (round-trips through from_dict)."""
        data = dataclasses.asdict(self)
        data["operators"] = list(self.operators)
        return data

    def architecture(self) -> dict[str, Any]:
        """What defines the architecture: the expanded sequence and the dims its operators use (dims of
        absent operators, the vocabulary and the name are left out, so they do not change the hash)."""
        used = self.used_dims()
        arch: dict[str, Any] = {"operators": list(self.operators)}
        for key in _DIM_DEFAULTS:
            if key in used:
                value = getattr(self, key)
                arch[key] = float(value) if isinstance(value, float) else value
        return arch

    def canonical_json(self) -> str:
        return json.dumps(self.architecture(), sort_keys=True, separators=(",", ":"))

    @property
    def content_hash(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    def to_json(self, indent: int | None = 2) -> str:
        """Canonical JSON for files and the API: the architecture, plus name and vocabulary when set."""
        data = self.architecture()
        if self.name is not None:
            data["name"] = self.name
        if self.vocab_size is not None:
            data["vocab_size"] = self.vocab_size
        return json.dumps(data, sort_keys=True, indent=indent)


def load_layout(path: str | Path, limits: LayoutLimits = DEFAULT_LIMITS) -> Layout:
    """Read a layout file (JSON, or YAML by extension)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise LayoutError(str(path), "file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LayoutError(str(path), f"cannot be read: {exc}") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise LayoutError(str(path), f"not valid YAML: {exc}") from None
        return Layout.from_dict(data, limits)
    return Layout.from_json(text, limits)


# ---- parsing helpers -----------------------------------------------------------------------------------


def _as_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise LayoutError(key, f"must be an integer, not {value!r}")
    return value


def _as_float(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LayoutError(key, f"must be a number, not {value!r}")
    return float(value)


def _check_positive(dims: dict[str, Any], limits: LayoutLimits) -> None:
    bounds = {
        "d_model": limits.max_d_model,
        "n_heads": limits.max_heads,
        "n_kv_heads": limits.max_heads,
        "mamba_expand": 16,
        "mamba_head_dim": limits.max_head_dim,
        "mamba_d_state": limits.max_d_state,
        "mamba_groups": limits.max_heads,
        "conv_size": limits.max_conv_size,
        "swa_window": limits.max_swa_window,
    }
    for key, upper in bounds.items():
        value = dims[key]
        if value <= 0:
            raise LayoutError(key, f"must be positive, got {value}")
        if value > upper:
            raise LayoutError(key, f"{value} exceeds the limit of {upper}")
    if dims.get("head_dim") is not None and dims["head_dim"] <= 0:
        raise LayoutError("head_dim", f"must be positive, got {dims['head_dim']}")
    if dims["conv_size"] < 2:
        raise LayoutError("conv_size", f"must be at least 2, got {dims['conv_size']}")
    if not 0 < dims["ffn_ratio"] <= limits.max_ffn_ratio:
        raise LayoutError("ffn_ratio", f"must be in (0, {limits.max_ffn_ratio}], got {dims['ffn_ratio']}")
    if dims["rope_base"] <= 1:
        raise LayoutError("rope_base", f"must be greater than 1, got {dims['rope_base']}")
    if not 0 <= dims["meta_tokens"] <= limits.max_meta_tokens:
        raise LayoutError(
            "meta_tokens", f"must be between 0 and {limits.max_meta_tokens}, got {dims['meta_tokens']}"
        )


_TOKEN_RE = re.compile(r"\[|\]|\(|\)|[xX*×]\s*\d+|[A-Za-z_][A-Za-z0-9_]*|\S")


def expand_operators(value: Any, where: str, limits: LayoutLimits = DEFAULT_LIMITS) -> tuple[str, ...]:
    """Expand any accepted way of writing an operator sequence into canonical operator names.

    Accepted: a string of names/short codes with bracketed repeat groups ("[D F M2 F] x 3", "(A F)*2");
    a list whose items are names/codes, compact strings, or {"repeat": n, "operators": [...]} groups.
    """
    out: list[str] = []
    _expand_into(value, where, out, limits)
    return tuple(out)


def _expand_into(value: Any, where: str, out: list[str], limits: LayoutLimits) -> None:
    if len(out) > limits.max_operators:
        raise LayoutError(where, f"expands to more than {limits.max_operators} operators")
    if isinstance(value, str):
        out.extend(_parse_compact(value, where, limits))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _expand_into(item, f"{where}[{index}]", out, limits)
    elif isinstance(value, dict):
        extra = sorted(set(value) - {"repeat", "operators"})
        if extra or "operators" not in value:
            raise LayoutError(where, 'a group must be {"repeat": n, "operators": [...]}')
        repeat = _as_int(value.get("repeat", 1), f"{where}.repeat")
        if not 1 <= repeat <= limits.max_operators:
            raise LayoutError(
                f"{where}.repeat", f"must be between 1 and {limits.max_operators}, got {repeat}"
            )
        inner: list[str] = []
        _expand_into(value["operators"], f"{where}.operators", inner, limits)
        out.extend(inner * repeat)
    else:
        raise LayoutError(where, f"must be an operator name, a string or a list, not {type(value).__name__}")
    if len(out) > limits.max_operators:
        raise LayoutError(where, f"expands to more than {limits.max_operators} operators")


def _parse_compact(text: str, where: str, limits: LayoutLimits) -> list[str]:
    tokens = _TOKEN_RE.findall(text)
    pos = 0

    def parse_seq(closer: str | None) -> list[str]:
        nonlocal pos
        seq: list[str] = []
        while pos < len(tokens):
            tok = tokens[pos]
            if tok in ("]", ")"):
                if closer != tok:
                    raise LayoutError(where, f"unbalanced {tok!r} in {text!r}")
                pos += 1
                return seq
            if tok in ("[", "("):
                pos += 1
                group = parse_seq("]" if tok == "[" else ")")
                seq.extend(group * _repeat_suffix())
                continue
            if re.fullmatch(r"[xX*×]\s*\d+", tok):
                raise LayoutError(where, f"repeat {tok!r} must follow a bracketed group in {text!r}")
            name = resolve(tok)
            if name is None:
                raise LayoutError(where, f"unknown operator {tok!r} (known: {', '.join(_known())})")
            pos += 1
            seq.append(name)
            if len(seq) > limits.max_operators:
                raise LayoutError(where, f"expands to more than {limits.max_operators} operators")
        if closer is not None:
            raise LayoutError(where, f"missing {closer!r} in {text!r}")
        return seq

    def _repeat_suffix() -> int:
        nonlocal pos
        if pos < len(tokens) and re.fullmatch(r"[xX*×]\s*\d+", tokens[pos]):
            count = int(re.sub(r"\D", "", tokens[pos]))
            pos += 1
            if not 1 <= count <= limits.max_operators:
                raise LayoutError(where, f"repeat count {count} must be between 1 and {limits.max_operators}")
            return count
        return 1

    return parse_seq(None)


def _expand_stages(stages: Any, limits: LayoutLimits) -> tuple[str, ...]:
    if not isinstance(stages, list) or not stages:
        raise LayoutError("stages", 'must be a non-empty list of {"block": [...], "repeat": n}')
    out: list[str] = []
    for index, stage in enumerate(stages):
        where = f"stages[{index}]"
        if not isinstance(stage, dict) or set(stage) - {"block", "repeat"} or "block" not in stage:
            raise LayoutError(where, 'must be {"block": [...], "repeat": n}')
        block = expand_operators(stage["block"], f"{where}.block", limits)
        repeat = _as_int(stage.get("repeat", 1), f"{where}.repeat")
        if not 1 <= repeat <= limits.max_operators:
            raise LayoutError(
                f"{where}.repeat", f"must be between 1 and {limits.max_operators}, got {repeat}"
            )
        out.extend(block * repeat)
        if len(out) > limits.max_operators:
            raise LayoutError("stages", f"expand to more than {limits.max_operators} operators")
    return tuple(out)


def _known() -> list[str]:
    return [f"{spec.name} ({spec.code})" for spec in OPERATORS.values()]
