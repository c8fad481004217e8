"""The Linux system calls the driver mounts and walks paths with, through ctypes: no process spawn.

glibc has wrappers for mount(2), umount2(2) and unshare(2); it has none for the new mount API
(``open_tree``, ``move_mount``, ``mount_setattr``) or ``openat2`` before 2.36, so those go through
syscall(2) by number (system calls from 424 on have one number on x86_64, arm64 and every other
architecture but alpha, ia64 and mips, which add an offset; the DaemonSet runs on amd64/arm64).
Every failure raises ``OSError`` with the errno, so callers tell ENOSYS (kernel too old, or a
seccomp filter) from a real refusal.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os

# mount(2) flags
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
# umount2(2) flags
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8
CLONE_NEWNS = 0x00020000

# the new mount API (Linux 5.2; mount_setattr 5.12)
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_OPENAT2 = 437
SYS_MOUNT_SETATTR = 442
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
OPEN_TREE_CLONE = 0x1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
# openat2 (Linux 5.6)
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08


class MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


class OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


@functools.cache
def libc() -> ctypes.CDLL:
    lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    lib.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    lib.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    lib.unshare.argtypes = [ctypes.c_int]
    lib.syscall.restype = ctypes.c_long
    return lib


def _checked(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def mount(source: bytes | None, target: bytes, flags: int, fstype: bytes | None = None) -> None:
    _checked(libc().mount(source, target, fstype, flags, None), f"mount({target.decode(errors='replace')})")


def umount2(target: bytes, flags: int) -> None:
    _checked(libc().umount2(target, flags), f"umount2({target.decode(errors='replace')})")


def unshare(flags: int) -> None:
    _checked(libc().unshare(flags), "unshare")


def open_tree(path: bytes, flags: int, dirfd: int = AT_FDCWD) -> int:
    """A file descriptor of a *detached* copy of the mount at ``path`` (with OPEN_TREE_CLONE)."""
    call = libc().syscall
    return _checked(call(ctypes.c_long(SYS_OPEN_TREE), ctypes.c_int(dirfd), path, ctypes.c_uint(flags)), "open_tree")


def mount_setattr(fd: int, attr_set: int, path: bytes = b"", flags: int = AT_EMPTY_PATH) -> None:
    attr = MountAttr(attr_set, 0, 0, 0)
    call = libc().syscall
    _checked(
        call(ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_int(fd), path, ctypes.c_uint(flags), ctypes.byref(attr),
             ctypes.c_size_t(ctypes.sizeof(attr))),
        "mount_setattr",
    )  # fmt: skip


def move_mount(from_fd: int, to_fd: int, flags: int, from_path: bytes = b"", to_path: bytes = b"") -> None:
    call = libc().syscall
    _checked(
        call(ctypes.c_long(SYS_MOVE_MOUNT), ctypes.c_int(from_fd), from_path, ctypes.c_int(to_fd), to_path,
             ctypes.c_uint(flags)),
        "move_mount",
    )  # fmt: skip


def openat2(dirfd: int, path: bytes, flags: int, resolve: int) -> int:
    how = OpenHow(flags, 0, resolve)
    call = libc().syscall
    return _checked(
        call(ctypes.c_long(SYS_OPENAT2), ctypes.c_int(dirfd), path, ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how))),
        "openat2",
    )


def _missing(probe: int) -> bool:
    """ENOSYS: the kernel lacks the call; EPERM from a call that cannot need a privilege: seccomp denies it."""
    return probe < 0 and ctypes.get_errno() in (errno.ENOSYS, errno.EPERM)


@functools.cache
def has_new_mount_api() -> bool:
    """open_tree, move_mount and mount_setattr all exist. Each probe passes a bad fd, so it does nothing."""
    call = libc().syscall
    return not (
        _missing(call(ctypes.c_long(SYS_OPEN_TREE), ctypes.c_int(-1), b"", ctypes.c_uint(0)))
        or _missing(call(ctypes.c_long(SYS_MOVE_MOUNT), ctypes.c_int(-1), b"", ctypes.c_int(-1), b"", ctypes.c_uint(0)))
        or _missing(call(ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_int(-1), b"", ctypes.c_uint(0), None, ctypes.c_size_t(0)))
    )


@functools.cache
def has_openat2() -> bool:
    how = OpenHow(0, 0, 0)
    call = libc().syscall
    return not _missing(call(ctypes.c_long(SYS_OPENAT2), ctypes.c_int(-1), b"", ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how))))
