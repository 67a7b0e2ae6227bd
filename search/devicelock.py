"""A per-node device lock for quiet latency measurements (stdlib only: fcntl file locks).

Training takes the lock shared, a latency measurement takes it exclusive: nothing trains on the node's
devices while a measurement runs, and trainings run side by side otherwise. A turnstile lock in front keeps a
waiting measurement from being starved by a stream of trainings (a new training passes the turnstile only
while no measurement is waiting). Works across processes (Ray actors on one node share the file system);
on a cluster, each node has its own lock under its local data dir.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path


class DeviceLock:
    def __init__(self, folder: str | Path, name: str | None = None):
        self.folder = Path(folder)
        self.name = name or socket.gethostname()

    def _open(self, suffix: str) -> int:
        self.folder.mkdir(parents=True, exist_ok=True)
        return os.open(self.folder / f"device-{self.name}.{suffix}", os.O_RDWR | os.O_CREAT, 0o600)

    @contextlib.contextmanager
    def shared(self):
        """Held while training."""
        turnstile, main = self._open("turnstile"), self._open("lock")
        try:
            fcntl.flock(turnstile, fcntl.LOCK_EX)  # pass the turnstile (blocked while a measurement waits)
            fcntl.flock(turnstile, fcntl.LOCK_UN)
            fcntl.flock(main, fcntl.LOCK_SH)
            yield
        finally:
            fcntl.flock(main, fcntl.LOCK_UN)
            os.close(main)
            os.close(turnstile)

    @contextlib.contextmanager
    def exclusive(self):
        """Held while measuring latency: waits for running trainings to finish, holds off new ones."""
        turnstile, main = self._open("turnstile"), self._open("lock")
        try:
            fcntl.flock(turnstile, fcntl.LOCK_EX)
            fcntl.flock(main, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(main, fcntl.LOCK_UN)
            fcntl.flock(turnstile, fcntl.LOCK_UN)
            os.close(main)
            os.close(turnstile)
