"""SwiGLU feed-forward block: y = down(silu(gate(x)) * up(x)). Stateless; implements the Operator interface.
The decode step (autograd off) runs gate and up as one GEMM."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Operator
from .common import cached_cat


class SwiGLU(Operator):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.d_model, self.hidden = d_model, hidden
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)
        self.share_decode_weights()

    def decode_weight_groups(self):
        return [(self.gate_proj.weight, self.up_proj.weight)]

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def forward(self, x: torch.Tensor, cache: dict | None = None, start: int = 0) -> torch.Tensor:
        return self._mlp(x)

    def step(self, x: torch.Tensor, cache: dict, pos: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self._mlp(x)
        # Decode (autograd off): gate and up as one GEMM on their concatenated weights (cached).
        w = cached_cat(self, "gate_up", (self.gate_proj.weight, self.up_proj.weight))
        gate, up = F.linear(x, w).split(self.hidden, dim=-1)
        return self.down_proj(F.silu(gate) * up)

    def init_cache(self, batch: int, max_len: int, device, dtype) -> dict:
        return {}

    @staticmethod
    def param_count(d_model: int, hidden: int) -> int:
        return 3 * d_model * hidden
