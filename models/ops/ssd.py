"""Pure-torch state space duality (SSD, Mamba2) in mamba_ssm 2.3.2's conventions.

Shapes as `mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined`:
    x (b, l, h, p), dt (b, l, h) (already softplus'ed and biased), A (h,) (negative), B, C (b, l, g, n),
    D (h,), state (b, h, p, n). Head i reads group i // (h // g).
The recurrence, per head:  S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T ;  y_t = S_t C_t + D x_t.

State math runs in at least float32 (`state_dtype`); float64 stays float64. Outputs are returned in x's dtype,
final states in the state dtype.

    ssd_recurrent  token-by-token reference (differentiable Python loop).
    ssd_chunked    the chunked SSD algorithm (`ssd_minimal_discrete`), vectorised over chunks; the CPU path.
    ssd_step       one decode token, updating the state in place (static shapes, no host sync).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.base import state_dtype


def _compute_dtype(x: torch.Tensor, initial_state: torch.Tensor | None) -> torch.dtype:
    ct = state_dtype(x.dtype)
    if initial_state is not None:
        ct = torch.promote_types(ct, initial_state.dtype)
    return ct


def _check_shapes(x, dt, A, B, C):
    b, l, h, p = x.shape
    assert dt.shape == (b, l, h), f"dt {tuple(dt.shape)} != {(b, l, h)}"
    assert A.shape == (h,), f"A {tuple(A.shape)} != {(h,)}"
    assert B.dim() == 4 and B.shape[:2] == (b, l) and C.shape == B.shape, "B, C must be (b, l, g, n)"
    g = B.shape[2]
    assert h % g == 0, f"nheads {h} not divisible by ngroups {g}"
    return b, l, h, p, g, B.shape[3]


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """Stable segment sum: out[..., i, j] = a[..., j+1] + ... + a[..., i] for i >= j, -inf above the
    diagonal."""
    T = a.size(-1)
    strict = torch.ones(T, T, device=a.device, dtype=torch.bool).tril(-1)
    seg = a.unsqueeze(-1).expand(*a.shape, T).masked_fill(~strict, 0).cumsum(-2)
    causal = torch.ones(T, T, device=a.device, dtype=torch.bool).tril()
    return seg.masked_fill(~causal, float("-inf"))


def ssd_recurrent(x, dt, A, B, C, D=None, initial_state=None):
    """Naive token-by-token SSD. Returns (y (b, l, h, p) in x.dtype, final_state (b, h, p, n))."""
    b, l, h, p, g, n = _check_shapes(x, dt, A, B, C)
    ct = _compute_dtype(x, initial_state)
    r = h // g
    x_, dt_ = x.to(ct), dt.to(ct)
    Bh = B.to(ct).repeat_interleave(r, dim=2)  # (b, l, h, n)
    Ch = C.to(ct).repeat_interleave(r, dim=2)
    dA = torch.exp(dt_ * A.to(ct))  # (b, l, h)
    xdt = x_ * dt_.unsqueeze(-1)  # (b, l, h, p)
    if initial_state is None:
        state = x_.new_zeros(b, h, p, n)
    else:
        state = initial_state.to(ct)
    ys = []
    for t in range(l):
        state = state * dA[:, t, :, None, None] + xdt[:, t, :, :, None] * Bh[:, t, :, None, :]
        ys.append(torch.matmul(state, Ch[:, t, :, :, None]).squeeze(-1))  # (b, h, p)
    y = torch.stack(ys, dim=1) if ys else x_.new_zeros(b, 0, h, p)
    if D is not None:
        y = y + x_ * D.to(ct)[:, None]
    return y.to(x.dtype), state


def ssd_chunked(x, dt, A, B, C, D=None, initial_state=None, chunk_size: int = 64):
    """Chunked SSD (Mamba2 paper, Listing 1), vectorised over chunks.

    Lengths not divisible by the chunk size are zero-padded (dt = 0 leaves the state unchanged) and trimmed.
    Returns (y (b, l, h, p) in x.dtype, final_state (b, h, p, n) in the state dtype).
    """
    b, l, h, p, g, n = _check_shapes(x, dt, A, B, C)
    ct = _compute_dtype(x, initial_state)
    r = h // g
    if l == 0:
        init = x.new_zeros(b, h, p, n, dtype=ct) if initial_state is None else initial_state.to(ct)
        return x.new_zeros(b, 0, h, p), init
    Q = max(1, min(int(chunk_size), l))
    pad = (-l) % Q
    x_, dt_, B_, C_ = x.to(ct), dt.to(ct), B.to(ct), C.to(ct)
    xdt = x_ * dt_.unsqueeze(-1)
    dA = dt_ * A.to(ct)
    if pad:
        xdt = F.pad(xdt, (0, 0, 0, 0, 0, pad))
        dA = F.pad(dA, (0, 0, 0, pad))
        B_ = F.pad(B_, (0, 0, 0, 0, 0, pad))
        C_ = F.pad(C_, (0, 0, 0, 0, 0, pad))
    L = l + pad
    c = L // Q

    # Chunked layouts; heads split as (g, r) so that head g*r + j reads group g.
    xdt = xdt.view(b, c, Q, g, r, p).permute(0, 1, 3, 4, 2, 5)  # (b, c, g, r, Q, p)
    Acs = dA.view(b, c, Q, h).transpose(2, 3).cumsum(-1)  # (b, c, h, Q)
    Bc = B_.view(b, c, Q, g, n).transpose(2, 3)  # (b, c, g, Q, n)
    Cc = C_.view(b, c, Q, g, n).transpose(2, 3)

    # 1. Intra-chunk (diagonal blocks): y_l = sum_{s<=l} C_l.B_s exp(Acs_l - Acs_s) xdt_s.
    CB = torch.matmul(Cc, Bc.transpose(-1, -2))  # (b, c, g, Q, Q)
    causal = torch.ones(Q, Q, device=x.device, dtype=torch.bool).tril()
    decay = torch.exp((Acs.unsqueeze(-1) - Acs.unsqueeze(-2)).masked_fill(~causal, float("-inf")))
    M = CB.unsqueeze(3) * decay.view(b, c, g, r, Q, Q)  # (b, c, g, r, Q, Q)
    Y = torch.matmul(M, xdt)  # (b, c, g, r, Q, p)

    # 2. Each chunk's own contribution to the state at its end.
    decay_states = torch.exp(Acs[..., -1:] - Acs).view(b, c, g, r, Q, 1)
    states = torch.matmul((xdt * decay_states).transpose(-1, -2), Bc.unsqueeze(3))  # (b, c, g, r, p, n)
    states = states.reshape(b, c, h, p * n)

    # 3. Inter-chunk recurrence over the chunk boundaries (with the initial state as chunk "-1").
    if initial_state is None:
        init = states.new_zeros(b, 1, h, p * n)
    else:
        assert initial_state.shape == (b, h, p, n), f"initial_state {tuple(initial_state.shape)}"
        init = initial_state.to(ct).reshape(b, 1, h, p * n)
    states = torch.cat([init, states], dim=1).transpose(1, 2)  # (b, h, c+1, p*n)
    decay_chunk = torch.exp(_segsum(F.pad(Acs[..., -1].transpose(1, 2), (1, 0))))  # (b, h, c+1, c+1)
    new_states = torch.matmul(decay_chunk, states)  # (b, h, c+1, p*n)
    final_state = new_states[:, :, -1].reshape(b, h, p, n)
    prev = new_states[:, :, :-1].reshape(b, h, c, p, n).transpose(1, 2)  # state entering each chunk

    # 4. State -> output within each chunk.
    prev = prev.reshape(b, c, g, r, p, n)
    Y_off = torch.matmul(Cc.unsqueeze(3), prev.transpose(-1, -2))  # (b, c, g, r, Q, p)
    Y = Y + Y_off * torch.exp(Acs).view(b, c, g, r, Q, 1)

    y = Y.permute(0, 1, 4, 2, 3, 5).reshape(b, L, h, p)[:, :l]
    if D is not None:
        y = y + x_ * D.to(ct)[:, None]
    return y.to(x.dtype), final_state


def ssd_step(x, dt, A, B, C, state, D=None):
    """One token. x (b, h, p), dt (b, h), B, C (b, g, n); `state` (b, h, p, n) is updated in place.
    Returns y (b, h, p) in x.dtype."""
    b, h, p = x.shape
    g = B.shape[1]
    r = h // g
    ct = state.dtype
    x_, dt_ = x.to(ct), dt.to(ct)
    Bh = B.to(ct).repeat_interleave(r, dim=1)  # (b, h, n)
    Ch = C.to(ct).repeat_interleave(r, dim=1)
    dA = torch.exp(dt_ * A.to(ct))  # (b, h)
    new = state * dA[..., None, None] + (x_ * dt_.unsqueeze(-1)).unsqueeze(-1) * Bh.unsqueeze(2)
    state.copy_(new)
    y = torch.matmul(new, Ch.unsqueeze(-1)).squeeze(-1)
    if D is not None:
        y = y + x_ * D.to(ct)[:, None]
    return y.to(x.dtype)
