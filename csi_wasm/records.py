"""Volume records: what is published where, one small JSON file per target, kept across restarts.

Records are the source of the store's reference counts: a module is in use
exactly while some record names it (never judged by access time).
"""

from __future__ import annotations

import hashlib
import json
import logging
import pathlib
import threading
from collections import Counter
from dataclasses import asdict, dataclass

from csi_wasm.store import write_atomic

log = logging.getLogger("csi_wasm.records")


@dataclass(frozen=True)
class VolumeRecord:
    volume_id: str
    target_path: str
    image: str
    module_digest: str
    file_name: str
    published_at: float
    pod_namespace: str = ""
    pod_name: str = ""


def record_key(target_path: str) -> str:
    return hashlib.sha256(target_path.encode("utf-8", "surrogateescape")).hexdigest()


class RecordStore:
    """Records with an in-memory index; every write is atomic (temp file, rename), none is fsync'd.

    A record describes a mount, and mounts live in the kernel: a driver crash keeps both (written
    pages belong to the kernel, not the process), a power loss or reboot loses both, and recovery
    drops a record whose mount is gone and adopts a mount whose record is missing. So an fsync per
    publish (two, with the directory's) would buy nothing; it cost most of a warm publish.
    """

    def __init__(self, root: pathlib.Path) -> None:
        self._root = root
        self._root.mkdir(parents=True, exist_ok=True)
        self._by_target: dict[str, VolumeRecord] = {}
        self._lock = threading.Lock()

    def load(self) -> list[pathlib.Path]:
        """Read every record; return the files that could not be read (the caller repairs)."""
        unreadable = []
        loaded: dict[str, VolumeRecord] = {}
        for path in self._root.glob("*.json"):
            try:
                record = VolumeRecord(**json.loads(path.read_bytes()))
            except (ValueError, TypeError, OSError):
                unreadable.append(path)
                continue
            loaded[record.target_path] = record
        for leftover in self._root.glob(".*.tmp"):
            leftover.unlink(missing_ok=True)
        with self._lock:
            self._by_target = loaded
        return unreadable

    def get(self, target_path: str) -> VolumeRecord | None:
        with self._lock:
            return self._by_target.get(target_path)

    def put(self, record: VolumeRecord) -> None:
        data = json.dumps(asdict(record), sort_keys=True).encode()
        write_atomic(self._path(record.target_path), data, durable=False)
        with self._lock:
            self._by_target[record.target_path] = record

    def delete(self, target_path: str) -> None:
        self._path(target_path).unlink(missing_ok=True)
        with self._lock:
            self._by_target.pop(target_path, None)

    def all(self) -> list[VolumeRecord]:
        with self._lock:
            return list(self._by_target.values())

    def references(self) -> Counter[str]:
        """Module digest -> number of volumes using it."""
        with self._lock:
            return Counter(record.module_digest for record in self._by_target.values())

    def _path(self, target_path: str) -> pathlib.Path:
        return self._root / f"{record_key(target_path)}.json"
