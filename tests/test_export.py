"""Export: a candidate of a real tiny search (inline executor, real short training on the stdlib corpus) as a
Hugging Face folder, loaded with AutoModelForCausalLM (remote code, offline), against HybridLM as the
reference: the same logits, and generate() token for token equal to a greedy loop of full re-forwards, on a
layout with attention and recurrent mixers. Also generation (streaming, sampling), the `export` / `generate`
commands, the REST download and the candidate page's link, and every refusal naming its field."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import tarfile
from pathlib import Path

import pytest
import torch
import typer
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import hybridnas
from api.app import create_app
from api.auth import Auth
from api.cli_model import register_model_commands, unpack
from api.settings import Settings
from models.export import ExportError, export_source, write_export
from models.generate import GenerationError, Sampling, generate_ids, generate_text, load_exported
from models.hybrid import HybridLM
from proxies.artifacts import ArtifactStore
from proxies.tokenizer import ByteTokenizer
from search.layout import Layout
from search.params import count_parameters
from search.storage import Storage
from tests.dashboard_seed import seed_search
from tests.live import Live
from tests.searched import searched_here
from tests.test_engine import TINY

TOKEN = "export-token-not-secret"
TEXT = "import os\n\ndef main(argv):\n    return os.path.join(argv[0], 'é')\n"
RECURRENT = {"mamba2", "deltanet"}


@dataclasses.dataclass
class Searched:
    url: str
    data_dir: Path
    root: Path
    ids: list[int]
    hybrid: int  # a candidate with attention and a recurrent mixer


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """One real search: 2 random layouts of the benchmark space, short-trained and profiled here."""
    root = tmp_path_factory.mktemp("export")
    url = f"sqlite:///{root / 'search.db'}"
    with searched_here(root, {**TINY, "budget": 2, "initial": "random"}, url) as (result, _):
        pass
    assert all(c.status == "completed" for c in result.candidates)
    hybrid = [
        c.id
        for c in result.candidates
        if "attention" in result.layout(c.id).operators and RECURRENT & set(result.layout(c.id).operators)
    ]
    assert hybrid, "the seeded random search has a layout with attention and a recurrent mixer"
    return Searched(url, root / "data", root, [c.id for c in result.candidates], hybrid[0])


@pytest.fixture(scope="module")
def source(searched):
    with Storage(searched.url) as storage:
        return export_source(storage, searched.hybrid, searched.data_dir)


@pytest.fixture(scope="module")
def exported(searched, source, tmp_path_factory):
    out = tmp_path_factory.mktemp("folders") / "proxy"
    return write_export(source, out)


@pytest.fixture(scope="module")
def loaded(exported):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        return load_exported(exported)


def reference_model(source) -> HybridLM:
    """The stored model: the artifact's weights loaded into HybridLM."""
    folder = Path(source.artifact_path)
    model = HybridLM(Layout.from_json((folder / "layout.json").read_text()), 257)
    model.load_state_dict(ArtifactStore(folder.parents[1]).load_state_dict(folder.name))
    return model.eval()


def tokens(text: str = TEXT) -> torch.Tensor:
    ids, _ = ByteTokenizer().encode_with_bytes(text)
    return torch.as_tensor(ids).unsqueeze(0)


@torch.no_grad()
def greedy_reference(model: HybridLM, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding by a full forward of the whole sequence at every step (no cache)."""
    seq = prompt
    for _ in range(n):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


# ------------------------------------------------------------------------------------ the exported folder


def test_the_folder_holds_config_weights_tokenizer_code_and_card(exported, source):
    names = {p.name for p in exported.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "configuration_hybridnas.py",
        "modeling_hybridnas.py",
        "README.md",
    } <= names
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "hybridnas" and config["architectures"] == ["HybridnasForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_hybridnas.HybridnasForCausalLM"
    assert config["vocab_size"] == 257 and config["eos_token_id"] == 256
    assert Layout.from_dict(config["layout"]).content_hash == source.layout_hash
    card = (exported / "README.md").read_text()
    assert f"{source.metrics['val_bpb']:.4f}" in card and f"{source.metrics['decode_ms']:.4f}" in card
    assert f"{source.metrics['n_params']:,}" in card and "pip install hybridnas" in card
    assert source.device_fingerprint["device"] in card and '"seq_len": 16' in card  # device, proxy config
    assert '"corpus": "stdlib"' in card  # the data settings


def test_logits_of_the_loaded_wrapper_equal_the_stored_models(loaded, source):
    model, _ = loaded
    assert type(model).__name__ == "HybridnasForCausalLM"
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference_model(source)(ids), rtol=1e-6, atol=1e-6)


def test_generate_is_a_greedy_full_forward_loop_through_the_recurrent_path(loaded, source, monkeypatch):
    model, _ = loaded
    operators = set(model.config.layout["operators"])
    assert "attention" in operators and RECURRENT & operators
    steps = []
    decode_step = model.model.decode_step
    monkeypatch.setattr(model.model, "decode_step", lambda *a: steps.append(1) or decode_step(*a))
    prompt, n = tokens()[:, :20], 16
    with torch.no_grad():
        out = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=n
        )
    assert torch.equal(out, greedy_reference(reference_model(source), prompt, n))
    assert len(steps) == n - 1  # every token after the prompt's went through decode_step


def test_the_tokenizer_is_the_byte_tokenizer(loaded):
    _, tokenizer = loaded
    assert tokenizer.encode(TEXT, add_special_tokens=False) == tokens().squeeze(0).tolist()
    assert tokenizer.decode(tokens().squeeze(0).tolist()) == TEXT
    assert tokenizer.eos_token_id == ByteTokenizer.eos_id


# ---------------------------------------------------------------------------------------------- generation


def test_greedy_text_streams_the_reference_continuation(loaded, source):
    model, tokenizer = loaded
    pieces = []
    text = generate_text(model, tokenizer, "def ", Sampling(max_new_tokens=12, temperature=0), pieces.append)
    expected = greedy_reference(reference_model(source), tokens("def "), 12)[0, 4:].tolist()
    assert text == ByteTokenizer().decode(expected) and "".join(pieces) == text and len(pieces) > 1


def test_sampling_with_a_seed_is_reproducible_and_top_k_1_is_greedy(loaded):
    model, tokenizer = loaded

    def run(**options):
        return generate_ids(model, tokenizer, "import ", Sampling(max_new_tokens=16, **options)).tolist()

    assert run(temperature=1.0, seed=7) == run(temperature=1.0, seed=7)
    assert run(temperature=1.0, seed=7) != run(temperature=1.0, seed=8)
    assert run(temperature=1.0, top_k=1, seed=3) == run(greedy=True)
    assert run(temperature=0.7, top_p=0.9, seed=3) == run(temperature=0.7, top_p=0.9, seed=3)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"seed": -1}, "seed"),
    ],
)
def test_a_bad_sampling_option_is_named(options, field):
    with pytest.raises(GenerationError) as refused:
        Sampling(**options).check()
    assert refused.value.option == field


# ---------------------------------------------------------------------------------------- other weights


def test_init_weights_at_another_width_have_the_counted_parameters(source, tmp_path):
    out = write_export(source, tmp_path / "wide", weights="init", d_model=96)
    model, tokenizer = load_exported(out)
    layout = Layout.from_dict(source.layout).replace(d_model=96)
    assert model.config.hidden_size == 96
    assert model.model.num_parameters() == count_parameters(layout, 257).total
    ids = generate_ids(model, tokenizer, "x", Sampling(max_new_tokens=4, greedy=True))
    assert torch.equal(ids, greedy_reference(model.model, tokens("x"), 4))


def test_a_width_that_breaks_the_layout_names_d_model(source, tmp_path):
    layout = Layout.from_dict(source.layout)
    bad = layout.d_model + 2  # the Mamba2 / DeltaNet heads (16 wide) no longer divide the inner width
    with pytest.raises(ExportError) as refused:
        write_export(source, tmp_path / "bad", weights="init", d_model=bad)
    assert (
        refused.value.field == "d_model" and refused.value.status == 422 and str(bad) in refused.value.reason
    )
    with pytest.raises(ExportError) as proxy_width:
        write_export(source, tmp_path / "bad", weights="proxy", d_model=96)
    assert proxy_width.value.field == "d_model"
    assert not (tmp_path / "bad").exists()


def train_further(source, steps: int = 3) -> tuple[HybridLM, float]:
    """The proxy model trained `steps` more AdamW steps on stdlib text; its val_bpb on held-out text."""
    import inspect
    import json as json_module

    model = reference_model(source).train()
    train, val = (
        tokens(inspect.getsource(json_module.decoder)[:4096]),
        tokens(inspect.getsource(json_module.encoder)[:1024]),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        chunk = train[:, step * 64 : step * 64 + 65]
        loss = torch.nn.functional.cross_entropy(model(chunk[:, :-1]).flatten(0, 1), chunk[0, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        val_loss = torch.nn.functional.cross_entropy(model(val[:, :-1]).flatten(0, 1), val[0, 1:]).item()
    return model, val_loss / math.log(2)  # one byte per token: nats per token -> bits per byte


def test_trained_weights_come_from_the_trained_checkpoint(source, tmp_path):
    model, val_bpb = train_further(source)
    final = source.data_dir / "trained" / f"candidate-{source.candidate_id}" / "final"
    final.mkdir(parents=True)
    artifact = Path(source.artifact_path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(final / "model.safetensors"))
    for name in ("tokenizer.json", "layout.json"):
        (final / name).write_text((artifact / name).read_text())
    (final / "meta.json").write_text(json.dumps({"steps": 3, "val_bpb": val_bpb, "vocab_size": 257}))
    try:
        out = write_export(source, tmp_path / "trained", weights="trained")
        loaded, _ = load_exported(out)
        ids = tokens()
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, model(ids), rtol=1e-6, atol=1e-6)
            assert not torch.allclose(loaded(ids).logits, reference_model(source)(ids))  # not the proxy's
        card = (out / "README.md").read_text()
        assert "| trained steps | 3 |" in card and f"{val_bpb:.4f}" in card
    finally:
        import shutil

        shutil.rmtree(final.parent.parent)


def test_missing_weights_are_refused_naming_the_candidate(source, tmp_path):
    cases = {
        "no artifact": dataclasses.replace(source, artifact_path=None, status="failed"),
        "pruned": dataclasses.replace(
            source, artifact_path=str(source.data_dir / "artifacts" / "ab" / ("ab" * 8))
        ),
    }
    for what, case in cases.items():
        with pytest.raises(ExportError) as refused:
            write_export(case, tmp_path / "none")
        assert refused.value.status == 409, what
        assert f"candidate {source.candidate_id}" in refused.value.reason, what
    with pytest.raises(ExportError) as untrained:
        write_export(source, tmp_path / "none", weights="trained")
    assert untrained.value.status == 409 and "trained" in untrained.value.reason
    assert not (tmp_path / "none").exists()


def test_an_artifact_path_outside_the_artifacts_is_refused(source, tmp_path):
    import shutil

    outside = shutil.copytree(source.artifact_path, tmp_path / "elsewhere")
    escaping = str(source.data_dir / "artifacts" / ".." / ".." / "elsewhere")
    for path in (str(outside), escaping):
        with pytest.raises(ExportError) as refused:
            write_export(dataclasses.replace(source, artifact_path=path), tmp_path / "out")
        assert refused.value.field == "artifact_path" and refused.value.status == 422


def test_a_non_empty_out_folder_is_left_alone(source, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError) as refused:
        write_export(source, out)
    assert refused.value.field == "out"
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (write_export(source, empty) / "model.safetensors").is_file()  # an empty folder is fine


# ---------------------------------------------------------------------------------------------- commands


@pytest.fixture
def cli(searched, monkeypatch):
    monkeypatch.setenv("HYBRIDNAS_DATA_DIR", str(searched.data_dir))
    app = typer.Typer()
    register_model_commands(app)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


def test_export_command_writes_the_same_weights(cli, searched, exported, tmp_path):
    out = tmp_path / "cli"
    result = cli("export", searched.hybrid, "--out", out, "--db", searched.url)
    assert result.exit_code == 0, result.output
    mine, reference = (
        load_file(str(out / "model.safetensors")),
        load_file(str(exported / "model.safetensors")),
    )
    assert mine.keys() == reference.keys() and all(torch.equal(mine[k], reference[k]) for k in mine)


@pytest.mark.parametrize(
    ("args", "code", "named"),
    [
        (["--weights", "bogus"], 2, "--weights"),
        (["--weights", "init", "--d-model", "50"], 2, "--d-model"),
        (["--d-model", "96"], 2, "--d-model"),
        (["--weights", "trained"], 1, "--weights"),
    ],
)
def test_export_command_refusals_name_the_option(cli, searched, tmp_path, args, code, named):
    result = cli("export", searched.hybrid, "--out", tmp_path / "x", "--db", searched.url, *args)
    assert result.exit_code == code and named in result.output, result.output
    assert not (tmp_path / "x").exists()


def test_export_command_of_an_unknown_candidate_or_into_a_full_folder(cli, searched, tmp_path):
    missing = cli("export", 999, "--out", tmp_path / "x", "--db", searched.url)
    assert missing.exit_code == 1 and "no candidate 999" in missing.output
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "a").write_text("a")
    full = cli("export", searched.hybrid, "--out", tmp_path / "full", "--db", searched.url)
    assert full.exit_code == 2 and "--out" in full.output and "not empty" in full.output


def test_generate_command_prints_the_greedy_continuation(cli, exported, source):
    result = cli("generate", exported, "--prompt", "def ", "--max-new-tokens", 10, "--greedy")
    assert result.exit_code == 0, result.output
    expected = greedy_reference(reference_model(source), tokens("def "), 10)[0, 4:].tolist()
    assert result.stdout == ByteTokenizer().decode(expected) + "\n"


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--top-p", "1.5"], "--top-p"),
        (["--temperature", "-1"], "--temperature"),
        (["--top-k", "-2"], "--top-k"),
    ],
)
def test_generate_command_names_a_bad_option(cli, exported, args, named):
    result = cli("generate", exported, "--prompt", "x", *args)
    assert result.exit_code == 2 and named in result.output, result.output


def test_generate_command_refuses_a_folder_that_is_no_export(cli, tmp_path):
    result = cli("generate", tmp_path, "--prompt", "x")
    assert result.exit_code == 2 and "no config.json" in result.output


# ---------------------------------------------------------------------------------------------- REST, page


@pytest.fixture
def api(searched):
    settings = Settings(data_dir=searched.data_dir, database_url=searched.url, runners=0, scheduler=False)
    with TestClient(create_app(settings, auth=Auth(TOKEN))) as client:
        yield client


def test_the_download_is_the_export_folder(api, searched, exported, tmp_path):
    r = api.get(f"/api/candidates/{searched.hybrid}/export.tar.gz")
    assert r.status_code == 200 and r.headers["content-type"] == "application/gzip"
    assert f"candidate-{searched.hybrid}-proxy.tar.gz" in r.headers["content-disposition"]
    with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tar:
        assert all(n.startswith(f"candidate-{searched.hybrid}") for n in tar.getnames())
    unpack(r.content, tmp_path / "downloaded")
    model, _ = load_exported(tmp_path / "downloaded")
    reference, _ = load_exported(exported)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens()).logits, reference(tokens()).logits, rtol=0, atol=0)


def test_download_errors_name_the_reason(api, searched):
    assert api.get("/api/candidates/999/export.tar.gz").status_code == 404
    bad = api.get(f"/api/candidates/{searched.hybrid}/export.tar.gz", params={"weights": "bogus"})
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "weights"
    width = api.get(
        f"/api/candidates/{searched.hybrid}/export.tar.gz", params={"weights": "init", "d_model": 50}
    )
    assert width.status_code == 422 and width.json()["errors"][0]["field"] == "d_model"
    untrained = api.get(f"/api/candidates/{searched.hybrid}/export.tar.gz", params={"weights": "trained"})
    assert untrained.status_code == 409 and f"candidate {searched.hybrid}" in untrained.json()["detail"]


def test_a_failed_candidate_has_no_download(tmp_path):
    store = Storage(f"sqlite:///{tmp_path / 'seeded.db'}")
    store.create_schema()
    seeded = seed_search(store, 3, fail_every=1)
    settings = Settings(data_dir=tmp_path / "data", runners=0, scheduler=False)
    with store, TestClient(create_app(settings, store, auth=Auth(TOKEN))) as client:
        failed = seeded.failed[0]
        r = client.get(f"/api/candidates/{failed}/export.tar.gz")
        assert r.status_code == 409 and f"candidate {failed}" in r.json()["detail"]
        assert "Download model" not in client.get(f"/candidates/{failed}").text


def test_the_candidate_page_links_the_download(api, searched):
    page = api.get(f"/candidates/{searched.hybrid}").text
    assert (
        f'href="/api/candidates/{searched.hybrid}/export.tar.gz"' in page
        and "Download model (.tar.gz)" in page
    )


def test_reads_that_need_the_token_need_it_for_the_download(searched, tmp_path):
    settings = Settings(data_dir=searched.data_dir, database_url=searched.url, runners=0, scheduler=False)
    with TestClient(create_app(settings, auth=Auth(TOKEN, True))) as client:
        path = f"/api/candidates/{searched.hybrid}/export.tar.gz"
        assert client.get(path).status_code == 401
        assert client.get(path, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_export_command_downloads_from_a_coordinator(searched, exported, tmp_path, monkeypatch):
    with Storage(searched.url) as store:
        live = Live(searched.root, TOKEN, store=store)
        try:
            monkeypatch.setenv("HYBRIDNAS_TOKEN", TOKEN)
            app = typer.Typer()
            register_model_commands(app)
            out = tmp_path / "remote"
            result = CliRunner().invoke(
                app, ["export", str(searched.hybrid), "--out", str(out), "--url", live.base]
            )
        finally:
            live.close()
    assert result.exit_code == 0, result.output
    mine, reference = (
        load_file(str(out / "model.safetensors")),
        load_file(str(exported / "model.safetensors")),
    )
    assert all(torch.equal(mine[k], reference[k]) for k in reference)


def test_a_bpe_tokenizer_is_exported_with_its_ids_and_end_token(tmp_path):
    import inspect
    import json as json_module

    from models.export import hf_tokenizer
    from proxies.tokenizer import HFTokenizer, train_bpe

    trained = train_bpe([inspect.getsource(json_module.decoder), inspect.getsource(json_module.encoder)], 300)
    trained.save(tmp_path / "tokenizer.json")
    tok, eos = hf_tokenizer(tmp_path / "tokenizer.json")
    assert tok.encode(TEXT, add_special_tokens=False).ids == trained.encode_with_bytes(TEXT)[0].tolist()
    assert tok.token_to_id(eos) == trained.eos_id and tok.get_vocab_size() == trained.vocab_size
    bare = HFTokenizer.from_file(tmp_path / "tokenizer.json")  # the same file read as training reads it
    assert bare.eos_id == tok.token_to_id(eos)


def test_meta_tokens_the_proxy_added_are_exported(tmp_path, monkeypatch):
    """A proxy config with meta tokens trains a layout with them (proxies.train.build_model): the export
    carries them, and generate() still equals the full re-forward loop."""
    monkeypatch.setenv("HYBRIDNAS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("HYBRIDNAS_DATA_ROOTS", json.dumps([str(tmp_path)]))
    url = f"sqlite:///{tmp_path / 'meta.db'}"
    proxy = {**TINY["proxy"], "meta_tokens": 2}
    result = hybridnas.run_search(
        {**TINY, "budget": 1, "initial": "random", "proxy": proxy}, url, executor="inline"
    )
    with Storage(url) as storage:
        source = export_source(storage, result.candidates[0].id, tmp_path / "data")
    assert source.layout.get("meta_tokens", 0) == 0
    model, _ = load_exported(write_export(source, tmp_path / "out"))
    assert model.config.layout["meta_tokens"] == 2 and model.model.meta.shape[0] == 2
    prompt = tokens("def f():")
    with torch.no_grad():
        out = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=8
        )
    assert torch.equal(out, greedy_reference(model.model, prompt, 8))


def test_a_batch_of_prompts_generates_each_ones_greedy_continuation(loaded, source):
    model, _ = loaded
    prompts = torch.cat([tokens("def f(x):"), tokens("class A: ")])  # the same length: no padding
    with torch.no_grad():
        out = model.generate(
            prompts, attention_mask=torch.ones_like(prompts), do_sample=False, max_new_tokens=8
        )
    reference = reference_model(source)
    for row in range(2):
        assert torch.equal(out[row : row + 1], greedy_reference(reference, prompts[row : row + 1], 8))
    padded = torch.ones_like(prompts)
    padded[0, 0] = 0
    with pytest.raises(ValueError, match="attention_mask"):
        model.generate(prompts, attention_mask=padded, do_sample=False, max_new_tokens=2)


def test_an_archive_that_escapes_or_is_no_archive_is_refused(tmp_path):
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w:gz") as tar:
        info = tarfile.TarInfo("../evil.txt")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    for archive in (evil.getvalue(), b"not a tar"):
        with pytest.raises(ExportError) as refused:
            unpack(archive, tmp_path / "work" / "out")
        assert refused.value.field == "url"
    assert not (tmp_path / "work" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()
    assert list((tmp_path / "work").iterdir()) == []  # the temporary folder is gone
