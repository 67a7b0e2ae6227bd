"""Many short trainings on one machine: a process pool, one torch thread per process (on a small CPU,
two single-thread processes train about twice as much as one two-thread process), the tokenized corpus
mapped once per process. Used by the fidelity run and the benchmark tables; the search uses Ray."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from search.layout import Layout
from search.params import count_parameters

_STATE: dict = {}


def _init(data_dir: str) -> None:
    import torch

    torch.set_num_threads(1)
    from proxies.dataset import DataConfig, load_data

    _STATE["data"] = load_data(DataConfig(), data_dir)


def _train(job: tuple) -> dict:
    layout_json, proxy_kwargs, extra = job
    from proxies.train import ProxyConfig, train_proxy

    layout = Layout.from_json(layout_json)
    result, _model = train_proxy(layout, ProxyConfig(**proxy_kwargs), _STATE["data"], device="cpu")
    return {
        **extra,
        "layout_hash": layout.content_hash,
        "name": layout.name or "",
        "operators": layout.compact(),
        "d_model": layout.d_model,
        "n_params": count_parameters(layout, _STATE["data"].vocab_size).total,
        "steps": proxy_kwargs.get("steps"),
        "seed": proxy_kwargs.get("seed", 0),
        "status": result.status,
        "val_bpb": result.val_bpb,
        "val_loss": result.val_loss,
        "final_train_loss": result.final_train_loss,
        "wall_s": round(result.wall_s, 2),
        "failure_reason": result.failure_reason or "",
    }


def train_many(jobs: Iterable[tuple[Layout, dict, dict]], workers: int, data_dir: Path) -> Iterator[dict]:
    """Train (layout, proxy settings, extra columns) jobs; yields one row per job as it completes."""
    import multiprocessing as mp

    payload = [(layout.to_json(None), proxy, extra) for layout, proxy, extra in jobs]
    if not payload:
        return
    _init(str(data_dir))  # tokenize once here, so the workers only map the cached arrays
    with mp.get_context("spawn").Pool(workers, initializer=_init, initargs=(str(data_dir),)) as pool:
        yield from pool.imap_unordered(_train, payload)
