"""Bounded retries of transient registry failures: backoff with jitter, ``Retry-After``, the call's deadline.

Only failures worth retrying are retried (``Transient``: connection refused or
reset, 429, 5xx, a manifest body cut short); at most ``pull.attempts`` attempts
in all; a wait that would pass the call's deadline is not taken, the call fails
at once instead. Timeouts are not retried inside a call: each would cost a whole
read timeout, and kubelet retries the call anyway.

``Retry-After`` (on a 429 or a 5xx) is honoured for the host that sent it, not just
by the call that got it: until then no call of this node sends that host a request
(``RetryAfter``); a call that can wait waits, one that cannot answers UNAVAILABLE at
once (kubelet retries). Every wait for it adds a random spread, so the nodes and
calls a registry turned away do not all come back in the same instant.
"""

from __future__ import annotations

import email.utils
import random
import threading
import time
from typing import Callable, TypeVar

from csi_wasm.errors import RegistryError

# A Retry-After is remembered for at most this long (a registry asking for days is asked again sooner).
MAX_RETRY_AFTER_SECONDS = 600.0
# A wait for Retry-After adds a random spread of up to this fraction of it, and at least this many seconds.
RETRY_AFTER_SPREAD_FRACTION = 0.5
RETRY_AFTER_MIN_SPREAD_SECONDS = 1.0
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


class Unreachable(Transient):
    """The host gave no answer at all: connection refused, reset or unroutable (a timeout is RegistryTimeout)."""


def backoff(number: int, retry_after: float | None = None, rng: random.Random | None = None) -> float:
    """Seconds to wait before attempt ``number + 1``: Retry-After (capped) plus a spread, else jittered
    exponential. Never less than Retry-After (up to its cap)."""
    draw = (rng or random).random()
    if retry_after is not None:
        wait = min(max(retry_after, 0.0), MAX_RETRY_AFTER_SECONDS)
        return wait + spread(wait, draw)
    base = min(BACKOFF_BASE_SECONDS * 2.0 ** (number - 1), BACKOFF_CAP_SECONDS)
    return base * (0.5 + draw)


def spread(retry_after: float, draw: float) -> float:
    """The random part added to a Retry-After wait (``draw`` in [0, 1))."""
    return draw * max(RETRY_AFTER_MIN_SPREAD_SECONDS, retry_after * RETRY_AFTER_SPREAD_FRACTION)


class RetryAfter:
    """Until when each host asked (with Retry-After) to be left alone, on the retrier's clock."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._until: dict[str, float] = {}
        self._lock = threading.Lock()

    def note(self, host: str, seconds: float) -> None:
        until = self._clock() + min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)
        with self._lock:
            self._until[host] = max(until, self._until.get(host, 0.0))

    def remaining(self, host: str) -> float:
        """Seconds until ``host`` may be asked again; 0 when it may be now."""
        with self._lock:
            until = self._until.get(host)
            if until is None:
                return 0.0
            left = until - self._clock()
            if left <= 0:
                del self._until[host]
                return 0.0
            return left


class Retrier:
    def __init__(
        self,
        attempts: int,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self._attempts = max(1, attempts)
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()
        self.retry_after = RetryAfter(clock)

    def run(self, call: Callable[[], T], deadline: float | None = None, host: str | None = None) -> T:
        """Run ``call``; retry transient failures a bounded number of times, inside ``deadline``.

        ``host``: the registry ``call`` talks to; a Retry-After it sent (to this call or another) is
        waited out, with a spread, before each attempt.
        """
        for number in range(1, self._attempts + 1):
            if host is not None:
                self._wait_out_retry_after(host, deadline)
            try:
                return call()
            except Transient as exc:
                if host is not None and exc.retry_after is not None:
                    self.retry_after.note(host, exc.retry_after)
                if number == self._attempts:
                    raise RegistryError(f"{exc} (gave up after {self._attempts} attempts)") from exc
                if host is not None and exc.retry_after is not None:
                    continue  # waited out at the top of the loop, with this call's deadline
                pause = backoff(number, exc.retry_after, self._rng)
                if deadline is not None and self._clock() + pause > deadline - DEADLINE_RESERVE_SECONDS:
                    raise RegistryError(
                        f"{exc} (not retried: waiting {pause:.1f}s would pass the call's deadline)"
                    ) from exc
                self._sleep(pause)
        raise AssertionError("unreachable")

    def _wait_out_retry_after(self, host: str, deadline: float | None) -> None:
        left = self.retry_after.remaining(host)
        if left <= 0:
            return
        pause = left + spread(left, self._rng.random())
        if deadline is not None and self._clock() + pause > deadline - DEADLINE_RESERVE_SECONDS:
            raise RegistryError(
                f"registry {host[:100]} asked to be retried after {left:.0f}s more (HTTP 429/503 Retry-After); "
                "not waiting past this call's deadline: kubelet will retry"
            )
        self._sleep(pause)


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
