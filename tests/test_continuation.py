"""Continuing a wsd training from a lower budget's stable-phase checkpoint (proxies/train.py, the worker):
the continued run's result is the fresh run's at that budget, a checkpoint of another plan or past this run's
stable-phase end is refused (the run trains fresh and says why), `continue_from` must lie inside the data
dir, and cosine runs are what they were. Real training of a tiny model on the stdlib corpus, on CPU."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from proxies.checkpoints import read_state
from proxies.dataset import DataConfig, load_data
from proxies.train import (
    ProxyConfig,
    apply_update,
    build_model,
    checked_loss,
    evaluate_bpb,
    make_optimizer,
    sample_batch,
    train_proxy,
)
from proxies.worker import evaluate, result_keys
from search.layout import Layout
from search.multifidelity import FidelityConfig
from tests.test_proxies import TINY

BASE = ProxyConfig(batch_size=4, seq_len=32, eval_tokens=512, log_every=5)
LADDER = FidelityConfig(rungs=[40, 120])
LOW, HIGH = LADDER.proxy_at(BASE, 0), LADDER.proxy_at(BASE, 1)  # 40 and 120 steps, stable ends 32 and 96
NO_LATENCY = dict(measure_latency=False)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("continuation")


@pytest.fixture(scope="module")
def data(data_dir):
    return load_data(DataConfig(), data_dir)


@pytest.fixture(scope="module")
def low_run(data, tmp_path_factory):
    """The 40-step wsd run, its stable-phase checkpoint saved."""
    folder = tmp_path_factory.mktemp("low") / "stable"
    result, _ = train_proxy(TINY, LOW, data, "cpu", save_stable=folder)
    assert result.status == "completed", result.failure_reason
    return result, folder


@pytest.fixture(scope="module")
def fresh_high(data):
    result, _ = train_proxy(TINY, HIGH, data, "cpu")
    assert result.status == "completed", result.failure_reason
    return result


def test_a_continued_run_is_the_fresh_run(data, low_run, fresh_high):
    low, folder = low_run
    assert LOW.stable_steps == 32 and low.stable_step == 32 and low.stable_checkpoint == str(folder)
    state = read_state(folder)
    assert state["step"] == 32 and state["loss_curve"] == [list(p) for p in low.loss_curve if p[0] < 32]
    continued, _ = train_proxy(TINY, HIGH, data, "cpu", continue_from=folder)
    assert continued.status == "completed" and continued.fresh_reason is None
    assert continued.continued_from_step == 32 and continued.steps_trained == 120 - 32
    assert continued.steps_done == fresh_high.steps_trained == 120
    seed_1, _ = train_proxy(TINY, HIGH.replace(seed=1), data, "cpu")
    seed_noise = abs(seed_1.val_bpb - fresh_high.val_bpb)
    # measured on CPU fp32: bit-identical (difference 0.0); the seed noise is ~5e-3 bpb
    assert abs(continued.val_bpb - fresh_high.val_bpb) <= 1e-5, (
        f"continued {continued.val_bpb} vs fresh {fresh_high.val_bpb}; seed noise {seed_noise:.2e}"
    )
    assert continued.loss_curve == fresh_high.loss_curve
    assert continued.final_train_loss == fresh_high.final_train_loss


def test_a_checkpoint_of_another_plan_or_step_trains_fresh(data, low_run, tmp_path):
    _, folder = low_run
    other_lr = HIGH.replace(lr=2e-3, steps=50)
    refused, _ = train_proxy(TINY, other_lr, data, "cpu", continue_from=folder)
    assert refused.status == "completed" and refused.continued_from_step is None
    assert refused.steps_trained == refused.steps_done == 50
    assert "another plan" in refused.fresh_reason and "proxy.lr" in refused.fresh_reason
    fresh, _ = train_proxy(TINY, other_lr, data, "cpu")
    assert refused.val_bpb == fresh.val_bpb  # trained from scratch, as if never given the checkpoint

    too_short = LOW.replace(steps=36)  # the same plan, its decay from step 29: before the checkpoint's 32
    past, _ = train_proxy(TINY, too_short, data, "cpu", continue_from=folder)
    assert past.steps_trained == 36 and "past this run's stable-phase end (step 29)" in past.fresh_reason

    missing, _ = train_proxy(TINY, LOW, data, "cpu", continue_from=tmp_path / "nothing")
    assert missing.steps_trained == 40 and "no readable checkpoint" in missing.fresh_reason
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "state.json").write_text("[1, 2]")
    other, _ = train_proxy(TINY, LOW.replace(steps=20), data, "cpu", continue_from=tmp_path / "other")
    assert other.steps_trained == 20 and "holds no stable-phase checkpoint" in other.fresh_reason

    other_layout = Layout.from_dict({**TINY.to_dict(), "operators": "A F A F"})
    elsewhere, _ = train_proxy(other_layout, HIGH.replace(steps=50), data, "cpu", continue_from=folder)
    assert elsewhere.steps_trained == 50 and "layout_hash" in elsewhere.fresh_reason


def test_the_worker_keeps_and_continues_from_the_stable_checkpoint(data_dir, data, fresh_high):
    low = evaluate(TINY, LOW, data_dir=data_dir, **NO_LATENCY)
    assert low.status == "completed", low.failure_reason
    stable = data_dir / "checkpoints" / low.training_key / "stable"
    assert low.training["stable_checkpoint"] == str(stable) and read_state(stable)["step"] == 32
    relative = stable.relative_to(data_dir)
    high = evaluate(TINY, HIGH, data_dir=data_dir, continue_from=str(relative), **NO_LATENCY)
    assert high.status == "completed", high.failure_reason
    assert high.training["continued_from_step"] == 32 and high.training["steps_trained"] == 88
    assert high.val_bpb == pytest.approx(fresh_high.val_bpb, abs=1e-5)
    assert high.training_key == result_keys(TINY, HIGH, data_dir=data_dir).training_key


@pytest.mark.parametrize("outside", ["../elsewhere", "/etc", "checkpoints/../../x"])
def test_continue_from_outside_the_data_dir_fails_naming_it(data_dir, outside):
    result = evaluate(TINY, HIGH, data_dir=data_dir, continue_from=outside, **NO_LATENCY)
    assert result.status == "failed" and result.training is None
    assert "continue_from" in result.failure_reason and "outside the data dir" in result.failure_reason


def _cosine_reference(layout: Layout, config: ProxyConfig, data) -> tuple[float, list]:
    """The cosine proxy run as the trainer ran it before continuation existed: seeded model, AdamW,
    sampled batches, the schedule, one update per step, then val_bpb."""
    device = torch.device("cpu")
    model = build_model(layout, data.vocab_size, config, device)
    optimizer = make_optimizer(model, config)
    rng = np.random.default_rng(config.seed)
    best, curve = math.inf, []
    for step in range(config.total_steps):
        for group in optimizer.param_groups:
            group["lr"] = config.lr_at(step)
        x, y = sample_batch(data.train, rng, config.batch_size, config.seq_len, device)
        loss, value = checked_loss(model, x, y, config, device, step, best, config.warmup_steps)
        best = min(best, value)
        apply_update(model, optimizer, loss, config)
        if step % config.log_every == 0 or step == config.total_steps - 1:
            curve.append((step, round(value, 6)))
    return evaluate_bpb(model, data, config, device)["val_bpb"], curve


def test_cosine_runs_are_unchanged(data, low_run, tmp_path):
    cosine = BASE.replace(steps=30)
    reference_bpb, reference_curve = _cosine_reference(TINY, cosine, data)
    plain, _ = train_proxy(TINY, cosine, data, "cpu")
    asked, _ = train_proxy(TINY, cosine, data, "cpu", save_stable=tmp_path / "stable")
    for result in (plain, asked):
        assert result.val_bpb == reference_bpb and result.loss_curve == reference_curve
        assert result.steps_trained == 30 and result.stable_step is None and result.stable_checkpoint is None
    assert not (tmp_path / "stable").exists()  # a cosine run has no stable phase to keep
    _, wsd_folder = low_run
    from_wsd, _ = train_proxy(TINY, cosine, data, "cpu", continue_from=wsd_folder)
    assert from_wsd.val_bpb == reference_bpb and "proxy.schedule" in from_wsd.fresh_reason


def test_a_ladder_climbs_each_rung_from_the_one_below(data_dir, data):
    """The benchmark's ladder job (proxies.pool): rung 0 fresh, each higher rung continued from the stable
    checkpoint below, its top rung's val_bpb the fresh top-budget run's."""
    from proxies import pool

    ladder = FidelityConfig(rungs=[10, 20, 40])
    rungs = [ladder.proxy_at(BASE, r).to_dict() for r in range(3)]
    threads = torch.get_num_threads()
    try:
        pool._init(str(data_dir))  # what each pool process does first (one torch thread)
        rows = pool._train_ladder((TINY.to_json(None), rungs, {}))
    finally:
        torch.set_num_threads(threads)
    assert [r["rung"] for r in rows] == [0, 1, 2] and all(r["status"] == "completed" for r in rows)
    assert [r["steps_trained"] for r in rows] == [10, 20 - 8, 40 - 16]
    assert [r["continued_from_step"] for r in rows] == ["", 8, 16] and not any(
        r["fresh_reason"] for r in rows
    )
    fresh_top, _ = train_proxy(TINY, ladder.proxy_at(BASE, 2), data, "cpu")
    assert rows[2]["val_bpb"] == pytest.approx(fresh_top.val_bpb, abs=1e-5)
