"""Where evaluations run: an `inline` executor (this process) and the default `ray` executor (long-lived
actors, one per device, on a local Ray or the cluster at RAY_ADDRESS).

Both drive the same `EvaluationWorker`, which reaches the worker entry point by its module path
(`proxies.worker`), so `search/` itself never imports torch. Every outcome is data: a result dict, or an
error of kind "timeout", "worker_died" or "exception" that the engine retries or records.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("hybridnas.executors")

WORKER_MODULE = "proxies.worker"


@dataclass
class Outcome:
    task_id: int
    result: dict | None = None  # EvaluationResult as a dict
    error_kind: str | None = None  # "timeout" | "worker_died" | "exception"
    error: str | None = None


class EvaluationWorker:
    """The code inside a worker (a Ray actor, or this process for `inline`). Long-lived: the corpus and
    compiled kernels stay loaded across candidates."""

    def __init__(
        self,
        data_dir: str,
        threads: int | None = None,
        lock_dir: str | None = None,
        device: str | None = None,
        data_roots: tuple[str, ...] | None = None,
    ):
        self.data_dir, self.device = data_dir, device
        # Corpus paths must resolve inside these (absolute: a Ray worker's working folder is not the
        # caller's).
        self.data_roots = tuple(data_roots) if data_roots else (os.path.abspath("."),)
        self.worker = importlib.import_module(WORKER_MODULE)
        if threads:
            torch = importlib.import_module("torch")
            torch.set_num_threads(int(threads))
        from search.devicelock import DeviceLock

        self.lock = DeviceLock(lock_dir) if lock_dir else None

    def ping(self) -> int:
        return os.getpid()

    def keys(self, payload: dict) -> dict:
        return self.worker.result_keys(
            payload["layout"],
            payload.get("proxy"),
            payload.get("latency"),
            data_config=payload.get("data"),
            data_dir=self.data_dir,
            device=self.device,
            data_roots=self.data_roots,
        )

    def evaluate(self, payload: dict) -> dict:
        result = self.worker.evaluate(
            payload["layout"],
            payload.get("proxy"),
            payload.get("latency"),
            data_config=payload.get("data"),
            data_dir=self.data_dir,
            device=self.device,
            data_roots=self.data_roots,
            train=payload.get("train", True),
            measure_latency=payload.get("measure_latency", True),
            device_lock=self.lock,
        )
        return result.to_dict()


class Executor:
    capacity: int

    def keys(self, payload: dict) -> dict:
        raise NotImplementedError

    def submit(self, task_id: int, payload: dict) -> None:
        raise NotImplementedError

    def poll(self, timeout: float) -> list[Outcome]:
        raise NotImplementedError

    def in_flight(self) -> list[int]:
        raise NotImplementedError

    def shutdown(self) -> None:
        raise NotImplementedError


class InlineExecutor(Executor):
    """Runs each evaluation in this process when polled (unit tests; a GPU machine without Ray).
    A timeout cannot interrupt in-process work: it is enforced by the proxy's own `timeout_s`."""

    def __init__(
        self,
        data_dir: str,
        threads: int | None = None,
        lock_dir: str | None = None,
        device: str | None = None,
        data_roots: tuple[str, ...] | None = None,
    ):
        self.capacity = 1
        self.worker = EvaluationWorker(data_dir, threads, lock_dir, device, data_roots)
        self.queue: list[tuple[int, dict]] = []

    def keys(self, payload: dict) -> dict:
        return self.worker.keys(payload)

    def submit(self, task_id: int, payload: dict) -> None:
        self.queue.append((task_id, payload))

    def poll(self, timeout: float) -> list[Outcome]:
        if not self.queue:
            return []
        task_id, payload = self.queue.pop(0)
        try:
            return [Outcome(task_id, result=self.worker.evaluate(payload))]
        except Exception as exc:  # pragma: no cover - evaluate() itself turns failures into results
            return [
                Outcome(
                    task_id,
                    error_kind="exception",
                    error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}",
                )
            ]

    def in_flight(self) -> list[int]:
        return [task_id for task_id, _ in self.queue]

    def shutdown(self) -> None:
        self.queue.clear()


@dataclass
class _Slot:
    actor: Any
    task_id: int | None = None
    ref: Any = None
    started: float = 0.0
    payload: dict = field(default_factory=dict)


class RayExecutor(Executor):
    """One long-lived actor per worker slot, each reserving its resources when created (`num_cpus`,
    `num_gpus`: Ray method calls cannot ask for more). A local Ray is started (and shut down at the end)
    unless RAY_ADDRESS names a cluster to join."""

    def __init__(
        self,
        data_dir: str,
        workers: int,
        cpus_per_worker: float = 1,
        gpus_per_worker: float = 0,
        timeout_s: float = 1800,
        lock_dir: str | None = None,
        namespace: str = "hybridnas",
        data_roots: tuple[str, ...] | None = None,
    ):
        import ray

        self.ray = ray
        self.timeout_s = timeout_s
        self.started_ray = False
        if not ray.is_initialized():
            init_ray(max(1, int(workers * cpus_per_worker)), None if gpus_per_worker else 0, namespace)
            self.started_ray = True
        self.actor_class = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, max_restarts=0)(
            EvaluationWorker
        )
        threads = max(1, int(cpus_per_worker))
        roots = tuple(data_roots) if data_roots else (os.path.abspath("."),)
        self.make_actor = lambda: self.actor_class.remote(data_dir, threads, lock_dir, None, roots)
        self.slots = [_Slot(self.make_actor()) for _ in range(workers)]
        self.capacity = workers
        ray.get([slot.actor.ping.remote() for slot in self.slots])  # fail early if workers cannot start
        self.pending: list[tuple[int, dict]] = []

    def keys(self, payload: dict) -> dict:
        return self.ray.get(self.slots[0].actor.keys.remote(payload))

    def submit(self, task_id: int, payload: dict) -> None:
        self.pending.append((task_id, payload))
        self._dispatch()

    def _dispatch(self) -> None:
        for slot in self.slots:
            if slot.task_id is None and self.pending:
                slot.task_id, slot.payload = self.pending.pop(0)
                slot.ref = slot.actor.evaluate.remote(slot.payload)
                slot.started = time.monotonic()

    def poll(self, timeout: float) -> list[Outcome]:
        busy = [s for s in self.slots if s.task_id is not None]
        if not busy:
            return []
        ready, _ = self.ray.wait([s.ref for s in busy], num_returns=1, timeout=timeout)
        outcomes = []
        for slot in busy:
            if slot.ref in ready:
                try:
                    outcomes.append(Outcome(slot.task_id, result=self.ray.get(slot.ref)))
                except self.ray.exceptions.RayActorError as exc:
                    outcomes.append(
                        Outcome(slot.task_id, error_kind="worker_died", error=str(exc).splitlines()[0])
                    )
                    slot.actor = self.make_actor()
                except Exception as exc:
                    outcomes.append(
                        Outcome(slot.task_id, error_kind="exception", error=f"{type(exc).__name__}: {exc}")
                    )
                slot.task_id, slot.ref = None, None
            elif time.monotonic() - slot.started > self.timeout_s:
                # A stuck evaluation: kill its actor (its resources come back) and start a fresh one.
                self.ray.kill(slot.actor, no_restart=True)
                outcomes.append(
                    Outcome(
                        slot.task_id,
                        error_kind="timeout",
                        error=f"evaluation exceeded {self.timeout_s:.0f} s",
                    )
                )
                slot.actor, slot.task_id, slot.ref = self.make_actor(), None, None
        self._dispatch()
        return outcomes

    def in_flight(self) -> list[int]:
        return [s.task_id for s in self.slots if s.task_id is not None] + [t for t, _ in self.pending]

    def shutdown(self) -> None:
        for slot in self.slots:
            try:
                self.ray.kill(slot.actor, no_restart=True)
            except Exception:
                pass
        self.slots = []
        if self.started_ray:
            self.ray.shutdown()


def init_ray(num_cpus: int, num_gpus: int | None = None, namespace: str = "hybridnas") -> None:
    """Join the cluster RAY_ADDRESS names, else start a local Ray with these resources (`num_gpus` None:
    detected). Ray's head processes die with the thread that calls this: call it from a long-lived one."""
    import ray

    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, namespace=namespace, log_to_driver=False)
    else:
        # The package directory travels to local workers through the shared file system.
        ray.init(
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            namespace=namespace,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": _project_root()}},
        )


def _project_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def executor_factory(data_dir: str | os.PathLike, data_roots: tuple[str, ...]):
    """The engine's executor factory: the executor a search's config asks for (called once per run). Data
    paths resolve inside `data_roots`; locks and artifacts live under `data_dir`."""
    data_dir = os.fspath(data_dir)
    lock_dir = os.path.join(data_dir, "locks")

    def make(config):
        if config.executor == "inline":
            return InlineExecutor(
                data_dir, threads=int(config.cpus_per_worker), lock_dir=lock_dir, data_roots=data_roots
            )
        return RayExecutor(
            data_dir,
            config.workers,
            config.cpus_per_worker,
            config.gpus_per_worker,
            config.timeout_s,
            lock_dir=lock_dir,
            data_roots=data_roots,
        )

    return make
