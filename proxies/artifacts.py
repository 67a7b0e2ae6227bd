"""The artifact store: trained weights (safetensors), tokenizer and layout of each evaluation, under the
data directory (a shared path on a cluster), keyed by training key, with a retention policy (keep the
Pareto-front members and the last N) so that export can hand them over."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

_KEY_RE = re.compile(r"^[0-9a-f]{16,64}$")


def save_weights_folder(
    final: Path, model, tokenizer, layout_json: str, metadata: dict, fsync: bool = False
) -> Path:
    """`final/` with model.safetensors, tokenizer.json, layout.json and meta.json: written beside it, then
    renamed into place (a reader never sees half a folder); `fsync`: on disk before the rename."""
    from safetensors.torch import save_file

    tmp = final.with_name(f".{final.name}.{time.time_ns()}.tmp")
    tmp.mkdir(parents=True)
    # Tied weights (and the decode weight groups) share storage: safetensors refuses shared tensors, so
    # store contiguous copies.
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in model.state_dict().items()}
    save_file(tensors, str(tmp / "model.safetensors"))
    tokenizer.save(tmp / "tokenizer.json")
    (tmp / "layout.json").write_text(layout_json)
    (tmp / "meta.json").write_text(json.dumps(metadata, indent=1, default=str))
    if fsync:
        fsync_files(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def fsync_files(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())


class ArtifactStore:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    def path_for(self, key: str) -> Path:
        if not _KEY_RE.match(key):  # keys are hex digests: nothing else may become a path
            raise ValueError(f"artifact key: {key!r} is not a hex digest")
        return self.root / key[:2] / key

    def save(self, key: str, model, tokenizer, layout_json: str, metadata: dict) -> Path:
        return save_weights_folder(self.path_for(key), model, tokenizer, layout_json, metadata)

    def load_state_dict(self, key: str) -> dict:
        from safetensors.torch import load_file

        return load_file(str(self.path_for(key) / "model.safetensors"))

    def keys(self) -> list[str]:
        if not self.root.exists():
            return []
        return [p.name for p in self.root.glob("*/*") if p.is_dir() and _KEY_RE.match(p.name)]

    def retain(self, keep: set[str], keep_last: int) -> list[str]:
        """Delete every artifact that is neither in `keep` nor among the `keep_last` newest; returns the
        deleted keys."""
        entries = sorted(((self.path_for(k).stat().st_mtime, k) for k in self.keys()), reverse=True)
        newest = {k for _, k in entries[:keep_last]}
        deleted = []
        for _, key in entries:
            if key not in keep and key not in newest:
                shutil.rmtree(self.path_for(key))
                deleted.append(key)
        return deleted
