"""Softmax attention: full causal ("attention") and sliding-window ("swa"), GQA, RoPE, meta-token sinks.

Visibility rule: the query at position i sees the key at position j iff
    j <= i  and  (window is None  or  i - j < window  or  j < n_sink).
The first `n_sink` positions are the meta tokens the model prepends; they stay visible to every query.

Paths (recorded in `self.last_backend` after each call):
    "sdpa"     full attention, torch's scaled_dot_product_attention (CPU and GPU).
    "blocked"  SWA in pure torch, blocked (`models.ops.swa.blocked_swa`): query block b (size W) attends to
               key blocks b-1, b and the sink prefix only, O(T * (2W + n_sink)). The CPU path, and the GPU
               fallback.
    "flex"     SWA on GPU via FlexAttention with a block mask (`models.ops.swa.flex_swa`: window + sink rule),
               flex_attention compiled once per process, block masks cached per shape.
    "dense"    `forward_reference`: explicit softmax(QK^T * scale + mask) V (tests only).
`backend`: "auto" (flex for SWA on CUDA, blocked elsewhere), "torch" (blocked SWA everywhere), "flex" (force
FlexAttention, any device), "flex-eager" (uncompiled FlexAttention: debugging / CPU tests of the GPU logic).
Flex sequence lengths are padded to a multiple of 128 so the compiled kernel sees few shapes. If FlexAttention
is missing or raises, one warning is logged and the blocked path is used from then on (process-wide).

Caches (`init_cache`):
    full: {"k", "v": (B, Hkv, max_len, hd)}; position p lives at index p.
    SWA:  {"k", "v": (B, Hkv, n_sink + W, hd), "pos": (n_sink + W,) long, -1 when empty}.
          Slots [0, n_sink) hold the sink (meta) prefix for good; slots [n_sink, n_sink + W) are a ring of
          the last W non-sink positions (position p >= n_sink lives in slot n_sink + (p - n_sink) % W).
          "pos" is the position each slot holds (shared by the batch), so masks are static-shaped.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Operator
from .common import (
    apply_rope_reference,
    cached_arange,
    cached_cat,
    rope_compute_dtype,
    rope_cos_sin,
    rope_frequencies,
    rope_rotate,
    rope_signed_frequencies,
    rope_table,
)
from .ops.swa import blocked_swa, flex_swa

log = logging.getLogger("hybridnas.attention")
_flex_failed = False  # set at the first failure: the blocked path from then on (process-wide)

BACKENDS = ("auto", "torch", "flex", "flex-eager")


# --------------------------------------------------------------------------------------------------------
# The operator
# --------------------------------------------------------------------------------------------------------


class Attention(Operator):
    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        window: int | None = None,
        n_sink: int = 0,
        rope: bool = True,
        rope_base: float = 10000.0,
        backend: str = "auto",
    ):
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1 (got {window})")
        if n_sink < 0:
            raise ValueError(f"n_sink must be >= 0 (got {n_sink})")
        if rope and head_dim % 2:
            raise ValueError("RoPE needs an even head_dim")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} (got {backend!r})")
        self.d_model, self.n_heads, self.n_kv_heads, self.head_dim = d_model, n_heads, n_kv_heads, head_dim
        self.window, self.n_sink, self.rope, self.rope_base = window, n_sink, rope, rope_base
        self.backend = backend
        self.last_backend: str | None = None
        self.scale = 1.0 / math.sqrt(head_dim)
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=False)
        # Not a buffer: `model.to(bfloat16)` must not round the frequencies. The cos/sin rows come from a
        # table shared by every module with these frequencies (`models.common.rope_table`, per device and
        # dtype).
        self._inv_freq = {"cpu": rope_frequencies(head_dim, rope_base)} if rope else {}
        self.share_decode_weights()

    def decode_weight_groups(self):
        return [(self.q_proj.weight, self.k_proj.weight, self.v_proj.weight)]

    @property
    def kind(self) -> str:
        return "attention" if self.window is None else "swa"

    @staticmethod
    def param_count(d_model: int, n_heads: int, n_kv_heads: int, head_dim: int) -> int:
        return d_model * head_dim * (2 * n_heads + 2 * n_kv_heads)

    # ---- projections -------------------------------------------------------------------------------------
    def _rope_rows(self, start: int, T: int, x: torch.Tensor) -> torch.Tensor:
        """RoPE rotation rows (T, 2, hd) of positions start .. start+T-1 (a slice of the table: no kernel)."""
        table = rope_table(self._inv_freq["cpu"], start + T, x.device, rope_compute_dtype(x.dtype))
        return table[start : start + T]

    def _qkv(self, x: torch.Tensor, start: int):
        """x (B, T, d) -> q (B, H, T, hd), k, v (B, Hkv, T, hd), RoPE applied at positions start ..
        start+T-1."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.rope:
            cs = self._rope_rows(start, T, x)
            q, k = rope_rotate(q, cs), rope_rotate(k, cs)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _qkv_step(self, x: torch.Tensor, p1: torch.Tensor, cache: dict):
        """One token x (B, d) at the device position p1 (1,) -> q (B, H, 1, hd), k, v (B, Hkv, 1, hd).

        With autograd off (decode): one GEMM on the concatenated q/k/v weights (cached) and one rotation of q
        and k together. The RoPE rows: full attention indexes the table (positions < the cache length);
        sliding window computes them from the position (unbounded)."""
        B = x.shape[0]
        H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        cs = None
        if self.rope:
            ct = rope_compute_dtype(x.dtype)
            if self.window is None:
                cs = rope_table(self._inv_freq["cpu"], cache["k"].shape[2], x.device, ct).index_select(0, p1)
            else:
                cs = rope_cos_sin(p1, rope_signed_frequencies(self._inv_freq["cpu"], x.device, ct))
        if torch.is_grad_enabled():
            x = x.unsqueeze(1)
            q = self.q_proj(x).view(B, 1, H, hd)
            k = self.k_proj(x).view(B, 1, Hkv, hd)
            v = self.v_proj(x).view(B, 1, Hkv, hd)
            if cs is not None:
                q, k = rope_rotate(q, cs), rope_rotate(k, cs)
        else:
            w = cached_cat(self, "qkv", (self.q_proj.weight, self.k_proj.weight, self.v_proj.weight))
            qkv = F.linear(x, w)  # (B, (H + 2 Hkv) hd)
            nqk = (H + Hkv) * hd
            qk = qkv[:, :nqk].view(B, 1, H + Hkv, hd)
            v = qkv[:, nqk:].view(B, 1, Hkv, hd)
            if cs is not None:
                qk = rope_rotate(qk, cs)
            q, k = qk[:, :, :H], qk[:, :, H:]
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _out(self, o: torch.Tensor) -> torch.Tensor:
        B, H, T, hd = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(B, T, H * hd))

    # ---- cache -------------------------------------------------------------------------------------------
    def cache_len(self, max_len: int) -> int:
        return max_len if self.window is None else self.n_sink + self.window

    def init_cache(self, batch: int, max_len: int, device, dtype) -> dict:
        n = self.cache_len(max_len)
        shape = (batch, self.n_kv_heads, n, self.head_dim)
        cache = {
            "k": torch.zeros(shape, device=device, dtype=dtype),
            "v": torch.zeros(shape, device=device, dtype=dtype),
        }
        if self.window is not None:
            cache["pos"] = torch.full((n,), -1, device=device, dtype=torch.long)
        return cache

    def _slot(self, pos: torch.Tensor) -> torch.Tensor:
        """SWA cache slot of position(s) `pos` (tensor op, no sync)."""
        ns, W = self.n_sink, self.window
        ring = ns + torch.remainder(pos - ns, W)
        return torch.where(pos < ns, pos, ring) if ns else ring

    def _swa_write(self, cache: dict, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        """Write the keys/values of positions start .. start+T-1 that the cache keeps (sinks, last W)."""
        T = k.shape[2]
        end = start + T
        ns, W = self.n_sink, self.window
        dev = k.device
        if start < ns:
            n = min(ns, end) - start
            cache["k"][:, :, start : start + n] = k[:, :, :n].to(cache["k"].dtype)
            cache["v"][:, :, start : start + n] = v[:, :, :n].to(cache["v"].dtype)
            cache["pos"][start : start + n] = torch.arange(start, start + n, device=dev)
        lo = max(ns, end - W, start)
        if lo < end:
            p = torch.arange(lo, end, device=dev)
            slots = self._slot(p)  # <= W consecutive non-sink positions: distinct slots
            cache["k"].index_copy_(2, slots, k[:, :, lo - start :].to(cache["k"].dtype))
            cache["v"].index_copy_(2, slots, v[:, :, lo - start :].to(cache["v"].dtype))
            cache["pos"].index_copy_(0, slots, p)

    def _swa_context(self, k, v, cache: dict | None, start: int):
        """Sink part (sk, sv, spos) and window part (wk, wv, wpos) for new keys at start .. start+T-1.

        Reads the cache (before it is written). Positions are absolute, -1 where absent."""
        B, Hkv, T, hd = k.shape
        ns, W = self.n_sink, self.window
        dev, dt = k.device, k.dtype
        end = start + T
        # sink part: positions 0 .. ns-1, the first min(start, ns) from the cache, the rest from the new keys
        n_old = min(start, ns) if cache is not None else 0
        n_new = max(0, min(ns, end) - start)
        sk_parts, sv_parts, sp_parts = [], [], []
        if n_old:
            idx = torch.arange(n_old, device=dev)
            sk_parts.append(cache["k"][:, :, :n_old].to(dt))
            sv_parts.append(cache["v"][:, :, :n_old].to(dt))
            sp_parts.append(torch.where(cache["pos"][:n_old] == idx, idx, -1))
        if n_new:
            sk_parts.append(k[:, :, :n_new])
            sv_parts.append(v[:, :, :n_new])
            sp_parts.append(torch.arange(start, start + n_new, device=dev))
        if sk_parts:
            sk, sv, spos = torch.cat(sk_parts, 2), torch.cat(sv_parts, 2), torch.cat(sp_parts)
        else:
            sk = sv = k.new_zeros(B, Hkv, 0, hd)
            spos = torch.zeros(0, device=dev, dtype=torch.long)
        # window part: left context start-W .. start-1 (non-sink positions, from the ring), then the new keys
        lp = torch.arange(start - W, start, device=dev)
        if cache is not None and start > ns:
            slots = self._slot(lp.clamp_min(ns))
            lk = cache["k"][:, :, slots].to(dt)
            lv = cache["v"][:, :, slots].to(dt)
            lpos = torch.where((lp >= ns) & (cache["pos"][slots] == lp), lp, -1)
        else:
            lk = lv = k.new_zeros(B, Hkv, W, hd)
            lpos = torch.full((W,), -1, device=dev, dtype=torch.long)
        npos = torch.arange(start, end, device=dev)
        npos = torch.where(npos >= ns, npos, -1)
        wk, wv = torch.cat([lk, k], 2), torch.cat([lv, v], 2)
        return sk, sv, spos, wk, wv, torch.cat([lpos, npos])

    # ---- paths -------------------------------------------------------------------------------------------
    def _use_flex(self, x: torch.Tensor) -> bool:
        if _flex_failed:
            return False
        if self.backend in ("flex", "flex-eager"):
            return True
        return self.backend == "auto" and x.is_cuda

    def _flex_swa(self, q, k, v, cache, start: int, compiled: bool):
        context = None if start == 0 else self._swa_context(k, v, cache, start)
        return flex_swa(q, k, v, context, start, self.window, self.n_sink, self.scale, compiled)

    def _swa(self, q, k, v, cache, start: int) -> torch.Tensor:
        global _flex_failed
        if self._use_flex(q):
            try:
                o = self._flex_swa(q, k, v, cache, start, compiled=self.backend != "flex-eager")
            except Exception as exc:
                msg = (str(exc).strip().splitlines() or [""])[0][:200]
                log.warning(
                    "FlexAttention failed (%s: %s): sliding-window attention falls back to the blocked "
                    "torch path from now on",
                    type(exc).__name__,
                    msg,
                )
                _flex_failed = True
                o = None
            if o is not None:
                self.last_backend = "flex"
                return o
        sk, sv, spos, wk, wv, wpos = self._swa_context(k, v, cache, start)
        self.last_backend = "blocked"
        return blocked_swa(q, sk, sv, spos, wk, wv, wpos, start, self.window, self.scale)

    def _full(self, q, k, v, cache, start: int) -> torch.Tensor:
        T = q.shape[2]
        gqa = self.n_heads != self.n_kv_heads
        self.last_backend = "sdpa"
        if cache is not None and start > 0:
            end = start + T
            kk = cache["k"][:, :, :end].to(q.dtype)
            vv = cache["v"][:, :, :end].to(q.dtype)
            ar = cached_arange(end, q.device)
            mask = ar[None, :] <= ar[start:, None]
            return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=self.scale, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=gqa)

    # ---- interface ---------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, cache: dict | None = None, start: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        start = int(start)
        q, k, v = self._qkv(x, start)
        if self.window is None:
            if cache is not None:
                cache["k"][:, :, start : start + T] = k.to(cache["k"].dtype)
                cache["v"][:, :, start : start + T] = v.to(cache["v"].dtype)
            o = self._full(q, k, v, cache, start)
        else:
            o = self._swa(q, k, v, cache, start)  # reads the cache before it is written
            if cache is not None:
                self._swa_write(cache, k, v, start)
        return self._out(o)

    def step(self, x: torch.Tensor, cache: dict, pos: torch.Tensor) -> torch.Tensor:
        pos = pos.reshape(()).to(device=x.device, dtype=torch.long)
        p1 = pos.reshape(1)
        q, k, v = self._qkv_step(x, p1, cache)  # (B, H|Hkv, 1, hd)
        gqa = self.n_heads != self.n_kv_heads
        if self.window is None:
            cache["k"].index_copy_(2, p1, k.to(cache["k"].dtype))
            cache["v"].index_copy_(2, p1, v.to(cache["v"].dtype))
            if x.is_cuda:
                # static shape over the whole buffer, no host sync (CUDA-graph capturable)
                kk, vv = cache["k"].to(q.dtype), cache["v"].to(q.dtype)
                mask = cached_arange(kk.shape[2], x.device) <= pos
                o = F.scaled_dot_product_attention(
                    q, kk, vv, attn_mask=mask.view(1, 1, 1, -1), scale=self.scale, enable_gqa=gqa
                )
            else:
                n = int(pos) + 1  # CPU: decode cost follows the real context
                kk, vv = cache["k"][:, :, :n].to(q.dtype), cache["v"][:, :, :n].to(q.dtype)
                o = F.scaled_dot_product_attention(q, kk, vv, scale=self.scale, enable_gqa=gqa)
        else:
            slot = self._slot(p1)
            cache["k"].index_copy_(2, slot, k.to(cache["k"].dtype))
            cache["v"].index_copy_(2, slot, v.to(cache["v"].dtype))
            cache["pos"].index_copy_(0, slot, p1)
            sp = cache["pos"]
            mask = (sp >= 0) & (sp <= pos) & (((pos - sp) < self.window) | (sp < self.n_sink))
            kk, vv = cache["k"].to(q.dtype), cache["v"].to(q.dtype)
            o = F.scaled_dot_product_attention(
                q, kk, vv, attn_mask=mask.view(1, 1, 1, -1), scale=self.scale, enable_gqa=gqa
            )
        self.last_backend = "sdpa"
        return self._out(o).squeeze(1)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Naive dense reference: explicit softmax(Q K^T * scale + mask) V over a fresh sequence (start 0)."""
        B, T, _ = x.shape
        dtype = x.dtype
        ct = torch.promote_types(dtype, torch.float32)
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.rope:  # the plain RoPE (the model uses the table: `_qkv`)
            positions = torch.arange(T, device=x.device)
            q = apply_rope_reference(q, positions, self._inv_freq["cpu"])
            k = apply_rope_reference(k, positions, self._inv_freq["cpu"])
        q, k, v = (t.transpose(1, 2).to(ct) for t in (q, k, v))
        G = self.n_heads // self.n_kv_heads
        k = k.repeat_interleave(G, dim=1)
        v = v.repeat_interleave(G, dim=1)
        i = torch.arange(T, device=x.device)[:, None]
        j = torch.arange(T, device=x.device)[None, :]
        allowed = j <= i
        if self.window is not None:
            allowed = allowed & (((i - j) < self.window) | (j < self.n_sink))
        scores = (q @ k.transpose(-1, -2)) * self.scale
        scores = scores + torch.zeros(T, T, device=x.device, dtype=ct).masked_fill(~allowed, float("-inf"))
        o = torch.softmax(scores, dim=-1) @ v
        self.last_backend = "dense"
        return self._out(o.to(dtype))
