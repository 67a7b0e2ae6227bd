"""Tokenized train/validation arrays: a deterministic split by document (seeded), tokenized once and cached
as memory-mapped arrays, so that a second candidate does not re-tokenize."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from proxies.corpus import CorpusError, CorpusSource, Document, iter_documents
from proxies.tokenizer import ByteTokenizer, HFTokenizer, tokenizer_from_spec
from search.evaluation import DataConfig  # noqa: F401 - re-exported beside the loader that reads it


@dataclass
class TokenData:
    train: np.ndarray  # (N_train,) token ids, documents joined by EOS
    val: np.ndarray  # (N_val,)
    val_bytes: np.ndarray  # (N_val,) bytes of text behind each validation token
    tokenizer: ByteTokenizer | HFTokenizer
    fingerprint: dict = field(default_factory=dict)  # corpus content hash, split seed, tokenizer hash

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size


def is_validation(doc_id: str, seed: int, fraction: float) -> bool:
    """Seeded, per-document split: stable under adding or removing other documents."""
    h = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < fraction


def load_data(
    config: DataConfig, data_dir: str | Path, data_roots: Sequence[str | Path] = (".",)
) -> TokenData:
    """Tokenize (or reuse the cached arrays of) the corpus under `data_dir/cache/tokens/`."""
    data_dir = Path(data_dir)
    source = CorpusSource(config.corpus, config.text_field)
    docs = list(iter_documents(source, data_roots))
    if not docs:
        raise CorpusError(config.corpus, "is empty: no non-empty text documents found")
    corpus_hash = _corpus_hash(source, docs)
    train_docs = [d for d in docs if not is_validation(d.doc_id, config.split_seed, config.val_fraction)]
    val_docs = [d for d in docs if is_validation(d.doc_id, config.split_seed, config.val_fraction)]
    if not val_docs or not train_docs:
        raise CorpusError(
            config.corpus,
            f"too small to split: {len(docs)} document(s) give "
            f"{len(train_docs)} for training and {len(val_docs)} for validation "
            f"(val_fraction={config.val_fraction}); add documents or split a large file",
        )
    tokenizer = tokenizer_from_spec(
        config.tokenizer,
        [d.text for d in train_docs],
        cache_dir=data_dir / "cache" / "tokenizers",
        corpus_key=corpus_hash,
    )
    key = hashlib.sha256(
        json.dumps([corpus_hash, config.split_seed, config.val_fraction, tokenizer.hash]).encode()
    ).hexdigest()[:24]
    folder = data_dir / "cache" / "tokens" / key
    fingerprint = {
        "corpus": config.corpus,
        "corpus_hash": corpus_hash,
        "split_seed": config.split_seed,
        "val_fraction": config.val_fraction,
        "tokenizer": config.tokenizer,
        "tokenizer_hash": tokenizer.hash,
        "key": key,
    }
    if not (folder / "meta.json").exists():
        _tokenize_to(folder, tokenizer, train_docs, val_docs, fingerprint)
    meta = json.loads((folder / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    train = np.memmap(folder / "train.bin", dtype=dtype, mode="r", shape=(meta["n_train"],))
    val = np.memmap(folder / "val.bin", dtype=dtype, mode="r", shape=(meta["n_val"],))
    val_bytes = np.memmap(folder / "val_bytes.bin", dtype=np.uint16, mode="r", shape=(meta["n_val"],))
    if meta["n_val"] < config.min_val_tokens:
        raise CorpusError(
            config.corpus,
            f"validation split has {meta['n_val']} tokens, fewer than "
            f"min_val_tokens={config.min_val_tokens}: the corpus is too small",
        )
    return TokenData(train, val, val_bytes, tokenizer, fingerprint)


def _corpus_hash(source: CorpusSource, docs: list[Document]) -> str:
    digest = hashlib.sha256(f"{source.kind}:{source.text_field}".encode())
    for doc in docs:
        digest.update(doc.doc_id.encode() + b"\x00" + hashlib.sha256(doc.text.encode()).digest())
    return digest.hexdigest()


def _encode_docs(tokenizer, docs: list[Document]) -> tuple[np.ndarray, np.ndarray]:
    ids, nbytes = [], []
    for doc in docs:
        doc_ids, doc_bytes = tokenizer.encode_with_bytes(doc.text)
        ids += [doc_ids, np.array([tokenizer.eos_id])]
        nbytes += [doc_bytes, np.array([1])]
    return np.concatenate(ids), np.concatenate(nbytes)


def _tokenize_to(folder: Path, tokenizer, train_docs, val_docs, fingerprint: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
    train_ids, _ = _encode_docs(tokenizer, train_docs)
    val_ids, val_bytes = _encode_docs(tokenizer, val_docs)
    # Write under temporary names, then rename: a concurrent reader sees whole files or none.
    pid = os.getpid()
    for name, array in (
        ("train.bin", train_ids.astype(dtype)),
        ("val.bin", val_ids.astype(dtype)),
        ("val_bytes.bin", np.minimum(val_bytes, 65535).astype(np.uint16)),
    ):
        tmp = folder / f"{name}.{pid}.tmp"
        array.tofile(tmp)
        tmp.replace(folder / name)
    tokenizer.save(folder / "tokenizer.json")
    meta = {
        **fingerprint,
        "dtype": np.dtype(dtype).name,
        "n_train": int(len(train_ids)),
        "n_val": int(len(val_ids)),
        "n_train_docs": len(train_docs),
        "n_val_docs": len(val_docs),
    }
    tmp = folder / f"meta.json.{pid}.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(folder / "meta.json")


def bits_per_byte(total_nats: float, total_bytes: int) -> float:
    return total_nats / math.log(2) / max(1, total_bytes)
