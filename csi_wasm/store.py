"""The node's content-addressed module store.

Layout under ``<state-dir>/store``::

    modules/sha256/<hex>              one file per module, named by the sha256 of its bytes (0444)
    views/<hex>/<fileName>/<fileName> hard link to the module: the directory a pod's target binds
    manifests/<hex>.json              manifest digest -> module digest, so a pinned reference
                                      is served from the store without the network; collected
                                      once its module is gone
    tags/<sha256 of reference>.json   last manifest digest a tag resolved to (for pullPolicy Never
                                      after a restart or a `csi-wasm pull`); written only once its
                                      manifest entry exists, collected once that entry is gone
    access/<hex>.json                 who may be handed the module (csi_wasm.access owns these;
                                      removed with the module)
    tmp/                              downloads in progress; swept at start
    quarantine/                       modules `csi-wasm store verify` or a publish found corrupt
    seals/<hex>.json                  size, mode, owner and inode of each module file as stored
                                      (csi_wasm.integrity: the warm path's tamper check)

Every change is write-temp, fsync, rename, fsync-directory: a crash leaves either
the old state or the new one, never a partial module under its final name.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pathlib
import re
import secrets
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Callable, Iterator

from csi_wasm import wasm
from csi_wasm.errors import DigestMismatch, InvalidRequest, NotWasm, StorageFull, TooLarge
from csi_wasm.integrity import Seal, Seals
from csi_wasm.streaming import BackgroundHash, Writeback

FILE_NAME_MAX = 255
# The free-space floor is checked again after every this many bytes written: a compat layer of a few KB
# can inflate to a module of hundreds of MB, so the size the manifest declared says little.
FREE_SPACE_CHECK_BYTES = 1024 * 1024
_FULL = (errno.ENOSPC, errno.EDQUOT)
_VIEW_ROOT = re.compile(r"/views/([0-9a-f]{64})/([^/]+)$")


def names_view(mount_root: str, digest: str, file_name: str) -> bool:
    """True if a mount's root is this view's directory, even one removed since (a quarantined module's
    views go, the pods that mounted them keep them): how a recorded mount is still known as ours."""
    match = _VIEW_ROOT.search(mount_root.removesuffix("//deleted"))
    return match is not None and (f"sha256:{match.group(1)}", match.group(2)) == (digest, file_name)


@dataclass(frozen=True)
class StoredModule:
    digest: str
    size: int
    path: pathlib.Path
    last_used: float


@dataclass(frozen=True)
class ManifestEntry:
    """What a manifest digest resolved to, remembered so pinned references skip the network."""

    manifest_digest: str
    module_digest: str
    size: int
    layout: str
    needs_auth: bool


def validate_file_name(name: str) -> str:
    if (
        not name
        or len(name.encode()) > FILE_NAME_MAX
        or name in (".", "..")
        or "/" in name
        or "\0" in name
        or not name.isprintable()
    ):
        raise InvalidRequest(
            f"fileName {name[:80]!r}: must be a plain file name (no '/', no NUL, not '.' or '..', "
            f"at most {FILE_NAME_MAX} bytes)"
        )
    return name


def fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def full_disk_is_storage_full(where: pathlib.Path, what: str) -> Iterator[None]:
    """ENOSPC/EDQUOT become StorageFull (RESOURCE_EXHAUSTED, with what to do); other OS errors pass."""
    try:
        yield
    except OSError as exc:
        if exc.errno in _FULL:
            raise StorageFull(
                f"{what}: the filesystem of {where} is full ({exc.strerror}); free disk on the node, or lower "
                "store.max_store_bytes / raise store.min_free_bytes so the store stops short of it"
            ) from exc
        raise


def write_atomic(path: pathlib.Path, data: bytes, durable: bool = True) -> None:
    """Replace ``path`` atomically. ``durable``: fsync the file and its directory (survive a power loss)."""
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with full_disk_is_storage_full(path.parent, f"writing {path.name}"):
            with open(temp, "wb") as handle:
                handle.write(data)
                if durable:
                    handle.flush()
                    os.fsync(handle.fileno())
            os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


class Ingest:
    """A module being written into the store: hashed, size-capped and header-checked as it streams, and
    stopped before the filesystem crosses the free-space floor (checked every ``FREE_SPACE_CHECK_BYTES``)."""

    def __init__(self, store: ModuleStore, image: str, max_bytes: int) -> None:
        self._store = store
        self._image = image
        self._max_bytes = max_bytes
        self._size = 0
        self._unchecked = 0
        self._header = b""
        self.temp_path = store.tmp_dir / f"{secrets.token_hex(8)}.partial"
        with self._full_disk():
            fd = os.open(self.temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        self._file = Writeback(fd)  # written and flushed to disk as the bytes arrive (csi_wasm.streaming)
        self._hash = BackgroundHash()  # hashed on its own thread, beside the socket reads and file writes
        self._closed = False

    @property
    def size(self) -> int:
        return self._size

    def write(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size > self._max_bytes:
            raise TooLarge(f"image {self._image}: module exceeds the node's limit of {self._max_bytes} bytes")
        if len(self._header) < wasm.HEADER_LENGTH:
            self._header += chunk[: wasm.HEADER_LENGTH - len(self._header)]
            if len(self._header) == wasm.HEADER_LENGTH and wasm.header_kind(self._header) is None:
                raise NotWasm(f"image {self._image}: the layer is not a WebAssembly module (bad magic/version)")
        self._hash.put(chunk)
        self._unchecked += len(chunk)
        if self._unchecked >= FREE_SPACE_CHECK_BYTES:
            self._unchecked = 0
            self._store.check_free_space(0, f"image {self._image}: module being written ({self._size} bytes so far)")
        with self._full_disk():
            self._file.write(chunk)

    def _full_disk(self) -> contextlib.AbstractContextManager[None]:
        return full_disk_is_storage_full(self._store.root, f"image {self._image}")

    def commit(self, expected_digest: str | None, landing: Callable[[str], None] | None = None) -> StoredModule:
        """Verify, fsync and move into place; the module's digest is the sha256 of its bytes.

        ``landing(digest)`` runs once the bytes are verified and before the module appears under its name:
        whoever waits for it marks it wanted there, before a garbage collection can see (and take) it."""
        if wasm.header_kind(self._header) is None:
            raise NotWasm(f"image {self._image}: the layer is not a WebAssembly module (too short)")
        digest = f"sha256:{self._hash.hexdigest()}"
        if expected_digest is not None and digest != expected_digest:
            raise DigestMismatch(
                f"image {self._image}: content digest {digest} does not match the expected {expected_digest}"
            )
        with self._full_disk():
            os.fchmod(self._file.fd, 0o444)
            os.fsync(self._file.fd)  # most of the file is on its way to disk already: a short wait
            self._close()
            if landing is not None:
                landing(digest)
            return self._store.adopt(self.temp_path, digest, self._size)

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._file.fd)

    def __enter__(self) -> Ingest:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._hash.close()
        with contextlib.suppress(OSError):  # a full disk may fail the close too: the file goes anyway
            self._close()
        self.temp_path.unlink(missing_ok=True)


class ModuleStore:
    def __init__(self, root: pathlib.Path, min_free_bytes: int = 0) -> None:
        self.root = root
        self.modules_dir = root / "modules" / "sha256"
        self.views_dir = root / "views"
        self.manifests_dir = root / "manifests"
        self.tmp_dir = root / "tmp"
        self.tags_dir = root / "tags"
        self.quarantine_dir = root / "quarantine"
        self.access_dir = root / "access"  # written by csi_wasm.access.AccessRecords
        self._min_free_bytes = min_free_bytes
        self._manifests: dict[str, ManifestEntry] = {}  # dict get/set are atomic under the GIL
        self._lock = threading.Lock()
        self.seals = Seals(root / "seals")
        # index entries are written and collected under one lock: a collection never races a pull's write
        self._index_lock = threading.RLock()
        for directory in (self.modules_dir, self.views_dir, self.manifests_dir, self.tmp_dir, self.tags_dir):
            directory.mkdir(parents=True, exist_ok=True, mode=0o755)

    # -- modules ---------------------------------------------------------

    def module_path(self, digest: str) -> pathlib.Path:
        return self.modules_dir / digest.removeprefix("sha256:")

    def has(self, digest: str) -> bool:
        return self.module_path(digest).is_file()

    def ingest(self, image: str, max_bytes: int, expected_size: int | None = None) -> Ingest:
        self.check_free_space(expected_size or 0, f"image {image}")
        return Ingest(self, image, max_bytes)

    def check_free_space(self, incoming_bytes: int, what: str = "a download") -> None:
        """StorageFull if writing ``incoming_bytes`` more would take the filesystem under ``min_free_bytes``."""
        if self._min_free_bytes <= 0:
            return
        stats = os.statvfs(self.root)
        free = stats.f_bavail * stats.f_frsize
        if free - incoming_bytes < self._min_free_bytes:
            where = f"the module store at {self.root}"
            state = (f"has {free} bytes free; writing {incoming_bytes} more would cross" if incoming_bytes
                     else f"is down to {free} bytes free, under")  # fmt: skip
            raise StorageFull(
                f"{what}: {where} {state} the node's floor of {self._min_free_bytes} bytes "
                "(store.min_free_bytes); free disk on the node"
            )

    def adopt(self, temp_path: pathlib.Path, digest: str, size: int) -> StoredModule:
        final = self.module_path(digest)
        # rename is atomic; if another download of the same content won, keep the winner's inode
        # so pods already mounted and new ones share one file.
        if final.exists():
            temp_path.unlink(missing_ok=True)
        else:
            self.seals.put(digest, Seal.of(os.lstat(temp_path)))  # the same inode after the rename
            os.replace(temp_path, final)
            fsync_dir(self.modules_dir)
        return StoredModule(digest=digest, size=size, path=final, last_used=time.time())

    def stat(self, digest: str) -> StoredModule | None:
        path = self.module_path(digest)
        try:
            info = path.stat()
        except FileNotFoundError:
            return None
        return StoredModule(digest=digest, size=info.st_size, path=path, last_used=info.st_mtime)

    def modules(self) -> list[StoredModule]:
        found = []
        for path in sorted(self.modules_dir.iterdir()):
            module = self.stat(f"sha256:{path.name}")
            if module is not None:
                found.append(module)
        return found

    def touch(self, digest: str, when: float | None = None) -> None:
        """Record a use (a publish, or the last unpublish) as the module's mtime: the LRU clock for GC."""
        try:
            os.utime(self.module_path(digest), None if when is None else (when, when))
        except FileNotFoundError:
            pass

    def verify(self, digest: str) -> bool:
        """Rehash a stored module; True if its bytes still match its name."""
        hasher = hashlib.sha256()
        with open(self.module_path(digest), "rb") as handle:
            while chunk := handle.read(1024 * 1024):
                hasher.update(chunk)
        return f"sha256:{hasher.hexdigest()}" == digest

    def quarantine(self, digest: str) -> pathlib.Path:
        """Move a corrupt module out of the store (mounted pods keep their inode); new publishes re-fetch."""
        self.quarantine_dir.mkdir(exist_ok=True)
        destination = self.quarantine_dir / f"{digest.removeprefix('sha256:')}.{int(time.time())}"
        os.replace(self.module_path(digest), destination)
        self.seals.forget(digest)
        self._remove_views(digest)
        fsync_dir(self.modules_dir)
        return destination

    def remove(self, digest: str) -> None:
        self.seals.forget(digest)
        self._remove_views(digest)
        self.module_path(digest).unlink(missing_ok=True)
        fsync_dir(self.modules_dir)
        (self.access_dir / f"{digest.removeprefix('sha256:')}.json").unlink(missing_ok=True)  # no leaked record

    def _remove_views(self, digest: str) -> None:
        view_root = self.views_dir / digest.removeprefix("sha256:")
        if view_root.exists():
            for view in view_root.iterdir():
                for item in view.iterdir():
                    item.unlink()
                view.rmdir()
            view_root.rmdir()

    def sweep_temp_files(self) -> int:
        removed = 0
        for leftover in self.tmp_dir.iterdir():
            leftover.unlink(missing_ok=True)
            removed += 1
        return removed

    # -- views -----------------------------------------------------------

    def view(self, digest: str, file_name: str) -> pathlib.Path:
        """The directory whose only entry is ``file_name``, a hard link to the module (same inode)."""
        directory = self.views_dir / digest.removeprefix("sha256:") / file_name
        link = directory / file_name
        if link.exists():
            return directory
        with self._lock:
            if not link.exists():
                self._make_view(digest, directory, link)
        return directory

    def _make_view(self, digest: str, directory: pathlib.Path, link: pathlib.Path) -> None:
        directory.mkdir(parents=True, exist_ok=True, mode=0o755)
        temp = directory / f".{secrets.token_hex(4)}.link"
        os.link(self.module_path(digest), temp)
        os.replace(temp, link)
        fsync_dir(directory)

    def shows_view(self, target: pathlib.Path, digest: str, file_name: str) -> bool:
        """True if ``target`` shows this view's directory (same inode): a bind of it is on top there."""
        view = self.views_dir / digest.removeprefix("sha256:") / file_name
        try:
            ours, theirs = view.stat(), os.lstat(target)
        except OSError:
            return False
        return (ours.st_dev, ours.st_ino) == (theirs.st_dev, theirs.st_ino)

    def view_of(self, mount_root: str, mounted: pathlib.Path) -> tuple[str, str] | None:
        """(digest, fileName) if ``mounted`` is a bind of one of our views (same device and inode)."""
        match = _VIEW_ROOT.search(mount_root)
        if match is None:
            return None
        view = self.views_dir / match.group(1) / match.group(2)
        try:
            ours, theirs = view.stat(), mounted.stat()
        except OSError:
            return None
        if (ours.st_dev, ours.st_ino) != (theirs.st_dev, theirs.st_ino):
            return None
        return f"sha256:{match.group(1)}", match.group(2)

    # -- manifest index --------------------------------------------------

    def remember_manifest(self, entry: ManifestEntry) -> None:
        path = self.manifests_dir / f"{entry.manifest_digest.removeprefix('sha256:')}.json"
        with self._index_lock:
            write_atomic(path, json.dumps(vars(entry), sort_keys=True).encode())
            self._manifests[entry.manifest_digest] = entry

    def remember_manifest_once(self, entry: ManifestEntry) -> None:
        """Write the entry unless one is there (every publish that joined a download gets here)."""
        with self._index_lock:
            if self.manifest(entry.manifest_digest) is None:
                self.remember_manifest(entry)

    def forget_orphan_manifests(self) -> int:
        """Remove manifest entries whose module is gone (or that cannot be read); how many."""
        removed = 0
        for path in self.manifests_dir.glob("*.json"):
            digest = f"sha256:{path.stem}"
            with self._index_lock:
                entry = self.manifest(digest)
                if entry is not None and self.has(entry.module_digest):
                    continue
                path.unlink(missing_ok=True)
                self._manifests.pop(digest, None)
            removed += 1
        return removed

    def manifest(self, manifest_digest: str) -> ManifestEntry | None:
        """What a manifest digest resolved to. Entries are content-addressed and never change, so the
        file is read once per process (another process, `csi-wasm pull`, may have written it since)."""
        cached = self._manifests.get(manifest_digest)
        if cached is not None:
            return cached
        path = self.manifests_dir / f"{manifest_digest.removeprefix('sha256:')}.json"
        try:
            entry = ManifestEntry(**json.loads(path.read_bytes()))
        except (FileNotFoundError, ValueError, TypeError):
            return None
        self._manifests[manifest_digest] = entry
        return entry


    def remember_tag(self, reference: str, manifest_digest: str, resolved_at: float) -> None:
        record = {"reference": reference, "manifest_digest": manifest_digest, "resolved_at": resolved_at}
        with self._index_lock:
            write_atomic(self._tag_path(reference), json.dumps(record, sort_keys=True).encode())

    def tag(self, reference: str) -> tuple[str, float] | None:
        return _tag_record(self._tag_path(reference))

    def forget_orphan_tags(self) -> int:
        """Remove tag entries whose manifest entry is gone (or that cannot be read); how many."""
        removed = 0
        for path in self.tags_dir.glob("*.json"):
            with self._index_lock:
                record = _tag_record(path)
                if record is not None and self.manifest(record[0]) is not None:
                    continue
                path.unlink(missing_ok=True)
            removed += 1
        return removed

    def _tag_path(self, reference: str) -> pathlib.Path:
        return self.tags_dir / f"{hashlib.sha256(reference.encode()).hexdigest()}.json"


def _tag_record(path: pathlib.Path) -> tuple[str, float] | None:
    try:
        record = json.loads(path.read_bytes())
        return str(record["manifest_digest"]), float(record["resolved_at"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None
