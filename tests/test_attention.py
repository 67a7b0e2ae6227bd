"""Attention (full / sliding-window with sinks, GQA, RoPE) and SwiGLU: parallel form vs naive dense reference,
vs token-by-token decode, chunked prefill from a cache, gradients, parameter counts."""

from __future__ import annotations

import pytest
import torch

from models.attention import Attention
from models.ffn import SwiGLU
from models.ops.swa import blocked_swa, swa_reference

D, H, HKV, HD = 32, 4, 2, 8
TOL = {torch.float64: 1e-8, torch.float32: 2e-3}

# (window, n_sink): full attention and SWA with several windows, with and without meta-token sinks
CONFIGS = [(None, 0), (4, 0), (4, 3), (16, 0), (16, 3), (1, 2)]
IDS = [f"W{w}-s{s}" for w, s in CONFIGS]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make(window, n_sink, dtype, seed=0, backend="auto"):
    torch.manual_seed(seed)
    m = Attention(D, H, HKV, HD, window=window, n_sink=n_sink, backend=backend).to(dtype)
    # larger q/k weights than the default init make the softmax peaked, so masking errors are not averaged
    # away
    with torch.no_grad():
        m.q_proj.weight.mul_(3.0)
        m.k_proj.weight.mul_(3.0)
    return m


def rand_x(B, T, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, D, generator=g, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("window,n_sink", CONFIGS, ids=IDS)
def test_forward_matches_reference(window, n_sink, dtype):
    m = make(window, n_sink, dtype, seed=1)
    for i, T in enumerate((1, 7, 37, 50)):
        x = rand_x(2, T, dtype, seed=100 + i)
        y = m(x)
        expected_backend = "sdpa" if window is None else "blocked"
        assert m.last_backend == expected_backend
        ref = m.forward_reference(x)
        assert y.shape == x.shape and y.dtype == dtype
        assert rel_err(y, ref) <= TOL[dtype], (T, rel_err(y, ref))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("window,n_sink", CONFIGS, ids=IDS)
def test_forward_matches_step(window, n_sink, dtype):
    m = make(window, n_sink, dtype, seed=2)
    B, T = 2, 45  # >> W: the ring buffer wraps many times
    x = rand_x(B, T, dtype, seed=7)
    y = m(x)
    cache = m.init_cache(B, T + 3, x.device, dtype)
    if window is not None:
        assert cache["k"].shape == (B, HKV, n_sink + window, HD)
        assert cache["pos"].dtype == torch.long and (cache["pos"] == -1).all()
    else:
        assert cache["k"].shape == (B, HKV, T + 3, HD)
    outs = [m.step(x[:, t], cache, torch.tensor(t)) for t in range(T)]
    ys = torch.stack(outs, 1)
    assert rel_err(ys, y) <= TOL[dtype], rel_err(ys, y)
    # per-token too: an early-token error must not hide in the norm of the whole sequence
    for t in (0, 1, n_sink, T - 1):
        assert rel_err(ys[:, t], y[:, t]) <= 10 * TOL[dtype]


@pytest.mark.parametrize("window,n_sink", CONFIGS, ids=IDS)
@pytest.mark.parametrize("split", [(2,), (5,), (23,), (3, 9, 20), (1, 1 + 17)])
def test_initial_state(window, n_sink, split):
    """Chunked prefill through a cache (start > 0), then decode steps == one forward over everything."""
    dtype = torch.float64
    m = make(window, n_sink, dtype, seed=3)
    B, T, n_steps = 2, 40, 4
    x = rand_x(B, T + n_steps, dtype, seed=11)
    full = m(x)
    cache = m.init_cache(B, T + n_steps + 9, x.device, dtype)
    bounds = (0, *split, T)
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        outs.append(m(x[:, a:b], cache, start=a))
    for t in range(T, T + n_steps):
        outs.append(m.step(x[:, t], cache, torch.tensor(t)).unsqueeze(1))
    y = torch.cat(outs, 1)
    assert rel_err(y, full) <= TOL[dtype], rel_err(y, full)
    # and continuing with another chunk after the steps
    x2 = rand_x(B, 9, dtype, seed=12)
    xx = torch.cat([x, x2], 1)
    y2 = m(x2, cache, start=T + n_steps)
    assert rel_err(y2, m(xx)[:, T + n_steps :]) <= TOL[dtype]


@pytest.mark.parametrize("window,n_sink", [(4, 3), (16, 0), (None, 0)], ids=["W4-s3", "W16-s0", "full"])
def test_float32_cache_float32(window, n_sink):
    dtype = torch.float32
    m = make(window, n_sink, dtype, seed=4)
    x = rand_x(1, 30, dtype, seed=5)
    full = m(x)
    cache = m.init_cache(1, 30, x.device, dtype)
    y = torch.cat([m(x[:, :13], cache), m(x[:, 13:], cache, start=13)], 1)
    assert rel_err(y, full) <= TOL[dtype]


@pytest.mark.parametrize("window,n_sink", CONFIGS, ids=IDS)
def test_gradients_reach_every_parameter(window, n_sink):
    m = make(window, n_sink, torch.float64, seed=5)
    x = rand_x(2, 19, torch.float64, seed=6).requires_grad_(True)
    y = m(x)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
    (y * w).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # and they equal the dense reference's
    g_fast = {n: p.grad.clone() for n, p in m.named_parameters()}
    gx_fast = x.grad.clone()
    m.zero_grad()
    x.grad = None
    (m.forward_reference(x) * w).sum().backward()
    for n, p in m.named_parameters():
        assert rel_err(g_fast[n], p.grad) <= 1e-8, n
    assert rel_err(gx_fast, x.grad) <= 1e-8


@pytest.mark.parametrize("d,h,hkv,hd", [(32, 4, 2, 8), (48, 6, 1, 16), (64, 2, 2, 32)])
def test_param_counts(d, h, hkv, hd):
    for window in (None, 8):
        m = Attention(d, h, hkv, hd, window=window, n_sink=2)
        n = sum(p.numel() for p in m.parameters())
        assert n == d * hd * (2 * h + 2 * hkv) == Attention.param_count(d, h, hkv, hd)
        assert all(mod.bias is None for mod in (m.q_proj, m.k_proj, m.v_proj, m.o_proj))
    ffn = SwiGLU(d, 3 * d)
    assert sum(p.numel() for p in ffn.parameters()) == 3 * d * 3 * d == SwiGLU.param_count(d, 3 * d)


def test_rejects_bad_gqa():
    with pytest.raises(ValueError):
        Attention(32, 4, 3, 8)


def test_rope_is_used():
    """RoPE changes the output (T > 1) and depends on relative positions only (shifting `start` without a
    cache leaves the output unchanged)."""
    torch.manual_seed(0)
    x = rand_x(1, 6, torch.float64, seed=9)
    m = Attention(D, H, HKV, HD, rope=True).double()
    m2 = Attention(D, H, HKV, HD, rope=False).double()
    m2.load_state_dict(m.state_dict())
    y, y2 = m(x), m2(x)
    assert rel_err(y[:, 0], y2[:, 0]) < 1e-12  # the first token sees only itself
    assert rel_err(y[:, 1:], y2[:, 1:]) > 1e-3
    assert rel_err(m(x, start=17), y) < 1e-12


def test_blocked_swa_is_windowed():
    """The blocked kernel never looks at keys older than the previous block: poisoning them changes
    nothing."""
    torch.manual_seed(0)
    B, T, W, hd = 1, 24, 4, 8
    q = torch.randn(B, 2, T, hd, dtype=torch.float64)
    wk = torch.randn(B, 1, W + T, hd, dtype=torch.float64)
    wv = torch.randn(B, 1, W + T, hd, dtype=torch.float64)
    wpos = torch.cat([torch.full((W,), -1), torch.arange(T)])
    empty = wk[:, :, :0]
    o = blocked_swa(q, empty, empty, torch.zeros(0, dtype=torch.long), wk, wv, wpos, 0, W, hd**-0.5)
    # last block's queries: positions 20..23, window reaches back to 17; poison keys of positions < 16
    wk2, wv2 = wk.clone(), wv.clone()
    wk2[:, :, W : W + 16] = 1e6
    wv2[:, :, W : W + 16] = float("nan")
    o2 = blocked_swa(q, empty, empty, torch.zeros(0, dtype=torch.long), wk2, wv2, wpos, 0, W, hd**-0.5)
    assert torch.equal(o[:, :, 20:], o2[:, :, 20:])


def test_swa_cache_layout():
    W, ns = 4, 3
    m = make(W, ns, torch.float64, seed=8)
    cache = m.init_cache(1, 100, "cpu", torch.float64)
    assert cache["k"].shape[2] == ns + W
    x = rand_x(1, 13, torch.float64, seed=1)
    m(x, cache)
    # sinks 0..2 in slots 0..2; last 4 positions 9..12 in slot ns + (p - ns) % W
    expect = [0, 1, 2, 0, 0, 0, 0]
    for p in range(9, 13):
        expect[ns + (p - ns) % W] = p
    assert cache["pos"].tolist() == expect
    m.step(rand_x(1, 1, torch.float64, seed=2)[:, 0], cache, torch.tensor(13))
    assert cache["pos"][ns + (13 - ns) % W].item() == 13


def _flex_eager_ok():
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401

        return True
    except Exception:
        return False


@pytest.mark.skipif(not _flex_eager_ok(), reason="FlexAttention unavailable")
@pytest.mark.parametrize("window,n_sink", [(4, 3), (16, 0)], ids=["W4-s3", "W16-s0"])
def test_flex_path_logic_on_cpu(window, n_sink, monkeypatch):
    """The GPU SWA path (FlexAttention block mask + context assembly), run eagerly on CPU (forward only:
    CPU FlexAttention has no backward)."""
    import warnings

    import models.attention as attn

    monkeypatch.setattr(attn, "_flex_failed", False)

    dtype = torch.float32
    m = make(window, n_sink, dtype, seed=10, backend="flex-eager")
    x = rand_x(2, 37, dtype, seed=3)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        y = m(x)
        assert m.last_backend == "flex"
        assert rel_err(y, m.forward_reference(x)) <= TOL[dtype]
        cache = m.init_cache(2, 37, x.device, dtype)
        y2 = torch.cat([m(x[:, :5], cache), m(x[:, 5:20], cache, start=5), m(x[:, 20:], cache, start=20)], 1)
        assert m.last_backend == "flex"
    assert rel_err(y2, y) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_swiglu_forward_matches_step(dtype):
    torch.manual_seed(0)
    f = SwiGLU(D, 56).to(dtype)
    x = rand_x(3, 11, dtype, seed=4)
    y = f(x)
    cache = f.init_cache(3, 11, x.device, dtype)
    assert cache == {}
    ys = torch.stack([f.step(x[:, t], cache, torch.tensor(t)) for t in range(11)], 1)
    assert rel_err(ys, y) <= TOL[dtype]
    ref = (
        torch.nn.functional.silu(x @ f.gate_proj.weight.T) * (x @ f.up_proj.weight.T)
    ) @ f.down_proj.weight.T
    assert rel_err(y, ref) <= TOL[dtype]
    y.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in f.parameters())


# ---- RoPE table and the decode step's fused projections ----------------------------------------------------


@pytest.mark.parametrize(
    "dtype, tol", [(torch.float64, 1e-14), (torch.float32, 1e-6), (torch.bfloat16, 1e-2)]
)
@pytest.mark.parametrize("start", [0, 5, 3000])
def test_rope_table_matches_reference(dtype, tol, start):
    """The table path (rope_table rows + rope_rotate) == the plain reference, within the compute dtype's
    rounding; the rows computed directly from a position (sliding-window decode) == the table's."""
    from models.common import (
        apply_rope,
        apply_rope_reference,
        rope_compute_dtype,
        rope_cos_sin,
        rope_frequencies,
        rope_rotate,
        rope_signed_frequencies,
        rope_table,
    )

    T, hd = 37, 16
    inv_freq = rope_frequencies(hd, 10000.0)
    x = torch.randn(2, T, 3, hd, generator=torch.Generator().manual_seed(start), dtype=torch.float64).to(
        dtype
    )
    positions = torch.arange(start, start + T)
    ref = apply_rope_reference(x, positions, inv_freq)
    ct = rope_compute_dtype(dtype)
    table = rope_table(inv_freq, start + T, "cpu", ct)
    assert table.dtype == ct and table.shape[0] >= start + T and table.shape[1:] == (2, hd)
    got = rope_rotate(x, table[start : start + T])
    assert got.dtype == dtype
    assert rel_err(got.double(), ref.double()) <= tol
    assert rel_err(apply_rope(x, positions, inv_freq).double(), ref.double()) <= tol
    direct = rope_cos_sin(positions, rope_signed_frequencies(inv_freq, "cpu", ct))
    assert (direct - table[start : start + T]).abs().max() <= (1e-14 if ct == torch.float64 else 1e-6)


def test_rope_table_grows_and_keeps_shorter_tables():
    from models.common import _ROPE_TABLES, _rope_key, rope_frequencies, rope_table

    inv_freq = rope_frequencies(12, 777.0)
    short = rope_table(inv_freq, 10, "cpu", torch.float32)
    assert rope_table(inv_freq, 900, "cpu", torch.float32) is short  # long enough already
    longer = rope_table(inv_freq, 5000, "cpu", torch.float32)
    assert longer.shape[0] >= 5000 and torch.equal(longer[: short.shape[0]], short)
    assert any(t is short for t in _ROPE_TABLES[_rope_key(inv_freq, "cpu", torch.float32)])


def test_rope_state_dict_and_dtype_unchanged():
    """The table is no buffer: state dicts and parameters are as before, `.to(bfloat16)` does not round it."""
    m = Attention(D, H, HKV, HD)
    keys = set(m.state_dict())
    assert keys == {"q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"}
    x = rand_x(1, 5, torch.float32, seed=1)
    with torch.no_grad():
        m(x)
        cache = m.init_cache(1, 8, "cpu", torch.float32)
        m(x, cache)
        m.step(x[:, 0], cache, torch.tensor(5))
    assert set(m.state_dict()) == keys and not list(m.buffers())
    assert m._inv_freq["cpu"].dtype == torch.float64
    m = m.to(torch.bfloat16)
    assert m._inv_freq["cpu"].dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("window,n_sink", CONFIGS, ids=IDS)
def test_step_without_grad_matches_forward(window, n_sink, dtype):
    """The decode path (autograd off: one GEMM on the cached q/k/v weights, q and k rotated together) == the
    parallel forward == the step with autograd on (three projections)."""
    m = make(window, n_sink, dtype, seed=12)
    B, T = 2, 29
    x = rand_x(B, T, dtype, seed=13)
    y = m(x)
    for ctx in (torch.no_grad, torch.inference_mode):
        cache = m.init_cache(B, T, x.device, dtype)
        with ctx():
            ys = torch.stack([m.step(x[:, t], cache, torch.tensor(t)) for t in range(T)], 1)
        assert rel_err(ys, y) <= TOL[dtype], (ctx.__name__, rel_err(ys, y))
    assert not getattr(m, "_cat_cache", None)  # the fused q/k/v matrix is a view of the weights: no copy
    cache = m.init_cache(B, T, x.device, dtype)
    ys_grad = torch.stack([m.step(x[:, t], cache, torch.tensor(t)) for t in range(T)], 1)
    assert ys_grad.requires_grad
    assert rel_err(ys, ys_grad) <= TOL[dtype]


def test_step_without_grad_follows_weight_changes():
    """The cached q/k/v concatenation is rebuilt after in-place updates, load_state_dict and dtype moves."""
    dtype = torch.float64
    m = make(None, 0, dtype, seed=14)
    x = rand_x(1, 6, dtype, seed=15)

    def decode(module, dt=dtype):
        cache = module.init_cache(1, 6, "cpu", dt)
        with torch.no_grad():
            return torch.stack([module.step(x[:, t].to(dt), cache, torch.tensor(t)) for t in range(6)], 1)

    decode(m)
    with torch.no_grad():
        m.k_proj.weight.mul_(0.5)  # in place, as an optimizer step or weight normalization
    assert rel_err(decode(m), m(x)) <= TOL[dtype]
    other = make(None, 0, dtype, seed=99)
    m.load_state_dict(other.state_dict())
    assert rel_err(decode(m), other(x)) <= TOL[dtype]
    m.q_proj.weight.data = other.q_proj.weight.data * 2  # replaced
    assert rel_err(decode(m), m(x)) <= TOL[dtype]
    m32 = m.float()
    assert rel_err(decode(m32, torch.float32), m32(x.float())) <= TOL[torch.float32]


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one storage count once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def test_fused_decode_weights_are_views_of_one_storage():
    """share_storage: the decode step's fused q/k/v and gate/up matrices cost no memory beyond the weights,
    after construction and after a dtype move; a weight replaced by hand falls back to a cached copy."""
    from models.common import cached_cat, stacked_view

    m, f = make(None, 0, torch.float32, seed=3), SwiGLU(D, 56)
    for module in (m, f, m.double(), f.double()):
        (group,) = module.decode_weight_groups()
        fused = cached_cat(module, "fused", group)
        assert fused.data_ptr() == group[0].data_ptr()
        assert _storage_bytes([*module.parameters(), fused]) == _storage_bytes(module.parameters())
        torch.testing.assert_close(fused, torch.cat([w.detach() for w in group]), rtol=0, atol=0)
    m.k_proj.weight.data = m.k_proj.weight.data.clone()
    (group,) = m.decode_weight_groups()
    assert stacked_view(group) is None
    torch.testing.assert_close(cached_cat(m, "qkv", group), torch.cat([w.detach() for w in group]))


def test_training_through_shared_storage_equals_separate_weights():
    """Two AdamW steps on weights that are views of one storage == on independent copies (exactly)."""
    shared = make(None, 0, torch.float64, seed=21)
    separate = make(None, 0, torch.float64, seed=21)
    for p in separate.parameters():
        p.data = p.data.clone()
    assert len({w.untyped_storage().data_ptr() for w in separate.decode_weight_groups()[0]}) == 3
    x = rand_x(2, 9, torch.float64, seed=22)
    for module in (shared, separate):
        opt = torch.optim.AdamW(module.parameters(), lr=1e-2)
        for _ in range(2):
            opt.zero_grad()
            module(x).square().mean().backward()
            opt.step()
    for (name, a), b in zip(shared.named_parameters(), separate.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_swiglu_step_without_grad_matches_forward(dtype):
    torch.manual_seed(1)
    f = SwiGLU(D, 56).to(dtype)
    x = rand_x(3, 11, dtype, seed=5)
    y = f(x)
    with torch.no_grad():
        ys = torch.stack([f.step(x[:, t], {}, torch.tensor(t)) for t in range(11)], 1)
    assert not getattr(f, "_cat_cache", None)
    assert rel_err(ys, y) <= TOL[dtype]
    with torch.no_grad():
        f.up_proj.weight.mul_(-1.0)
        ys2 = torch.stack([f.step(x[:, t], {}, torch.tensor(t)) for t in range(11)], 1)
    assert rel_err(ys2, f(x)) <= TOL[dtype] and rel_err(ys2, ys) > 0.5


@pytest.mark.parametrize("window,n_sink,T", [(4, 3, 23), (8, 0, 16), (5, 2, 5)], ids=["W4-s3", "W8", "T=W"])
def test_the_swa_kernels_equal_the_reference_at_the_ops_level(window, n_sink, T):
    """models/ops/swa.py: the blocked kernel (fed the sink/window parts the operator builds for a fresh
    sequence) and, where FlexAttention runs, the eager flex kernel both equal the dense reference."""
    from models.ops.swa import flex_swa

    gen = torch.Generator().manual_seed(T)
    q = torch.randn(2, 4, T, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 2, T, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 2, T, 8, generator=gen, dtype=torch.float64)
    scale = 8**-0.5
    ref = swa_reference(q, k, v, window, n_sink, scale)
    ns = min(n_sink, T)
    pos = torch.arange(T)
    sk, sv, spos = k[:, :, :ns], v[:, :, :ns], pos[:ns]
    wk = torch.cat([torch.zeros(2, 2, window, 8, dtype=torch.float64), k], 2)
    wv = torch.cat([torch.zeros(2, 2, window, 8, dtype=torch.float64), v], 2)
    wpos = torch.cat([torch.full((window,), -1), torch.where(pos >= n_sink, pos, -1)])
    assert rel_err(blocked_swa(q, sk, sv, spos, wk, wv, wpos, 0, window, scale), ref) < 1e-12
    if _flex_eager_ok():
        import warnings

        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            out = flex_swa(q.float(), k.float(), v.float(), None, 0, window, n_sink, scale, compiled=False)
        assert rel_err(out.double(), ref) < 1e-5
