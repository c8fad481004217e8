"""Bind mounts through the mount(2)/umount2(2) syscalls, and the mount table.

The hot path spawns no process: ``LinuxMounter`` calls libc through ctypes.
``Mounter`` is the seam tests and other platforms plug into.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import pathlib
from dataclasses import dataclass
from typing import Protocol

from csi_wasm.errors import MountError

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8
CLONE_NEWNS = 0x00020000
READ_ONLY_FLAGS = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
ST_READ_ONLY = os.ST_RDONLY | os.ST_NOSUID | os.ST_NODEV | os.ST_NOEXEC  # the same, as statvfs reports them
REQUIRED_OPTIONS = frozenset({"ro", "nosuid", "nodev", "noexec"})
MOUNTINFO = pathlib.Path("/proc/self/mountinfo")


@dataclass(frozen=True)
class MountEntry:
    mount_point: str
    root: str  # path inside the source filesystem that is mounted here
    options: frozenset[str]
    source: str


class Mounter(Protocol):
    def bind_read_only(self, source: pathlib.Path, target: pathlib.Path) -> None: ...

    def unmount(self, target: pathlib.Path) -> None: ...

    def mount_at(self, target: pathlib.Path) -> MountEntry | None: ...

    def mounts(self) -> list[MountEntry]: ...


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class LinuxMounter:
    def __init__(self, mountinfo: pathlib.Path = MOUNTINFO) -> None:
        self._libc = _libc()
        self._libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
        self._libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        self._mountinfo = mountinfo

    def bind_read_only(self, source: pathlib.Path, target: pathlib.Path) -> None:
        """Bind ``source`` at ``target``, then make it ro,nosuid,nodev,noexec; undo on any failure.

        The result is verified, not assumed: ``target`` must now show ``source``'s inode through a
        mount whose flags are read-only, nosuid, nodev and noexec. (``os.path.ismount`` cannot tell,
        a same-filesystem bind keeps st_dev; the mount table can, but reading it costs O(mounts),
        so it is kept for the idempotency check of a repeated publish and for recovery.)
        """
        self._mount(bytes(source), bytes(target), MS_BIND, "bind")
        try:
            self._mount(None, bytes(target), MS_REMOUNT | MS_BIND | READ_ONLY_FLAGS, "read-only remount")
            if not shows_read_only(source, target):
                raise MountError(f"mount at {target} does not show {source} read-only after remount")
        except BaseException:
            self._umount(bytes(target), MNT_DETACH)
            raise

    def unmount(self, target: pathlib.Path) -> None:
        try:
            self._umount(bytes(target), UMOUNT_NOFOLLOW)
        except MountError as exc:
            if exc.__cause__ is not None and getattr(exc.__cause__, "errno", None) == errno.EBUSY:
                # a process still has the module open; detach so the pod can go, the kernel frees it later
                self._umount(bytes(target), UMOUNT_NOFOLLOW | MNT_DETACH)
            else:
                raise

    def mount_at(self, target: pathlib.Path) -> MountEntry | None:
        if not os.path.lexists(target):
            return None  # nothing can be mounted on a path that does not exist: skip the table
        wanted = _escape(str(target))
        found = None
        with open(self._mountinfo, "rb") as handle:
            for line in handle.read().decode("utf-8", "surrogateescape").splitlines():
                if f" {wanted} " in line:
                    entry = _parse(line)
                    if entry is not None and entry.mount_point == str(target):
                        found = entry  # the last one listed is the one on top
        return found

    def mounts(self) -> list[MountEntry]:
        text = self._mountinfo.read_bytes().decode("utf-8", "surrogateescape")
        return [entry for line in text.splitlines() if (entry := _parse(line)) is not None]

    def _mount(self, source: bytes | None, target: bytes, flags: int, what: str) -> None:
        if self._libc.mount(source, target, None, flags, None) != 0:
            err = ctypes.get_errno()
            raise MountError(f"{what} at {target.decode()} failed: {os.strerror(err)}") from OSError(
                err, os.strerror(err)
            )

    def _umount(self, target: bytes, flags: int) -> None:
        if self._libc.umount2(target, flags) != 0:
            err = ctypes.get_errno()
            raise MountError(f"unmount of {target.decode()} failed: {os.strerror(err)}") from OSError(
                err, os.strerror(err)
            )


def shows_read_only(source: pathlib.Path, target: pathlib.Path) -> bool:
    """True if ``target`` shows ``source`` (same inode) through a ro,nosuid,nodev,noexec mount.

    Two stat calls instead of reading the whole mount table, which costs O(mounts) per call
    (2.5 ms at 1,000 mounts). statvfs reports the flags of the mount the path is on.
    """
    ours, there = os.stat(source), os.lstat(target)
    flags = os.statvfs(target).f_flag
    return (ours.st_dev, ours.st_ino) == (there.st_dev, there.st_ino) and flags & ST_READ_ONLY == ST_READ_ONLY


def enter_private_mount_namespace() -> None:
    """Move this (single-threaded) process into a mount namespace of its own, propagation private.

    Used by the tests and the demo so their mounts never reach the host's namespace.
    """
    libc = _libc()
    if libc.unshare(CLONE_NEWNS) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWNS): {os.strerror(err)} (needs root, single-threaded)")
    if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"making / private: {os.strerror(err)}")


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
    )
