"""Sliding-window attention kernels, each beside the reference it must equal (tests/test_attention.py).

Visibility rule: the query at position i sees the key at position j iff
    j <= i  and  (i - j < window  or  j < n_sink)
(the first `n_sink` positions are meta tokens, visible to every query).

Shapes: q (B, H, T, hd); keys and values (B, Hkv, L, hd) with H a multiple of Hkv (grouped-query attention);
outputs (B, H, T, hd) in q's dtype.

    swa_reference  dense softmax(Q K^T * scale + mask) V over a fresh sequence (start 0): the definition.
    blocked_swa    pure torch, blocked by the window: query block b attends to key blocks b-1, b and the
                   sink part only, O(T * (2W + n_sink)); the CPU path and the GPU fallback.
    flex_swa       FlexAttention with a block mask of the same rule (compiled once per process; block masks
                   cached per shape; lengths padded to a multiple of FLEX_PAD so the kernel sees few shapes).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger("hybridnas.attention")

FLEX_PAD = 128  # flex sequence lengths are padded to a multiple of this (= its default block size)


def visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int, n_sink: int) -> torch.Tensor:
    """The visibility rule as a boolean mask (len(q_pos), len(k_pos))."""
    q, k = q_pos[:, None], k_pos[None, :]
    return (k <= q) & (((q - k) < window) | (k < n_sink))


def swa_reference(q, k, v, window: int, n_sink: int, scale: float) -> torch.Tensor:
    """Dense SWA over a fresh sequence: q (B, H, T, hd), k, v (B, Hkv, T, hd) at positions 0 .. T-1.
    Computed in at least float32."""
    B, H, T, hd = q.shape
    G = H // k.shape[1]
    ct = torch.promote_types(q.dtype, torch.float32)
    kk = k.to(ct).repeat_interleave(G, dim=1)
    vv = v.to(ct).repeat_interleave(G, dim=1)
    pos = torch.arange(T, device=q.device)
    scores = torch.matmul(q.to(ct), kk.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~visible(pos, pos, window, n_sink), float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), vv).to(q.dtype)


def blocked_swa(q, sk, sv, spos, wk, wv, wpos, start: int, window: int, scale: float) -> torch.Tensor:
    """Sliding-window attention over a sink part and a window part, blocked by `window`.

    q: (B, H, T, hd), queries at positions start .. start+T-1.
    sk, sv: (B, Hkv, S, hd) sink keys/values with positions spos (S,) long (-1 = absent); seen by every
        query at a position >= theirs. S may be 0.
    wk, wv: (B, Hkv, W + T, hd) window keys/values: W entries of left context (positions start-W .. start-1,
        or -1) followed by the T new ones; positions wpos (W + T,) long, -1 where absent or a sink (sinks are
        only seen through the sink part, never twice). Query block b (queries bW .. bW+W-1) sees window
        entries bW .. bW+2W-1, i.e. its own block and the previous one.
    Returns (B, H, T, hd) in q's dtype; computed in at least float32.
    """
    B, H, T, hd = q.shape
    Hkv = wk.shape[1]
    G = H // Hkv
    W = window
    dtype = q.dtype
    ct = torch.promote_types(dtype, torch.float32)
    nb = -(-T // W)
    pad = nb * W - T
    q = q.to(ct)
    wk, wv = wk.to(ct), wv.to(ct)
    if pad:
        q = F.pad(q, (0, 0, 0, pad))
        wk = F.pad(wk, (0, 0, 0, pad))
        wv = F.pad(wv, (0, 0, 0, pad))
        wpos = F.pad(wpos, (0, pad), value=-1)
    qb = q.reshape(B, Hkv, G, nb, W, hd)
    kb = wk.unfold(2, 2 * W, W).unsqueeze(2)  # (B, Hkv, 1, nb, hd, 2W)
    vb = wv.unfold(2, 2 * W, W).transpose(-1, -2).unsqueeze(2)  # (B, Hkv, 1, nb, 2W, hd)
    qpos = torch.arange(start, start + nb * W, device=q.device).view(nb, W, 1)
    kpos = wpos.unfold(0, 2 * W, W).unsqueeze(1)  # (nb, 1, 2W)
    wmask = (kpos >= 0) & (kpos <= qpos) & ((qpos - kpos) < W)  # (nb, W, 2W)
    scores = torch.matmul(qb, kb) * scale  # (B, Hkv, G, nb, W, 2W)
    S = sk.shape[2]
    if S:
        sk, sv = sk.to(ct), sv.to(ct)
        smask = (spos >= 0) & (spos <= qpos)  # (nb, W, S)
        s_scores = torch.matmul(qb, sk.transpose(-1, -2)[:, :, None, None]) * scale
        scores = torch.cat([s_scores, scores], dim=-1)
        mask = torch.cat([smask, wmask], dim=-1)
    else:
        mask = wmask
    # A finite fill keeps fully-masked padding rows finite (no NaN in the backward).
    probs = torch.softmax(scores.masked_fill(~mask, torch.finfo(ct).min), dim=-1)
    out = torch.matmul(probs[..., S:], vb)
    if S:
        out = out + torch.matmul(probs[..., :S], sv[:, :, None, None])
    out = out.reshape(B, H, nb * W, hd)[:, :, :T]
    return out.to(dtype)


# --------------------------------------------------------------------------------------------------------
# FlexAttention (the GPU path)
# --------------------------------------------------------------------------------------------------------


@functools.cache
def flex_functions(compiled: bool = True):
    """(flex_attention [compiled once], create_block_mask) or None, logging one line when unavailable."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except Exception as exc:  # old torch
        log.warning(
            "FlexAttention unavailable (%s): sliding-window attention uses the blocked torch path", exc
        )
        return None
    fn = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
    return fn, create_block_mask


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _make_block_mask(create_block_mask, mask_mod, q_len: int, kv_len: int, device, compiled: bool):
    if compiled:
        # _compile=True: inductor fuses the mask evaluation, so no dense Q x KV mask is held in memory.
        return create_block_mask(mask_mod, None, None, q_len, kv_len, device=device, _compile=True)
    return create_block_mask(mask_mod, None, None, q_len, kv_len, device=device)


@functools.lru_cache(maxsize=64)
def _swa_block_mask(window: int, n_sink: int, q_len: int, device: str, compiled: bool):
    """Block mask for a fresh sequence (positions 0..T-1, keys = queries), cached per shape."""
    fns = flex_functions(compiled)
    create_block_mask = fns[1]

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (((q_idx - kv_idx) < window) | (kv_idx < n_sink))

    return _make_block_mask(create_block_mask, mask_mod, q_len, q_len, torch.device(device), compiled)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def flex_swa(q, k, v, context, start: int, window: int, n_sink: int, scale: float, compiled: bool):
    """SWA by FlexAttention, or None when FlexAttention is unavailable.

    Fresh sequence (`context` None, start 0): k, v (B, Hkv, T, hd) are the sequence's own keys. Otherwise
    `context` is (sk, sv, spos, wk, wv, wpos) as `blocked_swa` takes them: sink and window parts with their
    absolute positions (-1 where absent), for queries at start .. start+T-1."""
    fns = flex_functions(compiled)
    if fns is None:
        return None
    flex_attention, create_block_mask = fns
    T = q.shape[2]
    dt = q.dtype
    # Padded lengths: the compiled kernel (dynamic=False) and the block masks see few distinct shapes;
    # padded keys are never visible to real queries.
    Tp = _round_up(T, FLEX_PAD)
    if context is None:  # fresh sequence: static mask, cached per shape
        block_mask = _swa_block_mask(window, n_sink, Tp, str(q.device), compiled)
        kk, vv = k, v
    else:
        sk, sv, spos, wk, wv, wpos = context
        kk, vv = torch.cat([sk, wk], 2).to(dt), torch.cat([sv, wv], 2).to(dt)
        kpos = torch.cat([spos, wpos])
        is_sink = torch.zeros_like(kpos, dtype=torch.bool)
        is_sink[: spos.shape[0]] = True
        Lp = _round_up(kk.shape[2], FLEX_PAD)
        kpos = F.pad(kpos, (0, Lp - kpos.shape[0]), value=-1)
        is_sink = F.pad(is_sink, (0, Lp - is_sink.shape[0]), value=False)
        valid = kpos >= 0
        krel = kpos - start  # query q_idx sits at position start + q_idx

        def mask_mod(b, h, q_idx, kv_idx):
            kr = krel[kv_idx]
            return valid[kv_idx] & (kr <= q_idx) & (is_sink[kv_idx] | ((q_idx - kr) < window))

        block_mask = _make_block_mask(create_block_mask, mask_mod, Tp, Lp, q.device, compiled)
    q = F.pad(q, (0, 0, 0, Tp - T))
    kk = F.pad(kk, (0, 0, 0, block_mask.seq_lengths[1] - kk.shape[2]))
    vv = F.pad(vv, (0, 0, 0, block_mask.seq_lengths[1] - vv.shape[2]))
    o = flex_attention(q, kk, vv, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != kk.shape[1])
    return o[:, :, :T]
