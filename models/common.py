"""Building blocks shared by the operators: norms, the causal depthwise short convolution, RoPE, and the
cached concatenation of weights that lets a decode step run one GEMM where training runs several.

Every operator module in `models/` implements the same three-method interface (see `models/base.py`).
Fast paths here have their plain-torch reference beside them (`rms_norm_reference`, `apply_rope_reference`),
and the tests hold them equal.
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
        if self.weight.dtype == x.dtype:
            # One fused kernel on CUDA (the composite on CPU). It normalises in float32 at least, like the
            # reference, and multiplies by the weight before the single rounding to x's dtype (the reference
            # rounds before and after the weight: in bf16/fp16 the two differ by at most about one ulp).
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return self.forward_reference(x)  # mixed dtypes: the reference's type promotion

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_reference(x, self.weight, self.eps)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Plain-torch RMSNorm over the last dim: normalise in at least float32 (bf16 rsqrt loses too much), round
    to x's dtype, times `weight` (result dtype: x's and weight's promoted)."""
    dtype = x.dtype
    x32 = x.to(torch.promote_types(dtype, torch.float32))
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return x32.to(dtype) if weight is None else x32.to(dtype) * weight


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
        # F.rms_norm on the float32 (at least) tensor: the same arithmetic as `forward_reference`, fewer
        # kernels.
        dtype = x.dtype
        ct = torch.promote_types(dtype, torch.float32)
        D = x.shape[-1]
        if self.norm_before_gate:
            y = F.rms_norm(x.to(ct), (D,), self.weight.to(ct), self.eps)
            return (y * F.silu(gate.to(ct))).to(dtype)
        y = F.rms_norm(x.to(ct) * F.silu(gate.to(ct)), (D,), None, self.eps)
        return y.to(dtype) * self.weight

    def forward_reference(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
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
            conv_state.copy_(full[:, full.shape[1] - (self.size - 1) :].transpose(1, 2))
        # A sum of `size` shifted products, in (B, T, C) layout: on CPU this (and its backward) is several
        # times faster than a grouped F.conv1d, and needs no transposes.
        weight = self.weight.squeeze(1).to(x.dtype)  # (C, size)
        y = full[:, :T] * weight[:, 0]
        for i in range(1, self.size):
            y = y + full[:, i : i + T] * weight[:, i]
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return F.silu(y) if self.activation else y

    def step(self, x: torch.Tensor, conv_state: torch.Tensor) -> torch.Tensor:
        # x: (B, C) one token; conv_state (B, C, size-1) updated in place (roll left, append x).
        return short_conv_step(x, conv_state, self.weight.squeeze(1), self.bias, self.activation)


def short_conv_step(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: bool,
) -> torch.Tensor:
    """One token of a causal depthwise conv: x (B, C), conv_state (B, C, size-1) rolled in place, weight (C,
    size). Also runs several ShortConvs as one, on concatenated channels (`models.deltanet` does for q, k,
    v)."""
    window = torch.cat([conv_state.to(x.dtype), x.unsqueeze(-1)], dim=-1)  # (B, C, size)
    conv_state.copy_(window[:, :, 1:])
    y = (window * weight.to(x.dtype)).sum(-1)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return F.silu(y) if activation else y


# --------------------------------------------------------------------------------------------------------
# RoPE
# --------------------------------------------------------------------------------------------------------


def rope_frequencies(head_dim: int, base: float = 10000.0) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))


def rope_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """RoPE angles, cos/sin and the rotation are computed in at least float32."""
    return torch.promote_types(dtype, torch.float32)


def apply_rope_reference(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (rotate-half convention), the plain reference. x: (B, T, H, hd); positions: (T,) or
    (B, T) long; inv_freq (hd/2,) float64. Angles = position * inv_freq in the compute dtype (float32 for
    bf16/fp32 x)."""
    ct = rope_compute_dtype(x.dtype)
    angles = positions.to(ct).unsqueeze(-1) * inv_freq.to(device=x.device, dtype=ct)  # (..., T, hd/2)
    if angles.dim() == 2:
        angles = angles.unsqueeze(0)
    cos = torch.cat([angles.cos(), angles.cos()], -1).unsqueeze(2)  # (B|1, T, 1, hd)
    sin = torch.cat([angles.sin(), angles.sin()], -1).unsqueeze(2)
    x32 = x.to(ct)
    half = x32.shape[-1] // 2
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], -1)
    return (x32 * cos + rotated * sin).to(x.dtype)


_ROPE_FREQS: dict[tuple, torch.Tensor] = {}
_ROPE_TABLES: dict[tuple, list[torch.Tensor]] = {}
ROPE_TABLE_MIN = 1024


def _rope_key(inv_freq: torch.Tensor, device, dtype: torch.dtype) -> tuple:
    return (tuple(inv_freq.tolist()), str(torch.device(device)), dtype)


def rope_signed_frequencies(inv_freq: torch.Tensor, device, dtype: torch.dtype) -> torch.Tensor:
    """[-inv_freq | inv_freq] (hd,) in `dtype` on `device`, made once (a captured CUDA graph may hold it)."""
    key = _rope_key(inv_freq, device, dtype)
    f = _ROPE_FREQS.get(key)
    if f is None:
        with torch.no_grad(), torch.inference_mode(False):
            f = inv_freq.to(device=device, dtype=dtype)
            f = _ROPE_FREQS[key] = torch.cat([-f, f])
    return f


def rope_cos_sin(positions: torch.Tensor, signed_freq: torch.Tensor) -> torch.Tensor:
    """Rows of the rotation at `positions` (any shape P, long): (*P, 2, hd) in signed_freq's dtype, row 0 =
    [cos | cos], row 1 = [-sin | sin] of the angles position * inv_freq (computed as `apply_rope_reference`
    does). `signed_freq` from `rope_signed_frequencies`.

    The sign sits in the frequencies: sin(-a) = -sin(a), cos(-a) = cos(a) and (-f) * p = -(f * p) exactly, so
    the values are the reference's. Used to build the table, and directly from a device position where no
    table bound holds (sliding-window decode: positions are unbounded)."""
    angles = positions.to(signed_freq.dtype).unsqueeze(-1) * signed_freq  # (*P, hd)
    return torch.stack([angles.cos(), angles.sin()], -2)


def rope_table(inv_freq: torch.Tensor, length: int, device, dtype: torch.dtype) -> torch.Tensor:
    """`rope_cos_sin` at positions 0 .. L-1 for some L >= length: (L, 2, hd) in `dtype` on `device`.

    Computed once per (frequencies, device, dtype) and grown (to a power of two) when a longer one is needed.
    Not a module buffer on purpose: `model.to(torch.bfloat16)` must not round it, and state dicts and
    parameter counts stay as they are. Shorter tables are kept, never freed, so that a captured CUDA graph
    holding one stays valid."""
    key = _rope_key(inv_freq, device, dtype)
    tables = _ROPE_TABLES.setdefault(key, [])
    if tables and tables[-1].shape[0] >= length:
        return tables[-1]
    n = max(ROPE_TABLE_MIN, 1 << max(0, int(length) - 1).bit_length())
    signed = rope_signed_frequencies(inv_freq, device, dtype)
    with torch.no_grad(), torch.inference_mode(False):
        table = rope_cos_sin(torch.arange(n, device=device), signed)
    tables.append(table)
    return table


def rope_rotate(x: torch.Tensor, cs: torch.Tensor) -> torch.Tensor:
    """Apply the rotation rows `cs` (T, 2, hd) (from `rope_table` / `rope_cos_sin`) to x (B, T, H, hd).

    x * [cos|cos] + [x2|x1] * [-sin|sin] (the reference's x * cos + [-x2|x1] * sin, the sign moved, exactly),
    products in cs's dtype, the sum of the two rounded to x's dtype: one cat, one mul, one sum, one cast."""
    half = x.shape[-1] // 2
    xr = torch.cat([x, x[..., half:], x[..., :half]], -1).unflatten(-1, (2, -1))  # (B, T, H, 2, hd)
    return (xr * cs.unsqueeze(-3)).sum(-2).to(x.dtype)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """As `apply_rope_reference` (positions (T,) long), through `rope_cos_sin` + `rope_rotate`."""
    signed = rope_signed_frequencies(inv_freq, x.device, rope_compute_dtype(x.dtype))
    return rope_rotate(x, rope_cos_sin(positions, signed))


# --------------------------------------------------------------------------------------------------------
# Cached helpers for the decode step
# --------------------------------------------------------------------------------------------------------

_ARANGES: dict[str, list[torch.Tensor]] = {}


def cached_arange(n: int, device) -> torch.Tensor:
    """torch.arange(n) (long) on `device`: a view of one table per device, grown to a power of two when
    needed. Shorter tables are kept, never freed (a captured CUDA graph may hold one)."""
    n = int(n)
    tables = _ARANGES.setdefault(str(torch.device(device)), [])
    if not tables or tables[-1].shape[0] < n:
        size = max(ROPE_TABLE_MIN, 1 << max(0, n - 1).bit_length())
        with torch.no_grad(), torch.inference_mode(False):
            tables.append(torch.arange(size, device=device))
    return tables[-1][:n]


def _version(t: torch.Tensor):
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return None


def share_storage(weights) -> None:
    """Lay `weights` (parameters with equal trailing shapes, dtype and device) back to back along dim 0 of
    one fresh storage, each keeping its identity (optimizers, state dicts and gradients see no change) and
    becoming a view of it. The decode step's concatenation of them (`cached_cat`) is then a view too, not a
    second copy of the weights (a 12-layer Llama's fused q/k/v and gate/up copies were +49 % of its
    weights: benchmarks/decode_weight_memory.py)."""
    weights = tuple(weights)
    # Never an inference tensor (a module built under inference_mode must still train).
    with torch.no_grad(), torch.inference_mode(False):
        fused = torch.cat([w.detach() for w in weights], 0)
    start = 0
    for w in weights:
        w.data = fused[start : start + w.shape[0]]
        start += w.shape[0]


def stacked_view(tensors, dim: int = 0) -> torch.Tensor | None:
    """torch.cat(tensors, dim) as a view without copying, when the tensors already lie back to back in one
    storage along dim 0 (as `share_storage` leaves them); None otherwise."""
    tensors = tuple(tensors)
    first = tensors[0]
    if dim != 0 or first.dim() == 0:
        return None
    rest = tuple(first.shape[1:])
    row = math.prod(rest)
    storage, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    rows = 0
    for t in tensors:
        if (
            t.untyped_storage().data_ptr() != storage
            or t.dtype != first.dtype
            or tuple(t.shape[1:]) != rest
            or not t.is_contiguous()
            or t.storage_offset() != offset + rows * row
        ):
            return None
        rows += t.shape[0]
    strides = [row] + [math.prod(rest[i + 1 :]) for i in range(len(rest))]
    return first.detach().as_strided((rows, *rest), strides, offset)


def cached_cat(owner: nn.Module, name: str, tensors, dim: int = 0) -> torch.Tensor:
    """torch.cat(tensors, dim) of `owner`'s weights for inference (autograd off): e.g. the q, k, v projection
    weights as one matrix, so that a decode step runs one GEMM.

    Weights that share one storage (`share_storage`, what the operators set up) give a view: no copy, and
    in-place changes show through. Otherwise the concatenation is computed once and reused while none of the
    tensors changes: refreshed when one is modified in place (its version counter moves: an optimizer step,
    `load_state_dict`, weight normalization) or replaced (another data pointer: `param.data = ...`); the
    sources are held, so a freed weight's address cannot come back under a new tensor unnoticed.
    `Operator._apply` (every `.to()`, `.cuda()`, `.half()`) drops the cache. Not a buffer: no change to state
    dicts or parameter counts."""
    tensors = tuple(tensors)
    view = stacked_view(tensors, dim)
    if view is not None:
        return view
    sig = tuple((t.data_ptr(), _version(t), t.dtype, t.device, t.shape) for t in tensors)
    store = owner.__dict__.setdefault("_cat_cache", {})
    hit = store.get(name)
    if hit is not None and hit[0] == sig and all(v[1] is not None for v in sig):
        return hit[1]
    with torch.no_grad():
        sources = tuple(t.detach() for t in tensors)
        out = torch.cat(sources, dim)
    store[name] = (sig, out, sources)
    return out


def drop_cat_cache(owner: nn.Module) -> None:
    owner.__dict__.pop("_cat_cache", None)
