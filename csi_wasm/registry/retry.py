"""Bounded retries of transient registry failures: backoff with jitter, ``Retry-After``, the call's deadline.

Only failures worth retrying are retried (``Transient``: connection refused or
reset, 429, 5xx, a manifest body cut short); at most ``pull.attempts`` attempts
in all; a wait that would pass the call's deadline is not taken, the call fails
at once instead. Timeouts are not retried inside a call: each would cost a whole
read timeout, and kubelet retries the call anyway.
"""

from __future__ import annotations

import email.utils
import random
import time
from typing import Callable, TypeVar

from csi_wasm.errors import RegistryError

MAX_RETRY_AFTER_SECONDS = 10.0
BACKOFF_BASE_SECONDS = 0.2
BACKOFF_CAP_SECONDS = 2.0
# Time kept back from a call's deadline so the caller can still answer.
DEADLINE_RESERVE_SECONDS = 0.25

T = TypeVar("T")


class Transient(RegistryError):
    """A failure worth retrying (connection refused/reset, 429, 5xx)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def backoff(number: int, retry_after: float | None = None) -> float:
    """Seconds to wait before attempt ``number + 1``: Retry-After (capped), else jittered exponential."""
    if retry_after is not None:
        return float(min(max(retry_after, 0.0), MAX_RETRY_AFTER_SECONDS))
    base = min(BACKOFF_BASE_SECONDS * 2.0 ** (number - 1), BACKOFF_CAP_SECONDS)
    return base * (0.5 + random.random())


class Retrier:
    def __init__(
        self, attempts: int, clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self._attempts = max(1, attempts)
        self._clock = clock
        self._sleep = sleep

    def run(self, call: Callable[[], T], deadline: float | None = None) -> T:
        """Run ``call``; retry transient failures a bounded number of times, inside ``deadline``."""
        for number in range(1, self._attempts + 1):
            try:
                return call()
            except Transient as exc:
                if number == self._attempts:
                    raise RegistryError(f"{exc} (gave up after {self._attempts} attempts)") from exc
                pause = backoff(number, exc.retry_after)
                if deadline is not None and self._clock() + pause > deadline - DEADLINE_RESERVE_SECONDS:
                    raise RegistryError(
                        f"{exc} (not retried: waiting {pause:.1f}s would pass the call's deadline)"
                    ) from exc
                self._sleep(pause)
        raise AssertionError("unreachable")


def parse_retry_after(value: str, now: float) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent or unreadable."""
    value = value.strip()
    if not value:
        return None
    if value.isdigit():
        return float(int(value)) if len(value) < 10 else 1e9
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    try:
        return max(0.0, when.timestamp() - now)
    except (OverflowError, ValueError, OSError):
        return None
