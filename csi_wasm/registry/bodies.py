"""Registry answers read whole into memory (manifests, tokens, signature payloads, error details), bounded.

A body is never larger than its cap, and all bodies held at once by every publish
together stay within the node's ``pull.max_buffered_bytes``: each read reserves its
worst case up front (``BUFFER_FACTOR`` times its announced size, or its cap when
none is announced: the bytes, their decoded text and the parsed values), waits
for room until its deadline, and gives it back when the caller is done.

JSON is parsed only after a cheap count of its values (``MAX_JSON_VALUES``), so a
4 MiB manifest of small arrays or objects (a million Python objects, some 100 MB)
and a manifest nested 200,000 deep are refused before they are parsed.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from typing import Any, Callable, Iterator

from csi_wasm.errors import DriverError, RegistryError

# bytes + decoded text (up to 4 bytes a character) + the parsed strings (as much again)
BUFFER_FACTOR = 9
MAX_JSON_VALUES = 20_000
ERROR_BODY_BYTES = 4096


class MemoryBudget:
    """Bytes of registry answers the whole driver may hold at once."""

    def __init__(self, total: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.total = max(1, total)
        self._clock = clock
        self._used = 0
        self._room = threading.Condition()

    @property
    def used(self) -> int:
        with self._room:
            return self._used

    @contextlib.contextmanager
    def reserve(self, amount: int, deadline: float, what: str) -> Iterator[None]:
        amount = min(max(amount, 0), self.total)  # a read larger than the budget waits for all of it
        with self._room:
            while self._used + amount > self.total:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    raise RegistryError(
                        f"{what}: the node is holding {self._used} bytes of other registry answers "
                        f"(pull.max_buffered_bytes is {self.total}); retry shortly"
                    )
                self._room.wait(remaining)
            self._used += amount
        try:
            yield
        finally:
            with self._room:
                self._used -= amount
                self._room.notify_all()


def parse_json(raw: bytes | bytearray, what: str, error: type[DriverError]) -> Any:
    """Parse JSON whose value count is bounded; ``error`` (with a message naming ``what``) otherwise."""
    values = raw.count(b",") + raw.count(b"[") + raw.count(b"{")
    if values > MAX_JSON_VALUES:
        raise error(f"{what} has about {values} JSON values, more than the {MAX_JSON_VALUES} a node accepts")
    try:
        return json.loads(raw)
    except RecursionError:
        raise error(f"{what} is JSON nested too deeply to read") from None
    except ValueError as exc:
        raise error(f"{what} is not JSON") from exc


def error_codes(raw: bytes | bytearray) -> str:
    """The ``errors[].code`` list of an OCI error body, or "" (the body may be cut short, or anything)."""
    try:
        body = parse_json(raw, "error body", RegistryError)
    except RegistryError:
        return ""
    if not isinstance(body, dict) or not isinstance(body.get("errors"), list):
        return ""
    codes = [str(e.get("code"))[:40] for e in body["errors"][:8] if isinstance(e, dict)]
    return ", ".join(codes)
