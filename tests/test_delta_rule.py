"""(Gated) delta rule: chunked == recurrent == step, module forward == reference == step over a cache,
cache continuation, gradients, parameter counts."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.deltanet import DeltaNet, GatedDeltaNet
from models.ops.delta_rule import delta_rule_chunked, delta_rule_recurrent, delta_rule_step

from tests.numerics import DTYPES, TOL, rel


def dr_inputs(b, T, h, dk, dv, dtype, seed, gated):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    q = F.normalize(r(b, T, h, dk), dim=-1)
    k = F.normalize(r(b, T, h, dk), dim=-1)
    v = r(b, T, h, dv)
    beta = torch.rand(b, T, h, generator=gen, dtype=dtype)
    # Slow and fast decays, so that inter-chunk terms matter.
    g = F.logsigmoid(r(b, T, h) + torch.linspace(1.0, 5.0, h, dtype=dtype)) if gated else None
    s0 = r(b, h, dk, dv)
    return q, k, v, beta, g, s0


# ---- ops/delta_rule.py -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("with_init", [False, True])
@pytest.mark.parametrize("T", [1, 7, 37, 100])
@pytest.mark.parametrize("chunk", [8, 16, 32])
def test_chunked_matches_recurrent(chunk, T, with_init, gated, dtype):
    seed = 1000 * chunk + 10 * T + 2 * int(gated) + int(with_init)
    q, k, v, beta, g, s0 = dr_inputs(2, T, 3, 8, 5, dtype, seed, gated)
    init = s0 if with_init else None
    o_ref, s_ref = delta_rule_recurrent(q, k, v, beta, g, initial_state=init)
    o, s = delta_rule_chunked(q, k, v, beta, g, initial_state=init, chunk_size=chunk)
    assert o.shape == v.shape and o.dtype == dtype
    assert s.shape == (2, 3, 8, 5) and s.dtype == torch.promote_types(dtype, torch.float32)
    assert rel(o, o_ref) <= TOL[dtype]
    assert rel(s, s_ref) <= TOL[dtype]


@pytest.mark.parametrize("gated", [False, True])
def test_initial_state_and_scale_matter(gated):
    # Guards the tests above against an initial state or a scale that is silently ignored.
    q, k, v, beta, g, s0 = dr_inputs(2, 20, 3, 8, 5, torch.float64, 7, gated)
    o0, _ = delta_rule_chunked(q, k, v, beta, g, chunk_size=8)
    o1, _ = delta_rule_chunked(q, k, v, beta, g, initial_state=s0, chunk_size=8)
    o2, _ = delta_rule_chunked(q, k, v, beta, g, scale=1.0, chunk_size=8)
    assert rel(o1, o0) > 1e-3
    assert rel(o2, o0 * math.sqrt(8)) <= 1e-12


def test_recurrent_matches_definition():
    # The reference against an independent single-head transcription of fla's naive recurrence.
    q, k, v, beta, g, s0 = dr_inputs(1, 9, 1, 4, 3, torch.float64, 3, True)
    o, s = delta_rule_recurrent(q, k, v, beta, g, initial_state=s0)
    S = s0[0, 0].clone()
    for t in range(9):
        S = S * g[0, t, 0].exp()
        u = beta[0, t, 0] * (v[0, t, 0] - S.T @ k[0, t, 0])
        S = S + torch.outer(k[0, t, 0], u)
        assert rel(o[0, t, 0], S.T @ q[0, t, 0] / 2.0) <= 1e-12
    assert rel(s[0, 0], S) <= 1e-12


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gated", [False, True])
def test_step_matches_recurrent(gated, dtype):
    q, k, v, beta, g, s0 = dr_inputs(2, 11, 3, 8, 5, dtype, 11, gated)
    o_ref, s_ref = delta_rule_recurrent(q, k, v, beta, g, initial_state=s0)
    state = s0.to(torch.promote_types(dtype, torch.float32)).clone()
    ptr = state.data_ptr()
    outs = [delta_rule_step(q[:, t], k[:, t], v[:, t], beta[:, t], state, None if g is None else g[:, t])
            for t in range(11)]
    assert state.data_ptr() == ptr
    assert rel(torch.stack(outs, 1), o_ref) <= TOL[dtype]
    assert rel(state, s_ref) <= TOL[dtype]


@pytest.mark.parametrize("gated", [False, True])
def test_chunked_gradients_match_recurrent(gated):
    q, k, v, beta, g, s0 = dr_inputs(2, 23, 2, 6, 4, torch.float64, 5, gated)
    leaves = [t for t in (q, k, v, beta, g, s0) if t is not None]
    w = torch.randn(2, 23, 2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = []
    for fn, kw in ((delta_rule_recurrent, {}), (delta_rule_chunked, {"chunk_size": 8})):
        xs = [t.clone().requires_grad_() for t in leaves]
        qq, kk, vv, bb = xs[:4]
        gg = xs[4] if gated else None
        o, s = fn(qq, kk, vv, bb, gg, initial_state=xs[-1], **kw)
        ((o * w).sum() + s.square().sum()).backward()
        grads.append([x.grad for x in xs])
    for a, b in zip(*grads):
        assert rel(b, a) <= 1e-8


# ---- models/deltanet.py ----------------------------------------------------------------------------------------

CLASSES = [DeltaNet, GatedDeltaNet]
D_MODEL, H, HD, CONV = 32, 2, 16, 4


def make(cls, dtype, seed=0, chunk_size=16):
    torch.manual_seed(seed)
    m = cls(D_MODEL, H, HD, conv_size=CONV, chunk_size=chunk_size, backend="auto")
    if cls is GatedDeltaNet:
        with torch.no_grad():  # one slow-decay head, so that long-range terms matter in the tests
            m.A_log.copy_(torch.log(torch.tensor([0.05, 2.0])))
    with torch.no_grad():  # non-trivial norm weights
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.3 * torch.randn_like(p))
    return m.to(dtype)


def xs(b, T, dtype, seed):
    return torch.randn(b, T, D_MODEL, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cls", CLASSES)
def test_module_forward_matches_reference(cls, dtype):
    m = make(cls, dtype)
    x = xs(2, 37, dtype, 1)
    y = m(x)
    assert m.last_backend == "torch"
    assert y.shape == x.shape and y.dtype == dtype
    assert rel(y, m.forward_reference(x)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cls", CLASSES)
def test_module_step_matches_forward(cls, dtype):
    m = make(cls, dtype, seed=1)
    x = xs(2, 21, dtype, 2)
    y = m(x)
    cache = m.init_cache(2, 32, x.device, dtype)
    assert cache["state"].shape == (2, H, HD, HD)
    assert cache["state"].dtype == torch.promote_types(dtype, torch.float32)
    assert cache["q_conv"].shape == (2, H * HD, CONV - 1)
    ptrs = {k: t.data_ptr() for k, t in cache.items()}
    ys = [m.step(x[:, t], cache, torch.tensor(t)) for t in range(21)]
    assert {k: t.data_ptr() for k, t in cache.items()} == ptrs
    assert rel(torch.stack(ys, 1), y) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cls", CLASSES)
def test_module_cache_continuation(cls, dtype):
    m = make(cls, dtype, seed=2)
    x = xs(2, 45, dtype, 3)
    Tp = 19
    y_full = m(x)
    # prefix with a cache, then the rest in parallel form
    cache = m.init_cache(2, 64, x.device, dtype)
    y1 = m(x[:, :Tp], cache, start=0)
    assert cache["state"].abs().sum() > 0
    y2 = m(x[:, Tp:], cache, start=Tp)
    assert rel(torch.cat([y1, y2], 1), y_full) <= TOL[dtype]
    # prefix with a cache, then the rest by steps
    cache = m.init_cache(2, 64, x.device, dtype)
    y1 = m(x[:, :Tp], cache)
    ys = [m.step(x[:, t], cache, torch.tensor(t)) for t in range(Tp, 45)]
    assert rel(torch.cat([y1, torch.stack(ys, 1)], 1), y_full) <= TOL[dtype]
    # guard: the continuation without the prefix's state is different
    y_cold = m(x[:, Tp:])
    assert rel(y_cold, y_full[:, Tp:]) > 1e-3


@pytest.mark.parametrize("cls", CLASSES)
def test_module_gradients_reach_every_parameter(cls):
    m = make(cls, torch.float32, seed=3)
    x = xs(2, 24, torch.float32, 4)
    m(x).square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("cls", CLASSES)
def test_module_gradients_match_reference(cls):
    m = make(cls, torch.float64, seed=4)
    x = xs(2, 19, torch.float64, 5)
    grads = []
    for fwd in (m.forward, m.forward_reference):
        m.zero_grad()
        fwd(x).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for n in grads[0]:
        assert rel(grads[0][n], grads[1][n]) <= 1e-8, n


@pytest.mark.parametrize("d,h,hd,cs", [(32, 2, 16, 4), (48, 3, 8, 3), (64, 4, 32, 2)])
def test_parameter_counts(d, h, hd, cs):
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(DeltaNet(d, h, hd, conv_size=cs)) == 4 * d * h * hd + d * h + 3 * h * hd * cs + hd
    assert n(GatedDeltaNet(d, h, hd, conv_size=cs)) == 5 * d * h * hd + 2 * d * h + 2 * h + 3 * h * hd * cs + hd


def test_parameter_names():
    names = {n for n, _ in GatedDeltaNet(32, 2, 16).named_parameters()}
    for p in ("q_proj", "k_proj", "v_proj", "a_proj", "b_proj", "g_proj", "o_proj"):
        assert f"{p}.weight" in names
    assert {"A_log", "dt_bias", "o_norm.weight"} <= names
    names = {n for n, _ in DeltaNet(32, 2, 16).named_parameters()}
    assert {"q_proj.weight", "k_proj.weight", "v_proj.weight", "b_proj.weight", "o_proj.weight",
            "o_norm.weight", "q_conv.weight", "k_conv.weight", "v_conv.weight"} == names


def test_gated_decay_convention():
    # g = -exp(A_log) * softplus(a_proj(x) + dt_bias), log space (fla's GatedDeltaNet gate)
    m = make(GatedDeltaNet, torch.float64, seed=5)
    x = xs(2, 5, torch.float64, 6)
    _, g = m._beta_g(x)
    expect = -m.A_log.exp() * F.softplus(x @ m.a_proj.weight.T + m.dt_bias)
    assert rel(g, expect) <= 1e-12 and (g < 0).all()


@pytest.mark.parametrize("cls", CLASSES)
def test_backend_selection_on_cpu(cls):
    m = make(cls, torch.float32)
    x = xs(1, 5, torch.float32, 7)
    m(x)
    assert m.last_backend == "torch"
    m.backend = "fla"
    with pytest.raises(RuntimeError):
        m(x)
    with pytest.raises(ValueError):
        cls(D_MODEL, H, HD, backend="triton")


def test_output_norm_conventions():
    # fla's FusedRMSNormGated (norm, then gate): rmsnorm(o) * weight * silu(gate); fla's l2norm eps 1e-6.
    from models.common import GatedRMSNorm
    from models.deltanet import l2norm
    gen = torch.Generator().manual_seed(8)
    o, gate = torch.randn(3, 4, 16, generator=gen, dtype=torch.float64), torch.randn(3, 4, 16, generator=gen,
                                                                                      dtype=torch.float64)
    norm = GatedRMSNorm(16, eps=1e-5, norm_before_gate=True).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16, generator=gen, dtype=torch.float64))
    expect = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight * gate * torch.sigmoid(gate)
    assert rel(norm(o, gate), expect) <= 1e-12
    assert rel(l2norm(o), o / torch.sqrt(o.pow(2).sum(-1, keepdim=True) + 1e-6)) <= 1e-12
