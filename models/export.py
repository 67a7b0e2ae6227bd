"""Export a candidate as a Hugging Face folder that `AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)` loads:

    config.json             the layout and dims, vocabulary, token ids, model_type, architectures, auto_map
    model.safetensors       the weights: the candidate's proxy artifact, its longer-trained checkpoint, or a
                            fresh initialization (any width, the layout otherwise unchanged)
    tokenizer.json          a `tokenizers` file (the byte tokenizer as an equivalent byte-level one)
    tokenizer_config.json   what AutoTokenizer needs to load it
    configuration_hybridnas.py, modeling_hybridnas.py   the remote code (models/hf/)
    README.md               a model card: the measured metrics, proxy config, data settings, device

`export_source` reads what a candidate holds from the storage; `write_export` writes the folder. Both the CLI
and the REST route call them, so every check is the same: the output folder must be new or empty, artifact
paths read from the database must lie inside the data dir's artifacts, `--d-model` must keep the layout valid.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from search.layout import Layout, LayoutError

WEIGHTS = ("proxy", "trained", "init")
EOS_TOKEN = "<|endoftext|>"
HF_DIR = Path(__file__).resolve().parent / "hf"
REMOTE_CODE = ("configuration_hybridnas.py", "modeling_hybridnas.py")
WEIGHT_FILES = ("model.safetensors", "tokenizer.json", "layout.json", "meta.json")


class ExportError(ValueError):
    """An export refused: `field` names what is wrong, `status` the HTTP status it answers (404: no such
    candidate, 409: the candidate has no such weights, 422: a bad argument)."""

    def __init__(self, field: str, reason: str, status: int = 422):
        self.field, self.reason, self.status = field, reason, status
        super().__init__(f"{field}: {reason}")


@dataclass(frozen=True)
class ExportSource:
    """What the export of one candidate reads: its record, its results and the data dir its files are in."""

    candidate_id: int
    status: str
    layout: dict
    layout_hash: str
    metrics: dict[str, Any]
    artifact_path: str | None
    data_dir: Path
    search_config: dict = field(default_factory=dict)
    training: dict | None = None
    latency: dict | None = None
    device_fingerprint: dict | None = None


def export_source(storage, candidate_id: int, data_dir: str | Path) -> ExportSource:
    """The candidate `candidate_id` from `storage` (a search.storage.Storage), for export."""
    c = storage.get_candidate(candidate_id)
    if c is None:
        raise ExportError("candidate_id", f"no candidate {candidate_id}", status=404)
    training = storage.get_training_result(c.training_key) if c.training_key else None
    latency = storage.get_latency_result(c.latency_key) if c.latency_key else None
    job = storage.get_job(c.job_id)
    result = dict(training.result or {}) if training is not None else None
    if result is not None:
        result.pop("log_tail", None)
    return ExportSource(
        candidate_id=c.id,
        status=c.status,
        layout=c.layout,
        layout_hash=c.layout_hash,
        metrics={"val_bpb": c.val_bpb, "decode_ms": c.decode_ms, "n_params": c.n_params},
        artifact_path=training.artifact_path if training is not None else None,
        data_dir=Path(data_dir),
        search_config=dict(job.config or {}) if job is not None else {},
        training=result,
        latency=latency.result if latency is not None else None,
        device_fingerprint=latency.device_fingerprint if latency is not None else None,
    )


# ------------------------------------------------------------------------------------------ weights folders


def proxy_folder(source: ExportSource) -> Path:
    """The candidate's artifact folder, checked to lie inside `<data_dir>/artifacts` and to hold its files."""
    if not source.artifact_path:
        raise ExportError(
            "weights",
            f"candidate {source.candidate_id} ({source.status}) has no proxy weights: no artifact was saved",
            status=409,
        )
    root = (source.data_dir / "artifacts").resolve()
    folder = Path(source.artifact_path).resolve()
    if not folder.is_relative_to(root):
        raise ExportError("artifact_path", f"{folder} is outside the data dir's artifacts ({root})")
    return _checked_folder(folder, source, "proxy weights (artifacts pruned?)")


def trained_folder(source: ExportSource) -> Path:
    """`<data_dir>/trained/candidate-<ID>/final/`: the longer-trained checkpoint."""
    folder = (source.data_dir / "trained" / f"candidate-{source.candidate_id}" / "final").resolve()
    return _checked_folder(folder, source, "trained weights (train it first)")


def _checked_folder(folder: Path, source: ExportSource, what: str) -> Path:
    missing = [name for name in WEIGHT_FILES if not (folder / name).is_file()]
    if missing:
        raise ExportError(
            "weights",
            f"candidate {source.candidate_id} has no {what}: {folder} lacks {', '.join(missing)}",
            status=409,
        )
    stored = Layout.from_json((folder / "layout.json").read_text())
    if stored.content_hash != source.layout_hash:
        raise ExportError("weights", f"{folder} holds another layout than candidate {source.candidate_id}'s")
    return folder


def _tokenizer_folder(source: ExportSource) -> Path | None:
    """Where an `init` export takes its tokenizer: the artifact, else the trained checkpoint, else none."""
    for find in (proxy_folder, trained_folder):
        try:
            return find(source)
        except ExportError as exc:
            if exc.status != 409:
                raise
    return None


# --------------------------------------------------------------------------------------------- tokenizer


def hf_tokenizer(path: Path | None):
    """A `tokenizers.Tokenizer` for the tokenizer.json a worker saved (None: the byte tokenizer) with its
    end-of-document token registered; (tokenizer, eos token)."""
    from tokenizers import AddedToken, Tokenizer

    spec = json.loads(path.read_text()) if path is not None else {"kind": "bytes"}
    if spec.get("kind") == "bytes":
        return _byte_tokenizer(), EOS_TOKEN
    tok = Tokenizer.from_file(str(path))
    for name in (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>"):  # proxies.tokenizer.HFTokenizer's choice
        if tok.token_to_id(name) is not None:
            return tok, name
    tok.add_special_tokens([AddedToken(EOS_TOKEN, special=True)])  # the id past the vocabulary, as trained
    return tok, EOS_TOKEN


def _byte_tokenizer():
    """UTF-8 bytes as ids 0..255 and the end-of-document token at 256 (proxies.tokenizer.ByteTokenizer), as
    a byte-level BPE without merges."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={symbols[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOS_TOKEN, special=True)])
    return tok


def _write_tokenizer(folder: Path, source_json: Path | None) -> tuple[int, int]:
    """tokenizer.json and tokenizer_config.json; (vocabulary size, eos id)."""
    tok, eos = hf_tokenizer(source_json)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "model_max_length": 1 << 20}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
    return tok.get_vocab_size(), tok.token_to_id(eos)


# ------------------------------------------------------------------------------------------------ layout


def export_layout(source: ExportSource, weights: str, d_model: int | None) -> Layout:
    """The candidate's layout, at width `d_model` for an `init` export."""
    layout = Layout.from_dict(source.layout)
    if d_model is None:
        return layout
    if weights != "init":
        raise ExportError("d_model", f"sets the width of fresh weights only (weights=init), not {weights}")
    if not isinstance(d_model, int) or isinstance(d_model, bool) or d_model < 1:
        raise ExportError("d_model", f"must be a positive integer, got {d_model!r}")
    try:
        resized = layout.replace(d_model=d_model)
        resized.validate()
    except LayoutError as exc:
        raise ExportError("d_model", f"{d_model} makes the layout invalid: {exc}") from None
    return resized


# ---------------------------------------------------------------------------------------------- writing


def check_out_dir(out: Path) -> None:
    """The output folder must not exist, or be an empty folder: nothing of the user's is overwritten."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ExportError("out", f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        raise ExportError("out", f"{out} exists and is not empty (nothing is overwritten)")


def write_export(
    source: ExportSource, out: str | Path, weights: str = "proxy", d_model: int | None = None, seed: int = 0
) -> Path:
    """Write the export folder `out` (made in a temporary folder beside it, then moved there whole)."""
    out = Path(out)
    if weights not in WEIGHTS:
        raise ExportError("weights", f"{weights!r} is not one of {', '.join(WEIGHTS)}")
    check_out_dir(out)
    layout = export_layout(source, weights, d_model)
    folder = {"proxy": proxy_folder, "trained": trained_folder}.get(weights, _tokenizer_folder)(source)
    if folder is None and (source.search_config.get("data") or {}).get("tokenizer", "bytes") != "bytes":
        raise ExportError(
            "weights", f"candidate {source.candidate_id} has no saved tokenizer for fresh weights", status=409
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _write_folder(tmp, source, layout, weights, folder, seed)
        if out.is_dir():
            out.rmdir()  # empty (checked): the finished folder takes its place
        tmp.replace(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_folder(tmp: Path, source: ExportSource, layout: Layout, weights: str, folder, seed: int) -> None:
    vocab_size, eos_id = _write_tokenizer(tmp, folder / "tokenizer.json" if folder is not None else None)
    model, meta = _build_model(layout, vocab_size, eos_id, weights, folder, seed, source)
    model.save_pretrained(str(tmp))
    for name in REMOTE_CODE:
        shutil.copyfile(HF_DIR / name, tmp / name)
    (tmp / "README.md").write_text(model_card(source, model, weights, meta))


def _build_model(layout, vocab_size, eos_id, weights, folder, seed, source):
    """The wrapper with the chosen weights, and the weights folder's meta.json ({} for fresh weights)."""
    import torch
    from safetensors.torch import load_file

    from models.hf.configuration_hybridnas import HybridnasConfig
    from models.hf.modeling_hybridnas import HybridnasForCausalLM

    state, meta = None, {}
    if weights != "init":
        state = load_file(str(folder / "model.safetensors"))
        meta = json.loads((folder / "meta.json").read_text())
        vocab_size = int(meta.get("vocab_size") or state["embed.weight"].shape[0])
        # The proxy config may add meta tokens to the layout it trains (proxies.train.build_model).
        layout = layout.replace(meta_tokens=int(state["meta"].shape[0]) if "meta" in state else 0)
    config = HybridnasConfig(
        layout=layout.to_dict(),
        vocab_size=vocab_size,
        eos_token_id=eos_id,
        architectures=["HybridnasForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_hybridnas.HybridnasConfig",
            "AutoModelForCausalLM": "modeling_hybridnas.HybridnasForCausalLM",
        },
        hybridnas={
            "candidate_id": source.candidate_id,
            "layout_hash": source.layout_hash,
            "weights": weights,
        },
    )
    torch.manual_seed(seed)
    model = HybridnasForCausalLM(config)
    if state is not None:
        model.model.load_state_dict(state, strict=True)
    return model.eval(), meta


# ------------------------------------------------------------------------------------------- model card


def model_card(source: ExportSource, model, weights: str, meta: dict) -> str:
    """README.md: what the candidate is, what was measured, and how to load it."""
    layout = Layout.from_dict(model.config.layout)
    m = source.metrics
    rows = [
        ("val_bpb (proxy)", _fmt(m.get("val_bpb"))),
        ("decode (ms/token)", _fmt(m.get("decode_ms"))),
        ("parameters (searched layout)", _fmt(m.get("n_params"))),
        ("parameters (this export)", f"{model.model.num_parameters():,}"),
    ]
    if weights == "trained":
        rows += [("trained steps", _fmt(meta.get("steps"))), ("val_bpb (trained)", _fmt(meta.get("val_bpb")))]
    weights_text = {
        "proxy": "the proxy short-training's weights (the search's quality estimate)",
        "trained": "the longer-trained checkpoint",
        "init": "freshly initialized (untrained)",
    }[weights]
    return "\n".join(
        [
            f"# hybridnas candidate {source.candidate_id}",
            "",
            f"A hybrid small language model found by a hybridnas search: `{layout.compact()}`, "
            f"d_model {layout.d_model}, {len(layout.operators)} operators. Weights: {weights_text}.",
            "",
            "## Loading",
            "",
            "The remote code imports the model from the hybridnas package: `pip install hybridnas` first.",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            'model = AutoModelForCausalLM.from_pretrained("DIR", trust_remote_code=True)',
            'tokenizer = AutoTokenizer.from_pretrained("DIR", trust_remote_code=True)',
            "```",
            "",
            'or `hybridnas generate DIR --prompt "def "`.',
            "",
            "## Measured",
            "",
            "| metric | value |",
            "| --- | --- |",
            *(f"| {name} | {value} |" for name, value in rows),
            "",
            *_json_section("Layout", model.config.layout),
            *_json_section("Proxy config", meta.get("proxy_config") or source.search_config.get("proxy")),
            *_json_section("Data settings", source.search_config.get("data")),
            *_json_section("Device fingerprint (latency)", source.device_fingerprint),
        ]
    )


def _json_section(title: str, value: Any) -> list[str]:
    body = json.dumps(value, indent=1, sort_keys=True, default=str) if value else "(not recorded)"
    return [f"## {title}", "", "```json", body, "```", ""]


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return (
        f"{value:.4f}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else str(value)
    )
