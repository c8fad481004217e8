"""One driver per state directory: an exclusive lock on it, and the pid of the driver holding it.

During a DaemonSet rolling update with ``maxSurge``, two driver pods run on one node and
share the state dir and the socket dir (both hostPaths). The newcomer waits here, saying
who holds the lock, until the old driver has exited; only then does it touch the socket.
So the old driver never loses its socket while it still serves, and never removes the
newcomer's. ``csi-wasm store gc`` takes the same lock to tell a live node from an idle store.
"""

from __future__ import annotations

import fcntl
import logging
import os
import pathlib
import threading
import time
from typing import Callable

from csi_wasm.logs import event
from csi_wasm.store import write_atomic

log = logging.getLogger("csi_wasm.statedir")
LOCK_FILE = "driver.lock"
PID_FILE = "driver.pid"
POLL_SECONDS = 0.2
REPORT_EVERY_SECONDS = 30.0


def holder_pid(state_dir: pathlib.Path) -> int | None:
    """The pid the lock holder wrote, or None (no driver has run here, or it is unreadable)."""
    try:
        return int((state_dir / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None


class StateDirLock:
    def __init__(self, state_dir: pathlib.Path, clock: Callable[[], float] = time.monotonic) -> None:
        self._state_dir = state_dir
        self._clock = clock
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        """Take the lock if it is free; False at once if another process holds it."""
        fd = os.open(self._state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def acquire(self, stop: threading.Event) -> bool:
        """Wait for the lock, logging who holds it; False if ``stop`` is set first."""
        reported_at: float | None = None
        while not self.try_acquire():
            now = self._clock()
            if reported_at is None or now - reported_at >= REPORT_EVERY_SECONDS:
                event(log, "state_dir.waiting", logging.WARNING, state_dir=str(self._state_dir),
                      holder_pid=holder_pid(self._state_dir),
                      why="another driver serves this state dir; taking over when it exits")  # fmt: skip
                reported_at = now
            if stop.wait(POLL_SECONDS):
                return False
        write_atomic(self._state_dir / PID_FILE, f"{os.getpid()}\n".encode(), durable=False)
        if reported_at is not None:
            event(log, "state_dir.acquired", state_dir=str(self._state_dir))
        return True

    def release(self) -> None:
        if self._fd is None:
            return
        if holder_pid(self._state_dir) == os.getpid():
            (self._state_dir / PID_FILE).unlink(missing_ok=True)
        os.close(self._fd)  # closing the last descriptor drops the flock
        self._fd = None
