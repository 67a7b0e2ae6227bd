"""Tokenizers: bytes (the default, no training), a BPE trained on the corpus (cached), or a local Hugging Face
`tokenizer.json`. Every one reports the byte length of the text behind each token it produces, so that the
quality objective, `val_bpb` (bits per byte), is comparable across tokenizers."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np


class ByteTokenizer:
    """UTF-8 bytes; id 256 ends a document (counted as one byte, like the newline it stands for)."""

    kind = "bytes"
    vocab_size = 257
    eos_id = 256

    def encode_with_bytes(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
        return ids, np.ones_like(ids)

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    @property
    def hash(self) -> str:
        return hashlib.sha256(b"bytes-v1").hexdigest()

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"kind": "bytes", "vocab_size": self.vocab_size, "eos_id": self.eos_id}))


class HFTokenizer:
    """A `tokenizers.Tokenizer` (a local tokenizer.json, or a BPE trained here)."""

    kind = "hf"

    def __init__(self, tokenizer, eos_token: str | None = None):
        self.tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        eos = None
        for candidate in ([eos_token] if eos_token else []) + [
            "<|endoftext|>",
            "</s>",
            "<eos>",
            "<|end_of_text|>",
        ]:
            eos = tokenizer.token_to_id(candidate)
            if eos is not None:
                break
        if eos is None:  # no end-of-document token: the last id past the vocabulary becomes one
            eos = self.vocab_size
            self.vocab_size += 1
        self.eos_id = eos

    @classmethod
    def from_file(cls, path: str | Path) -> HFTokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)))

    def encode_with_bytes(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        enc = self.tok.encode(text, add_special_tokens=False)
        ids = np.asarray(enc.ids, dtype=np.int64)
        # Bytes behind each token from its character offsets (UTF-8 length of the span it covers); a span
        # that two tokens share (a character split across byte-level tokens) is counted once.
        nbytes = np.zeros(len(ids), dtype=np.int64)
        covered = 0
        for index, (start, end) in enumerate(enc.offsets):
            start = max(start, covered)
            if end > start:
                nbytes[index] = len(text[start:end].encode("utf-8"))
                covered = end
        return ids, nbytes

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([i for i in ids if i < self.tok.get_vocab_size()])

    @property
    def hash(self) -> str:
        return hashlib.sha256(self.tok.to_str().encode()).hexdigest()

    def save(self, path: Path) -> None:
        self.tok.save(str(path))


def train_bpe(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return HFTokenizer(tok)


def tokenizer_from_spec(
    spec: str, train_texts: Sequence[str] | None = None, cache_dir: Path | None = None, corpus_key: str = ""
) -> ByteTokenizer | HFTokenizer:
    """'bytes' | 'bpe:VOCAB' (trained on `train_texts`, cached under `cache_dir`) | 'file:PATH'."""
    if spec == "bytes":
        return ByteTokenizer()
    if spec.startswith("file:"):
        path = Path(spec[5:])
        if not path.is_file():
            raise ValueError(f"tokenizer: {path}: no such tokenizer file")
        return HFTokenizer.from_file(path)
    if spec.startswith("bpe:"):
        try:
            vocab = int(spec[4:])
        except ValueError:
            raise ValueError(f"tokenizer: {spec!r}: the vocabulary after 'bpe:' must be an integer") from None
        if not 300 <= vocab <= 262144:
            raise ValueError(f"tokenizer: BPE vocabulary {vocab} must be between 300 and 262144")
        cached = cache_dir / f"bpe-{vocab}-{corpus_key[:16]}.json" if cache_dir else None
        if cached is not None and cached.exists():
            return HFTokenizer.from_file(cached)
        if train_texts is None:
            raise ValueError("tokenizer: a BPE needs the training texts")
        tok = train_bpe(train_texts, vocab)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(".tmp")
            tok.save(tmp)
            tmp.replace(cached)
        return tok
    raise ValueError(f"tokenizer: {spec!r} is not 'bytes', 'bpe:VOCAB' or 'file:PATH'")
