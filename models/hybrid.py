"""HybridLM: a language model built from a layout, readable top to bottom.

    tokens -> embedding -> [meta tokens prepended] -> for each operator: x = x + op(norm(x)) -> final norm
           -> LM head (tied to the embedding or not) -> logits (meta positions stripped)

Three ways to run it, all on the same weights:
    forward(tokens)                       training / scoring: parallel forms, no cache
    prefill(tokens, caches, start)        parallel forms that fill preallocated caches
    decode_step(token, caches, pos)       one token through every operator's recurrent step (static shapes,
                                          `pos` a device tensor: a whole step can be one CUDA graph)
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.common import RMSNorm
from models.registry import build_operator
from search.layout import Layout


class Block(nn.Module):
    """Pre-norm residual wrapper around one operator."""

    def __init__(self, name: str, layout: Layout, backend: str):
        super().__init__()
        self.name = name
        self.norm = RMSNorm(layout.d_model)
        self.op = build_operator(name, layout, backend)

    def forward(self, x, cache=None, start=0):
        return x + self.op(self.norm(x), cache, start)

    def step(self, x, cache, pos):
        return x + self.op.step(self.norm(x), cache, pos)


class HybridLM(nn.Module):
    def __init__(self, layout: Layout, vocab_size: int, backend: str = "auto", init_std: float = 0.02):
        super().__init__()
        layout.validate()
        self.layout, self.vocab_size = layout, vocab_size
        d = layout.d_model
        self.n_meta = layout.meta_tokens
        self.embed = nn.Embedding(vocab_size, d)
        # Meta tokens: learnable vectors prepended at prefill; a permanent attention prefix and a learned
        # initial state for the recurrent mixers (method.md section 5).
        self.meta = nn.Parameter(torch.randn(self.n_meta, d) * init_std) if self.n_meta else None
        self.blocks = nn.ModuleList(Block(name, layout, backend) for name in layout.operators)
        self.norm = RMSNorm(d)
        self.lm_head = None if layout.tied_embeddings else nn.Linear(d, vocab_size, bias=False)
        self._init_weights(init_std)

    def _init_weights(self, std: float) -> None:
        # nanoGPT-style: N(0, std) for matrices, residual-output projections scaled by 1/sqrt(2 * depth).
        # Operator-specific parameters (Mamba2's A_log, dt_bias, ...) keep their modules' own init.
        residual_std = std / math.sqrt(2 * max(1, len(self.blocks)))
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                leaf = name.rsplit(".", 1)[-1]
                nn.init.normal_(
                    module.weight, 0.0, residual_std if leaf in ("o_proj", "down_proj", "out_proj") else std
                )
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)

    # ---- helpers -------------------------------------------------------------------------------------------
    def _embed(self, tokens: torch.Tensor, with_meta: bool) -> torch.Tensor:
        x = self.embed(tokens)  # (B, T, d)
        if with_meta and self.meta is not None:
            x = torch.cat([self.meta.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)  # (B, M+T, d)
        return x

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(x, weight.to(x.dtype))

    # ---- the three ways to run ----------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) long -> logits (B, T, vocab)."""
        x = self._embed(tokens, with_meta=True)
        for block in self.blocks:
            x = block(x)
        return self._logits(x[:, self.n_meta :])

    def init_cache(self, batch: int, max_tokens: int, device=None, dtype=None) -> list[dict]:
        """Static caches for sequences of up to `max_tokens` real tokens (meta tokens are added)."""
        param = self.embed.weight
        device = param.device if device is None else device
        dtype = param.dtype if dtype is None else dtype
        return [block.op.init_cache(batch, max_tokens + self.n_meta, device, dtype) for block in self.blocks]

    def prefill(self, tokens: torch.Tensor, caches: list[dict], start: int = 0) -> torch.Tensor:
        """Run `tokens` (B, T) through the parallel forms, filling `caches`; start = cache position of the
        first token (0 for a new sequence: the meta tokens are prepended then). Returns logits (B, T, vocab).
        The next position is `start + T` (+ the meta tokens when start == 0): see `next_position`."""
        with_meta = start == 0
        x = self._embed(tokens, with_meta)
        for block, cache in zip(self.blocks, caches):
            x = block(x, cache, start)
        return self._logits(x[:, self.n_meta :] if with_meta else x)

    def next_position(self, start: int, n_tokens: int) -> int:
        return start + n_tokens + (self.n_meta if start == 0 else 0)

    def decode_step(self, token: torch.Tensor, caches: list[dict], pos: torch.Tensor) -> torch.Tensor:
        """token (B,) long at cache position `pos` (0-dim long tensor on the model's device) -> logits (B,
        vocab)."""
        x = self.embed(token)  # (B, d)
        for block, cache in zip(self.blocks, caches):
            x = block.step(x, cache, pos)
        return self._logits(x)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def backends(self) -> dict[str, str]:
        """Operator name -> the path its last call used (kernel or torch), for fingerprints and logs."""
        out = {}
        for block in self.blocks:
            out.setdefault(block.name, getattr(block.op, "last_backend", block.op.backend))
        return out
