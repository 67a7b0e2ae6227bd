"""`hybridnas export` and `hybridnas generate`: a candidate as a Hugging Face folder, and text from one.

`export` reads the local database (and the data dir's artifacts) in this process, or with `--url` /
HYBRIDNAS_URL downloads the coordinator's `GET /api/candidates/{id}/export.tar.gz` and unpacks it; both run
models/export.py's checks. Exit codes: 0 done; 1 nothing to export (no such candidate, no such weights);
2 a usage or validation error, naming the option.
"""

from __future__ import annotations

import io
import sys
import tarfile
from pathlib import Path

import typer
from rich.console import Console

err_console = Console(stderr=True, soft_wrap=True)
EXPORT_ROUTE = "/api/candidates/{id}/export.tar.gz"


def _needs_transformers() -> None:
    from importlib.util import find_spec

    if find_spec("transformers") is None:
        _fail("transformers", "not installed: `pip install 'hybridnas[hf]'`", 1)


def _fail(option: str, reason: str, code: int) -> None:
    err_console.print(f"[red]error[/red] {option}: {reason}", highlight=False)
    raise typer.Exit(code)


def export_command(
    candidate_id: int = typer.Argument(..., min=1, help="the candidate's id"),
    out: Path = typer.Option(..., "--out", help="the folder to write (must not exist, or be empty)"),
    weights: str = typer.Option(
        "proxy",
        "--weights",
        help="proxy (its short-training), trained (its longer checkpoint) or init (fresh)",
    ),
    d_model: int = typer.Option(
        None, "--d-model", min=1, help="the width of fresh weights (with --weights init)"
    ),
    seed: int = typer.Option(0, "--seed", min=0, help="the seed of fresh weights"),
    db: str = typer.Option(
        None, "--db", help="database URL (default: the settings': SQLite under the data dir)"
    ),
    url: str = typer.Option(
        None, "--url", envvar="HYBRIDNAS_URL", help="a coordinator's URL: export from it"
    ),
) -> None:
    """Write a candidate as a folder that transformers loads (AutoModelForCausalLM, trust_remote_code)."""
    from models.export import ExportError, check_out_dir

    _needs_transformers()
    try:
        check_out_dir(out)
        if url:
            _download(url, candidate_id, out, weights, d_model, seed)
        else:
            _export_locally(db, candidate_id, out, weights, d_model, seed)
    except ExportError as exc:
        option = {"out": "--out", "weights": "--weights", "d_model": "--d-model"}.get(exc.field, exc.field)
        _fail(option, exc.reason, 2 if exc.status == 422 else 1)
    err_console.print(f"exported candidate {candidate_id} ({weights} weights) to {out}")


def _export_locally(db: str | None, candidate_id: int, out: Path, weights: str, d_model, seed: int) -> None:
    from api.search_cli import _local_settings
    from models.export import export_source, write_export
    from search.storage import Storage

    settings = _local_settings(db, create=False)
    with Storage(settings.resolved_database_url()) as storage:
        source = export_source(storage, candidate_id, settings.resolved_data_dir())
    write_export(source, out, weights, d_model, seed)


def _download(url: str, candidate_id: int, out: Path, weights: str, d_model, seed: int) -> None:
    from api.search_cli import reported
    from hybridnas.client import Client

    params = {"weights": weights, "seed": seed, **({"d_model": d_model} if d_model is not None else {})}
    with reported(), Client(url, timeout_s=600.0) as client:
        archive = client.request("GET", EXPORT_ROUTE.format(id=candidate_id), params=params).content
    unpack(archive, out)


def unpack(archive: bytes, out: Path) -> None:
    """Unpack an export archive (one top folder) into `out`; tarfile's `data` filter refuses absolute paths,
    `..`, links out of the folder and special files."""
    import shutil
    import tempfile

    from models.export import ExportError

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        try:
            with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
                tar.extractall(tmp, filter="data")
        except tarfile.TarError as exc:
            raise ExportError(
                "url", f"the coordinator's archive cannot be unpacked: {exc}", status=502
            ) from None
        tops = list(tmp.iterdir())
        if len(tops) != 1 or not tops[0].is_dir():
            raise ExportError("url", "the coordinator's archive is not one export folder", status=502)
        if out.is_dir():
            out.rmdir()  # empty (checked before the download)
        tops[0].replace(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def generate_command(
    folder: Path = typer.Argument(..., help="an exported folder (`hybridnas export`)"),
    prompt: str = typer.Option(..., "--prompt", help="the text to continue"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="tokens to generate"),
    temperature: float = typer.Option(1.0, "--temperature", help="0: greedy; else the sampling temperature"),
    top_k: int = typer.Option(0, "--top-k", help="sample among the k likeliest tokens (0: off)"),
    top_p: float = typer.Option(1.0, "--top-p", help="sample within this probability mass, in (0, 1]"),
    seed: int = typer.Option(None, "--seed", help="the sampling seed (a rerun gives the same text)"),
    greedy: bool = typer.Option(
        False, "--greedy", help="the likeliest token each step (same as --temperature 0)"
    ),
) -> None:
    """Continue a prompt with an exported model, printing the text as it is decoded."""
    from models.generate import GenerationError, Sampling, generate_text, load_exported

    _needs_transformers()
    sampling = Sampling(max_new_tokens, temperature, top_k, top_p, seed, greedy)
    try:
        sampling.check()
        if not prompt:
            raise GenerationError("prompt", "must be a non-empty text")
        model, tokenizer = load_exported(folder)
        generate_text(model, tokenizer, prompt, sampling, on_text=_write)
    except GenerationError as exc:
        _fail("DIR" if exc.option == "dir" else "--" + exc.option.replace("_", "-"), exc.reason, 2)
    sys.stdout.write("\n")


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def register_model_commands(app: typer.Typer) -> None:
    """`hybridnas export` and `hybridnas generate` on the main command line."""
    app.command("export")(export_command)
    app.command("generate")(generate_command)
