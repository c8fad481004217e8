"""Stream one module layer from its registry into the store: count, cap, verify, commit.

``LayerFetcher.fetch`` is what a download worker runs (``csi_wasm.pull`` decides when, and who may
share the result). A raw layer is the module itself: the store hashes it while it streams and commits
it only under the manifest's digest. A compat layer (tar+gzip holding ``plugin.wasm``) is hashed as
compressed bytes, inflated under a cap (gzip bomb guard), read with a bounded tar reader, and its one
module entry is stored only once every byte of the layer matched the manifest's digest. Either way a
refused layer leaves nothing in the store.
"""

from __future__ import annotations

import hashlib
import io
import logging
import posixpath
import time
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator

from csi_wasm.config import PullConfig
from csi_wasm.credentials import Credentials
from csi_wasm.errors import DigestMismatch, DriverError, TooLarge, UnsupportedLayout
from csi_wasm.layouts import ModuleLayer
from csi_wasm.logs import event
from csi_wasm.metrics import Metrics
from csi_wasm.reference import Reference
from csi_wasm.registry import RegistryClient
from csi_wasm.store import ModuleStore, StoredModule
from csi_wasm.tarstream import TarStream

log = logging.getLogger("csi_wasm.pull")
MODULE_IN_TAR = "plugin.wasm"
# A gzip layer may not inflate past this many times the module cap (gzip bomb guard).
INFLATE_FACTOR = 4


class LayerFetcher:
    def __init__(self, store: ModuleStore, client: RegistryClient, config: PullConfig, metrics: Metrics) -> None:
        self._store = store
        self._client = client
        self._config = config
        self._metrics = metrics

    def cap(self, layer: ModuleLayer) -> int:
        """The most bytes ``layer`` may have: the module cap, times ``INFLATE_FACTOR`` for a compressed layer."""
        return self._config.max_module_bytes * (INFLATE_FACTOR if layer.packaging == "tar+gzip" else 1)

    def fetch(self, ref: Reference, layer: ModuleLayer, creds: Credentials | None) -> StoredModule:
        """Download ``layer`` of ``ref`` into the store; raises (nothing left in the store) when it is refused."""
        started = time.monotonic()
        self._metrics.pulls_in_flight.inc()
        event(log, "pull.start", image=str(ref), layer=layer.digest, layout=layer.layout, bytes=layer.size)
        steps = _Steps()
        try:
            with self._client.open_blob(ref, layer.digest, creds, layer.size) as blob:
                steps.headers_s = time.monotonic() - started
                counted = _counting(iter(blob), self._metrics, steps)
                if layer.packaging == "raw":
                    stored = self._store_raw(ref, layer, counted, steps)
                else:
                    stored = self.store_from_tar(ref, layer, counted)
        except DriverError as exc:
            event(log, "pull.failed", logging.WARNING, image=str(ref), layer=layer.digest, reason=exc.reason,
                  error=str(exc), seconds=round(time.monotonic() - started, 3))  # fmt: skip
            raise
        finally:
            self._metrics.pulls_in_flight.dec()
        seconds = time.monotonic() - started
        self._metrics.pull_seconds.observe(seconds)
        event(log, "pull.done", image=str(ref), digest=stored.digest, bytes=stored.size, seconds=round(seconds, 3),
              headers_s=round(steps.headers_s, 4), read_s=round(steps.read_s, 4),
              commit_s=round(steps.commit_s, 4))  # fmt: skip
        return stored

    def _store_raw(self, ref: Reference, layer: ModuleLayer, chunks: Iterator[bytes], steps: _Steps) -> StoredModule:
        with self._store.ingest(str(ref), self._config.max_module_bytes, layer.size) as ingest:
            for chunk in chunks:
                ingest.write(chunk)
            committing = time.monotonic()
            stored = ingest.commit(expected_digest=layer.digest)
            steps.commit_s = time.monotonic() - committing
            return stored

    def store_from_tar(self, ref: Reference, layer: ModuleLayer, chunks: Iterator[bytes]) -> StoredModule:
        reader = _GunzipReader(chunks, self.cap(layer), str(ref))
        with self._store.ingest(str(ref), self._config.max_module_bytes, layer.size) as ingest:
            try:
                self._extract_module(ref, TarStream(reader.read, str(ref)), ingest.write)
            except zlib.error as exc:
                raise UnsupportedLayout(f"image {ref}: the compat layer is not a valid tar+gzip: {exc}") from exc
            reader.drain()
            if reader.digest != layer.digest:
                raise DigestMismatch(
                    f"image {ref}: layer content digest {reader.digest} does not match the manifest's {layer.digest}"
                )
            return ingest.commit(expected_digest=None)

    def _extract_module(self, ref: Reference, archive: TarStream, write: Callable[[bytes], None]) -> None:
        for member in archive:
            if posixpath.basename(member.name.rstrip("/")) != MODULE_IN_TAR:
                continue
            # names are never used as paths here, but a crafted one says the layer is hostile
            if member.name.startswith("/") or ".." in member.name.split("/"):
                raise UnsupportedLayout(
                    f"image {ref}: compat layer entry {member.name[:100]!r} is absolute or climbs out with '..'"
                )
            if member.kind != "file":
                raise UnsupportedLayout(
                    f"image {ref}: {member.name[:100]!r} in the compat layer is not a regular file ({member.kind})"
                )
            if member.size > self._config.max_module_bytes:
                raise TooLarge(
                    f"image {ref}: {member.name[:100]!r} is {member.size} bytes, over the node's limit of "
                    f"{self._config.max_module_bytes}"
                )
            for chunk in archive.data(member):
                write(chunk)
            return
        raise UnsupportedLayout(f"image {ref}: the compat layer holds no {MODULE_IN_TAR}")




@dataclass
class _Steps:
    """Where a download's time went, logged with ``pull.done``: the registry's answer (connect, auth,
    headers), the socket reads, and the commit (the last hash, fsync, rename). The rest of ``seconds``
    is writing into the store, with the hash running beside it."""

    headers_s: float = 0.0
    read_s: float = 0.0
    commit_s: float = 0.0


def _counting(chunks: Iterator[bytes], metrics: Metrics, steps: _Steps) -> Iterator[bytes]:
    while True:
        reading = time.monotonic()
        chunk = next(chunks, None)
        steps.read_s += time.monotonic() - reading
        if chunk is None:
            return
        metrics.pull_bytes.inc(len(chunk))
        yield chunk


class _GunzipReader(io.RawIOBase):
    """A file-like view of a gzip stream: hashes the compressed bytes, caps the inflated ones."""

    def __init__(self, chunks: Iterator[bytes], max_inflated: int, image: str) -> None:
        self._chunks = chunks
        self._hash = hashlib.sha256()
        self._inflate = zlib.decompressobj(wbits=31)
        self._buffer = bytearray()  # del from the front is amortised O(1) for bytearray
        self._inflated = 0
        self._max_inflated = max_inflated
        self._image = image
        self._eof = False

    @property
    def digest(self) -> str:
        return f"sha256:{self._hash.hexdigest()}"

    def readable(self) -> bool:
        return True

    def readinto(self, target: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._buffer and not self._eof:
            self._fill()
        size = min(len(target), len(self._buffer))
        target[:size] = self._buffer[:size]
        del self._buffer[:size]
        return size

    def drain(self) -> None:
        """Hash the rest of the layer (without inflating it) so the digest covers every byte."""
        for compressed in self._chunks:
            self._hash.update(compressed)
        self._eof = True

    def _fill(self) -> None:
        # at most 1 MiB inflated per call, so a bomb never sits in memory
        if self._inflate.unconsumed_tail:
            data = self._inflate.decompress(self._inflate.unconsumed_tail, 1024 * 1024)
        else:
            compressed = next(self._chunks, None)
            if compressed is None:
                self._eof = True
                data = self._inflate.flush()
            else:
                self._hash.update(compressed)
                data = self._inflate.decompress(compressed, 1024 * 1024)
        self._inflated += len(data)
        if self._inflated > self._max_inflated:
            raise TooLarge(f"image {self._image}: the compat layer inflates past {self._max_inflated} bytes")
        self._buffer += data
