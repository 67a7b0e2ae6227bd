"""The whole HybridLM: analytic = built parameter counts, prefill + decode = parallel forward, gradients
reach every parameter, weight normalization leaves the right rows/columns at unit norm."""

import random

import pytest
import torch
import torch.nn as nn

from models.hybrid import HybridLM
from models.weight_norm import READS_HIDDEN, WRITES_RESIDUAL, normalize_weights, weight_norm_axes
from search.layout import Layout
from search.params import count_parameters
from search.presets import FULL_PRESETS, get_preset, preset_names
from search.space import SearchSpace, cpu_space

ALL_OPS = "A F S F F D M2 F GD A"
SMALL = dict(
    d_model=32,
    n_heads=4,
    n_kv_heads=2,
    head_dim=8,
    mamba_head_dim=16,
    mamba_d_state=8,
    swa_window=5,
    ffn_ratio=2.0,
)


def small_layout(**kw):
    return Layout.from_dict({"operators": ALL_OPS, **SMALL, **kw})


@pytest.mark.parametrize("name", preset_names())
def test_analytic_count_equals_built_model(name):
    layout = get_preset(name)
    vocab = layout.vocab_size or 257
    if name in FULL_PRESETS:  # counted on the meta device, never materialised here
        with torch.device("meta"):
            model = HybridLM(layout, vocab)
    else:
        model = HybridLM(layout, vocab)
    assert model.num_parameters() == count_parameters(layout, vocab).total


def test_analytic_count_on_random_layouts():
    spaces = [
        cpu_space(),
        SearchSpace(
            mixers=("swa", "gated_deltanet", "mamba2", "attention"),
            max_operators=14,
            widths=(48, 96),
            dims={"head_dim": 16, "kv_group": 3, "mamba_head_dim": 8, "mamba_d_state": 4, "swa_window": 7},
        ),
    ]
    rng = random.Random(0)
    for space in spaces:
        for _ in range(12):
            layout = space.sample_layout(rng)
            layout = layout.replace(meta_tokens=rng.choice([0, 3]), tied_embeddings=rng.random() < 0.5)
            vocab = rng.randint(50, 300)
            with torch.device("meta"):
                built = HybridLM(layout, vocab).num_parameters()
            assert built == count_parameters(layout, vocab).total, layout.compact()
            per_op = count_parameters(layout, vocab).per_operator
            with torch.device("meta"):
                model = HybridLM(layout, vocab)
            assert [sum(p.numel() for p in b.parameters()) for b in model.blocks] == list(per_op)


@pytest.mark.parametrize("meta_tokens", [0, 3])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-8), (torch.float32, 2e-3)])
def test_prefill_then_decode_equals_parallel_forward(meta_tokens, dtype, tol):
    torch.manual_seed(meta_tokens)
    layout = small_layout(meta_tokens=meta_tokens, tied_embeddings=meta_tokens == 0)
    model = HybridLM(layout, 61).to(dtype)
    tokens = torch.randint(0, 61, (2, 23))
    reference = model(tokens)  # (B, T, V)
    caches = model.init_cache(2, 23)
    # prefill in two pieces (the second continues from the cache), then decode token by token
    first = model.prefill(tokens[:, :9], caches)
    pos = model.next_position(0, 9)
    second = model.prefill(tokens[:, 9:14], caches, start=pos)
    pos = model.next_position(pos, 5)
    position = torch.tensor(pos)
    decoded = []
    for t in range(14, 23):
        decoded.append(model.decode_step(tokens[:, t], caches, position))
        position += 1
    got = torch.cat([first, second, torch.stack(decoded, 1)], dim=1)
    err = (got - reference).abs().max() / reference.abs().max()
    assert err <= tol, float(err)


def test_meta_tokens_change_the_output_and_are_stripped():
    torch.manual_seed(0)
    plain = HybridLM(small_layout(), 61)
    torch.manual_seed(0)
    meta = HybridLM(small_layout(meta_tokens=4), 61)
    tokens = torch.randint(0, 61, (1, 10))
    assert meta(tokens).shape == plain(tokens).shape == (1, 10, 61)
    assert not torch.allclose(meta(tokens), plain(tokens))


def test_gradients_reach_every_parameter():
    torch.manual_seed(1)
    model = HybridLM(small_layout(meta_tokens=2, tied_embeddings=False), 61)
    tokens = torch.randint(0, 61, (2, 17))
    logits = model(tokens)
    nn.functional.cross_entropy(logits.reshape(-1, 61), tokens.roll(-1, 1).reshape(-1)).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name


def test_weight_norm_rows_and_columns():
    torch.manual_seed(2)
    model = HybridLM(small_layout(), 61)
    axes = weight_norm_axes(model)
    roles = {name.rsplit(".", 1)[-1] for name, _, _ in axes}
    assert {"q_proj", "o_proj", "in_proj", "out_proj", "up_proj", "down_proj"} <= roles
    before = {name: w.clone() for name, w, _ in axes}
    normalize_weights(model)
    for name, weight, dim in axes:
        leaf = name.rsplit(".", 1)[-1]
        if leaf in READS_HIDDEN:  # each row (output unit) has unit norm
            assert dim == 1
            assert torch.allclose(weight.norm(dim=1), torch.ones(weight.shape[0]), atol=1e-5), name
        else:
            assert leaf in WRITES_RESIDUAL and dim == 0
            assert torch.allclose(weight.norm(dim=0), torch.ones(weight.shape[1]), atol=1e-5), name
        # a projection, not a rescale of the whole matrix: directions are kept
        ref = before[name] / before[name].norm(dim=dim, keepdim=True)
        assert torch.allclose(weight, ref, atol=1e-6)
    # the embedding and norms are left alone
    assert not torch.allclose(model.embed.weight.norm(dim=1), torch.ones(61))


def test_weight_norm_refuses_an_unknown_matrix():
    model = HybridLM(small_layout(), 61)
    model.blocks[0].op.mystery = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="mystery"):
        weight_norm_axes(model)


# ---- the decode path with autograd off (fused projections, RoPE table, fused RMSNorm) ----------------------


@pytest.mark.parametrize("ctx", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-8), (torch.float32, 2e-3)])
def test_decode_without_grad_equals_parallel_forward(dtype, tol, ctx):
    torch.manual_seed(5)
    model = HybridLM(small_layout(meta_tokens=3, tied_embeddings=False), 61).to(dtype)
    tokens = torch.randint(0, 61, (2, 21))
    reference = model(tokens)
    keys, n_params = set(model.state_dict()), model.num_parameters()
    with ctx():
        caches = model.init_cache(2, 21)
        first = model.prefill(tokens[:, :8], caches)
        position = torch.tensor(model.next_position(0, 8))
        decoded = []
        for t in range(8, 21):
            decoded.append(model.decode_step(tokens[:, t], caches, position))
            position += 1
    got = torch.cat([first, torch.stack(decoded, 1)], dim=1)
    err = (got - reference).abs().max() / reference.abs().max()
    assert err <= tol, float(err)
    # nothing added to the state dict, the parameters or the buffers
    assert (
        set(model.state_dict()) == keys and model.num_parameters() == n_params and not list(model.buffers())
    )


def test_decode_follows_training_updates():
    """Weights cached for decode are refreshed after an optimizer step and weight normalization."""
    torch.manual_seed(6)
    model = HybridLM(small_layout(), 61).double()
    tokens = torch.randint(0, 61, (1, 12))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def decode_logits():
        with torch.no_grad():
            caches = model.init_cache(1, 12)
            model.prefill(tokens[:, :4], caches)
            pos = torch.tensor(model.next_position(0, 4))
            out = []
            for t in range(4, 12):
                out.append(model.decode_step(tokens[:, t], caches, pos))
                pos += 1
        return torch.stack(out, 1)

    for _ in range(2):
        before = decode_logits()
        nn.functional.cross_entropy(model(tokens).reshape(-1, 61), tokens.roll(-1, 1).reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
        normalize_weights(model)
        after = decode_logits()
        assert (after - before).abs().max() > 1e-6
        assert torch.allclose(after, model(tokens)[:, 4:], atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize(
    "dtype, tol", [(torch.float64, 1e-14), (torch.float32, 1e-6), (torch.bfloat16, 1e-2)]
)
def test_rms_norms_match_their_references(dtype, tol):
    """F.rms_norm paths == the plain references (bf16: one rounding instead of two, within an ulp);
    gradients."""
    from models.common import GatedRMSNorm, RMSNorm

    gen = torch.Generator().manual_seed(7)
    x = (3 * torch.randn(4, 5, 48, generator=gen, dtype=torch.float64)).to(dtype)
    gate = torch.randn(4, 5, 48, generator=gen, dtype=torch.float64).to(dtype)
    norms = [
        RMSNorm(48, eps=1e-6),
        GatedRMSNorm(48, eps=1e-5),
        GatedRMSNorm(48, eps=1e-5, norm_before_gate=True),
    ]
    for norm in norms:
        with torch.no_grad():
            norm.weight.copy_(1 + 0.5 * torch.randn(48, generator=gen, dtype=torch.float64))
        norm.to(dtype)
        args = (x,) if isinstance(norm, RMSNorm) else (x, gate)
        got, ref = norm(*args), norm.forward_reference(*args)
        assert got.dtype == ref.dtype == dtype
        err = ((got.double() - ref.double()).norm() / ref.double().norm()).item()
        assert err <= tol, (type(norm).__name__, err)
    if dtype != torch.bfloat16:
        norm = RMSNorm(48).to(dtype)
        xg = x.clone().requires_grad_()
        grads = []
        for fn in (norm.forward, norm.forward_reference):
            norm.zero_grad()
            xg.grad = None
            (fn(xg) * gate).sum().backward()
            grads.append((xg.grad.clone(), norm.weight.grad.clone()))
        for a, b in zip(*grads):
            assert ((a - b).norm() / b.norm()).item() <= 10 * tol
    # mixed dtypes keep the reference's type promotion
    norm = RMSNorm(48).double()
    assert norm(x.float()).dtype == torch.float64
