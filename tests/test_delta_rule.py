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


# ---- ops/delta_rule.py -------------------------------------------------------------------------------------


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
    outs = [
        delta_rule_step(q[:, t], k[:, t], v[:, t], beta[:, t], state, None if g is None else g[:, t])
        for t in range(11)
    ]
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


# ---- models/deltanet.py ------------------------------------------------------------------------------------

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
    assert (
        n(GatedDeltaNet(d, h, hd, conv_size=cs)) == 5 * d * h * hd + 2 * d * h + 2 * h + 3 * h * hd * cs + hd
    )


def test_parameter_names():
    names = {n for n, _ in GatedDeltaNet(32, 2, 16).named_parameters()}
    for p in ("q_proj", "k_proj", "v_proj", "a_proj", "b_proj", "g_proj", "o_proj"):
        assert f"{p}.weight" in names
    assert {"A_log", "dt_bias", "o_norm.weight"} <= names
    names = {n for n, _ in DeltaNet(32, 2, 16).named_parameters()}
    assert {
        "q_proj.weight",
        "k_proj.weight",
        "v_proj.weight",
        "b_proj.weight",
        "o_proj.weight",
        "o_norm.weight",
        "q_conv.weight",
        "k_conv.weight",
        "v_conv.weight",
    } == names


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
    o, gate = (
        torch.randn(3, 4, 16, generator=gen, dtype=torch.float64),
        torch.randn(3, 4, 16, generator=gen, dtype=torch.float64),
    )
    norm = GatedRMSNorm(16, eps=1e-5, norm_before_gate=True).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16, generator=gen, dtype=torch.float64))
    expect = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight * gate * torch.sigmoid(gate)
    assert rel(norm(o, gate), expect) <= 1e-12
    assert rel(l2norm(o), o / torch.sqrt(o.pow(2).sum(-1, keepdim=True) + 1e-6)) <= 1e-12


# ---- the decode step: fused projections, joint convs, the fla kernel path ----------------------------------


def _steps(m, x, cache, start=0):
    return torch.stack([m.step(x[:, t], cache, torch.tensor(start + t)) for t in range(x.shape[1])], 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cls", CLASSES)
def test_step_without_grad_matches_forward(cls, dtype):
    """Autograd off (decode): one GEMM on the cached concatenated input weights and the three short convs as
    one (on the joint conv buffer of `init_cache`) == the parallel forward == the step with autograd on."""
    from models.deltanet import joint_conv_state

    m = make(cls, dtype, seed=11)
    x = xs(2, 23, dtype, 12)
    y = m(x)
    cache = m.init_cache(2, 32, x.device, dtype)
    joint = joint_conv_state(cache)
    assert joint is not None and joint.shape == (2, 3 * H * HD, CONV - 1)
    with torch.no_grad():
        ys = _steps(m, x, cache)
    # The fused input and conv weights are views of the weights (one storage each group), not copies.
    assert m.last_backend == "torch" and not getattr(m, "_cat_cache", None)
    for group in m.decode_weight_groups():
        assert len({w.untyped_storage().data_ptr() for w in group}) == 1
    assert rel(ys, y) <= TOL[dtype]
    # separate conv-state tensors (a cache not made by init_cache): the convs run one by one, same result
    cache = {k: v.clone() for k, v in m.init_cache(2, 32, x.device, dtype).items()}
    assert joint_conv_state(cache) is None
    with torch.inference_mode():
        ys2 = _steps(m, x, cache)
    assert rel(ys2, y) <= TOL[dtype]
    # a prefix by the parallel form into the joint buffer, the rest by decode steps
    cache = m.init_cache(2, 32, x.device, dtype)
    with torch.no_grad():
        y1 = m(x[:, :9], cache)
        ys3 = _steps(m, x[:, 9:], cache, start=9)
    assert joint_conv_state(cache) is not None
    assert rel(torch.cat([y1, ys3], 1), y) <= TOL[dtype]


def test_cache_bytes_unchanged_by_the_joint_conv_buffer():
    m = make(DeltaNet, torch.float32)
    cache = m.init_cache(3, 16, "cpu", torch.float32)
    nbytes = sum(t.numel() * t.element_size() for t in cache.values())
    assert nbytes == (3 * 3 * H * HD * (CONV - 1) + 3 * H * HD * HD) * 4


def fake_fused_recurrent_gated_delta_rule(
    q,
    k,
    v,
    g=None,
    gk=None,
    gv=None,
    beta=None,
    scale=None,
    initial_state=None,
    output_final_state=False,
    use_qk_l2norm_in_kernel=False,
    use_gate_in_kernel=False,
    A_log=None,
    dt_bias=None,
    use_beta_sigmoid_in_kernel=False,
    allow_neg_eigval=False,
    state_v_first=False,
    cu_seqlens=None,
):
    """fla 0.6.0's fused_recurrent_gated_delta_rule forward, transcribed from its Triton kernel into torch
    (float32 math; q, k (B, T, H, K), v (B, T, H, V), g and beta (B, T, H), state (B, H, K, V)): the CPU tests
    check that the module hands the kernel the right arguments."""
    assert gk is None and gv is None and cu_seqlens is None and not allow_neg_eigval and not state_v_first
    assert q.dim() == 4 and beta.shape == q.shape[:3] and initial_state.dtype == torch.float32
    h = initial_state.float().clone()
    outs = []
    for t in range(q.shape[1]):
        bq, bk, bv = q[:, t].float(), k[:, t].float(), v[:, t].float()
        if use_qk_l2norm_in_kernel:
            bq = bq / torch.sqrt((bq * bq).sum(-1, keepdim=True) + 1e-6)
            bk = bk / torch.sqrt((bk * bk).sum(-1, keepdim=True) + 1e-6)
        bq = bq * scale
        b = beta[:, t].float()
        if use_beta_sigmoid_in_kernel:
            b = torch.sigmoid(b)
        if g is not None:
            bg = g[:, t].float()
            if use_gate_in_kernel:
                if dt_bias is not None:
                    bg = bg + dt_bias.float()
                bg = -torch.exp(A_log.float()) * F.softplus(bg)
            h = h * torch.exp(bg)[..., None, None]
        bv = b[..., None] * (bv - torch.einsum("bhkv,bhk->bhv", h, bk))
        h = h + bk[..., :, None] * bv[..., None, :]
        outs.append(torch.einsum("bhkv,bhk->bhv", h, bq).to(v.dtype))
    return torch.stack(outs, 1), (h if output_final_state else None)


@pytest.mark.parametrize("cls", CLASSES)
def test_fla_step_arguments_on_cpu(cls, monkeypatch):
    """The fla decode path's plumbing, on CPU: with a torch transcription of the kernel in its place, the
    decode steps equal the torch steps (and the parallel forward), and the state is carried in place."""
    dtype = torch.float32
    m = make(cls, dtype, seed=13)
    calls = []

    def kernel(**kw):
        calls.append(kw)
        return fake_fused_recurrent_gated_delta_rule(**kw)

    monkeypatch.setattr(m, "_step_kernel", lambda x, cache: None if torch.is_grad_enabled() else kernel)
    x = xs(2, 21, dtype, 14)
    y = m(x)
    cache = m.init_cache(2, 32, x.device, dtype)
    state_ptr = cache["state"].data_ptr()
    with torch.no_grad():
        ys = _steps(m, x, cache)
    assert m.last_backend == "fla" and len(calls) == 21 and cache["state"].data_ptr() == state_ptr
    assert (
        calls[0].get("use_gate_in_kernel", False) is cls.gated
        and (calls[0].get("g") is not None) is cls.gated
    )
    assert rel(ys, y) <= TOL[dtype]
    cache_t = m.init_cache(2, 32, x.device, dtype)
    ys_t = _steps(m, x, cache_t)  # autograd on: the torch step
    assert m.last_backend == "torch"
    assert rel(ys, ys_t) <= TOL[dtype] and rel(cache["state"], cache_t["state"]) <= TOL[dtype]


@pytest.mark.parametrize("cls", CLASSES)
def test_fla_step_failure_falls_back_to_torch(cls, monkeypatch, caplog):
    import models.deltanet as dn

    monkeypatch.setattr(dn, "_fla_step_failed", False)
    m = make(cls, torch.float32, seed=15)

    def broken(**kw):
        raise RuntimeError("triton says no")

    monkeypatch.setattr(m, "_step_kernel", lambda x, cache: None if dn._fla_step_failed else broken)
    x = xs(1, 6, torch.float32, 16)
    y = m(x)
    cache = m.init_cache(1, 8, x.device, torch.float32)
    with torch.no_grad(), caplog.at_level("WARNING", logger="hybridnas.deltanet"):
        ys = _steps(m, x, cache)
    assert dn._fla_step_failed and m.last_backend == "torch"
    assert "triton says no" in caplog.text
    assert rel(ys, y) <= TOL[torch.float32]


def _fla_step_ready():
    if not torch.cuda.is_available():
        return False
    from models import kernels

    return kernels.fla_recurrent_step() is not None


@pytest.mark.skipif(not _fla_step_ready(), reason="needs CUDA and fla's fused recurrent kernel")
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-3), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("cls", CLASSES)
def test_fla_step_matches_torch_step_cuda(cls, dtype, tol, batch):
    """GPU: the fla decode step (one fused recurrent kernel) == the torch step (backend='torch', same
    weights), outputs and state, over 24 steps from the state of a 37-token prefill (torch path: no
    chunk-kernel autotuning); and the same steps replayed from one CUDA graph."""
    import copy

    torch.manual_seed(17)
    d, h, hd = 256, 4, 64
    m = cls(d, h, hd, conv_size=CONV, backend="auto").to("cuda", dtype).eval()
    ref = copy.deepcopy(m)
    ref.backend = "torch"
    x = torch.randn(batch, 61, d, device="cuda", dtype=torch.float32).to(dtype)
    outs = {}
    with torch.no_grad():
        cache0 = ref.init_cache(batch, 64, "cuda", dtype)
        ref(x[:, :37], cache0)

        def fresh(mod):
            cache = mod.init_cache(batch, 64, "cuda", dtype)  # the joint conv buffer, filled in place
            for key, t in cache.items():
                t.copy_(cache0[key])
            return cache

        for name, mod in (("fla", m), ("torch", ref)):
            cache = fresh(mod)
            ys = _steps(mod, x[:, 37:], cache, start=37)
            outs[name] = (ys, cache["state"].clone(), mod.last_backend)
        assert outs["fla"][2] == "fla" and outs["torch"][2] == "torch"
        assert rel(outs["fla"][0], outs["torch"][0]) <= tol
        assert rel(outs["fla"][1], outs["torch"][1]) <= tol
        # one CUDA graph of a step (warmed up first), replayed: the same as the eager fla steps
        cache = fresh(m)
        tok = x[:, 37].clone()
        pos = torch.tensor(37, device="cuda")
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                m.step(tok, cache, pos)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = m.step(tok, cache, pos)
        for key, t in cache.items():
            t.copy_(cache0[key])
        ys = []
        for t in range(37, 61):
            tok.copy_(x[:, t])
            graph.replay()
            ys.append(out.clone())
        torch.cuda.synchronize()
        assert rel(torch.stack(ys, 1), outs["fla"][0]) <= 1e-6
