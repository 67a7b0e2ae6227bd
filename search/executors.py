"""Where evaluations run: `inline` (a thread of this process) and `ray` (the default: long-lived actors, one
per worker slot, on a local Ray or the cluster at RAY_ADDRESS).

The contract (`Executor`): the engine `submit`s a task (a candidate id and its payload). The worker first
computes the task's result keys (the data phase: loading and tokenizing the corpus), reported as an `Outcome`
with `keys`. The engine then `evaluate`s the task on the same worker (training and measuring what is not
stored yet), reported as an `Outcome` with the `EvaluationResult`, or `release`s it (both results stored:
reused). Every outcome is data: keys, a result, or an error of kind "timeout", "worker_died" or "exception",
with the phase it happened in, which the engine retries or records.

A dead worker is replaced: its actor is re-created (consecutive failed starts back off, 1 s doubling to 30 s,
at most `max_restarts` in a row); the task it held comes back as a `worker_died` outcome. When no worker slot
can be brought back, `poll` raises `WorkersUnavailable` and the engine ends the search `failed` with that
reason. Timeouts cover every phase, the data phase included: a task running longer than `timeout_s` has its
actor killed (its resources come back) and comes back as a `timeout` outcome naming the phase.

Both executors drive the same `EvaluationWorker`, which reaches the worker entry point by its module path
(`proxies.worker`), so `search/` itself never imports torch.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from search.evaluation import EvaluationResult, ResultKeys
from search.logs import adopt_library_loggers

log = logging.getLogger("hybridnas.executors")

WORKER_MODULE = "proxies.worker"
ErrorKind = Literal["timeout", "worker_died", "exception"]
RETRYABLE: tuple[ErrorKind, ...] = ("timeout", "worker_died")


@dataclass
class Outcome:
    """What became of a task's current step: its keys, its result, or an error (with the phase)."""

    task_id: int
    keys: ResultKeys | None = None
    result: EvaluationResult | None = None
    error_kind: ErrorKind | None = None
    error: str | None = None
    phase: str | None = None

    @property
    def retryable(self) -> bool:
        """A dead or stuck worker (the task may succeed elsewhere), not a deterministic failure."""
        return self.error_kind in RETRYABLE

    @property
    def reason(self) -> str:
        return f"{self.error_kind} ({self.phase or 'unknown phase'}): {self.error}"


class WorkersUnavailable(RuntimeError):
    """No worker could be (re-)created: the search cannot go on."""


class Executor(Protocol):
    """What the engine needs of an executor."""

    capacity: int  # tasks it runs at once

    def submit(self, task_id: int, payload: dict) -> None:
        """Queue a task: its keys come back as an Outcome."""

    def evaluate(self, task_id: int, payload: dict) -> None:
        """Evaluate a task whose keys came back, on the worker that holds it."""

    def release(self, task_id: int) -> None:
        """Nothing to evaluate (its results are stored): the worker is free."""

    def poll(self, timeout: float) -> list[Outcome]:
        """Outcomes that arrived within `timeout` seconds (raises WorkersUnavailable)."""

    def in_flight(self) -> list[int]:
        """Tasks submitted and not yet finished or released."""

    def shutdown(self) -> None:
        """Stop every worker (their tasks are abandoned)."""


SECRET_ENVIRONMENT = ("HYBRIDNAS_TOKEN", "HYBRIDNAS_DATABASE_URL", "DATABASE_URL", "PGPASSWORD")


class EvaluationWorker:
    """The code inside a worker (a Ray actor, or a thread of this process for `inline`). Long-lived: the
    corpus and compiled kernels stay loaded across candidates. Reports the phase it is in (a threaded actor
    answers `current_phase` while it evaluates)."""

    def __init__(
        self,
        data_dir: str,
        threads: int | None = None,
        lock_dir: str | None = None,
        device: str | None = None,
        data_roots: tuple[str, ...] | None = None,
        own_process: bool = True,
    ):
        if own_process:  # a worker process never needs the coordinator's credentials
            for name in SECRET_ENVIRONMENT:
                os.environ.pop(name, None)
        # (`inline` runs in the caller's own process: its environment is the caller's, left as it is.)
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
        self.phase = "idle"

    def ping(self) -> int:
        return os.getpid()

    def identity(self) -> dict:
        """Where this worker runs: its pid, host and (under Ray) node id."""
        import socket

        node_id = None
        try:
            ray = import_ray()
            if ray.is_initialized():
                node_id = ray.get_runtime_context().get_node_id()
        except Exception:  # noqa: BLE001 - outside Ray, or Ray without a context: no node id
            node_id = None
        return {"pid": os.getpid(), "host": socket.gethostname(), "node_id": node_id}

    def current_phase(self) -> str:
        return self.phase

    def _set_phase(self, name: str) -> None:
        self.phase = name

    def _call(self, entry: Callable, payload: dict, **extra: Any) -> Any:
        """One call of a worker entry point on a task's payload, the phase reported while it runs."""
        self.phase = "data"
        try:
            return entry(
                payload["layout"],
                payload.get("proxy"),
                payload.get("latency"),
                data_config=payload.get("data"),
                data_dir=self.data_dir,
                device=self.device,
                data_roots=self.data_roots,
                on_phase=self._set_phase,
                **extra,
            )
        finally:
            self.phase = "idle"

    def keys(self, payload: dict) -> dict:
        return self._call(self.worker.result_keys, payload).to_dict()

    def evaluate(self, payload: dict) -> dict:
        result = self._call(
            self.worker.evaluate,
            payload,
            train=payload.get("train", True),
            measure_latency=payload.get("measure_latency", True),
            device_lock=self.lock,
            continue_from=payload.get("continue_from"),
        )
        return {**result.to_dict(), "worker": self.identity()}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"


@dataclass
class _Task:
    task_id: int
    payload: dict
    step: Literal["keys", "evaluate", "held"] = "keys"  # held: keys reported, the engine decides next
    started: float = 0.0
    handle: Any = None  # a Ray ObjectRef, or the inline executor's call


# ---------------------------------------------------------------------------------------------- inline


class _Call:
    """One worker call on a daemon thread: the inline executor waits for it with a timeout instead of
    blocking the engine, so timeouts and cancels cover every phase (an abandoned call is left to finish)."""

    def __init__(self, fn: Callable[[], Any]):
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None
        threading.Thread(target=self._run, args=(fn,), daemon=True, name="hybridnas-inline-call").start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.value = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the poller as an outcome
            self.error = exc
        finally:
            self.done.set()


SHUTDOWN_WAIT_S = 60


class InlineExecutor:
    """Runs one task at a time in this process (unit tests; a GPU machine without Ray). Each worker call
    runs on a daemon thread, so a stuck call times out after `timeout_s` (it is then abandoned: the thread
    cannot be killed, so the inline executor cannot reclaim its CPU the way Ray does)."""

    def __init__(
        self,
        data_dir: str,
        threads: int | None = None,
        lock_dir: str | None = None,
        device: str | None = None,
        data_roots: tuple[str, ...] | None = None,
        timeout_s: float = 1800.0,
    ):
        self.capacity = 1
        self.timeout_s = float(timeout_s)
        self.worker_args = (data_dir, threads, lock_dir, device, data_roots, False)
        self.worker = EvaluationWorker(*self.worker_args)
        self.queue: list[_Task] = []  # the first is the one running (or held)

    def submit(self, task_id: int, payload: dict) -> None:
        self.queue.append(_Task(task_id, payload))

    def evaluate(self, task_id: int, payload: dict) -> None:
        task = self._held(task_id)
        task.payload, task.step, task.handle = payload, "evaluate", None

    def release(self, task_id: int) -> None:
        self.queue.remove(self._held(task_id))

    def _held(self, task_id: int) -> _Task:
        for task in self.queue:
            if task.task_id == task_id and task.step == "held":
                return task
        raise KeyError(f"task {task_id} is not held by a worker")

    def poll(self, timeout: float) -> list[Outcome]:
        if not self.queue or self.queue[0].step == "held":
            return []
        task = self.queue[0]
        if task.handle is None:
            method = self.worker.keys if task.step == "keys" else self.worker.evaluate
            task.handle, task.started = _Call(lambda: method(task.payload)), time.monotonic()
        if not task.handle.done.wait(timeout):
            if time.monotonic() - task.started <= self.timeout_s:
                return []
            phase = self.worker.current_phase()
            self.queue.pop(0)
            self.worker = EvaluationWorker(*self.worker_args)  # the stuck call keeps the old one
            return [
                Outcome(
                    task.task_id,
                    error_kind="timeout",
                    phase=phase,
                    error=f"{task.step} exceeded {self.timeout_s:g} s",
                )
            ]
        return [self._finish(task)]

    def _finish(self, task: _Task) -> Outcome:
        call, step = task.handle, task.step
        task.handle = None
        if call.error is not None:
            self.queue.remove(task)
            phase = "data" if step == "keys" else self.worker.current_phase()
            return Outcome(task.task_id, error_kind="exception", phase=phase, error=_first_line(call.error))
        if step == "keys":
            task.step = "held"
            return Outcome(task.task_id, keys=ResultKeys.from_dict(call.value))
        self.queue.remove(task)
        return Outcome(task.task_id, result=EvaluationResult.from_dict(call.value))

    def in_flight(self) -> list[int]:
        return [task.task_id for task in self.queue]

    def shutdown(self) -> None:
        """A call still running is waited for (up to `SHUTDOWN_WAIT_S`): a process must not exit while one of
        its threads is inside torch. A stuck one (a read that never returns) is left behind."""
        for task in self.queue:
            if task.handle is not None and not task.handle.done.wait(SHUTDOWN_WAIT_S):
                log.warning("task %d: still running after %d s; abandoned", task.task_id, SHUTDOWN_WAIT_S)
        self.queue.clear()


# ---------------------------------------------------------------------------------------------- Ray


@dataclass
class _Slot:
    """One worker slot: its actor and the state of that actor."""

    index: int
    actor: Any = None
    state: Literal["starting", "ready", "backoff", "dead"] = "backoff"
    ready_ref: Any = None  # the start-up ping while starting
    since: float = 0.0  # when the current start began
    failed_starts: int = 0  # in a row
    retry_at: float = 0.0
    task: _Task | None = None
    last_error: str | None = None


class RayExecutor:
    """One long-lived actor per worker slot, each reserving its resources when created (`num_cpus`,
    `num_gpus`: Ray method calls cannot ask for more). A local Ray is started (and shut down at the end)
    unless Ray is up already or RAY_ADDRESS names a cluster to join. Actors are threaded (two calls at once),
    so one answers `current_phase` while it evaluates."""

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
        *,
        max_restarts: int = 5,
        start_timeout_s: float = 300.0,
        max_backoff_s: float = 30.0,
    ):
        ray = import_ray()
        self.ray = ray
        self.timeout_s = float(timeout_s)
        self.max_restarts, self.start_timeout_s, self.max_backoff_s = (
            max_restarts,
            start_timeout_s,
            max_backoff_s,
        )
        self.started_ray = False
        if not ray.is_initialized():
            init_ray(max(1, int(workers * cpus_per_worker)), None if gpus_per_worker else 0, namespace)
            self.started_ray = True
        self.actor_class = ray.remote(
            num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, max_restarts=0, max_concurrency=2
        )(EvaluationWorker)
        threads = max(1, int(cpus_per_worker))
        roots = tuple(data_roots) if data_roots else (os.path.abspath("."),)
        self.make_actor = lambda: self.actor_class.remote(data_dir, threads, lock_dir, None, roots)
        errors = ray.exceptions
        # The worker process is gone (killed, crashed, out of memory, its node lost): retryable elsewhere.
        self._worker_deaths = (
            errors.RayActorError,
            errors.WorkerCrashedError,
            errors.OutOfMemoryError,
            errors.NodeDiedError,
        )
        self.slots = [_Slot(i) for i in range(workers)]
        self.capacity = workers
        self.pending: list[_Task] = []
        for slot in self.slots:
            self._start(slot)
        self._wait_until_one_ready()

    # ---- actors

    def _start(self, slot: _Slot) -> None:
        slot.actor = self.make_actor()
        slot.ready_ref = slot.actor.ping.remote()
        slot.state, slot.since = "starting", time.monotonic()

    def _kill(self, slot: _Slot) -> None:
        if slot.actor is not None:
            try:
                self.ray.kill(slot.actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead
                pass
        slot.actor, slot.ready_ref = None, None

    def _replace(self, slot: _Slot) -> None:
        """The slot's actor died or was killed after it had started: start a fresh one at once."""
        self._kill(slot)
        self._start(slot)

    def _start_failed(self, slot: _Slot, why: str) -> None:
        self._kill(slot)
        slot.failed_starts += 1
        slot.last_error = why
        if slot.failed_starts > self.max_restarts:
            slot.state = "dead"
            log.error("worker %d: gave up after %d failed starts (%s)", slot.index, slot.failed_starts, why)
            return
        delay = min(self.max_backoff_s, 2.0 ** (slot.failed_starts - 1))
        slot.state, slot.retry_at = "backoff", time.monotonic() + delay
        log.warning("worker %d: start failed (%s); again in %.0f s", slot.index, why, delay)

    def _wait_until_one_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while not any(s.state == "ready" for s in self.slots):
            if time.monotonic() > deadline or all(s.state == "dead" for s in self.slots):
                self.shutdown()
                raise WorkersUnavailable(self._unavailable_reason())
            self._tend(wait_s=0.5)

    def _unavailable_reason(self) -> str:
        errors = sorted({s.last_error for s in self.slots if s.last_error}) or [
            f"no worker became ready in {self.start_timeout_s:g} s"
        ]
        return f"no Ray worker could be started: {'; '.join(errors)}"

    def _tend(self, wait_s: float) -> list[Outcome]:
        """Restart slots whose backoff is over, fail starts that take too long, and wait up to `wait_s` for
        start-ups and task steps; the task outcomes that arrived."""
        now = time.monotonic()
        for slot in self.slots:
            if slot.state == "backoff" and now >= slot.retry_at:
                self._start(slot)
            elif slot.state == "starting" and now - slot.since > self.start_timeout_s:
                self._start_failed(slot, f"not ready after {self.start_timeout_s:g} s")
        waiting = {s.ready_ref: s for s in self.slots if s.state == "starting"}
        running = {s.task.handle: s for s in self.slots if s.task is not None and s.task.step != "held"}
        refs = [*waiting, *running]
        if not refs:
            time.sleep(min(wait_s, 0.5))
            return []
        ready, _ = self.ray.wait(refs, num_returns=1, timeout=wait_s)
        if ready:  # everything else that is ready too
            ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0)
        outcomes = []
        for ref in ready:
            if ref in waiting:
                self._started(waiting[ref])
            else:
                outcomes.append(self._finish(running[ref]))
        return outcomes

    def _started(self, slot: _Slot) -> None:
        try:
            self.ray.get(slot.ready_ref)
        except Exception as exc:  # noqa: BLE001 - the actor could not be created, or died starting
            self._start_failed(slot, _first_line(exc))
            return
        slot.state, slot.ready_ref, slot.failed_starts, slot.last_error = "ready", None, 0, None

    # ---- tasks

    def _finish(self, slot: _Slot) -> Outcome:
        task = slot.task
        try:
            value = self.ray.get(task.handle)
        except self._worker_deaths as exc:
            slot.task = None
            log.warning("worker %d died in task %d (%s step)", slot.index, task.task_id, task.step)
            self._replace(slot)
            return Outcome(
                task.task_id, error_kind="worker_died", phase=self._step_phase(task), error=_first_line(exc)
            )
        except Exception as exc:  # noqa: BLE001 - an exception the worker raised
            slot.task = None
            return Outcome(
                task.task_id,
                error_kind="exception",
                phase=self._step_phase(task),
                error=_first_line(getattr(exc, "cause", None) or exc),
            )
        if task.step == "keys":
            task.step, task.handle = "held", None
            return Outcome(task.task_id, keys=ResultKeys.from_dict(value))
        slot.task = None
        return Outcome(task.task_id, result=EvaluationResult.from_dict(value))

    @staticmethod
    def _step_phase(task: _Task) -> str:
        return "data" if task.step == "keys" else "evaluation"

    def _phase_of(self, slot: _Slot, task: _Task) -> str:
        """The phase a stuck task is in, asked of its (threaded) actor; its step if the actor cannot say."""
        try:
            return str(self.ray.get(slot.actor.current_phase.remote(), timeout=5))
        except Exception:  # noqa: BLE001 - the actor is wedged or gone
            return self._step_phase(task)

    def _timeouts(self) -> list[Outcome]:
        outcomes = []
        now = time.monotonic()
        for slot in self.slots:
            task = slot.task
            if task is None or task.step == "held" or now - task.started <= self.timeout_s:
                continue
            phase = self._phase_of(slot, task)
            slot.task = None
            log.warning(
                "worker %d: task %d stuck in %s for %.0f s; killing it",
                slot.index,
                task.task_id,
                phase,
                now - task.started,
            )
            self._replace(slot)  # a stuck worker is killed: its resources come back
            outcomes.append(
                Outcome(
                    task.task_id,
                    error_kind="timeout",
                    phase=phase,
                    error=f"{task.step} exceeded {self.timeout_s:g} s",
                )
            )
        return outcomes

    def _dispatch(self) -> None:
        for slot in self.slots:
            if slot.state == "ready" and slot.task is None and self.pending:
                task = self.pending.pop(0)
                task.handle, task.started, task.step = (
                    slot.actor.keys.remote(task.payload),
                    time.monotonic(),
                    "keys",
                )
                slot.task = task

    def _holder(self, task_id: int) -> _Slot:
        for slot in self.slots:
            if slot.task is not None and slot.task.task_id == task_id and slot.task.step == "held":
                return slot
        raise KeyError(f"task {task_id} is not held by a worker")

    def submit(self, task_id: int, payload: dict) -> None:
        self.pending.append(_Task(task_id, payload))
        self._dispatch()

    def evaluate(self, task_id: int, payload: dict) -> None:
        slot = self._holder(task_id)
        task = slot.task
        task.payload, task.step, task.started = payload, "evaluate", time.monotonic()
        task.handle = slot.actor.evaluate.remote(payload)

    def release(self, task_id: int) -> None:
        self._holder(task_id).task = None
        self._dispatch()

    def poll(self, timeout: float) -> list[Outcome]:
        outcomes = self._tend(wait_s=timeout)
        outcomes += self._timeouts()
        if all(s.state == "dead" for s in self.slots):
            raise WorkersUnavailable(self._unavailable_reason())
        self._dispatch()
        return outcomes

    def in_flight(self) -> list[int]:
        return [s.task.task_id for s in self.slots if s.task is not None] + [t.task_id for t in self.pending]

    def worker_pids(self) -> list[int]:
        """The pids of the ready actors (tests and the chaos harness kill them)."""
        return [self.ray.get(s.actor.ping.remote(), timeout=30) for s in self.slots if s.state == "ready"]

    def shutdown(self) -> None:
        for slot in self.slots:
            self._kill(slot)
        self.slots = []
        if self.started_ray:
            self.ray.shutdown()


def quiet_ray_signals() -> None:
    """Keep Ray's native crash handler off SIGTERM: it dumps a stack and arms a 3 s alarm that aborts a
    graceful shutdown (exit 134). Read by Ray when it is first imported, so call this before that (the
    user's own setting wins)."""
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    if not os.environ.get("RAY_ADDRESS"):
        # A local Ray has token authentication on by default and warns about it at every start; saying so
        # explicitly keeps it on without the warning. (A cluster's own setting is left alone.)
        os.environ.setdefault("RAY_AUTH_MODE", "token")


def import_ray():
    """`import ray`, after `quiet_ray_signals`: every import of Ray in the project goes through here."""
    quiet_ray_signals()
    import ray

    adopt_library_loggers()
    return ray


_ENVIRON_LOCK = threading.Lock()


@contextlib.contextmanager
def _without_secrets():
    """The coordinator's credentials out of the environment while the local Ray starts: its processes, and
    every worker they start later, inherit the environment of that moment (never the driver's later one)."""
    with _ENVIRON_LOCK:
        saved = {name: os.environ.pop(name) for name in SECRET_ENVIRONMENT if name in os.environ}
        try:
            yield
        finally:
            os.environ.update(saved)


@contextlib.contextmanager
def _own_signal_handlers():
    """Ray installs a SIGTERM handler (sys.exit) when started from the main thread: keep the process's own."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def init_ray(num_cpus: int, num_gpus: int | None = None, namespace: str = "hybridnas") -> None:
    """Join the cluster RAY_ADDRESS names, else start a local Ray with these resources (`num_gpus` None:
    detected), without the coordinator's secrets in its environment. Ray's head processes die with the
    thread that calls this: call it from a long-lived one, and shut Ray down from that same thread."""
    ray = import_ray()
    address = os.environ.get("RAY_ADDRESS")
    with _own_signal_handlers():
        if address:
            ray.init(address=address, namespace=namespace, log_to_driver=False)
            return
        with _without_secrets():
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
                data_dir,
                threads=int(config.cpus_per_worker),
                lock_dir=lock_dir,
                data_roots=data_roots,
                timeout_s=config.timeout_s,
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


__all__ = [
    "EvaluationWorker",
    "Executor",
    "InlineExecutor",
    "Outcome",
    "RayExecutor",
    "WorkersUnavailable",
    "executor_factory",
]
