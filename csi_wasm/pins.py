"""Pins: modules a publish is using before its volume record exists. The GC never deletes a pinned module.

``pin_if_present`` and the collector's deletions take the same lock, so a module
is either pinned while still in the store, or gone and the publish fetches it again.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator


class Pins:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def pin_if_present(self, digest: str, present: Callable[[str], bool]) -> bool:
        with self._lock:
            if not present(digest):
                return False
            self._counts[digest] = self._counts.get(digest, 0) + 1
            return True

    def unpin(self, digest: str) -> None:
        with self._lock:
            self._counts[digest] -= 1
            if not self._counts[digest]:
                del self._counts[digest]

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[frozenset[str]]:
        """For the collector: nothing can be pinned while held; yields what is pinned now."""
        with self._lock:
            yield frozenset(self._counts)

    def pinned(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._counts)
