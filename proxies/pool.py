"""Many short trainings on one machine: a process pool, one torch thread per process (on a small CPU,
two single-thread processes train about twice as much as one two-thread process), the tokenized corpus
mapped once per process. Used by the fidelity run and the benchmark tables; the search uses Ray.

A job trains one layout at one budget (`train_many`), or climbs a ladder of wsd budgets (`train_ladders`):
the first rung fresh, each higher rung continued from the rung below's stable-phase checkpoint (kept in a
temporary folder removed when the layout is done)."""

from __future__ import annotations

import tempfile
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


def _row(layout: Layout, proxy_kwargs: dict, result, extra: dict) -> dict:
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


def _train(job: tuple) -> dict:
    layout_json, proxy_kwargs, extra = job
    from proxies.train import ProxyConfig, train_proxy

    layout = Layout.from_json(layout_json)
    result, _model = train_proxy(layout, ProxyConfig(**proxy_kwargs), _STATE["data"], device="cpu")
    return _row(layout, proxy_kwargs, result, extra)


def _train_ladder(job: tuple) -> list[dict]:
    """One layout up every rung: each rung's run continues from the stable checkpoint of the one below."""
    layout_json, rung_kwargs, extra = job
    from proxies.train import ProxyConfig, train_proxy

    layout = Layout.from_json(layout_json)
    rows, below = [], None
    with tempfile.TemporaryDirectory(prefix="ladder-") as folder:
        for rung, proxy_kwargs in enumerate(rung_kwargs):
            save = Path(folder) / f"rung-{rung}" if rung < len(rung_kwargs) - 1 else None
            result, _model = train_proxy(
                layout,
                ProxyConfig(**proxy_kwargs),
                _STATE["data"],
                device="cpu",
                continue_from=below,
                save_stable=save,
            )
            below = save
            row = _row(layout, proxy_kwargs, result, extra)
            row.update(
                rung=rung,
                steps_trained=result.steps_trained,
                continued_from_step="" if result.continued_from_step is None else result.continued_from_step,
                fresh_reason=result.fresh_reason or "",
            )
            rows.append(row)
    return rows


def _imap(function, payload: list, workers: int, data_dir: Path) -> Iterator:
    import multiprocessing as mp

    if not payload:
        return
    _init(str(data_dir))  # tokenize once here, so the workers only map the cached arrays
    with mp.get_context("spawn").Pool(workers, initializer=_init, initargs=(str(data_dir),)) as pool:
        yield from pool.imap_unordered(function, payload)


def train_many(jobs: Iterable[tuple[Layout, dict, dict]], workers: int, data_dir: Path) -> Iterator[dict]:
    """Train (layout, proxy settings, extra columns) jobs; yields one row per job as it completes."""
    payload = [(layout.to_json(None), proxy, extra) for layout, proxy, extra in jobs]
    yield from _imap(_train, payload, workers, data_dir)


def train_ladders(
    jobs: Iterable[tuple[Layout, list[dict], dict]], workers: int, data_dir: Path
) -> Iterator[list[dict]]:
    """Train (layout, proxy settings per rung, extra columns) jobs, each rung continued from the one below;
    yields each layout's rows (one per rung: its `rung`, `steps_trained`, `continued_from_step`,
    `fresh_reason`) as the layout completes."""
    payload = [(layout.to_json(None), rungs, extra) for layout, rungs, extra in jobs]
    yield from _imap(_train_ladder, payload, workers, data_dir)
