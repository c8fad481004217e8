"""A total deadline for every registry exchange, headers and TLS handshake included.

Socket timeouts bound one read each: a registry that drips one byte of its
headers every few seconds never trips them. Here an exchange registers its
deadline with the ``Watchdog``, the connections it uses report their sockets
(``WatchSlot.attach``, called by our urllib3 connection classes in
``sessions``), and when the deadline passes the watchdog shuts those sockets
down: the blocked read returns at once and the exchange fails as a timeout.

A ``Watch`` holds a duplicate of each socket's descriptor, so it shuts down the
very socket it was given even if the original descriptor number has been closed
and reused meanwhile; the duplicates are closed when the exchange ends.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from typing import Callable, Iterator


class Watch:
    """One exchange's deadline and the sockets it has used so far."""

    def __init__(self, deadline: float, lock: threading.Lock) -> None:
        self.deadline = deadline
        self._lock = lock
        self._sockets: dict[tuple[int, int], socket.socket] = {}
        self._expired = False
        self._closed = False

    @property
    def expired(self) -> bool:
        """True once the deadline passed while the exchange was still running: its sockets were shut down."""
        return self._expired

    def attach(self, sock: socket.socket) -> None:
        try:
            info = os.fstat(sock.fileno())
        except (OSError, ValueError):
            return
        identity = (info.st_dev, info.st_ino)  # a socket's inode is unique while it lives
        with self._lock:
            if self._closed or identity in self._sockets:
                return
            duplicate = socket.socket(fileno=os.dup(sock.fileno()))
            self._sockets[identity] = duplicate
            if self._expired:
                _shut(duplicate)

    def expire(self) -> None:
        """Shut every socket down (the watchdog's lock is held)."""
        self._expired = True
        for sock in self._sockets.values():
            _shut(sock)

    def close(self) -> None:
        """Release the duplicates (the watchdog's lock is held)."""
        self._closed = True
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class Watchdog:
    """One thread for all exchanges of a client; it sleeps until the earliest deadline."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._watches: set[Watch] = set()
        self._thread: threading.Thread | None = None
        self._stopped = False

    @contextlib.contextmanager
    def watching(self, deadline: float) -> Iterator[Watch]:
        watch = Watch(deadline, self._lock)
        with self._lock:
            self._watches.add(watch)
            if self._thread is None and not self._stopped:
                self._thread = threading.Thread(target=self._run, name="registry-watchdog", daemon=True)
                self._thread.start()
            self._wake.notify()
        try:
            yield watch
        finally:
            with self._lock:
                self._watches.discard(watch)
                watch.close()

    def close(self) -> None:
        with self._lock:
            self._stopped = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        with self._lock:
            while not self._stopped:
                now = self._clock()
                for watch in [w for w in self._watches if w.deadline <= now]:
                    watch.expire()
                    self._watches.discard(watch)
                pending = [w.deadline for w in self._watches]
                self._wake.wait(min(pending) - now if pending else None)


class WatchSlot:
    """Which watch the current thread's exchange runs under, for the connections it opens or reuses."""

    def __init__(self) -> None:
        self._local = threading.local()

    @contextlib.contextmanager
    def active(self, watch: Watch) -> Iterator[None]:
        previous = getattr(self._local, "watch", None)
        self._local.watch = watch
        try:
            yield
        finally:
            self._local.watch = previous

    def attach(self, sock: socket.socket) -> None:
        watch: Watch | None = getattr(self._local, "watch", None)
        if watch is not None:
            watch.attach(sock)
