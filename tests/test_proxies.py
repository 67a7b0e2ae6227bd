"""Data paths, tokenizers, the short-training proxy, failure as data, weight saving, the worker."""

import json
import math

import numpy as np
import pytest
import torch

from models.hybrid import HybridLM
from proxies.artifacts import ArtifactStore
from proxies.corpus import CorpusError, CorpusSource, iter_documents, resolve_data_path
from proxies.dataset import DataConfig, is_validation, load_data
from proxies.tokenizer import ByteTokenizer, tokenizer_from_spec
from proxies.train import ProxyConfig, evaluate_bpb, train_proxy
from proxies.worker import evaluate
from search.layout import Layout

TINY = Layout.from_dict(
    {
        "operators": "D F A F M2 F",
        "d_model": 32,
        "n_heads": 2,
        "n_kv_heads": 1,
        "mamba_head_dim": 16,
        "mamba_d_state": 8,
    }
)
FAST = dict(steps=6, batch_size=4, seq_len=32, eval_tokens=512, log_every=2)


@pytest.fixture(scope="module")
def stdlib_data(tmp_path_factory):
    return load_data(DataConfig(), tmp_path_factory.mktemp("data"))


def write_corpus(root, n_docs=40, size=400):
    folder = root / "corpus"
    folder.mkdir()
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "héllo", "naïve", "λ", "end"]
    for i in range(n_docs):
        (folder / f"doc{i:03d}.txt").write_text(" ".join(rng.choice(words, size)))
    return folder


# ---- data --------------------------------------------------------------------------------------------------


def test_stdlib_corpus_is_the_default(stdlib_data):
    assert stdlib_data.fingerprint["corpus"] == "stdlib"
    assert len(stdlib_data.train) > 5_000_000 and len(stdlib_data.val) > 100_000
    assert stdlib_data.vocab_size == 257
    docs = {d.doc_id for d in iter_documents(CorpusSource("stdlib"))}
    assert "os.py" in docs and not any(part in ("test", "tests") for d in docs for part in d.split("/")[:-1])


def test_folder_jsonl_and_caching(tmp_path):
    folder = write_corpus(tmp_path)
    data = load_data(
        DataConfig(corpus="corpus", min_val_tokens=16, val_fraction=0.25),
        tmp_path / "dd",
        data_roots=[tmp_path],
    )
    total = sum(len(p.read_bytes()) for p in folder.iterdir())
    assert len(data.train) + len(data.val) == total + 40  # one EOS per document
    # the cached arrays are reused: a second load maps the same files, without re-tokenizing
    cache = next((tmp_path / "dd" / "cache" / "tokens").iterdir())
    stamp = (cache / "train.bin").stat().st_mtime_ns
    again = load_data(
        DataConfig(corpus="corpus", min_val_tokens=16, val_fraction=0.25),
        tmp_path / "dd",
        data_roots=[tmp_path],
    )
    assert (cache / "train.bin").stat().st_mtime_ns == stamp and np.array_equal(again.val, data.val)
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": p.read_text()}) for p in sorted(folder.iterdir())))
    from_jsonl = load_data(
        DataConfig(corpus="c.jsonl", min_val_tokens=16, val_fraction=0.25), tmp_path / "dd", [tmp_path]
    )
    assert len(from_jsonl.train) + len(from_jsonl.val) == total + 40


def test_split_is_by_document_and_seeded():
    ids = [f"doc{i}" for i in range(2000)]
    a = [is_validation(d, 0, 0.1) for d in ids]
    assert a == [is_validation(d, 0, 0.1) for d in ids]
    assert a != [is_validation(d, 1, 0.1) for d in ids]
    assert 120 < sum(a) < 280


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda root: "missing.txt", "no such file"),
        (lambda root: "../../etc/passwd", "escapes|outside"),
        (lambda root: "/etc/passwd", "outside"),
        (lambda root: (root / "empty").mkdir() or "empty", "is empty"),
        (lambda root: (root / "bin.txt").write_bytes(b"\x00\x01\x02" * 100) and "bin.txt", "binary"),
        (lambda root: (root / "one.txt").write_text("hello world") and "one.txt", "too small"),
    ],
)
def test_bad_corpus_names_the_path(tmp_path, make, words):
    spec = make(tmp_path)
    with pytest.raises(CorpusError) as info:
        load_data(DataConfig(corpus=spec), tmp_path / "dd", data_roots=[tmp_path])
    assert any(w in str(info.value) for w in words.split("|")), str(info.value)
    assert spec.split("/")[-1] in str(info.value) or "corpus" in str(info.value)


def test_bad_jsonl_line_is_named(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"text": "a"}\n{"txt": "b"}\n')
    with pytest.raises(CorpusError, match=r"c.jsonl:2"):
        load_data(DataConfig(corpus="c.jsonl"), tmp_path / "dd", data_roots=[tmp_path])


def test_symlink_out_of_the_root_is_refused(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path)
    with pytest.raises(CorpusError, match="outside|escapes"):
        resolve_data_path("link", [tmp_path / "root"])


def test_bpe_tokenizer_counts_bytes_exactly(tmp_path):
    texts = ["def f(x):\n    return x + 1  # héllo λ\n"] * 50 + ["naïve café " * 20]
    tok = tokenizer_from_spec("bpe:320", texts, cache_dir=tmp_path, corpus_key="k")
    assert (tmp_path / "bpe-320-k.json").exists()  # cached for the next candidate
    for text in texts[-2:]:
        ids, nbytes = tok.encode_with_bytes(text)
        assert nbytes.sum() == len(text.encode("utf-8"))
        assert len(ids) < len(text.encode("utf-8"))
        assert tok.decode(ids) == text
    ids, nbytes = ByteTokenizer().encode_with_bytes("héllo")
    assert list(ids) == list("héllo".encode()) and nbytes.sum() == 6


def test_bad_tokenizer_spec():
    with pytest.raises(ValueError, match="tokenizer"):
        tokenizer_from_spec("sentencepiece")
    with pytest.raises(ValueError, match="tokenizer"):
        tokenizer_from_spec("bpe:12")


# ---- the proxy ---------------------------------------------------------------------------------------------


def test_schedule_warmup_then_cosine_over_exactly_the_budget():
    config = ProxyConfig(steps=100, lr=1e-3, warmup_fraction=0.1, min_lr_ratio=0.1)
    lrs = [config.lr_at(s) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert config.lr_at(100) == pytest.approx(1e-4)  # the cosine ends at min_lr exactly at the budget
    assert ProxyConfig(tokens=8 * 128 * 10).total_steps == 10


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"steps": 0}, "steps"),
        ({"steps": 5, "tokens": 100}, "steps"),
        ({"lr": -1}, "lr"),
        ({"precision": "fp8"}, "precision"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_proxy_config(kw, field):
    with pytest.raises(ValueError, match=field):
        ProxyConfig(**kw)


def test_config_hash_changes_with_any_setting():
    assert ProxyConfig(steps=5).content_hash != ProxyConfig(steps=6).content_hash
    assert ProxyConfig(steps=5).content_hash == ProxyConfig.from_dict({"steps": 5}).content_hash


def test_training_is_reproducible_and_learns(stdlib_data):
    first, _ = train_proxy(TINY, ProxyConfig(**FAST), stdlib_data, "cpu")
    second, _ = train_proxy(TINY, ProxyConfig(**FAST), stdlib_data, "cpu")
    other_seed, _ = train_proxy(TINY, ProxyConfig(**FAST, seed=1), stdlib_data, "cpu")
    assert first.status == "completed", first.traceback
    assert abs(first.val_bpb - second.val_bpb) <= 1e-6
    assert [loss for _, loss in first.loss_curve] == pytest.approx(
        [loss for _, loss in second.loss_curve], abs=1e-6
    )
    assert other_seed.val_bpb != first.val_bpb
    assert first.loss_curve[-1][1] < first.loss_curve[0][1]
    assert first.tokens_per_s > 0 and first.wall_s > 0 and first.peak_memory_bytes > 0
    assert [s for s, _ in first.loss_curve] == [0, 2, 4, 5]


def test_weight_norm_and_meta_tokens_train(stdlib_data):
    result, model = train_proxy(
        TINY, ProxyConfig(**FAST, weight_norm=True, meta_tokens=4), stdlib_data, "cpu"
    )
    assert result.status == "completed"
    assert model.meta is not None and model.meta.shape == (4, 32)
    q = model.blocks[2].op.q_proj.weight
    assert torch.allclose(q.norm(dim=1), torch.ones(q.shape[0]), atol=1e-5)


def test_val_bpb_metric(stdlib_data):
    torch.manual_seed(0)
    model = HybridLM(TINY, stdlib_data.vocab_size)
    config = ProxyConfig(**FAST)
    metrics = evaluate_bpb(model, stdlib_data, config, torch.device("cpu"))
    # bytes: every token is one byte, so bits per byte = nats per token / ln 2
    assert metrics["val_bpb"] == pytest.approx(metrics["val_loss"] / math.log(2), rel=1e-9)
    val = torch.from_numpy(np.asarray(stdlib_data.val[:513], dtype=np.int64))
    windows = val[:512].view(16, 32), val[1:513].view(16, 32)
    with torch.no_grad():
        logits = model(windows[0])
    manual = torch.nn.functional.cross_entropy(logits.reshape(-1, 257), windows[1].reshape(-1)).item()
    assert metrics["val_loss"] == pytest.approx(manual, rel=1e-5)
    assert metrics["val_ppl"] == pytest.approx(math.exp(manual), rel=1e-4)


class Poison(torch.nn.Module):
    backend = "torch"

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, x, cache=None, start=0):
        if self.how == "raise":
            raise RuntimeError("operator exploded")
        return x * self.w * float("nan")


@pytest.mark.parametrize("how, reason", [("nan", "non-finite loss"), ("raise", "operator exploded")])
def test_failure_is_data(stdlib_data, monkeypatch, how, reason):
    import models.registry as registry

    monkeypatch.setitem(registry.BUILDERS, "ffn", lambda layout, backend: Poison(how))
    result, _ = train_proxy(TINY, ProxyConfig(**FAST), stdlib_data, "cpu")
    assert result.status == "failed" and reason in result.failure_reason
    assert "Traceback" in result.traceback


def test_timeout_is_a_failure(stdlib_data):
    result, _ = train_proxy(
        TINY, ProxyConfig(steps=10_000, batch_size=2, seq_len=16, timeout_s=0.5), stdlib_data, "cpu"
    )
    assert result.status == "failed" and result.failure_reason.startswith("timeout")
    assert 0 < result.steps_done < 10_000 and result.loss_curve  # the metrics that existed are kept


# ---- the worker and artifacts ---------------------------------------------------------------------------


def test_evaluate_saves_weights_that_reload(tmp_path, stdlib_data):
    result = evaluate(
        TINY, {**FAST}, {"decode_tokens": 4, "repeats": 2, "throughput": False}, data_dir=tmp_path
    )
    assert result.status == "completed", result.traceback
    store = ArtifactStore(tmp_path / "artifacts")
    path = store.path_for(result.training_key)
    assert result.artifact_path == str(path)
    # poison the saved weights, save again through a fresh evaluation, and check they were rewritten
    (path / "model.safetensors").write_bytes(b"garbage")
    again = evaluate(TINY, {**FAST}, None, data_dir=tmp_path, measure_latency=False)
    assert again.training_key == result.training_key
    model = HybridLM(TINY, 257)
    model.load_state_dict(store.load_state_dict(result.training_key))
    config = ProxyConfig(**FAST)
    assert evaluate_bpb(model, stdlib_data, config, torch.device("cpu"))["val_bpb"] == pytest.approx(
        again.val_bpb, abs=1e-6
    )
    assert json.loads((path / "layout.json").read_text())["operators"] == list(TINY.operators)
    assert (path / "tokenizer.json").exists()
    assert result.decode_ms > 0 and result.latency["decode_ms_per_token"]["repeats"] == 2
    assert result.device_fingerprint["method"] == "eager" and result.latency_key
    assert any("val_bpb" in line for line in result.log_tail)


def test_evaluate_keys_follow_their_inputs(tmp_path):
    a = evaluate(TINY, {**FAST}, None, data_dir=tmp_path, measure_latency=False, save_artifacts=False)
    b = evaluate(
        TINY, {**FAST, "lr": 1e-3}, None, data_dir=tmp_path, measure_latency=False, save_artifacts=False
    )
    assert a.training_key != b.training_key


def test_evaluate_bad_layout_fails_cleanly(tmp_path):
    result = evaluate({"operators": "A F", "d_model": 64, "n_heads": 3}, {**FAST}, data_dir=tmp_path)
    assert result.status == "failed" and "n_heads" in result.failure_reason


def test_artifact_retention(tmp_path):
    store = ArtifactStore(tmp_path)
    keys = [f"{i:064x}" for i in range(5)]
    for i, key in enumerate(keys):
        store.path_for(key).mkdir(parents=True)
        import os

        os.utime(store.path_for(key), (1000 + i, 1000 + i))
    deleted = store.retain(keep={keys[0]}, keep_last=2)
    assert sorted(deleted) == sorted(keys[1:3])
    assert sorted(store.keys()) == sorted([keys[0], keys[3], keys[4]])
    with pytest.raises(ValueError):
        store.path_for("../../etc")


def test_local_tokenizer_file_and_bpe_corpus(tmp_path):
    folder = write_corpus(tmp_path)
    bpe = load_data(
        DataConfig(corpus="corpus", tokenizer="bpe:300", min_val_tokens=16, val_fraction=0.25),
        tmp_path / "dd",
        data_roots=[tmp_path],
    )
    assert 257 < bpe.vocab_size <= 300  # a tiny corpus may stop merging early
    saved = next((tmp_path / "dd" / "cache" / "tokenizers").glob("bpe-300-*.json"))
    from_file = load_data(
        DataConfig(corpus="corpus", tokenizer=f"file:{saved}", min_val_tokens=16, val_fraction=0.25),
        tmp_path / "dd",
        data_roots=[tmp_path],
    )
    assert np.array_equal(np.asarray(from_file.val), np.asarray(bpe.val))
    # bytes behind the validation tokens add up to the validation text (+1 per end-of-document)
    val_docs = [p for p in sorted(folder.iterdir()) if is_validation(p.name, 0, 0.25)]
    assert int(np.asarray(bpe.val_bytes, dtype=np.int64).sum()) == sum(
        len(p.read_bytes()) for p in val_docs
    ) + len(val_docs)


# ---- fidelity: keyed resume --------------------------------------------------------------------------------


def test_fidelity_key_follows_every_setting_that_changes_a_row():
    from dataclasses import fields, replace

    from proxies.fidelity import NOT_IN_KEY, FidelityConfig, run_key

    base, data = FidelityConfig(), {"corpus": "stdlib", "corpus_hash": "a", "tokenizer_hash": "t"}
    key = run_key(base, data)
    assert key == run_key(FidelityConfig(), dict(data))
    changes = {
        "short_steps": 7,
        "long_factor": 3,
        "seed": 5,
        "noise_seed": 9,
        "lr": 1e-3,
        "warmup_fraction": 0.2,
        "batch_size": 4,
        "seq_len": 64,
        "eval_tokens": 1024,
        "max_operators": 8,
        "d_model": 96,
        "corpus": "docs",
        "tokenizer": "bpe:512",
    }
    assert set(changes) | set(NOT_IN_KEY) == {f.name for f in fields(FidelityConfig)}
    for name, value in changes.items():
        assert run_key(replace(base, **{name: value}), data) != key, name
    for name, value in {"n_layouts": 3, "workers": 0, "bootstrap": 10}.items():
        assert run_key(replace(base, **{name: value}), data) == key, name  # change no row
    assert run_key(base, {**data, "corpus_hash": "b"}) != key  # the same path with other content
    assert run_key(base, {**data, "tokenizer_hash": "u"}) != key


def test_fidelity_rows_of_another_config_are_never_done(tmp_path):
    from proxies.fidelity import (
        COLUMNS,
        FidelityConfig,
        append_rows,
        fidelity_layouts,
        pending_runs,
        planned_runs,
        read_rows,
        rows_of,
    )

    config = FidelityConfig(n_layouts=2, max_operators=4, d_model=32)
    layouts = fidelity_layouts(config)
    planned = planned_runs(config, layouts)
    assert len(planned) == 6

    def row(key, layout, run):
        return {"config_hash": key, "layout_hash": layout.content_hash, "run": run, "status": "completed"}

    table = tmp_path / "runs.csv"
    append_rows(table, COLUMNS, [row("old", lo, run) for lo, run, _, _ in planned])
    append_rows(table, COLUMNS, [row("new", layouts[0], "short")])
    with table.open("a") as fh:
        fh.write(f"new,{layouts[1].content_hash},x,A,1,long")  # a row torn by a kill: no newline, short
    rows = read_rows(table)
    assert len(rows) == 7  # the torn row is skipped
    pending = pending_runs(planned, rows, "new")
    assert [(lo.content_hash, run) for lo, run, _, _ in pending] == [
        (lo.content_hash, run) for lo, run, _, _ in planned if (lo, run) != (layouts[0], "short")
    ]
    assert pending_runs(planned, rows, "old") == [] and len(pending_runs(planned, rows, "other")) == 6
    assert len(rows_of(rows, "old", layouts[:1])) == 3
    append_rows(table, COLUMNS, [row("new", layouts[1], "long")])  # starts on a line of its own
    assert len(rows_of(read_rows(table), "new")) == 2
