"""A second corpus of a different kind from the embedded default (code): English prose, built from Debian's
`fortunes` package (quotations, literature excerpts, jokes and definitions; about 2.5 MB of text), one JSONL
document per fortune.

    apt-get install -y fortunes
    python benchmarks/studies/prose_corpus.py --out data/prose/fortunes.jsonl

Then give `data/prose/fortunes.jsonl` as a corpus (`--corpus`, or a study's `data.corpus`; the path must lie
inside the data roots).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SOURCE = Path("/usr/share/games/fortunes")


def fortunes(source: Path):
    """Each fortune of each plain-text file (the `.dat` indexes and `.u8` links skipped), stripped."""
    for path in sorted(source.iterdir()):
        if path.suffix or path.is_symlink() or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for entry in text.split("\n%\n"):
            entry = entry.strip().strip("%").strip()
            if entry:
                yield {"source": path.name, "text": entry}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=SOURCE, help="the fortunes folder")
    parser.add_argument("--out", type=Path, default=Path("data/prose/fortunes.jsonl"))
    args = parser.parse_args()
    if not args.source.is_dir():
        raise SystemExit(f"{args.source}: not found (apt-get install -y fortunes)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    n_docs = n_chars = 0
    with args.out.open("w", encoding="utf-8") as out:
        for doc in fortunes(args.source):
            out.write(json.dumps(doc) + "\n")
            n_docs, n_chars = n_docs + 1, n_chars + len(doc["text"])
    print(f"{args.out}: {n_docs} documents, {n_chars} characters")


if __name__ == "__main__":
    main()
