"""Analytic parameter count of a layout, in pure Python (the search's parameter budgets need no torch).

Tests hold it equal to the count of the built `HybridLM` for every preset and for random layouts.
"""

from __future__ import annotations

from dataclasses import dataclass

from search.layout import Layout, LayoutError
from search.operators import OPERATORS


@dataclass(frozen=True)
class ParamCount:
    total: int
    non_embedding: int
    embedding: int  # token embedding, plus the LM head when it is not tied
    per_operator: tuple[int, ...]  # each operator with its pre-norm, in layout order

    def as_dict(self) -> dict:
        return {"total": self.total, "non_embedding": self.non_embedding, "embedding": self.embedding}


def count_parameters(layout: Layout, vocab_size: int | None = None) -> ParamCount:
    vocab = vocab_size if vocab_size is not None else layout.vocab_size
    if vocab is None:
        raise LayoutError(
            "vocab_size", "needed to count parameters: give one (the tokenizer's) or use a preset"
        )
    d = layout.d_model
    per_op = tuple(OPERATORS[op].param_count(layout) + d for op in layout.operators)  # + the op's pre-norm
    non_embedding = sum(per_op) + d + layout.meta_tokens * d  # + final norm, + meta tokens
    embedding = vocab * d * (1 if layout.tied_embeddings else 2)
    return ParamCount(non_embedding + embedding, non_embedding, embedding, per_op)


def format_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3f}{unit}"
    return str(n)
