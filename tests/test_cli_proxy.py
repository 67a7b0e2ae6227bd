"""`hybridnas proxy train` / `proxy fidelity` from the command line: JSON or a table, exit codes (0 done, 1
failed, 2 naming the bad field or option, 130 interrupted), corpus paths checked against the data roots,
fidelity runs resumed only under the same config, progress lines on stderr off a terminal."""

import csv
import json

import numpy as np
import pytest
from typer.testing import CliRunner

import proxies.pool as pool
from api.cli_proxy import proxy_app
from api.settings import get_settings

FAST = {"batch_size": 2, "seq_len": 16, "eval_tokens": 64, "log_every": 1}
FIDELITY = [
    "fidelity",
    "--n",
    "1",
    "--short-steps",
    "2",
    "--long-factor",
    "2",
    "--seq-len",
    "16",
    "--eval-tokens",
    "64",
    "--workers",
    "0",
]


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A data dir and one data root of this test's own."""
    root = tmp_path / "roots"
    root.mkdir()
    monkeypatch.setenv("HYBRIDNAS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("HYBRIDNAS_DATA_ROOTS", json.dumps([str(root)]))
    get_settings.cache_clear()
    yield root
    get_settings.cache_clear()


@pytest.fixture
def trained(monkeypatch):
    """The (run, steps) of every fidelity run really trained; `stop[0]` = k raises KeyboardInterrupt when
    the (k+1)-th run would train."""
    real = pool._train
    calls: list[tuple[str, int]] = []
    stop: list[int | None] = [None]

    def spy(job):
        if stop[0] is not None and len(calls) >= stop[0]:
            raise KeyboardInterrupt
        calls.append((job[2]["run"], job[1]["steps"]))
        return real(job)

    monkeypatch.setattr(pool, "_train", spy)
    return calls, stop


def write_layout(path):
    path.write_text(json.dumps({"operators": "A F", "d_model": 32, "n_heads": 2, "n_kv_heads": 1}))
    return str(path)


def write_config(path, proxy=None, **sections):
    path.write_text(json.dumps({"proxy": {**FAST, "steps": 2, **(proxy or {})}, **sections}))
    return str(path)


def write_corpus(root, n_docs=120, size=300):
    folder = root / "corpus"
    folder.mkdir()
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    for i in range(n_docs):
        (folder / f"doc{i:03d}.txt").write_text(" ".join(rng.choice(words, size)))
    return folder


def read_csv(path):
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


# ---- proxy train -------------------------------------------------------------------------------------------


def test_train_json_is_the_evaluation_result(env, tmp_path):
    args = ["train", write_layout(tmp_path / "l.json"), "--config", write_config(tmp_path / "c.json")]
    result = CliRunner().invoke(proxy_app, [*args, "--no-latency", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["status"] == "completed" and isinstance(data["training"]["val_bpb"], float)
    assert data["training"]["steps_done"] == 2 and data["training_key"]
    # plain progress lines on stderr (not a terminal), none of it on stdout
    assert "training: 2/2 loss" in result.stderr and "training:" not in result.stdout


def test_train_table_without_json(env, tmp_path):
    args = ["train", write_layout(tmp_path / "l.json"), "--config", write_config(tmp_path / "c.json")]
    latency = ["--steps", "1"]
    config = json.loads((tmp_path / "c.json").read_text())
    config["latency"] = {"decode_tokens": 2, "repeats": 1, "throughput": False, "prompt_len": 4}
    (tmp_path / "c.json").write_text(json.dumps(config))
    result = CliRunner().invoke(proxy_app, [*args, *latency, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "val_bpb" in result.stdout and "decode ms/token" in result.stdout and "completed" in result.stdout
    with pytest.raises(json.JSONDecodeError):
        json.loads(result.stdout)


@pytest.mark.parametrize(
    "config, field",
    [
        ({"proxy": {"stepz": 3}}, "proxy.stepz"),
        ({"latency": {"repeats": 0}}, "latency.repeats"),
        ({"data": {"tokenizer": "sentencepiece"}}, "data.tokenizer"),
        ({"proxy": {"lr": "fast"}}, "proxy.lr"),
        ({"extra": {}}, "extra"),
    ],
)
def test_train_bad_config_exits_2_naming_the_field(env, tmp_path, config, field):
    (tmp_path / "c.json").write_text(json.dumps(config))
    result = CliRunner().invoke(
        proxy_app, ["train", write_layout(tmp_path / "l.json"), "--config", str(tmp_path / "c.json")]
    )
    assert result.exit_code == 2, result.output
    assert f"{field}:" in result.stderr


def test_train_bad_layout_exits_2(env, tmp_path):
    (tmp_path / "l.json").write_text(json.dumps({"operators": "A F", "d_model": 32, "n_heads": 3}))
    result = CliRunner().invoke(proxy_app, ["train", str(tmp_path / "l.json")])
    assert result.exit_code == 2 and "layout" in result.stderr


def test_train_corpus_outside_the_data_roots_exits_2(env, tmp_path):
    outside = write_corpus(tmp_path)  # tmp_path itself is not a data root
    result = CliRunner().invoke(
        proxy_app, ["train", write_layout(tmp_path / "l.json"), "--corpus", str(outside)]
    )
    assert result.exit_code == 2, result.output
    assert "data.corpus" in result.stderr and "outside the configured data roots" in result.stderr


def test_train_failed_evaluation_exits_1_with_the_reason(env, tmp_path):
    config = write_config(tmp_path / "c.json", proxy={"steps": 100000, "timeout_s": 0.2})
    result = CliRunner().invoke(
        proxy_app,
        ["train", write_layout(tmp_path / "l.json"), "--config", config, "--no-latency", "--json"],
    )
    assert result.exit_code == 1, result.output
    assert json.loads(result.stdout)["status"] == "failed"
    assert "failed" in result.stderr and "timeout" in result.stderr


# ---- proxy fidelity ----------------------------------------------------------------------------------------


def test_fidelity_reuses_rows_only_under_the_same_config(env, tmp_path, trained):
    calls, _ = trained
    runner = CliRunner()
    out = tmp_path / "fid"
    result = runner.invoke(proxy_app, [*FIDELITY, "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    first = json.loads(result.stdout)  # --json: the report alone on stdout
    assert sorted(calls) == [("long", 4), ("short", 2), ("short_seed", 2)]
    assert first["rows"] == 3 and first["planned_runs"] == 3
    assert "fidelity runs: 3/3" in result.stderr

    result = runner.invoke(proxy_app, [*FIDELITY, "--out", str(out), "--json"])  # the same config: resumed
    assert result.exit_code == 0, result.output
    assert len(calls) == 3
    assert json.loads(result.stdout)["config_hash"] == first["config_hash"]

    for changed in (["--lr", "0.002"], ["--seq-len", "8"], ["--short-steps", "1"]):
        before = len(calls)
        result = runner.invoke(proxy_app, [*FIDELITY, "--out", str(out), "--json", *changed])
        assert result.exit_code == 0, result.output
        assert len(calls) == before + 3, changed  # nothing of another config was reused
        report = json.loads(result.stdout)
        assert report["rows"] == 3 and report["config_hash"] != first["config_hash"]
    rows = read_csv(out / "runs.csv")
    assert len(rows) == 12 and len({r["config_hash"] for r in rows}) == 4


def test_fidelity_default_folder_is_under_the_data_dir_and_follows_the_corpus(env, tmp_path, trained):
    calls, _ = trained
    runner = CliRunner()
    result = runner.invoke(proxy_app, [*FIDELITY, "--json"])
    assert result.exit_code == 0, result.output
    key = json.loads(result.stdout)["config_hash"]
    folder = tmp_path / "data" / "fidelity" / key[:16]
    assert len(read_csv(folder / "runs.csv")) == 3 and (folder / "report.md").exists()
    write_corpus(env)
    result = runner.invoke(proxy_app, [*FIDELITY, "--json", "--corpus", "corpus"])
    assert result.exit_code == 0, result.output
    other = json.loads(result.stdout)["config_hash"]
    assert other != key and len(calls) == 6
    assert len(read_csv(tmp_path / "data" / "fidelity" / other[:16] / "runs.csv")) == 3
    config = json.loads((tmp_path / "data" / "fidelity" / other[:16] / "config.json").read_text())
    assert config["config"]["corpus"] == "corpus" and config["data"]["corpus_hash"]


def test_fidelity_interrupt_keeps_rows_and_resumes(env, tmp_path, trained):
    calls, stop = trained
    runner = CliRunner()
    out = tmp_path / "fid"
    stop[0] = 1
    result = runner.invoke(proxy_app, [*FIDELITY, "--out", str(out)])
    assert result.exit_code == 130, result.output
    assert "interrupted" in result.stderr
    assert len(read_csv(out / "runs.csv")) == 1
    stop[0] = None
    result = runner.invoke(proxy_app, [*FIDELITY, "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert len(calls) == 3  # 1 before the interrupt + the 2 missing
    assert json.loads(result.stdout)["rows"] == 3


@pytest.mark.parametrize(
    "args, option",
    [
        (["--corpus", "/etc"], "--corpus"),
        (["--corpus", "../../"], "--corpus"),
        (["--corpus", "missing"], "--corpus"),
        (["--tokenizer", "file:/etc/passwd"], "--tokenizer"),
        (["--tokenizer", "words"], "--tokenizer"),
        (["--lr", "-1"], "--lr"),
        (["--warmup-fraction", "1.5"], "--warmup-fraction"),
    ],
)
def test_fidelity_bad_settings_exit_2_naming_the_option(env, tmp_path, trained, args, option):
    result = CliRunner().invoke(proxy_app, [*FIDELITY, "--out", str(tmp_path / "fid"), *args])
    assert result.exit_code == 2, result.output
    assert f"{option}:" in result.stderr
    assert not trained[0] and not (tmp_path / "fid").exists()


def test_fidelity_refuses_a_table_of_another_format(env, tmp_path, trained):
    out = tmp_path / "fid"
    out.mkdir()
    (out / "runs.csv").write_text("layout_hash,name,run,status\nabc,llama,short,completed\n")
    result = CliRunner().invoke(proxy_app, [*FIDELITY, "--out", str(out)])
    assert result.exit_code == 2 and "--out" in result.stderr and "config_hash" in result.stderr
    assert not trained[0]


def test_fidelity_pool_workers_train_on_the_chosen_corpus(env, tmp_path):
    write_corpus(env)
    runner = CliRunner()
    args = [*FIDELITY[:-2], "--corpus", "corpus", "--json"]
    bpb = {}
    for workers in ("0", "1"):  # in this process, then in a spawned training process
        out = tmp_path / f"fid{workers}"
        result = runner.invoke(proxy_app, [*args, "--workers", workers, "--out", str(out)])
        assert result.exit_code == 0, result.output
        bpb[workers] = {r["run"]: float(r["val_bpb"]) for r in read_csv(out / "runs.csv")}
    assert bpb["1"] == pytest.approx(bpb["0"], rel=1e-4)
    result = runner.invoke(proxy_app, [*FIDELITY, "--out", str(tmp_path / "stdlib"), "--json"])
    stdlib = {r["run"]: float(r["val_bpb"]) for r in read_csv(tmp_path / "stdlib" / "runs.csv")}
    assert stdlib["short"] != pytest.approx(bpb["1"]["short"], rel=1e-3)
