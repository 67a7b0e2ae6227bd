"""Text generation from an exported folder (models/export.py), through transformers' `generate()` on the
remote-code wrapper: greedy (temperature 0, or `greedy`), or temperature / top-k / top-p sampling, with the
text streamed as it is decoded.

    model, tokenizer = load_exported(folder)
    text = generate_text(model, tokenizer, "def ", Sampling(max_new_tokens=32, temperature=0), on_text=print)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from transformers.generation.streamers import BaseStreamer

MAX_NEW_TOKENS = 1 << 16


class GenerationError(ValueError):
    """A bad generation argument: `option` names it (the keyword; the CLI shows it as --option)."""

    def __init__(self, option: str, reason: str):
        self.option, self.reason = option, reason
        super().__init__(f"{option}: {reason}")


@dataclass(frozen=True)
class Sampling:
    """How to pick each token. temperature 0 (or greedy) is greedy; top_k 0 and top_p 1 switch those off."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    greedy: bool = False

    def check(self) -> Sampling:
        if not _is_int(self.max_new_tokens) or not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise GenerationError(
                "max_new_tokens", f"must be 1 to {MAX_NEW_TOKENS}, got {self.max_new_tokens!r}"
            )
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise GenerationError("temperature", f"must be a finite number >= 0, got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise GenerationError("top_k", f"must be an integer >= 0 (0: off), got {self.top_k!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise GenerationError("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise GenerationError("seed", f"must be an integer in [0, 2**63), got {self.seed!r}")
        return self

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0

    def generate_kwargs(self) -> dict:
        """The arguments of transformers' generate() for these settings."""
        if self.is_greedy:
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False}
        return {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": True,
            "temperature": float(self.temperature),
            "top_k": self.top_k,  # 0: off (else generate() would apply its default of 50)
            "top_p": float(self.top_p),
        }


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def load_exported(folder: str | Path):
    """The model (eval mode) and tokenizer of an export folder, from local files only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise GenerationError("dir", f"{folder} is not an exported model folder (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True, local_files_only=True)
    return model.eval(), tokenizer


class TextDeltas(BaseStreamer):
    """A generate() streamer that decodes the growing sequence and hands on only the new text. A trailing
    U+FFFD (an incomplete UTF-8 character, one byte token at a time) is held back until it completes."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]):
        self.tokenizer, self.on_text = tokenizer, on_text
        self.ids: list[int] = []
        self.sent = ""
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() first puts the prompt
            self.prompt_seen = True
            return
        self.ids.extend(int(i) for i in value.reshape(-1).tolist())
        self._emit(final=False)

    def end(self) -> None:
        self._emit(final=True)

    def _emit(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not final:
            text = text.rstrip("\ufffd")
        if text.startswith(self.sent) and len(text) > len(self.sent):
            self.on_text(text[len(self.sent) :])
            self.sent = text


def generate_ids(model, tokenizer, prompt: str, sampling: Sampling, streamer: BaseStreamer | None = None):
    """The prompt's ids followed by the generated ones, (1, T) long."""
    import torch

    sampling.check()
    if not isinstance(prompt, str) or not prompt:
        raise GenerationError("prompt", "must be a non-empty text")
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)], dtype=torch.long)
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    with torch.no_grad():
        return model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            pad_token_id=model.config.eos_token_id,
            streamer=streamer,
            **sampling.generate_kwargs(),
        )


def generate_text(
    model, tokenizer, prompt: str, sampling: Sampling, on_text: Callable[[str], None] | None = None
) -> str:
    """The text generated after `prompt`; `on_text` receives it piece by piece as it is decoded."""
    pieces: list[str] = []

    def collect(piece: str) -> None:
        pieces.append(piece)
        if on_text is not None:
            on_text(piece)

    generate_ids(model, tokenizer, prompt, sampling, TextDeltas(tokenizer, collect))
    return "".join(pieces)
