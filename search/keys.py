"""Result keys: what makes two evaluations the same (pure Python; the search de-duplicates with these).

A training result is keyed by (layout hash, proxy config hash, corpus fingerprint — path, content hash, split
seed —, tokenizer hash, device class and precision, the code versions of the operators it uses); a latency
result by (layout hash, latency config hash, device fingerprint hash).
"""

from __future__ import annotations

import hashlib
import json

from search.layout import Layout
from search.operators import OPERATORS


def _digest(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def operator_code_versions(layout: Layout) -> dict[str, int]:
    return {op: OPERATORS[op].code_version for op in sorted(set(layout.operators))}


def training_key(
    layout: Layout, proxy_config_hash: str, corpus_fingerprint: dict, device_class: str, precision: str
) -> str:
    corpus = {
        k: corpus_fingerprint.get(k)
        for k in ("corpus", "corpus_hash", "split_seed", "val_fraction", "tokenizer_hash")
    }
    return _digest(
        {
            "layout": layout.content_hash,
            "proxy": proxy_config_hash,
            "corpus": corpus,
            "device_class": device_class,
            "precision": precision,
            "code": operator_code_versions(layout),
        }
    )


def latency_key(layout: Layout, latency_config_hash: str, device_fingerprint_hash: str) -> str:
    return _digest(
        {
            "layout": layout.content_hash,
            "latency": latency_config_hash,
            "device": device_fingerprint_hash,
            "code": operator_code_versions(layout),
        }
    )
