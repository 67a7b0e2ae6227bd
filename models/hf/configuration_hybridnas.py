"""HybridnasConfig: a hybridnas layout (the operator sequence and its dims) as a transformers config.

The layout is kept whole in `layout` (what `search.layout.Layout.from_dict` reads); `hidden_size`,
`num_hidden_layers` and the token ids are the standard fields tools look for, derived from it at export.
"""

from __future__ import annotations

from transformers import PretrainedConfig


class HybridnasConfig(PretrainedConfig):
    model_type = "hybridnas"

    def __init__(
        self,
        layout: dict | None = None,
        vocab_size: int = 257,
        hidden_size: int | None = None,
        num_hidden_layers: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        **kwargs,
    ):
        self.layout = dict(layout or {})
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size if hidden_size is not None else self.layout.get("d_model")
        self.num_hidden_layers = (
            num_hidden_layers if num_hidden_layers is not None else len(self.layout.get("operators", ()))
        )
        # HybridLM ties (or not) its LM head itself, as its layout says: transformers must not tie anything.
        kwargs["tie_word_embeddings"] = False
        super().__init__(
            bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs
        )
