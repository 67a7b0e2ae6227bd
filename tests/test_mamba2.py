"""Mamba2 / SSD: chunked == recurrent == step, cache continuation, gradients, parameter count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.mamba2 import Mamba2
from models.ops.ssd import ssd_chunked, ssd_recurrent, ssd_step
from tests.numerics import DTYPES, TOL, rel


def ssd_inputs(b, T, h, p, g, n, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    x = r(b, T, h, p)
    dt = F.softplus(r(b, T, h) - 1.0)
    # Mix slow and fast heads so that long-range (inter-chunk) terms matter.
    A = -torch.exp(torch.rand(h, generator=gen, dtype=dtype) * 4.0 - 3.0)
    B, C = r(b, T, g, n), r(b, T, g, n)
    D = r(h)
    s0 = r(b, h, p, n)
    return x, dt, A, B, C, D, s0


# ---- ops/ssd.py --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("g", [1, 2])
@pytest.mark.parametrize("with_init", [False, True])
@pytest.mark.parametrize("T", [1, 7, 37, 100])
@pytest.mark.parametrize("chunk", [8, 16, 32])
def test_chunked_matches_recurrent(chunk, T, with_init, g, dtype):
    seed = 1000 * chunk + 10 * T + 2 * g + int(with_init)
    x, dt, A, B, C, D, s0 = ssd_inputs(2, T, 4, 5, g, 6, dtype, seed)
    init = s0 if with_init else None
    y_ref, s_ref = ssd_recurrent(x, dt, A, B, C, D, initial_state=init)
    y, s = ssd_chunked(x, dt, A, B, C, D, initial_state=init, chunk_size=chunk)
    assert y.shape == x.shape and y.dtype == dtype
    assert s.shape == (2, 4, 5, 6) and s.dtype == torch.promote_types(dtype, torch.float32)
    assert rel(y, y_ref) <= TOL[dtype]
    assert rel(s, s_ref) <= TOL[dtype]


def test_chunked_state_differs_from_zero_init():
    # Guards the initial-state test above against a state that is silently ignored.
    x, dt, A, B, C, D, s0 = ssd_inputs(2, 20, 4, 5, 1, 6, torch.float64, 7)
    y0, _ = ssd_chunked(x, dt, A, B, C, D, chunk_size=8)
    y1, _ = ssd_chunked(x, dt, A, B, C, D, initial_state=s0, chunk_size=8)
    assert rel(y1, y0) > 1e-3


@pytest.mark.parametrize("g", [1, 2])
def test_chunked_gradients_match_recurrent(g):
    x, dt, A, B, C, D, s0 = ssd_inputs(2, 29, 4, 3, g, 5, torch.float64, 11 + g)
    leaves = [t.clone().requires_grad_() for t in (x, dt, A, B, C, D, s0)]
    w = torch.randn(2, 29, 4, 3, dtype=torch.float64)
    grads = []
    for fn, kw in ((ssd_recurrent, {}), (ssd_chunked, {"chunk_size": 8})):
        y, s = fn(*leaves[:6], initial_state=leaves[6], **kw)
        gs = torch.autograd.grad((y * w).sum() + s.pow(2).sum(), leaves)
        grads.append(gs)
    for ga, gb in zip(*grads):
        assert rel(gb, ga) <= 1e-8


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("g", [1, 2])
def test_step_matches_recurrent(g, dtype):
    x, dt, A, B, C, D, s0 = ssd_inputs(2, 13, 4, 5, g, 6, dtype, 21 + g)
    y_ref, s_ref = ssd_recurrent(x, dt, A, B, C, D, initial_state=s0)
    state = s0.to(torch.promote_types(dtype, torch.float32)).clone()
    ptr = state.data_ptr()
    ys = [ssd_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], state, D=D) for t in range(13)]
    assert state.data_ptr() == ptr
    assert rel(torch.stack(ys, 1), y_ref) <= TOL[dtype]
    assert rel(state, s_ref) <= TOL[dtype]


# ---- models/mamba2.py --------------------------------------------------------------------------------------


def make_model(dtype, n_groups=1, seed=0, chunk_size=8):
    torch.manual_seed(seed)
    m = Mamba2(
        32, expand=2, head_dim=16, d_state=8, n_groups=n_groups, chunk_size=chunk_size, backend="torch"
    )
    with torch.no_grad():  # non-trivial values for the parameters initialised to constants
        m.conv.bias.normal_(0, 0.1)
        m.D.normal_(1, 0.5)
        m.norm.weight.normal_(1, 0.2)
    return m.to(dtype)


def rand_x(b, T, dtype, seed):
    return torch.randn(b, T, 32, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_groups", [1, 2])
def test_forward_matches_reference(n_groups, dtype):
    m = make_model(dtype, n_groups, seed=1)
    x = rand_x(2, 37, dtype, 100 + n_groups)
    with torch.no_grad():
        y = m(x)
        y_ref = m.forward_reference(x)
    assert y.shape == x.shape and y.dtype == dtype
    assert m.last_backend == "torch"
    assert rel(y, y_ref) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_groups", [1, 2])
def test_step_matches_forward(n_groups, dtype):
    m = make_model(dtype, n_groups, seed=2)
    B, T = 2, 21
    x = rand_x(B, T, dtype, 200 + n_groups)
    with torch.no_grad():
        cache_f = m.init_cache(B, T, x.device, dtype)
        y_full = m(x, cache=cache_f, start=0)
        cache = m.init_cache(B, T, x.device, dtype)
        assert cache["ssm"].dtype == torch.promote_types(dtype, torch.float32)
        assert cache["conv"].shape == (B, m.conv_dim, m.conv_size - 1)
        ptrs = {k: v.data_ptr() for k, v in cache.items()}
        ys = [m.step(x[:, t], cache, torch.tensor(t)) for t in range(T)]
    assert {k: v.data_ptr() for k, v in cache.items()} == ptrs
    assert rel(torch.stack(ys, 1), y_full) <= TOL[dtype]
    assert rel(cache["ssm"], cache_f["ssm"]) <= TOL[dtype]
    assert rel(cache["conv"], cache_f["conv"]) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split", [2, 13, 20])
def test_prefix_then_continuation(split, dtype):
    m = make_model(dtype, n_groups=2, seed=3)
    B, T = 2, 37
    x = rand_x(B, T, dtype, 300 + split)
    with torch.no_grad():
        y_full = m(x)
        cache = m.init_cache(B, T, x.device, dtype)
        y1 = m(x[:, :split], cache=cache, start=0)
        y2 = m(x[:, split:], cache=cache, start=split)
        y_nocache = m(x[:, split:])
    y = torch.cat([y1, y2], 1)
    assert rel(y, y_full) <= TOL[dtype]
    assert rel(y_nocache, y_full[:, split:]) > 1e-3  # the carried state matters


def test_gradients_reach_every_parameter():
    m = make_model(torch.float32, n_groups=2, seed=4)
    x = rand_x(2, 19, torch.float32, 400)
    w = torch.randn(2, 19, 32, generator=torch.Generator().manual_seed(401))
    (m(x) * w).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name
        assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize(
    "d_model,expand,head_dim,d_state,conv_size,n_groups",
    [(32, 2, 16, 8, 4, 1), (64, 2, 32, 16, 4, 2), (48, 3, 24, 12, 3, 3)],
)
def test_parameter_count(d_model, expand, head_dim, d_state, conv_size, n_groups):
    m = Mamba2(
        d_model, expand=expand, head_dim=head_dim, d_state=d_state, conv_size=conv_size, n_groups=n_groups
    )
    d, di, GN = d_model, expand * d_model, n_groups * d_state
    nh = di // head_dim
    expected = d * (2 * di + 2 * GN + nh) + (di + 2 * GN) * conv_size + (di + 2 * GN) + 3 * nh + di + di * d
    assert sum(p.numel() for p in m.parameters()) == expected
    names = {n for n, _ in m.named_parameters()}
    assert {
        "in_proj.weight",
        "out_proj.weight",
        "dt_bias",
        "A_log",
        "D",
        "norm.weight",
        "conv.weight",
        "conv.bias",
    } == names


def test_init_matches_mamba_ssm_ranges():
    torch.manual_seed(5)
    m = Mamba2(64, expand=2, head_dim=4, d_state=8)  # 32 heads
    dt = F.softplus(m.dt_bias.detach())
    assert (dt >= 1e-3 * (1 - 1e-5)).all() and (dt <= 1e-1 * (1 + 1e-5)).all()
    A = torch.exp(m.A_log.detach())
    assert (A >= 1).all() and (A <= 16).all()
    assert torch.equal(m.D.detach(), torch.ones(32))


def test_backend_resolution_on_cpu():
    m = Mamba2(32, expand=2, head_dim=16, d_state=8, backend="auto")
    x = torch.randn(1, 5, 32)
    with torch.no_grad():
        m(x)
    assert m.last_backend == "torch"
    m.backend = "mamba_ssm"
    with pytest.raises(RuntimeError):
        m(x)
    with pytest.raises(ValueError):
        Mamba2(32, head_dim=16, d_state=8, backend="nope")


def test_grouped_gated_norm_is_per_group():
    # mamba_ssm normalises y * silu(z) over groups of d_inner // n_groups channels (RMSNormGated group_size).
    m = make_model(torch.float64, n_groups=2, seed=6)
    gen = torch.Generator().manual_seed(600)
    y, z = (
        torch.randn(3, 64, generator=gen, dtype=torch.float64),
        torch.randn(3, 64, generator=gen, dtype=torch.float64),
    )
    h = y * F.silu(z)
    parts = [hp / torch.sqrt(hp.pow(2).mean(-1, keepdim=True) + m.norm.eps) for hp in h.split(32, -1)]
    expected = torch.cat(parts, -1) * m.norm.weight
    assert m.norm.eps == 1e-5
    assert rel(m._gated_norm(y, z), expected) <= 1e-12
