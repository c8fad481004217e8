"""Tamper evidence for stored modules, at a price the warm path can pay.

Re-hashing a module on every publish costs milliseconds per MiB; a warm publish costs about one
millisecond in all. So each module gets a *seal* when it is stored: the size, mode, owner and inode
its file had. A publish compares the module file and the hard link it is about to mount with the
seal: two lstat calls. Any difference (rewritten to another size, made setuid, chowned, replaced by
another file, a view linked to something else) makes that publish re-hash the module: bytes that
still match the digest are kept (mode and owner put back, views re-linked, seal renewed); others
are quarantined and the publish fetches the module again.

What a seal cannot see: a rewrite in place that keeps size, mode and owner (mtime cannot tell, the
garbage collector keeps its LRU clock there). Every mount is read-only in every namespace, so only
root on the node itself can do that; ``csi-wasm store verify`` re-hashes everything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import secrets
import stat
import threading
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from csi_wasm.logs import event

if TYPE_CHECKING:
    from csi_wasm.store import ModuleStore

log = logging.getLogger("csi_wasm.integrity")
MODULE_MODE = 0o444


@dataclass(frozen=True)
class Seal:
    size: int
    mode: int
    uid: int
    gid: int
    inode: int

    @classmethod
    def of(cls, info: os.stat_result) -> Seal:
        return cls(info.st_size, info.st_mode, info.st_uid, info.st_gid, info.st_ino)

    def matches(self, info: os.stat_result) -> bool:
        return self == Seal.of(info)


class Seals:
    """One small JSON file per module (``<store>/seals/<hex>.json``), read once per process.

    Not fsync'd: a seal lost to a power cut only costs one re-hash at the next publish.
    """

    def __init__(self, directory: pathlib.Path) -> None:
        self._directory = directory
        self._directory.mkdir(parents=True, exist_ok=True, mode=0o755)
        self._cache: dict[str, Seal] = {}  # dict get/set are atomic under the GIL

    def put(self, digest: str, seal: Seal) -> None:
        path = self._path(digest)
        temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        temp.write_text(json.dumps(asdict(seal)))
        os.replace(temp, path)
        self._cache[digest] = seal

    def get(self, digest: str) -> Seal | None:
        cached = self._cache.get(digest)
        if cached is not None:
            return cached
        try:
            seal = Seal(**json.loads(self._path(digest).read_bytes()))
        except (FileNotFoundError, ValueError, TypeError):
            return None
        self._cache[digest] = seal
        return seal

    def forget(self, digest: str) -> None:
        self._cache.pop(digest, None)
        self._path(digest).unlink(missing_ok=True)

    def _path(self, digest: str) -> pathlib.Path:
        return self._directory / f"{digest.removeprefix('sha256:')}.json"


class ModuleIntegrity:
    """The warm-path check: ``intact`` before a stored module is mounted."""

    def __init__(self, store: ModuleStore) -> None:
        self._store = store
        self._lock = threading.Lock()  # one re-hash at a time; the others then see the renewed seal

    def intact(self, digest: str, view: pathlib.Path, file_name: str) -> bool:
        """True if the module (and its view's link) still look as sealed, or re-hash clean; False if the
        module was corrupt and has been quarantined (the caller fetches it again)."""
        if self._as_sealed(digest, view / file_name):
            return True
        with self._lock:
            if self._as_sealed(digest, view / file_name):
                return True
            return self._recheck(digest, view, file_name)

    def _as_sealed(self, digest: str, link: pathlib.Path) -> bool:
        seal = self._store.seals.get(digest)
        if seal is None:
            return False  # stored by a driver version without seals: hashed once, then sealed
        try:
            return seal.matches(os.lstat(self._store.module_path(digest))) and seal.matches(os.lstat(link))
        except FileNotFoundError:
            return False

    def _recheck(self, digest: str, view: pathlib.Path, file_name: str) -> bool:
        module = self._store.module_path(digest)
        seal = self._store.seals.get(digest)
        info = os.lstat(module)
        if not stat.S_ISREG(info.st_mode) or not self._store.verify(digest):
            moved = self._store.quarantine(digest)
            event(log, "store.corrupt_module", logging.ERROR, digest=digest, quarantined=str(moved),
                  changed=_changes(seal, info))  # fmt: skip
            return False
        os.chmod(module, MODULE_MODE)
        if seal is not None and (info.st_uid, info.st_gid) != (seal.uid, seal.gid):
            os.chown(module, seal.uid, seal.gid)
        link = view / file_name
        try:
            linked = os.path.samestat(os.lstat(link), os.lstat(module))
        except FileNotFoundError:
            linked = False
        if not linked:
            link.unlink(missing_ok=True)
            self._store.view(digest, file_name)  # linked afresh to the module
        renewed = Seal.of(os.lstat(module))
        self._store.seals.put(digest, renewed)
        event(log, "store.resealed_module", logging.WARNING, digest=digest, changed=_changes(seal, info))
        return True


def _changes(seal: Seal | None, info: os.stat_result) -> str:
    if seal is None:
        return "no seal"
    now = Seal.of(info)
    return ",".join(name for name in ("size", "mode", "uid", "gid", "inode") if getattr(seal, name) != getattr(now, name)) or "view"


def hashes_to(path: pathlib.Path, digest: str) -> bool:
    """True if the bytes of ``path`` have this sha256 digest."""
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1024 * 1024):
            hasher.update(chunk)
    return f"sha256:{hasher.hexdigest()}" == digest
