"""Building blocks shared by the operators: norms, the causal depthwise short convolution, RoPE.

Every operator module in `models/` implements the same three-method interface (see `models/base.py`).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 at least: bf16 rsqrt loses too much.
        dtype = x.dtype
        x32 = x.to(torch.promote_types(dtype, torch.float32))
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.to(dtype) * self.weight


class GatedRMSNorm(nn.Module):
    """RMSNorm with a SiLU gate, in either order:
    norm_before_gate=False: RMSNorm(x * silu(gate)) * weight   (Mamba2's `RMSNormGated`)
    norm_before_gate=True:  RMSNorm(x) * weight * silu(gate)   (fla's `FusedRMSNormGated`, Gated DeltaNet)
    """

    def __init__(self, dim: int, eps: float = 1e-6, norm_before_gate: bool = False):
        super().__init__()
        self.eps, self.norm_before_gate = eps, norm_before_gate
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        ct = torch.promote_types(dtype, torch.float32)
        if self.norm_before_gate:
            x32 = x.to(ct)
            y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.to(ct)
            return (y * F.silu(gate.to(ct))).to(dtype)
        x32 = x.to(ct) * F.silu(gate.to(ct))
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.to(dtype) * self.weight


class ShortConv(nn.Module):
    """Causal depthwise 1-D convolution over time (kernel `size`), optional SiLU.

    Parallel form `forward(x, conv_state)` and recurrent form `step(x, conv_state)`. The state holds the
    last `size - 1` inputs, shape (B, channels, size - 1), and is updated in place so that a decode step has
    static shapes (CUDA-graph capturable).
    """

    def __init__(self, channels: int, size: int, bias: bool = False, activation: bool = True):
        super().__init__()
        self.channels, self.size, self.activation = channels, size, activation
        self.weight = nn.Parameter(torch.empty(channels, 1, size))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def init_state(self, batch: int, device, dtype) -> torch.Tensor:
        return torch.zeros(batch, self.channels, self.size - 1, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, conv_state: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, T, C) -> (B, T, C). With a state, it is the left context and is replaced by the last inputs.
        B, T, C = x.shape
        if conv_state is None:
            left = x.new_zeros(B, self.size - 1, C)
        else:
            left = conv_state.transpose(1, 2).to(x.dtype)  # (B, size-1, C)
        full = torch.cat([left, x], dim=1)  # (B, size-1+T, C)
        if conv_state is not None:
            conv_state.copy_(full[:, full.shape[1] - (self.size - 1):].transpose(1, 2))
        # A sum of `size` shifted products, in (B, T, C) layout: on CPU this (and its backward) is several
        # times faster than a grouped F.conv1d, and needs no transposes.
        weight = self.weight.squeeze(1).to(x.dtype)  # (C, size)
        y = full[:, :T] * weight[:, 0]
        for i in range(1, self.size):
            y = y + full[:, i:i + T] * weight[:, i]
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return F.silu(y) if self.activation else y

    def step(self, x: torch.Tensor, conv_state: torch.Tensor) -> torch.Tensor:
        # x: (B, C) one token; conv_state (B, C, size-1) updated in place (roll left, append x).
        window = torch.cat([conv_state.to(x.dtype), x.unsqueeze(-1)], dim=-1)  # (B, C, size)
        conv_state.copy_(window[:, :, 1:])
        y = (window * self.weight.squeeze(1).to(x.dtype)).sum(-1)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return F.silu(y) if self.activation else y


def rope_frequencies(head_dim: int, base: float = 10000.0) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (rotate-half convention). x: (B, T, H, hd); positions: (T,) or (B, T) long."""
    ct = torch.promote_types(x.dtype, torch.float32)
    angles = positions.to(ct).unsqueeze(-1) * inv_freq.to(device=x.device, dtype=ct)  # (..., T, hd/2)
    if angles.dim() == 2:
        angles = angles.unsqueeze(0)
    cos = torch.cat([angles.cos(), angles.cos()], -1).unsqueeze(2)  # (B|1, T, 1, hd)
    sin = torch.cat([angles.sin(), angles.sin()], -1).unsqueeze(2)
    x32 = x.to(ct)
    half = x32.shape[-1] // 2
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], -1)
    return (x32 * cos + rotated * sin).to(x.dtype)
