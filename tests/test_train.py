"""Training a candidate longer (proxies/longtrain.py, `hybridnas train`): the trainer's periodic-evaluation
callback changes nothing, a continuation starts from the proxy weights (step 0 scores the candidate's stored
val_bpb), a run stopped after a checkpoint and resumed ends bit for bit where an uninterrupted one does, and
the recipe comes from the newest completed tune job, a named one, or the search's proxy.

The candidate: a real tiny search on the inline executor, once per module."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from proxies.dataset import load_data
from proxies.longtrain import PlanMismatch, checkpoints, train_longer
from proxies.recipe import load_source_data, train_candidate, trained_folder
from proxies.train import ProxyConfig, train_proxy
from search.evaluation import DataConfig
from search.storage import Storage
from search.tune_config import Recipe, TuneError, recipe_for, resolve_source
from tests.searched import searched_here
from tests.test_engine import TINY

PROXY = {"steps": 12, "batch_size": 4, "seq_len": 32, "eval_tokens": 512, "log_every": 2}
SEARCH = {**TINY, "budget": 2, "proxy": PROXY}
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A finished 2-candidate search, with its settings' env (data dir, data roots, database) kept."""
    root = tmp_path_factory.mktemp("train")
    with searched_here(root, SEARCH) as (result, mp):
        yield {
            "root": root,
            "data_dir": root / "data",
            "url": result.database_url,
            "result": result,
            "mp": mp,
        }


@pytest.fixture
def store(world):
    with Storage(world["url"]) as storage:
        yield storage


@pytest.fixture
def source(world, store):
    best = min(world["result"].candidates, key=lambda c: c.val_bpb)
    return resolve_source(store, best.id, world["data_dir"])


@pytest.fixture
def data(world, source):
    return load_source_data(source, world["data_dir"], (str(world["root"]),))


def test_the_periodic_evaluation_callback_changes_no_result(world):
    data = load_data(DataConfig(), world["data_dir"])
    layout = world["result"].layout(world["result"].candidates[0].id)
    config = ProxyConfig(**PROXY)
    heard = []
    plain, _ = train_proxy(layout, config, data, "cpu")
    watched, _ = train_proxy(
        layout, config, data, "cpu", evaluate_every=4, on_evaluate=lambda s, m: heard.append(s)
    )
    assert plain.status == watched.status == "completed"
    assert watched.val_bpb == plain.val_bpb and watched.loss_curve == plain.loss_curve
    assert heard == [4, 8, 12]


def test_a_continuation_starts_from_the_proxy_weights(source, data, store):
    recipe = Recipe.of_proxy(ProxyConfig.from_dict(source.proxy))
    result, _ = train_longer(source, recipe, 4, data, CPU, evaluate_every=2)
    step, at_start = result.val_curve[0]
    assert step == 0 and at_start == pytest.approx(source.val_bpb, abs=1e-9)
    assert source.val_bpb == store.get_candidate(source.candidate_id).val_bpb
    assert [s for s, _ in result.val_curve] == [0, 2, 4]
    assert result.status == "completed" and result.val_bpb == result.val_curve[-1][1]
    fresh = Recipe(lr=1e-9, warmup_steps=0, weight_norm=False, batch_size=4)  # barely moves the weights
    untouched, _ = train_longer(source, fresh, 1, data, CPU)
    assert untouched.val_curve[0][1] == at_start  # the same loaded weights whatever the recipe


def _final(world, source) -> tuple[dict, dict]:
    final = trained_folder(world["data_dir"], source.candidate_id) / "final"
    return load_file(str(final / "model.safetensors")), json.loads((final / "meta.json").read_text())


def test_a_stopped_run_resumes_to_exactly_the_uninterrupted_result(world, source):
    recipe = Recipe(lr=2e-3, warmup_steps=2, weight_norm=False, batch_size=4)
    args = (source, recipe, 10, world["data_dir"], (str(world["root"]),))
    folder = trained_folder(world["data_dir"], source.candidate_id)
    shutil.rmtree(folder, ignore_errors=True)
    whole = train_candidate(*args, checkpoint_every=4)
    assert whole["status"] == "completed" and whole["resumed_from"] is None
    weights, meta = _final(world, source)
    assert sorted(p.name for p in (folder / "final").iterdir()) == [
        "layout.json", "meta.json", "model.safetensors", "tokenizer.json"
    ]  # fmt: skip
    assert (
        meta["steps"] == 10 and meta["val_bpb"] == whole["val_bpb"] and meta["recipe"] == recipe.model_dump()
    )
    assert meta["source_artifact_key"] == source.training_key and not (folder / "checkpoint").exists()
    shutil.rmtree(folder)

    stopped = train_candidate(*args, checkpoint_every=4, stop_after=6)  # steps 5 and 6 are lost, as in a kill
    assert stopped["status"] == "stopped" and not (folder / "final").exists()
    assert [p.name for p in checkpoints(folder / "checkpoint")] == ["step-000000004"]
    resumed = train_candidate(*args, checkpoint_every=4)
    assert resumed["status"] == "completed" and resumed["resumed_from"] == 4
    again, again_meta = _final(world, source)
    assert resumed["val_bpb"] == whole["val_bpb"] and again_meta["val_curve"] == meta["val_curve"]
    assert resumed["loss_curve"] == whole["loss_curve"]
    assert weights.keys() == again.keys() and all(torch.equal(weights[k], again[k]) for k in weights)
    assert train_candidate(*args, checkpoint_every=4)["already"] is True  # the same command once done


def test_a_checkpoint_of_another_plan_is_refused(world, source):
    recipe = Recipe(lr=2e-3, warmup_steps=2, weight_norm=False, batch_size=4)
    folder = trained_folder(world["data_dir"], source.candidate_id)
    shutil.rmtree(folder, ignore_errors=True)
    train_candidate(
        source, recipe, 8, world["data_dir"], (str(world["root"]),), checkpoint_every=2, stop_after=3
    )
    with pytest.raises(PlanMismatch, match="checkpoint: .* rerun with the same options"):
        train_candidate(source, recipe, 9, world["data_dir"], (str(world["root"]),), checkpoint_every=2)
    shutil.rmtree(folder)


def _tune_job(store, candidate_id: int, lr: float, status: str = "completed") -> int:
    job_id = store.create_job("tune", {"candidate_id": candidate_id})
    best = {"recipe": {"lr": lr, "warmup_steps": 1, "weight_norm": True, "batch_size": 2}, "val_bpb": 3.0}
    store.set_job_result(job_id, {"trials": [], "best": best})
    store.set_job_status(job_id, status)
    return job_id


def test_the_recipe_is_the_newest_completed_tunes_a_named_one_or_the_proxys(store, source, world):
    proxy = Recipe.of_proxy(ProxyConfig.from_dict(source.proxy))
    assert proxy == Recipe(lr=3e-3, warmup_steps=1, weight_norm=False, batch_size=4)  # PROXY's 10 % of 12
    assert recipe_for(store, source, None) == (proxy, None)
    other = next(c.id for c in world["result"].candidates if c.id != source.candidate_id)
    foreign = _tune_job(store, other, 0.5)
    assert recipe_for(store, source, "best") == (proxy, None)  # no tune of this candidate yet
    older = _tune_job(store, source.candidate_id, 0.01)
    newer = _tune_job(store, source.candidate_id, 0.02)
    failed = _tune_job(store, source.candidate_id, 0.03, status="failed")
    assert recipe_for(store, source, "best")[1] == newer and recipe_for(store, source, "best")[0].lr == 0.02
    assert recipe_for(store, source, str(older))[0].lr == 0.01
    for choice, reason in (
        (str(foreign), f"tuned candidate {other}"),
        (str(failed), "is failed and has no best recipe"),
        ("999999", "no tune job 999999"),
        ("latest", "neither 'best' nor"),
    ):
        with pytest.raises(TuneError, match=reason) as refused:
            recipe_for(store, source, choice)
        assert refused.value.field == "recipe"
    for job_id in (foreign, older, newer, failed):
        store.delete_job(job_id)


def test_resolve_source_refuses_what_cannot_be_continued(store, world, tmp_path):
    with pytest.raises(TuneError, match="no candidate 999999") as missing:
        resolve_source(store, 999999, world["data_dir"])
    assert missing.value.field == "candidate_id"
    candidate = world["result"].candidates[0]
    with pytest.raises(TuneError, match="outside the data dir"):
        resolve_source(store, candidate.id, tmp_path)  # another data dir: its artifacts are not in it


def test_the_train_command_writes_the_final_folder_and_names_bad_input(world, source):
    from api.cli_tune import register

    app = __import__("typer").Typer()
    register(app)
    runner = CliRunner()
    shutil.rmtree(trained_folder(world["data_dir"], source.candidate_id), ignore_errors=True)
    ok = runner.invoke(
        app, ["train", str(source.candidate_id), "--steps", "3", "--db", world["url"], "--json"]
    )
    assert ok.exit_code == 0, ok.output
    summary = json.loads(ok.stdout.strip().splitlines()[-1])
    _, meta = _final(world, source)
    assert meta["val_bpb"] == summary["val_bpb"] and meta["steps"] == 3 and summary["tune_id"] is None
    bad = runner.invoke(app, ["train", "999999", "--steps", "3", "--db", world["url"]])
    assert bad.exit_code == 2 and "candidate_id" in bad.output and "no candidate 999999" in bad.output
    recipe = runner.invoke(
        app, ["train", str(source.candidate_id), "--steps", "3", "--recipe", "x", "--db", world["url"]]
    )
    assert recipe.exit_code == 2 and "recipe" in recipe.output


def test_train_killed_with_sigkill_resumes_to_the_same_final_weights(world, source):
    """`hybridnas train` in a subprocess, killed -9 once a checkpoint is on disk, then rerun: the same final
    weights and val_bpb as an uninterrupted run of the same command."""
    import os
    import signal
    import subprocess
    import sys
    import time

    folder = trained_folder(world["data_dir"], source.candidate_id)
    command = [sys.executable, "-m", "api.cli", "train", str(source.candidate_id), "--steps", "300"]
    command += ["--checkpoint-every", "20", "--db", world["url"], "--json"]
    shutil.rmtree(folder, ignore_errors=True)
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    reference, reference_meta = _final(world, source)
    shutil.rmtree(folder)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not checkpoints(folder / "checkpoint") and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(30)
    assert not (folder / "final").exists(), "the run ended before the kill: give it more steps"
    killed_at = int(checkpoints(folder / "checkpoint")[-1].name.removeprefix("step-"))
    resumed = subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["resumed_from"] is not None and summary["resumed_from"] >= killed_at
    weights, meta = _final(world, source)
    assert meta["val_bpb"] == reference_meta["val_bpb"] and meta["val_curve"] == reference_meta["val_curve"]
    assert all(torch.equal(weights[k], reference[k]) for k in reference)
