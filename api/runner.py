"""Job runners: take jobs from the queue under a lease, run them, heartbeat, hand them back on shutdown.

Exactly one runner owns a running job: `Storage.claim_job` takes it atomically with a lease that the owner's
heartbeat renews every third of the lease. A runner whose heartbeat finds the job gone (cancelled over REST,
or taken over after the lease lapsed) stops it. When an owner dies, its lease expires and any runner — another
coordinator, or this one restarted — takes the job and resumes it under the engine's guarantee (nothing
completed is lost; an evaluation in flight at the death runs again at most once).

Sharing: at most `max_running_jobs` jobs run at once across every coordinator on the database (live leases are
counted inside the claim), at most `runners` in this process; the queue order is priority, then first in,
first out (`Storage.queue`). A running job is never pre-empted. Each search brings its own worker share
(`workers` x `cpus_per_worker` / `gpus_per_worker` of its config) as Ray actors of its own; when the local Ray
is full, a new search's actors wait for the running ones to finish.

Job kinds plug in through `JOB_HANDLERS`: searches, the studies of `search/studies/`, and tune jobs
(`search/tune_runner.py`).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from search.engine import StopEvent
from search.leases import held_lease, owner_id, owner_is_dead_here
from search.storage import JobRecord, Storage, is_unavailable

log = logging.getLogger("hybridnas.runner")


@dataclass
class JobContext:
    storage: Storage
    job: JobRecord
    owner: str
    stop: StopEvent
    data_dir: Path
    executor_factory: Callable
    tracking_uri: str | None = None  # MLflow (HYBRIDNAS_MLFLOW_TRACKING_URI): each evaluation logged there
    data_roots: tuple[str, ...] = (".",)  # where data paths may resolve (a tune job's trials load the corpus)


def run_search(ctx: JobContext) -> None:
    from search.engine import SearchEngine
    from search.tracking import tracker_for

    SearchEngine(
        ctx.storage,
        ctx.job.id,
        ctx.executor_factory,
        stop=ctx.stop,
        lease_owner=ctx.owner,
        tracker=tracker_for(ctx.tracking_uri),  # one per job: a failure ends only this job's tracking
    ).run()


def run_study_job(ctx: JobContext) -> None:
    """A study (search/studies/): its runs one after another on this runner's executors, then its report."""
    from search.study_runner import run_study
    from search.tracking import tracker_for

    status, error = run_study(
        ctx.storage, ctx.job.id, ctx.executor_factory, stop=ctx.stop, tracker=tracker_for(ctx.tracking_uri)
    )
    if getattr(ctx.stop, "lost", False):
        return  # another runner owns the study now: touch nothing of it
    ctx.storage.release_job(ctx.job.id, ctx.owner, status, error=error)


def run_tune_job(ctx: JobContext) -> None:
    """A tune job (search/tune_runner.py): Ray Tune trials on this runner's Ray, then its report."""
    from search.tune_runner import run_tune

    status, error = run_tune(ctx.storage, ctx.job.id, ctx.data_dir, ctx.data_roots, ctx.stop)
    if getattr(ctx.stop, "lost", False):
        return
    ctx.storage.release_job(ctx.job.id, ctx.owner, status, error=error)


def _handlers() -> dict[str, Callable[[JobContext], None]]:
    from search.studies import STUDIES

    return {"search": run_search, "tune": run_tune_job, **{kind: run_study_job for kind in STUDIES}}


JOB_HANDLERS: dict[str, Callable[[JobContext], None]] = _handlers()


class _Ray:
    """One local Ray per coordinator process, shared by its jobs (each job's executor must not shut it
    down)."""

    def __init__(self, num_cpus: int | None):
        self.num_cpus = num_cpus
        self.lock = threading.Lock()
        self.started = False

    def ensure(self) -> None:
        from search.executors import import_ray, init_ray

        ray = import_ray()
        with self.lock:
            if ray.is_initialized():
                return
            init_ray(self.num_cpus or os.cpu_count() or 1)
            self.started = True

    def shutdown(self) -> None:
        """From the thread that started it: Ray's head processes die with that thread, and a shutdown that
        finds them gone takes seconds."""
        with self.lock:
            if self.started:
                from search.executors import import_ray

                import_ray().shutdown()
                self.started = False


class JobRunner:
    """Runs up to `slots` jobs at once in threads of this process; `start()` / `stop()` from the service."""

    def __init__(
        self,
        storage: Storage,
        data_dir: Path,
        *,
        slots: int = 1,
        max_running: int = 1,
        lease_s: float = 30.0,
        poll_s: float = 1.0,
        ray_num_cpus: int | None = None,
        executor_factory: Callable | None = None,
        owner: str | None = None,
        data_roots: tuple[str, ...] = (),
        tracking_uri: str | None = None,
    ):
        self.storage, self.data_dir = storage, Path(data_dir)
        self.data_roots = tuple(data_roots) or (str(Path(".").resolve()),)
        self.slots, self.max_running = slots, max_running
        self.lease_s, self.poll_s = lease_s, poll_s
        self.owner = owner or owner_id()
        self.ray = _Ray(ray_num_cpus)
        self._executor_factory = executor_factory
        # MLflow experiment tracking: the given URI, else the settings' (HYBRIDNAS_MLFLOW_TRACKING_URI); ""
        # is off. Checked here: a URI without mlflow installed stops the service at start-up, not each job.
        if tracking_uri is None:
            from api.settings import get_settings

            tracking_uri = get_settings().mlflow_tracking_uri
        self.tracking_uri = tracking_uri or None
        from search.tracking import tracker_for

        tracker_for(self.tracking_uri)
        self._stopping = threading.Event()
        self._jobs_stopped = threading.Event()
        self.stop_timeout_s = 120.0
        self._active: dict[int, tuple[threading.Thread, StopEvent]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # ---- the executor a search gets: Ray shared by this process's jobs, or the config's inline executor
    def executor_factory(self, config):
        if self._executor_factory is not None:
            return self._executor_factory(config)
        from search.executors import executor_factory

        return executor_factory(self.data_dir, self.data_roots)(config)  # Ray is up already (poll_once)

    # ---- lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="hybridnas-runner", daemon=True)
        self._thread.start()
        log.info(
            "runner %s: up to %d job(s) here, %d across coordinators",
            self.owner,
            self.slots,
            self.max_running,
        )

    def stop(self, timeout: float = 120.0) -> None:
        """Graceful: take no more work; running jobs stop, their in-flight evaluations go back to pending and
        the jobs back to the queue with their leases released (another coordinator may take them at once)."""
        self._stopping.set()
        with self._lock:
            active = list(self._active.values())
        for _thread, stop in active:
            stop.set()
        for thread, _stop in active:
            thread.join(timeout)
        self._jobs_stopped.set()  # now the runner thread shuts its Ray down, then ends
        if self._thread is not None:
            self._thread.join(timeout)
        self.ray.shutdown()  # a runner that never started its thread (tests polling by hand)

    @property
    def running_jobs(self) -> list[int]:
        with self._lock:
            return [job_id for job_id, (thread, _) in self._active.items() if thread.is_alive()]

    def _loop(self) -> None:
        try:
            while not self._stopping.is_set():
                try:
                    while self.poll_once() is not None:  # fill every free slot before sleeping
                        pass
                except Exception:  # the database may be restarting: log, and look again at the next poll
                    log.exception("runner %s: polling the queue failed", self.owner)
                self._stopping.wait(self.poll_s)
        finally:
            # The local Ray was started on this thread and must be shut down on it, after the jobs stopped.
            self._jobs_stopped.wait(self.stop_timeout_s)
            self.ray.shutdown()

    def poll_once(self) -> JobRecord | None:
        """Claim one job if a slot is free and start it in a thread; the job, or None."""
        with self._lock:
            self._active = {k: v for k, v in self._active.items() if v[0].is_alive()}
            if self._stopping.is_set() or len(self._active) >= self.slots:
                return None
        job = self._take_from_dead_owner() or self.storage.claim_job(
            self.owner, self.lease_s, kinds=tuple(JOB_HANDLERS), max_running=self.max_running
        )
        if job is None:
            return None
        if self._executor_factory is None and job.config.get("executor", "ray") == "ray":
            # Ray's head processes die with the THREAD that started them (Linux parent-death signal): start
            # it here, on the runner's long-lived thread, never on a job's thread, which ends with its job.
            try:
                self.ray.ensure()
            except Exception as exc:
                log.exception("job %d: Ray did not start", job.id)
                self.storage.release_job(job.id, self.owner, "failed", error=f"Ray did not start: {exc}")
                return job
        stop = StopEvent()
        thread = threading.Thread(
            target=self._run, args=(job, stop), name=f"hybridnas-job-{job.id}", daemon=True
        )
        with self._lock:
            self._active[job.id] = (thread, stop)
        thread.start()
        return job

    def _take_from_dead_owner(self) -> JobRecord | None:
        """A running job whose owner was a process of this machine that is gone (this coordinator before a
        crash, a killed `hybridnas search run`): taken at once rather than after its lease lapses."""
        for job in self.storage.list_jobs(status="running", limit=None):
            if job.kind in JOB_HANDLERS and owner_is_dead_here(job.lease_owner):
                taken = self.storage.claim_job(
                    self.owner,
                    self.lease_s,
                    kinds=tuple(JOB_HANDLERS),
                    job_id=job.id,
                    takeover_from=job.lease_owner,
                    max_running=self.max_running,
                )
                if taken is not None:
                    log.info("job %d: its owner %s died on this machine; taken over", job.id, job.lease_owner)
                    return taken
        return None

    def _run(self, job: JobRecord, stop: StopEvent) -> None:
        log.info("job %d (%s): taken by %s", job.id, job.kind, self.owner)
        ctx = JobContext(
            self.storage,
            job,
            self.owner,
            stop,
            self.data_dir,
            self.executor_factory,
            self.tracking_uri,
            data_roots=self.data_roots,
        )
        with held_lease(self.storage, job.id, self.owner, self.lease_s, stop):
            try:
                JOB_HANDLERS[job.kind](ctx)
            except Exception as exc:
                if is_unavailable(exc):  # its lease lapses; then this runner (or another) takes it again
                    log.warning("job %d: database unavailable; resumed once the lease lapses", job.id)
                    return
                # The engine recorded the failure under the lease; make sure it is released.
                log.exception("job %d failed", job.id)
                self.storage.release_job(job.id, self.owner, "failed", error=f"{type(exc).__name__}: {exc}")
        try:
            log.info("job %d: %s", job.id, (self.storage.get_job(job.id) or job).status)
        except Exception:  # noqa: BLE001 - only a log line
            log.info("job %d: ended", job.id)
