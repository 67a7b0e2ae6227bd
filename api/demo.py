"""`make demo`: the service on the embedded defaults.

Counts every preset (the full Nemotron-Flash models built on the `meta` device), starts the coordinator
(`hybridnas serve`: SQLite under the data dir, a local Ray), submits a real pareto-aging search over REST,
follows its evaluations through the polling feed, prints its Pareto front, and keeps the server up (Ctrl-C
stops it; `--exit-when-done` returns when the search ends). `--presets` also short-trains the scaled-down
presets on the embedded corpus (the Python standard library's source) and profiles them, in this process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from search.params import count_parameters, format_count
from search.presets import CPU_PRESETS, get_preset, preset_names


def data_dir() -> Path:
    from api.settings import get_settings

    return get_settings().ensure_data_dir()


DEMO_SEARCH = {
    "name": "demo",
    "space": {"preset": "cpu"},
    "strategy": "pareto-aging",
    "strategy_options": {"population_size": 6, "sample_size": 3},
    "budget": 14,
    "executor": "ray",
    "workers": 2,
    "proxy": {"steps": 60, "batch_size": 8, "seq_len": 128, "eval_tokens": 16384},
    "latency": {"prompt_len": 64, "decode_tokens": 32, "repeats": 3, "throughput": False, "threads": 1},
}


def run_demo_search(console: Console) -> int:
    """A real pareto-aging search on the embedded corpus through a local Ray, run in this process (no
    server)."""
    from api.search_cli import _local_settings, run_engine, searches_api
    from search.config import SearchConfig
    from search.storage import Storage

    config = SearchConfig.model_validate(DEMO_SEARCH)
    settings = _local_settings(None, create=True)
    with searches_api(None, None, create=True) as client:
        job_id = client.submit({**DEMO_SEARCH, "name": "demo"}).id
    with Storage(settings.resolved_database_url()) as storage:
        console.print(
            f"search {job_id}: {config.strategy}, {config.budget} evaluations on {config.workers} Ray "
            f"workers ({storage!r}; resume with `hybridnas search resume {job_id}`)"
        )
        run_engine(storage, job_id, settings)
    return job_id


def start_service(console: Console, port: int) -> tuple[subprocess.Popen, str]:
    """`hybridnas serve` on loopback in a child process (its log in the data dir); its base URL once ready."""
    import httpx

    base = f"http://127.0.0.1:{port}"
    log_path = data_dir() / "serve.log"
    log = open(log_path, "ab")  # noqa: SIM115 - the child keeps writing to it
    proc = subprocess.Popen(
        [sys.executable, "-m", "api.cli", "serve", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(
                f"the coordinator exited ({proc.returncode}); see {log_path} (is port {port} taken? "
                "use --port)"
            )
        try:
            if httpx.get(f"{base}/api/ready", timeout=2).status_code == 200:
                console.print(
                    f"coordinator up at {base}: dashboard {base}/ (OpenAPI: {base}/docs; log: {log_path})"
                )
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.terminate()
    raise SystemExit(f"the coordinator did not become ready in 120 s; see {log_path}")


def submit_and_follow(console: Console, base: str, body: dict) -> int:
    """Submit a search over REST (`hybridnas.Client`), follow its event stream, print its front."""
    from api.progress import progress_bar
    from hybridnas.client import Client

    with Client(base) as client:
        job_id = client.submit(body).id
        console.print(
            f"POST /api/searches -> search {job_id} ({body['strategy']}, budget {body['budget']}); "
            f"following GET /api/searches/{job_id}/events"
        )
        console.print(f"watch it live in the dashboard: {base}/searches/{job_id}")
        with progress_bar(f"search {job_id}", total=body["budget"], fields={"status": "queued"}) as update:
            for event, data in client.events(job_id):
                if event == "evaluation":
                    result = (
                        f"val_bpb {data['val_bpb']:.3f}, decode {data['decode_ms']:.2f} ms/token"
                        if data["val_bpb"] is not None
                        else "failed"
                    )
                    where = f"{data['status']}, generation {data['generation']}"
                    console.print(f"  candidate {data['id']} ({where}): {result}")
                elif event in ("status", "end"):
                    update(completed=data.get("n_evaluations"), status=data["status"])
        final = client.search(job_id)
        table = Table(
            "id",
            "operators",
            "val_bpb",
            "decode ms/token",
            "params",
            "generation",
            title=f"search {job_id} ({final.status}): Pareto front (GET /api/searches/{job_id}/pareto)",
        )
        for c in client.pareto(job_id).items:
            table.add_row(
                str(c.id),
                client.layout(c.id).compact(),
                f"{c.val_bpb:.4f}",
                f"{c.decode_ms:.3f}",
                f"{c.n_params:,}",
                str(c.generation),
            )
    console.print(table)
    return job_id


def run_service_demo(
    console: Console, port: int = 8000, exit_when_done: bool = False, budget: int | None = None
) -> None:
    """The service on the embedded defaults: start it, submit the demo search over REST, follow it, keep
    serving."""
    console.rule("the coordinator: REST API + job runner on local Ray (SQLite under the data dir)")
    proc, base = start_service(console, port)
    interrupted = False
    try:
        submit_and_follow(console, base, {**DEMO_SEARCH, "budget": budget or DEMO_SEARCH["budget"]})
        if exit_when_done:
            return
        console.print(f"serving at {base}: dashboard {base}/ (OpenAPI: {base}/docs); Ctrl-C stops")
        proc.wait()
    except KeyboardInterrupt:
        console.print("stopping the coordinator")
        interrupted = True
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # graceful: running jobs go back to the queue
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
    if interrupted:
        raise SystemExit(130)  # Ctrl-C: the shell's convention


def run_demo(
    console: Console,
    steps: int = 30,
    decode_tokens: int = 64,
    presets: bool = False,
    service: bool = True,
    port: int = 8000,
    exit_when_done: bool = False,
    budget: int | None = None,
) -> None:
    import torch

    from models.hybrid import HybridLM

    console.rule("presets: analytic parameter count vs the built model")
    table = Table(
        "preset", "operators", "d_model", "vocab", "analytic total", "built (meta device)", "non-embedding"
    )
    for name in preset_names():
        layout = get_preset(name)
        vocab = layout.vocab_size or 257
        count = count_parameters(layout, vocab)
        with torch.device("meta"):
            built = HybridLM(layout, vocab).num_parameters()
        table.add_row(
            name,
            str(len(layout.operators)),
            str(layout.d_model),
            str(vocab),
            format_count(count.total),
            f"{format_count(built)} ({'=' if built == count.total else '!='})",
            format_count(count.non_embedding),
        )
    console.print(table)

    if presets:
        evaluate_presets(console, steps, decode_tokens)
    if service:
        run_service_demo(console, port, exit_when_done, budget)
    else:
        console.rule("a pareto-aging search (val_bpb vs decode ms/token) on local Ray, no server")
        run_demo_search(console)


def evaluate_presets(console: Console, steps: int, decode_tokens: int) -> None:
    console.rule("scaled-down presets: evaluated end to end on the embedded corpus (this CPU)")
    from proxies.worker import evaluate

    proxy = dict(
        steps=steps, batch_size=8, seq_len=128, lr=3e-3, eval_tokens=16384, log_every=max(1, steps // 3)
    )
    latency = dict(prompt_len=128, decode_tokens=decode_tokens, repeats=3, throughput_max_batch=8)
    results = Table(
        "preset",
        "params",
        "loss first -> last",
        "val_bpb",
        "train tok/s",
        "decode ms/token (IQR)",
        "prefill ms (128)",
        "throughput tok/s (batch)",
        "status",
    )
    for name in CPU_PRESETS:
        result = evaluate(get_preset(name), proxy, latency, data_dir=data_dir())
        if result.status != "completed":
            results.add_row(name, "-", "-", "-", "-", "-", "-", "-", f"failed: {result.failure_reason}")
            continue
        train, lat = result.training, result.latency
        curve = train["loss_curve"]
        tput = lat["throughput_tokens_per_s"]
        results.add_row(
            name,
            format_count(train["n_params"]),
            f"{curve[0][1]:.2f} -> {curve[-1][1]:.2f}",
            f"{train['val_bpb']:.3f}",
            f"{train['tokens_per_s']:,.0f}",
            f"{lat['decode_ms_per_token']['median']:.2f} ({lat['decode_ms_per_token']['iqr']:.2f})",
            f"{lat['prefill_ms']['median']:.1f}",
            f"{tput['median']:,.0f} ({lat['throughput_batch']})" if tput else "-",
            result.status,
        )
        console.print(f"  {name}: val_bpb {train['val_bpb']:.3f}, {result.timings['total_s']:.1f} s")
    console.print(results)
    console.print(f"weights and tokenizers saved under {data_dir() / 'artifacts'}")
