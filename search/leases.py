"""Leases on jobs, for whoever runs one (a service runner, `hybridnas search run`): who an owner is, whether
a lease's owner is a dead process of this machine, and the heartbeat that keeps a lease alive.

Exactly one owner holds a running job: `Storage.claim_job` takes it atomically, the heartbeat renews it every
third of the lease, and `Storage.release_job` hands it back. A heartbeat that finds the job gone from its
owner (cancelled, or taken over after the lease lapsed) sets the engine's stop signal, saying why.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from search.engine import StopEvent
from search.storage import JobRecord, Storage

log = logging.getLogger("hybridnas.leases")


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "-"


def owner_id(prefix: str = "") -> str:
    """A lease owner's name: host, pid and pid namespace (so a process can tell whether a lease's owner is a
    dead process of its own machine), plus a random part (so a reused pid is another owner)."""
    return f"{prefix}{socket.gethostname()}:{os.getpid()}:{_pid_namespace()}:{uuid.uuid4().hex[:8]}"


def owner_is_dead_here(owner: str | None) -> bool:
    """True only when the owner was a process of this host and pid namespace that no longer exists: its job
    can be taken at once instead of after its lease lapses. Anything uncertain is False (wait for the
    lease)."""
    if not owner:
        return False
    parts = owner.split(":")
    if len(parts) < 4 or not parts[-3].isdigit():
        return False
    host, pid, namespace = parts[-4].rpartition("@")[2], int(parts[-3]), parts[-2]  # after any "prefix@"
    if host != socket.gethostname() or namespace != _pid_namespace() or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def keep_lease(
    storage: Storage, job_id: int, owner: str, lease_s: float, stop: StopEvent, done: threading.Event
) -> None:
    """The heartbeat: renew the lease every third of it until `done`; if the job is gone from this owner,
    tell the engine why (cancelled, or lost) and stop it."""
    while not done.wait(lease_s / 3):
        try:
            held = storage.renew_lease(job_id, owner, lease_s)
        except Exception:  # database unreachable: try again next beat (the lease may still hold)
            log.warning("job %d: heartbeat failed; retrying", job_id, exc_info=True)
            continue
        if not held:
            job = storage.get_job(job_id)
            if done.is_set() or (job is not None and job.status in ("completed", "failed", "archived")):
                return  # the engine finished the job (and released the lease) between two beats
            if job is not None and job.status == "cancelled":
                stop.cancel = True
                log.info("job %d: cancelled; stopping", job_id)
            else:
                stop.lost = True
                log.warning(
                    "job %d: lease lost to %s; stopping without writing",
                    job_id,
                    job.lease_owner if job else None,
                )
            stop.set()
            return


@contextmanager
def held_lease(storage: Storage, job_id: int, owner: str, lease_s: float, stop: StopEvent) -> Iterator[None]:
    """Keep `owner`'s lease on the job alive (a heartbeat thread) for the duration of the block."""
    done = threading.Event()
    heartbeat = threading.Thread(
        target=keep_lease,
        args=(storage, job_id, owner, lease_s, stop, done),
        daemon=True,
        name=f"hybridnas-heartbeat-{job_id}",
    )
    heartbeat.start()
    try:
        yield
    finally:
        done.set()
        heartbeat.join()


class LeaseHeld(RuntimeError):
    """The job runs under a live lease of another owner."""

    def __init__(self, job: JobRecord):
        expires = f"{job.lease_expires_at:%H:%M:%S} UTC" if job.lease_expires_at else "unknown"
        super().__init__(
            f"job {job.id} is {job.status} under {job.lease_owner} (lease until {expires}): stop it there, "
            "or wait for the lease to lapse"
        )
        self.job = job


def take_job(storage: Storage, job_id: int, owner: str, lease_s: float) -> JobRecord:
    """Take one job under a lease for `owner`, as a service runner would, so that nobody else runs it at the
    same time: a queued job, a running one whose owner was a process of this machine that died (at once), or
    one whose lease lapsed. A cancelled or failed job is put back in the queue first (a resume). LeaseHeld
    when a live owner holds it; KeyError when there is no such job."""
    job = storage.get_job(job_id)
    if job is None:
        raise KeyError(f"no job {job_id}")
    takeover = None
    if job.status == "running" and (job.lease_owner is None or owner_is_dead_here(job.lease_owner)):
        takeover = job.lease_owner
    if job.status in ("cancelled", "failed"):
        storage.transition_job(job_id, ("cancelled", "failed"), "queued")
    taken = storage.claim_job(owner, lease_s, kinds=(job.kind,), job_id=job_id, takeover_from=takeover)
    if taken is None:
        raise LeaseHeld(storage.get_job(job_id) or job)
    return taken
