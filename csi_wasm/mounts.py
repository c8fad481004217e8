"""Read-only bind mounts that no mount namespace ever sees writable, unmounts, and the mount table.

Why not bind, then remount read-only: in a cluster the driver has its own mount namespace and
kubelet's pods dir reaches it as an rshared bind (``mountPropagation: Bidirectional``). A bind made
there propagates to the host's peer at once, *read-write*; the remount that follows changes only
the driver's copy (per-mount flags never propagate). Every pod container gets a bind of the host's
copy, so a root container whose volumeMount is not ``readOnly`` could rewrite the shared module.

So the mount is made read-only *before* it is attached anywhere another namespace can see it:

* ``DetachedBinder`` (Linux 5.12+): ``open_tree(OPEN_TREE_CLONE)`` makes a detached copy of the
  view, ``mount_setattr`` sets ``ro,nosuid,nodev,noexec`` on it, and ``move_mount`` attaches it at
  the target; the host's peer gets it with those flags, as a new mount.
* ``StagedBinder`` (the fallback where those calls are missing, ENOSYS): bind and remount read-only
  at a staging point under a *private* mount of our own (nothing propagates from there), then
  ``MS_MOVE`` it onto the target. MS_MOVE refuses a mount whose parent is shared, which is why the
  staging directory is made a private mount of its own first.

The target is always a directory descriptor held by ``csi_wasm.targets.Target``, never a path
re-resolved later. The hot path spawns no process. ``Mounter`` is the seam tests plug into.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import secrets
import threading
from dataclasses import dataclass
from typing import Protocol

from csi_wasm import syscalls
from csi_wasm.errors import MountError
from csi_wasm.syscalls import CLONE_NEWNS, MNT_DETACH, MS_PRIVATE, MS_REC, UMOUNT_NOFOLLOW

READ_ONLY_FLAGS = syscalls.MS_RDONLY | syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC
READ_ONLY_ATTRS = (
    syscalls.MOUNT_ATTR_RDONLY | syscalls.MOUNT_ATTR_NOSUID | syscalls.MOUNT_ATTR_NODEV | syscalls.MOUNT_ATTR_NOEXEC
)
ST_READ_ONLY = os.ST_RDONLY | os.ST_NOSUID | os.ST_NODEV | os.ST_NOEXEC  # the same, as statvfs reports them
REQUIRED_OPTIONS = frozenset({"ro", "nosuid", "nodev", "noexec"})
MOUNTINFO = pathlib.Path("/proc/self/mountinfo")


@dataclass(frozen=True)
class MountEntry:
    mount_point: str
    root: str  # path inside the source filesystem that is mounted here
    options: frozenset[str]
    source: str
    mount_id: int = 0
    parent_id: int = 0
    propagation: frozenset[str] = frozenset()  # mountinfo's optional fields: shared:N, master:N, ...

    @property
    def shared(self) -> bool:
        return any(tag.startswith("shared:") for tag in self.propagation)


class MountTarget(Protocol):
    """Where a mount goes: a directory reached through a held descriptor (``csi_wasm.targets.Target``)."""

    @property
    def path(self) -> pathlib.Path: ...

    @property
    def at(self) -> str: ...  # a path that reaches the target through the held parent descriptor

    def open_dir(self) -> int: ...


class Mounter(Protocol):
    def bind_read_only(self, source: pathlib.Path, target: MountTarget) -> None: ...

    def unmount(self, target: MountTarget) -> None: ...

    def mount_at(self, target: pathlib.Path) -> MountEntry | None: ...

    def mounts(self) -> list[MountEntry]: ...


class LinuxMounter:
    """``Mounter`` through system calls. ``new_api``: None picks the new mount API when the kernel has it;
    False forces the staging fallback (tests use it to cover both)."""

    def __init__(
        self,
        staging_dir: pathlib.Path | None = None,
        mountinfo: pathlib.Path = MOUNTINFO,
        new_api: bool | None = None,
    ) -> None:
        self._mountinfo = mountinfo
        use_new_api = syscalls.has_new_mount_api() if new_api is None else new_api
        self._binder: DetachedBinder | StagedBinder = DetachedBinder() if use_new_api else StagedBinder(staging_dir)

    @property
    def method(self) -> str:
        return self._binder.method

    def bind_read_only(self, source: pathlib.Path, target: MountTarget) -> None:
        """Attach a ro,nosuid,nodev,noexec bind of ``source`` at ``target``; verified, undone on failure."""
        attached = self._binder.bind(source, target)
        try:
            if not _same_file(os.stat(source), os.lstat(target.at)):
                raise MountError(f"mount at {target.path} does not show {source} after attaching it")
        except BaseException:
            # undone through the mount's own descriptor: a target directory swapped during the attach took
            # the mount with it, and a path would name the directory that took its place instead
            _umount(f"/proc/self/fd/{attached}", MNT_DETACH, target.path)
            raise
        finally:
            os.close(attached)

    def unmount(self, target: MountTarget) -> None:
        """Unmount what is on top at ``target``; if a process holds the module open (EBUSY), detach it
        lazily so the pod can go (the kernel frees the mount when the last user closes it)."""
        try:
            _umount(target.at, UMOUNT_NOFOLLOW, target.path)
        except MountError as exc:
            if getattr(exc.__cause__, "errno", None) != errno.EBUSY:
                raise
            _umount(target.at, UMOUNT_NOFOLLOW | MNT_DETACH, target.path)

    def mount_at(self, target: pathlib.Path) -> MountEntry | None:
        if not os.path.lexists(target):
            return None  # nothing can be mounted on a path that does not exist: skip the table
        wanted = _escape(str(target))
        candidates = []
        with open(self._mountinfo, "rb") as handle:
            for line in handle.read().decode("utf-8", "surrogateescape").splitlines():
                if f" {wanted} " in line:
                    entry = _parse(line)
                    if entry is not None and entry.mount_point == str(target):
                        candidates.append(entry)
        return top_mounts(candidates).get(str(target))

    def mounts(self) -> list[MountEntry]:
        return read_mountinfo(self._mountinfo)


class DetachedBinder:
    """open_tree + mount_setattr + move_mount: read-only before it is attached anywhere."""

    method = "open_tree"

    def bind(self, source: pathlib.Path, target: MountTarget) -> int:
        """Attach; a descriptor of the attached mount's root (the caller closes it)."""
        try:
            tree = syscalls.open_tree(bytes(source), syscalls.OPEN_TREE_CLONE | syscalls.OPEN_TREE_CLOEXEC)
        except OSError as exc:
            raise MountError(f"cloning the mount of {source} failed: {exc.strerror}") from exc
        try:
            try:
                syscalls.mount_setattr(tree, READ_ONLY_ATTRS)
            except OSError as exc:
                raise MountError(f"making the bind of {source} read-only failed: {exc.strerror}") from exc
            _require_read_only(os.fstatvfs(tree).f_flag, _same_file(os.fstat(tree), os.stat(source)), source)
            directory = target.open_dir()
            try:
                syscalls.move_mount(tree, directory, syscalls.MOVE_MOUNT_F_EMPTY_PATH | syscalls.MOVE_MOUNT_T_EMPTY_PATH)
            except OSError as exc:
                raise MountError(f"attaching {source} at {target.path} failed: {exc.strerror}") from exc
            finally:
                os.close(directory)
        except BaseException:
            os.close(tree)  # a detached mount that never got attached is freed with its last descriptor
            raise
        return tree  # now names the attached mount, wherever its mount point goes


class StagedBinder:
    """Bind + read-only remount at a private staging point, then MS_MOVE onto the target."""

    method = "staging"

    def __init__(self, staging_dir: pathlib.Path | None) -> None:
        self._staging_dir = staging_dir
        self._prepared = False
        self._lock = threading.Lock()

    def bind(self, source: pathlib.Path, target: MountTarget) -> int:
        """Attach; a descriptor of the attached mount's root (the caller closes it)."""
        stage = self._stage_point()
        try:
            _mount(bytes(source), stage, syscalls.MS_BIND, f"bind of {source} at the staging point")
            held = -1
            try:
                flags = syscalls.MS_REMOUNT | syscalls.MS_BIND | READ_ONLY_FLAGS
                _mount(None, stage, flags, "read-only remount at the staging point")
                _require_read_only(os.statvfs(stage).f_flag, _same_file(os.stat(stage), os.stat(source)), source)
                held = os.open(stage, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)  # the mount's root: moves with it
                directory = target.open_dir()
                try:
                    _mount(bytes(stage), pathlib.Path(f"/proc/self/fd/{directory}"), syscalls.MS_MOVE, f"move to {target.path}")
                finally:
                    os.close(directory)
            except BaseException:
                if held >= 0:
                    os.close(held)
                _umount(str(stage), MNT_DETACH, stage)
                raise
            return held
        finally:
            with contextlib.suppress(OSError):  # still busy only if the unmount above failed: that error counts
                os.rmdir(stage)

    def _stage_point(self) -> pathlib.Path:
        if self._staging_dir is None:
            raise MountError("the kernel lacks the new mount API and no staging directory was configured")
        with self._lock:
            if not self._prepared:
                self._prepare(self._staging_dir)
                self._prepared = True
        stage = self._staging_dir / secrets.token_hex(8)
        stage.mkdir(mode=0o700)
        return stage

    @staticmethod
    def _prepare(staging: pathlib.Path) -> None:
        """Clear what a killed predecessor left in ``staging`` (once per process, before the first use),
        then make it a private mount of its own."""
        staging.mkdir(parents=True, exist_ok=True, mode=0o700)
        inside = f"{staging.resolve()}/"
        while leftovers := sorted({e.mount_point for e in read_mountinfo() if e.mount_point.startswith(inside)}):
            for point in reversed(leftovers):  # deepest first
                _umount(point, MNT_DETACH | UMOUNT_NOFOLLOW, pathlib.Path(point))
        for leftover in staging.iterdir():
            leftover.rmdir()
        holder = mount_holding(staging)
        if holder is None or holder.mount_point != str(staging.resolve()):
            _mount(bytes(staging), staging, syscalls.MS_BIND, "bind of the staging directory onto itself")
        _mount(None, staging, MS_PRIVATE, "making the staging directory private")


def _require_read_only(flags: int, same_file: bool, source: pathlib.Path) -> None:
    if flags & ST_READ_ONLY != ST_READ_ONLY or not same_file:
        raise MountError(f"the bind of {source} is not read-only (flags {flags:#x}); refusing to attach it")


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _mount(source: bytes | None, target: pathlib.Path, flags: int, what: str) -> None:
    try:
        syscalls.mount(source, bytes(target), flags)
    except OSError as exc:
        raise MountError(f"{what} at {target} failed: {exc.strerror}") from exc


def _umount(path: str, flags: int, shown: pathlib.Path) -> None:
    try:
        syscalls.umount2(path.encode("utf-8", "surrogateescape"), flags)
    except OSError as exc:
        raise MountError(f"unmount of {shown} failed: {exc.strerror}") from exc


def unmount_path(path: pathlib.Path) -> None:
    """Unmount whatever is on top at ``path`` (lazily if busy): clean-up for tests and tools, by path."""
    try:
        syscalls.umount2(bytes(path), UMOUNT_NOFOLLOW)
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
        syscalls.umount2(bytes(path), UMOUNT_NOFOLLOW | MNT_DETACH)


def mount_holding(path: pathlib.Path, mountinfo: pathlib.Path = MOUNTINFO) -> MountEntry | None:
    """The mount ``path`` is on, by the mount id the kernel reports for an open descriptor of it."""
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        fields = dict(
            line.split(":", 1) for line in pathlib.Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines() if ":" in line
        )
    finally:
        os.close(fd)
    mount_id = int(fields["mnt_id"].strip())
    return next((entry for entry in read_mountinfo(mountinfo) if entry.mount_id == mount_id), None)


def read_mountinfo(mountinfo: pathlib.Path = MOUNTINFO) -> list[MountEntry]:
    text = mountinfo.read_bytes().decode("utf-8", "surrogateescape")
    return [entry for line in text.splitlines() if (entry := _parse(line)) is not None]


def top_mounts(entries: list[MountEntry]) -> dict[str, MountEntry]:
    """Mount point -> the mount on top there (the one no other mount at that point sits on)."""
    by_point: dict[str, list[MountEntry]] = {}
    for entry in entries:
        by_point.setdefault(entry.mount_point, []).append(entry)
    top = {}
    for point, stacked in by_point.items():
        covered = {entry.parent_id for entry in stacked}
        uncovered = [entry for entry in stacked if entry.mount_id not in covered]
        top[point] = (uncovered or stacked)[-1]
    return top


def enter_private_mount_namespace() -> None:
    """Move this (single-threaded) process into a mount namespace of its own, propagation private.

    Used by the tests and the demo so their mounts never reach the host's namespace.
    """
    try:
        syscalls.unshare(CLONE_NEWNS)
    except OSError as exc:
        raise OSError(exc.errno, f"unshare(CLONE_NEWNS): {exc.strerror} (needs root, single-threaded)") from exc
    syscalls.mount(b"none", b"/", MS_REC | MS_PRIVATE)


def _escape(path: str) -> str:
    return path.replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011").replace("\n", "\\012")


def _unescape(field: str) -> str:
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) + 0 and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _parse(line: str) -> MountEntry | None:
    # id parent major:minor root mount-point options [optional fields...] - fstype source super-options
    parts = line.split(" ")
    if len(parts) < 10 or "-" not in parts[6:]:
        return None
    separator = parts.index("-", 6)
    return MountEntry(
        mount_point=_unescape(parts[4]),
        root=_unescape(parts[3]),
        options=frozenset(parts[5].split(",")),
        source=_unescape(parts[separator + 2]),
        mount_id=int(parts[0]),
        parent_id=int(parts[1]),
        propagation=frozenset(parts[6:separator]),
    )
