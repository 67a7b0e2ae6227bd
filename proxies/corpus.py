"""Text corpora: where training text comes from, and its fingerprint.

Sources:
    stdlib          the Python standard library's own source (embedded default: present wherever Python is)
    PATH            a text file, a folder of text files, or a JSONL file with a `text` field
    hf:PATH         a Hugging Face `datasets` dataset saved on local disk (`save_to_disk`), `text` column

Paths resolve only inside the configured data roots (no `../` escapes, no symlinks out).
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

TEXT_SUFFIXES = {
    ".txt",
    ".md",
    ".py",
    ".rst",
    ".text",
    ".json",
    ".jsonl",
    ".csv",
    ".html",
    ".tex",
    ".c",
    ".h",
}
_STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


class CorpusError(ValueError):
    """Bad corpus input; names the path (or field) and the reason."""

    def __init__(self, where: str, reason: str):
        self.where, self.reason = where, reason
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True)
class Document:
    doc_id: str  # stable identifier (relative path, or path#line) used for the seeded split
    text: str


@dataclass(frozen=True)
class CorpusSource:
    spec: str  # "stdlib", a path, or "hf:PATH"
    text_field: str = "text"

    @property
    def kind(self) -> str:
        if self.spec == "stdlib":
            return "stdlib"
        return "hf" if self.spec.startswith("hf:") else "path"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def resolve_data_path(raw: str, data_roots: Sequence[str | Path]) -> Path:
    """Resolve a user-given path; it must lie inside one of the data roots (after resolving links)."""
    if not raw or "\x00" in raw:
        raise CorpusError(raw or "path", "empty or malformed path")
    try:  # a name the file system refuses (too long, say) is bad input, not a server error
        roots = [Path(r).expanduser().resolve() for r in data_roots]
        candidate = Path(raw).expanduser()
        paths = (
            [candidate.resolve()] if candidate.is_absolute() else [(r / candidate).resolve() for r in roots]
        )
        inside = [p for p in paths if any(p == r or r in p.parents for r in roots)]
        if not inside:
            raise CorpusError(raw, f"outside the configured data roots ({', '.join(map(str, roots))})")
        for path in inside:
            if path.exists():
                return path
    except OSError as exc:
        raise CorpusError(raw[:80], f"not a usable path ({exc.strerror or exc})") from None
    raise CorpusError(raw, "no such file or folder")


def iter_documents(source: CorpusSource, data_roots: Sequence[str | Path] = (".",)) -> Iterator[Document]:
    """The corpus's documents in a fixed order."""
    if source.kind == "stdlib":
        root = stdlib_root()
        yield from _folder_documents(root, suffixes={".py"}, skip_dirs=_STDLIB_SKIP_DIRS)
        return
    if source.kind == "hf":
        path = resolve_data_path(source.spec[3:], data_roots)
        yield from _hf_documents(path, source.text_field)
        return
    path = resolve_data_path(source.spec, data_roots)
    if path.is_dir():
        yield from _folder_documents(path, suffixes=TEXT_SUFFIXES, skip_dirs={"__pycache__", ".git"})
    elif path.suffix.lower() == ".jsonl":
        yield from _jsonl_documents(path, source.text_field)
    else:
        yield Document(path.name, _read_text(path))


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        raise CorpusError(str(path), "looks binary (NUL bytes): not a text corpus")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(str(path), f"is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _folder_documents(root: Path, suffixes: set[str], skip_dirs: set[str]) -> Iterator[Document]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs)
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.suffix.lower() not in suffixes or path.is_symlink():
                continue
            try:
                text = _read_text(path)
            except CorpusError:
                continue  # a folder may hold the odd binary or non-UTF-8 file: skip it, keep the rest
            if text.strip():
                yield Document(str(path.relative_to(root)), text)


def _jsonl_documents(path: Path, field: str) -> Iterator[Document]:
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"{path}:{line_no}", f"not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise CorpusError(f"{path}:{line_no}", f"no string field {field!r}")
            yield Document(f"{path.name}#{line_no}", record[field])


def _hf_documents(path: Path, field: str) -> Iterator[Document]:
    try:
        import datasets  # optional: only for corpora saved with `datasets.save_to_disk`
    except ImportError:
        raise CorpusError(
            str(path), "the `datasets` package is not installed (pip install datasets)"
        ) from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise CorpusError(str(path), f"not a dataset saved with save_to_disk ({exc})") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    if field not in ds.column_names:
        raise CorpusError(str(path), f"no column {field!r} (columns: {', '.join(ds.column_names)})")
    for index, text in enumerate(ds[field]):
        if isinstance(text, str) and text.strip():
            yield Document(f"{path.name}#{index}", text)


def fingerprint(source: CorpusSource, data_roots: Sequence[str | Path] = (".",)) -> str:
    """Content hash of the corpus (document ids and texts, in order)."""
    digest = hashlib.sha256()
    digest.update(f"{source.kind}:{source.text_field}".encode())
    for doc in iter_documents(source, data_roots):
        digest.update(doc.doc_id.encode() + b"\x00" + hashlib.sha256(doc.text.encode()).digest())
    return digest.hexdigest()
