"""Known designs: the published Nemotron-Flash models (counted, not trained here), their scaled-down CPU
versions (same pattern), and single-operator baselines. They seed a search's initial population."""

from __future__ import annotations

from search.layout import Layout

_FLASH_BLOCK_A = "D F M2 F"  # DeltaNet block
_FLASH_BLOCK_B = "A F M2 F"  # attention block
# method.md section 6: 24 operators (4 D, 6 M2, 2 A, 12 F) and 36 operators (6 D, 9 M2, 3 A, 18 F).
FLASH_1B_PATTERN = " ".join([_FLASH_BLOCK_A, _FLASH_BLOCK_B] * 2 + [_FLASH_BLOCK_A] * 2)
FLASH_3B_PATTERN = " ".join([_FLASH_BLOCK_A, _FLASH_BLOCK_B] * 3 + [_FLASH_BLOCK_A] * 3)

_FLASH_COMMON = dict(
    ffn_ratio=3.0,
    mamba_expand=2,
    mamba_head_dim=64,
    mamba_d_state=128,
    mamba_groups=1,
    conv_size=4,
    tied_embeddings=True,
)
# CPU scale: d_model 128, 4 query heads of 32 (2 KV heads), Mamba2 heads of 32 with d_state 32.
_MINI_DIMS = dict(
    d_model=128,
    n_heads=4,
    n_kv_heads=2,
    head_dim=32,
    ffn_ratio=3.0,
    mamba_expand=2,
    mamba_head_dim=32,
    mamba_d_state=32,
    mamba_groups=1,
    conv_size=4,
    swa_window=64,
    tied_embeddings=True,
)

_PRESETS: dict[str, dict] = {
    "nemotron-flash-1b": dict(
        operators=FLASH_1B_PATTERN,
        d_model=2048,
        n_heads=16,
        n_kv_heads=4,
        head_dim=128,
        vocab_size=131072,
        **_FLASH_COMMON,
    ),
    "nemotron-flash-3b": dict(
        operators=FLASH_3B_PATTERN,
        d_model=3072,
        n_heads=24,
        n_kv_heads=6,
        head_dim=128,
        vocab_size=131072,
        **_FLASH_COMMON,
    ),
    "nemotron-flash-1b-mini": dict(operators=FLASH_1B_PATTERN, **_MINI_DIMS),
    "nemotron-flash-3b-mini": dict(operators=FLASH_3B_PATTERN, **_MINI_DIMS),
    # Single-operator baselines at the same CPU width, 12 mixers deep (24 operators with their FFNs).
    "llama": dict(operators="[A F] x 12", **_MINI_DIMS),
    "mamba2": dict(operators="[M2 F] x 12", **_MINI_DIMS),
    "deltanet": dict(operators="[D F] x 12", **_MINI_DIMS),
}
# Presets small enough to train on a CPU.
CPU_PRESETS = ("nemotron-flash-1b-mini", "nemotron-flash-3b-mini", "llama", "mamba2", "deltanet")
FULL_PRESETS = ("nemotron-flash-1b", "nemotron-flash-3b")


def preset_names() -> list[str]:
    return list(_PRESETS)


def get_preset(name: str, **overrides) -> Layout:
    if name not in _PRESETS:
        raise KeyError(f"unknown preset {name!r} (known: {', '.join(_PRESETS)})")
    return Layout.from_dict({"name": name, **_PRESETS[name], **overrides})


def resolve_layout(spec: str) -> Layout:
    """A preset name, or a path to a layout file (JSON or YAML)."""
    from pathlib import Path

    from search.layout import LayoutError, load_layout

    if spec in _PRESETS:
        return get_preset(spec)
    path = Path(spec)
    if path.suffix.lower() in (".json", ".yaml", ".yml") or path.exists():
        return load_layout(path)
    raise LayoutError("layout", f"{spec!r} is neither a preset ({', '.join(_PRESETS)}) nor a layout file")
