"""A search written through the storage seam, for the dashboard's tests: layouts sampled from the CPU space
with mutation lineage, objectives from a seeded formula, the front materialized as the engine does
(`Storage.set_front`), the hypervolume history recorded, and real training/latency result rows for the
candidates that need a loss curve and a measured spread. No evaluation runs (the engine's own tests do that):
what these tests check is how the pages show what storage holds."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from search.layout import Layout
from search.pareto import pareto_front
from search.presets import get_preset
from search.space import cpu_space
from search.storage import Storage


@dataclass
class Seeded:
    job_id: int
    ids: list[int] = field(default_factory=list)  # every candidate, in id order
    failed: list[int] = field(default_factory=list)
    front: list[int] = field(default_factory=list)
    presets: dict[int, str] = field(default_factory=dict)


def _objectives(layout: Layout, rng: random.Random) -> tuple[float, float, int]:
    share_attention = layout.mixers.count("attention") / max(1, len(layout.mixers))
    val_bpb = 2.6 - 0.05 * layout.depth - 0.2 * share_attention + rng.gauss(0, 0.05)
    decode_ms = 0.4 + 0.12 * layout.depth + 0.3 * share_attention + rng.gauss(0, 0.02)
    return round(val_bpb, 5), round(max(0.05, decode_ms), 5), 1000 * layout.depth + layout.d_model


def seed_search(
    store: Storage,
    n: int,
    *,
    name: str = "seeded search",
    status: str = "completed",
    fail_every: int = 0,
    seed: int = 0,
    with_presets: bool = True,
) -> Seeded:
    rng = random.Random(seed)
    space = cpu_space()
    config = {"strategy": "pareto-aging", "budget": n, "objectives": ["val_bpb", "decode_ms"]}
    job_id = store.create_job("search", config, name=name, budget=n)
    seeded = Seeded(job_id)
    named = [get_preset(p) for p in ("llama", "mamba2")]
    done: list[tuple[int, float, float]] = []
    layouts: dict[int, Layout] = {}
    for index in range(n):
        parent = rng.choice(seeded.ids) if seeded.ids and index >= 8 else None
        if index < len(named) and with_presets:
            layout, mutation = named[index], None
        elif parent is not None:
            layout, mutation = space.mutate_layout(layouts[parent], rng)
            mutation = mutation.as_dict()
        else:
            layout, mutation = space.sample_layout(rng), None
        generation = 0 if parent is None else store.get_candidate(parent).generation + 1
        candidate_id = store.add_candidate(
            job_id, layout.to_dict(), f"{layout.content_hash}-{index}", parent, generation, mutation
        )
        layouts[candidate_id] = layout
        seeded.ids.append(candidate_id)
        if layout.name:
            seeded.presets[candidate_id] = layout.name
        store.mark_running(candidate_id)
        if fail_every and index % fail_every == fail_every - 1:
            store.fail_candidate(
                candidate_id, f"training: loss is not finite (candidate {index})", "Traceback ..."
            )
            seeded.failed.append(candidate_id)
            continue
        val_bpb, decode_ms, n_params = _objectives(layout, rng)
        keys = _results(store, candidate_id, layout, val_bpb, decode_ms, rng) if index < 40 else (None, None)
        objectives = {"val_bpb": val_bpb, "decode_ms": decode_ms, "n_params": n_params}
        store.complete_candidate(candidate_id, *keys, val_bpb, decode_ms, n_params, objectives)
        done.append((candidate_id, val_bpb, decode_ms))
        if len(done) % 10 == 0 or index == n - 1:
            store.record_hypervolume(job_id, index + 1, len(done) / n)
    keep = pareto_front([[v, d] for _, v, d in done]) if done else []
    seeded.front = sorted(done[i][0] for i in keep)
    store.set_front(job_id, seeded.front)
    store.update_progress(job_id, n, n)
    if status != "queued":
        store.set_job_status(job_id, status)
    return seeded


def _results(store: Storage, candidate_id, layout, val_bpb, decode_ms, rng) -> tuple[str, str]:
    """A training result with a loss curve and a latency result with a median and an IQR."""
    training_key, latency_key = f"t-{candidate_id}-{layout.content_hash}", f"l-{candidate_id}"
    curve = [[step, round(5.5 * (0.8 ** (step / 10)) + val_bpb, 4)] for step in range(0, 60, 10)]
    result = {"val_bpb": val_bpb, "loss_curve": curve, "log_tail": ["step 50"]}
    store.put_training_result(training_key, layout_hash=layout.content_hash, result=result, val_bpb=val_bpb)
    iqr = round(abs(rng.gauss(0.03, 0.01)), 5)
    latency = {
        "decode_ms_per_token": {"median": decode_ms, "iqr": iqr, "repeats": 5, "values": []},
        "prefill_ms": {"median": round(8 * decode_ms, 4), "iqr": iqr, "repeats": 5, "values": []},
        "throughput_tokens_per_s": {
            "median": round(900 / decode_ms, 2),
            "iqr": 3.0,
            "repeats": 5,
            "values": [],
        },
        "cache_bytes_per_sequence": 1024 * layout.mixers.count("attention") + 64 * layout.depth,
    }
    store.put_latency_result(
        latency_key,
        layout_hash=layout.content_hash,
        result=latency,
        decode_ms=decode_ms,
        device_fingerprint={"device": "cpu", "torch": "test"},
    )
    return training_key, latency_key


def seed_studies(store: Storage, search: Seeded, seed: int = 0) -> dict[str, int]:
    """One completed study of each kind, its report made by the kind's own analysis from synthetic results
    (val_bpb and latency from seeded formulas), stored as a runner stores it; the verdict judges `search`."""
    from dataclasses import asdict

    from search.studies import AblationStudy, DepthWidthStudy, FidelityStudy, Reference, VerdictStudy

    rng = random.Random(seed)
    grid = DepthWidthStudy(budgets_ms=[1.0, 2.0], bootstrap=20)  # few resamples: the page, not the fit
    grid_points = []
    for depth, width in grid.grid():
        layout = grid.layout(depth, width)
        val_bpb = 2.2 + 0.8 * depth**-0.5 + 9.0 * width**-0.7 + rng.gauss(0, 0.005)
        grid_points.append(_done(layout, val_bpb, 0.3 + 0.13 * depth + 0.002 * width))
    fidelity = FidelityStudy(n_layouts=8, bootstrap=50)
    runs = {run: [] for run in ("short", "short_seed", "long")}
    for i, layout in enumerate(fidelity.layouts()):
        short = 3.0 + 0.05 * i + rng.gauss(0, 0.03)
        runs["short"].append(_done(layout, short))
        runs["short_seed"].append(_done(layout, short + rng.gauss(0, 0.03)))
        runs["long"].append(_done(layout, short - 0.6 + rng.gauss(0, 0.04)))
    ablation = AblationStudy(seeds=[0, 1, 2])
    [hybrid] = ablation.resolved_layouts()
    arms = {}
    for s in ablation.seeds:
        base = 3.4 + rng.gauss(0, 0.01)
        arms[f"baseline-s{s}"] = [_done(hybrid, base, tokens_per_s=1000.0)]
        arms[f"weight_norm-s{s}"] = [_done(hybrid, base - 0.03 + rng.gauss(0, 0.005), tokens_per_s=950.0)]
        arms[f"meta_tokens-s{s}"] = [_done(hybrid, base + rng.gauss(0, 0.01), tokens_per_s=990.0)]
    ids = {
        "depth-width": _stored(store, grid, grid.analyse({"grid": grid_points}, {})),
        "fidelity": _stored(store, fidelity, fidelity.analyse(runs, {})),
        "ablation": _stored(store, ablation, ablation.analyse(arms, {})),
    }
    verdict = VerdictStudy(search_id=search.job_id, depth_width_id=ids["depth-width"], seeds=[1])
    references = {
        "search": Reference(
            asdict(store.get_job(search.job_id)),
            [asdict(c) for c in store.candidates(search.job_id)],
        ),
        "depth_width": Reference(asdict(store.get_job(ids["depth-width"]))),
    }
    ids["verdict"] = _stored(store, verdict, verdict.analyse({}, references))
    return ids


def _done(layout: Layout, val_bpb: float, decode_ms: float = 1.0, tokens_per_s: float = 1000.0) -> dict:
    return {
        "layout_hash": layout.content_hash,
        "layout": layout.to_dict(),
        "status": "completed",
        "val_bpb": round(val_bpb, 5),
        "decode_ms": round(decode_ms, 5),
        "n_params": 1000 * layout.depth + layout.d_model,
        "training": {"tokens_per_s": tokens_per_s},
    }


def _stored(store: Storage, study, report: dict) -> int:
    job_id = store.create_job(study.kind, study.model_dump(mode="json"), name=f"seeded {study.kind}")
    store.set_job_result(job_id, report)
    store.set_job_status(job_id, "completed")
    return job_id
