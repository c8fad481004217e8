"""Which mirrors to skip for now: one that did not answer at all is left alone for a while.

Mirrors are tried in order before the registry itself, and any failure falls through to
the next. A mirror that is down would otherwise cost every request its failure again:
connection attempts and backoff when it refuses (about 1.3 s per request with the
defaults), a whole read timeout when it accepts and never answers (30 s). So a mirror
that gave no answer (refused, reset, timed out) is skipped by every request of the node
for ``MIRROR_SKIP_SECONDS``, then tried again. A mirror that answers, even with an error
(a 404 for an image it does not hold, a 5xx while its own upstream is down), is alive:
it keeps being asked, and serves what it holds.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from csi_wasm.errors import DriverError, RegistryTimeout
from csi_wasm.registry.retry import Unreachable

MIRROR_SKIP_SECONDS = 60.0


def gave_no_answer(exc: DriverError) -> bool:
    """True when ``exc`` (or the last attempt behind it) means the host never answered."""
    cause = exc.__cause__
    return isinstance(exc, (Unreachable, RegistryTimeout)) or isinstance(cause, (Unreachable, RegistryTimeout))


class MirrorHealth:
    def __init__(self, clock: Callable[[], float] = time.monotonic, skip_seconds: float = MIRROR_SKIP_SECONDS) -> None:
        self._clock = clock
        self._skip_seconds = skip_seconds
        self._down_until: dict[str, float] = {}
        self._lock = threading.Lock()

    def down(self, host: str) -> None:
        with self._lock:
            self._down_until[host] = self._clock() + self._skip_seconds

    def skipped(self, host: str) -> bool:
        with self._lock:
            until = self._down_until.get(host)
            if until is None:
                return False
            if self._clock() >= until:
                del self._down_until[host]
                return False
            return True
