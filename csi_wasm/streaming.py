"""Hash and persist a download while it arrives, instead of after.

A cold publish of a large module spent as long verifying and persisting the bytes as
curl spends downloading them: sha256 and the final fsync ran after the last byte, one
after the other. Here the sha256 runs on a thread of its own, fed chunk by chunk
(hashlib releases the GIL for large buffers, so it overlaps the socket reads and the
file writes of the download thread), and the kernel is asked to start writing the
file back every ``WRITEBACK_BYTES`` (``sync_file_range``), so the fsync at the end
waits only for the last few MiB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import queue
import threading
from typing import Callable

# Start writeback of what was written every this many bytes.
WRITEBACK_BYTES = 8 * 1024 * 1024
# Chunks handed to the hashing thread and not hashed yet, at most (each at most one socket read).
HASH_QUEUE_DEPTH = 4
_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of dirty pages in the range, do not wait


def _sync_file_range() -> Callable[[int, int, int], None]:
    """``sync_file_range(fd, offset, n, SYNC_FILE_RANGE_WRITE)`` from libc; a no-op where it is missing
    (the final fsync then does all the work, as before)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        call = libc.sync_file_range
    except (OSError, AttributeError):
        return lambda fd, offset, length: None
    call.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]

    def start_writeback(fd: int, offset: int, length: int) -> None:
        call(fd, offset, length, _SYNC_FILE_RANGE_WRITE)  # advisory: a failure only leaves more for fsync

    return start_writeback


start_writeback = _sync_file_range()


class BackgroundHash:
    """sha256 of the chunks ``put`` into it, computed on its own thread."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._chunks: queue.Queue[bytes | None] = queue.Queue(maxsize=HASH_QUEUE_DEPTH)
        self._thread = threading.Thread(target=self._run, name="sha256", daemon=True)
        self._thread.start()
        self._done = False

    def put(self, chunk: bytes) -> None:
        self._chunks.put(chunk)

    def hexdigest(self) -> str:
        """Wait for every chunk put so far, then the digest (no more chunks may follow)."""
        self._finish()
        return self._hash.hexdigest()

    def close(self) -> None:
        """Stop the thread (the digest is not wanted: the download failed)."""
        self._finish()

    def _finish(self) -> None:
        if not self._done:
            self._done = True
            self._chunks.put(None)
            self._thread.join()

    def _run(self) -> None:
        while (chunk := self._chunks.get()) is not None:
            self._hash.update(chunk)


class Writeback:
    """Writes to ``fd`` through ``os.write``, starting writeback every ``WRITEBACK_BYTES``."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._written = 0
        self._flushed = 0

    def write(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            view = view[os.write(self.fd, view) :]
        self._written += len(chunk)
        if self._written - self._flushed >= WRITEBACK_BYTES:
            start_writeback(self.fd, self._flushed, self._written - self._flushed)
            self._flushed = self._written
