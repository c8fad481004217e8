"""The download workers, shared fairly between registries.

At most ``per_registry`` downloads from one registry run at once; the others wait in
that registry's queue, and a free worker serves the registries with work in turn.
A registry that drips its blobs (each download may take ``download_timeout_seconds``)
therefore holds at most ``per_registry`` workers, and another registry's pull starts
on the next free one instead of waiting behind it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
from typing import Any, Callable, TypeVar

T = TypeVar("T")
_Job = tuple[concurrent.futures.Future[Any], Callable[..., Any], tuple[Any, ...]]


class FairDownloads:
    def __init__(self, workers: int, per_registry: int, name: str = "download") -> None:
        self.workers = max(1, workers)
        self.per_registry = max(1, min(per_registry, self.workers))
        self._name = name
        self._queues: collections.OrderedDict[str, collections.deque[_Job]] = collections.OrderedDict()
        self._running: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._threads: list[threading.Thread] = []
        self._stopped = False

    def submit(self, registry: str, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._lock:
            if self._stopped:
                raise RuntimeError("the download workers are shut down")
            self._queues.setdefault(registry, collections.deque()).append((future, fn, args))
            if len(self._threads) < self.workers:
                name = f"{self._name}-{len(self._threads)}"
                thread = threading.Thread(target=self._work_loop, name=name, daemon=True)
                self._threads.append(thread)
                thread.start()
            self._work.notify()
        return future

    def running(self, registry: str) -> int:
        with self._lock:
            return self._running[registry]

    def queued(self, registry: str) -> int:
        with self._lock:
            return len(self._queues.get(registry, ()))

    def shutdown(self, wait: bool = False, cancel_futures: bool = True) -> None:
        with self._lock:
            self._stopped = True
            pending = [job for queue in self._queues.values() for job in queue] if cancel_futures else []
            if cancel_futures:
                self._queues.clear()
            self._work.notify_all()
        for future, _, _ in pending:
            future.cancel()
        if wait:
            for thread in self._threads:
                thread.join()

    def _work_loop(self) -> None:
        while True:
            with self._lock:
                job = self._next()
                while job is None:
                    if self._stopped and not self._queues:
                        return
                    self._work.wait()
                    job = self._next()
                registry, (future, fn, args) = job
                self._running[registry] += 1
            try:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(*args))
                    except BaseException as exc:  # noqa: BLE001 - handed to the future, as an executor does
                        future.set_exception(exc)
            finally:
                with self._lock:
                    self._running[registry] -= 1
                    if not self._running[registry]:
                        del self._running[registry]
                    self._work.notify_all()

    def _next(self) -> tuple[str, _Job] | None:
        """The oldest job of the first registry in turn that is under its limit (the lock is held)."""
        for registry, queue in self._queues.items():
            if self._running[registry] < self.per_registry:
                job = queue.popleft()
                if queue:
                    self._queues.move_to_end(registry)  # the others go first next time
                else:
                    del self._queues[registry]
                return registry, job
        return None
