"""Operator name -> torch module, built from a layout. One entry per operator in `search/operators.py`."""

from __future__ import annotations

from collections.abc import Callable

from models.base import Operator
from search.layout import Layout


def _attention(layout: Layout, backend: str) -> Operator:
    from models.attention import Attention

    return Attention(
        layout.d_model,
        layout.n_heads,
        layout.n_kv_heads,
        layout.head_dim,
        window=None,
        n_sink=layout.meta_tokens,
        rope_base=layout.rope_base,
        backend=backend,
    )


def _swa(layout: Layout, backend: str) -> Operator:
    from models.attention import Attention

    return Attention(
        layout.d_model,
        layout.n_heads,
        layout.n_kv_heads,
        layout.head_dim,
        window=layout.swa_window,
        n_sink=layout.meta_tokens,
        rope_base=layout.rope_base,
        backend=backend,
    )


def _mamba2(layout: Layout, backend: str) -> Operator:
    from models.mamba2 import Mamba2

    return Mamba2(
        layout.d_model,
        expand=layout.mamba_expand,
        head_dim=layout.mamba_head_dim,
        d_state=layout.mamba_d_state,
        conv_size=layout.conv_size,
        n_groups=layout.mamba_groups,
        backend=backend,
    )


def _deltanet(layout: Layout, backend: str) -> Operator:
    from models.deltanet import DeltaNet

    return DeltaNet(
        layout.d_model, layout.n_heads, layout.head_dim, conv_size=layout.conv_size, backend=backend
    )


def _gated_deltanet(layout: Layout, backend: str) -> Operator:
    from models.deltanet import GatedDeltaNet

    return GatedDeltaNet(
        layout.d_model, layout.n_heads, layout.head_dim, conv_size=layout.conv_size, backend=backend
    )


def _ffn(layout: Layout, backend: str) -> Operator:
    from models.ffn import SwiGLU

    return SwiGLU(layout.d_model, layout.ffn_hidden)


BUILDERS: dict[str, Callable[[Layout, str], Operator]] = {
    "attention": _attention,
    "swa": _swa,
    "mamba2": _mamba2,
    "deltanet": _deltanet,
    "gated_deltanet": _gated_deltanet,
    "ffn": _ffn,
}


def build_operator(name: str, layout: Layout, backend: str = "auto") -> Operator:
    try:
        builder = BUILDERS[name]
    except KeyError:
        raise KeyError(f"operator {name!r} has no torch module registered in models/registry.py") from None
    return builder(layout, backend)
