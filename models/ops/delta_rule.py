"""Pure-torch (gated) delta rule in flash-linear-attention 0.6.0's conventions.

Shapes as `fla.ops.delta_rule.chunk_delta_rule` / `fla.ops.gated_delta_rule.chunk_gated_delta_rule`
(head_first=False): q, k (B, T, H, K), v (B, T, H, V), beta (B, T, H), g (B, T, H) log-space decay (or None),
state (B, H, K, V). scale defaults to 1/sqrt(K). q and k are taken as given (callers L2-normalise them).

The recurrence, per head (fla's naive_recurrent_gated_delta_rule; g = 0 gives the plain delta rule):
    S    <- exp(g_t) S_{t-1}
    u_t   = beta_t (v_t - S^T k_t)
    S_t   = S + k_t u_t^T
    o_t   = scale * S_t^T q_t

State math runs in at least float32 (`state_dtype`); float64 stays float64. Outputs come back in q's dtype,
final states in the state dtype.

    delta_rule_recurrent  token-by-token reference (differentiable Python loop).
    delta_rule_chunked    chunked WY / UT-transform form, intra-chunk work batched over all chunks, the
                          inter-chunk state recurrence a loop over chunks only; the CPU training path.
    delta_rule_step       one decode token, updating the state in place (static shapes, no host sync).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from models.base import state_dtype


def _compute_dtype(q: torch.Tensor, initial_state: torch.Tensor | None) -> torch.dtype:
    ct = state_dtype(q.dtype)
    if initial_state is not None:
        ct = torch.promote_types(ct, initial_state.dtype)
    return ct


def _check(q, k, v, beta, g, initial_state):
    B, T, H, K = q.shape
    assert k.shape == (B, T, H, K), f"k {tuple(k.shape)} != q {tuple(q.shape)}"
    assert v.dim() == 4 and v.shape[:3] == (B, T, H), f"v {tuple(v.shape)} must be (B, T, H, V)"
    assert beta.shape == (B, T, H), f"beta {tuple(beta.shape)} != {(B, T, H)}"
    assert g is None or g.shape == (B, T, H), f"g {tuple(g.shape)} != {(B, T, H)}"
    V = v.shape[3]
    assert initial_state is None or initial_state.shape == (B, H, K, V), (
        f"initial_state {tuple(initial_state.shape)} != {(B, H, K, V)}"
    )
    return B, T, H, K, V


def delta_rule_recurrent(q, k, v, beta, g=None, scale=None, initial_state=None):
    """Token-by-token reference. Returns (o (B, T, H, V) in q's dtype, final_state (B, H, K, V))."""
    B, T, H, K, V = _check(q, k, v, beta, g, initial_state)
    ct = _compute_dtype(q, initial_state)
    out_dtype = q.dtype
    scale = K**-0.5 if scale is None else scale
    q, k, v, beta = (t.to(ct) for t in (q, k, v, beta))
    if g is not None:
        g = g.to(ct)
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(ct)
    outs = []
    for t in range(T):
        if g is not None:
            S = S * g[:, t].exp()[..., None, None]
        k_t = k[:, t]
        u = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhkv,bhk->bhv", S, k_t))
        S = S + k_t.unsqueeze(-1) * u.unsqueeze(-2)
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]) * scale)
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(B, 0, H, V, dtype=ct)
    return o.to(out_dtype), S


def delta_rule_chunked(q, k, v, beta, g=None, scale=None, initial_state=None, chunk_size: int = 64):
    """Chunked WY/UT-transform form. Same function as `delta_rule_recurrent`.

    Within a chunk starting from state S0, with G_t = sum_{s<=t} g_s (chunk-local cumulative log decay) and
    D_ts = exp(G_t - G_s) for s <= t:
        u_t = beta_t (v_t - exp(G_t) S0^T k_t - sum_{s<t} D_ts (k_t . k_s) u_s)
    i.e. (I + A) U = diag(beta) V - diag(beta exp(G)) K S0 with A_ts = beta_t D_ts (k_t . k_s), s < t (the UT
    transform; one unit-lower-triangular solve gives U = U0 - W S0 for every chunk at once). Then
        O   = scale ((Q * exp(G)) S0 + (Q K^T * D, causal incl. diagonal) U)
        S_C = exp(G_C) S0 + (K * exp(G_C - G))^T U.
    Padding tokens (k = v = beta = g = 0) leave the state unchanged, so T need not divide chunk_size.
    """
    B, T, H, K, V = _check(q, k, v, beta, g, initial_state)
    ct = _compute_dtype(q, initial_state)
    out_dtype = q.dtype
    scale = K**-0.5 if scale is None else scale
    C = int(chunk_size)
    assert C >= 1
    if T == 0:
        S = q.new_zeros(B, H, K, V, dtype=ct) if initial_state is None else initial_state.to(ct)
        return v.new_zeros(B, 0, H, V, dtype=out_dtype), S
    N = -(-T // C)
    pad = N * C - T

    # (B, T, H, D) -> (N, B, H, C, D) in the compute dtype: chunk-major, so that each chunk's slice in the
    # inter-chunk loop is contiguous.
    def blocks(x):
        x = x.to(ct)
        if pad:
            x = F.pad(x, (0, 0, 0, 0, 0, pad))
        return x.view(B, N, C, H, x.shape[-1]).permute(1, 0, 3, 2, 4).contiguous()

    def blocks_s(x):  # (B, T, H) -> (N, B, H, C)
        x = x.to(ct)
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
        return x.view(B, N, C, H).permute(1, 0, 3, 2).contiguous()

    qc, kc, vc = blocks(q), blocks(k), blocks(v)
    bc = blocks_s(beta)[..., None]  # (N, B, H, C, 1)
    qc = qc * scale

    # A's diagonal and upper triangle are never read: solve_triangular(unitriangular=True) ignores them (and
    # projects A's gradient onto the strictly lower triangle), so only the causal scores need a mask.
    upper = torch.ones(C, C, dtype=torch.bool, device=q.device).triu(1)  # s > t

    kt = kc.transpose(-1, -2)
    kb = kc * bc
    A = kb @ kt  # beta_t (k_t . k_s), (N, B, H, C, C)
    Pm = qc @ kt  # scale (q_t . k_s)
    if g is not None:
        G = blocks_s(g).cumsum(-1)  # (N, B, H, C) chunk-local cumulative log decay
        D = (G[..., :, None] - G[..., None, :]).masked_fill(upper, -math.inf).exp()  # 0 above the diagonal
        A = A * D
        Pm = Pm * D
        gam = G.exp()[..., None]  # exp(G_t)
        rhs = torch.cat([vc * bc, kb * gam], dim=-1)
        Kt = (kc * (G[..., -1:] - G).exp()[..., None]).transpose(-1, -2)  # (k_s exp(G_C - G_s))^T
        last = G[..., -1].exp()[..., None, None]  # (N, B, H, 1, 1)
        qi = qc * gam
    else:
        Pm = Pm.masked_fill(upper, 0.0)
        rhs = torch.cat([vc * bc, kb], dim=-1)
        Kt, last, qi = kt, None, qc
    sol = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)  # (I + tril(A, -1))^-1 rhs
    U0, W = sol[..., :V], sol[..., V:]  # (N, B, H, C, V), (N, B, H, C, K)

    S = q.new_zeros(B, H, K, V, dtype=ct) if initial_state is None else initial_state.to(ct)
    # unbind (not indexing) so that the backward assembles each gradient with one stack, not N scatters.
    U0s, Ws, Kts = U0.unbind(0), W.unbind(0), Kt.unbind(0)
    lasts = [None] * N if last is None else last.unbind(0)
    states, Us = [], []
    for n in range(N):
        states.append(S)
        U = U0s[n] - Ws[n] @ S
        Us.append(U)
        S = (S if lasts[n] is None else S * lasts[n]) + Kts[n] @ U
    S0s = torch.stack(states)  # (N, B, H, K, V)
    Uall = torch.stack(Us)  # (N, B, H, C, V)
    o = qi @ S0s + Pm @ Uall  # (N, B, H, C, V)
    o = o.permute(1, 0, 3, 2, 4).reshape(B, N * C, H, V)[:, :T]
    return o.to(out_dtype), S


def delta_rule_step(q, k, v, beta, state, g=None, scale=None):
    """One token: q, k (B, H, K), v (B, H, V), beta (B, H), g (B, H) or None; state (B, H, K, V) is updated in
    place. Returns o (B, H, V) in q's dtype."""
    ct = state.dtype
    out_dtype = q.dtype
    K = q.shape[-1]
    scale = K**-0.5 if scale is None else scale
    q, k, v, beta = q.to(ct), k.to(ct), v.to(ct), beta.to(ct)
    S = state
    if g is not None:
        S = S * g.to(ct).exp()[..., None, None]
    u = beta[..., None] * (v - torch.einsum("bhkv,bhk->bhv", S, k))
    S = S + k.unsqueeze(-1) * u.unsqueeze(-2)
    o = torch.einsum("bhkv,bhk->bhv", S, q) * scale
    state.copy_(S)
    return o.to(out_dtype)
