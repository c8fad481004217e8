"""Processes in mount namespaces of their own, made the way a node makes them (node-in-a-box, tests/nodebox.py).

Run as a script by the tests, never imported by pytest::

    nsexec.py driver [options] -- CMD...    a DaemonSet container: unshare, adjust, then exec CMD
    nsexec.py container SRC DST [--read-only] a pod container: unshare, bind SRC at DST, then answer
                                             file operations on DST, one JSON line per request
    nsexec.py old-publish VIEW TARGET       what a driver before issue 12 did: bind, then remount
                                             read-only, in a namespace of its own; then exit

Namespaces come from unshare(2) through ctypes (Python 3.11 has no os.unshare). A fresh process is
single-threaded, which unshare(CLONE_NEWNS) requires.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import hashlib
import json
import os
import pathlib
import platform
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from csi_wasm import syscalls  # noqa: E402
from csi_wasm.mounts import READ_ONLY_FLAGS, read_mountinfo, top_mounts  # noqa: E402

CONTAINER_KEEPS_WRITABLE = ("/proc", "/dev", "/sys")  # a container's own mounts, not its root filesystem
KEPT_ON_REMOUNT = ((os.ST_NOSUID, syscalls.MS_NOSUID), (os.ST_NODEV, syscalls.MS_NODEV), (os.ST_NOEXEC, syscalls.MS_NOEXEC),
                   (os.ST_NOATIME, 0x400), (os.ST_NODIRATIME, 0x800), (os.ST_RELATIME, 1 << 21))  # fmt: skip
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}


def _under(path: str, roots: list[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


# -- driver --------------------------------------------------------------------------------------


def driver(args: argparse.Namespace) -> None:
    syscalls.unshare(syscalls.CLONE_NEWNS)  # a copy of the host view: the pods dir's copy is its peer
    if args.pods_propagation != "shared":  # what the DaemonSet gives without Bidirectional
        flag = syscalls.MS_PRIVATE if args.pods_propagation == "private" else syscalls.MS_SLAVE
        syscalls.mount(None, args.pods.encode(), syscalls.MS_REC | flag)
    if args.read_only_root:
        read_only_root(args.writable, [args.pods])
    if args.deny_syscalls:
        deny_syscalls([int(number) for number in args.deny_syscalls.split(",")])
    os.execvp(args.command[0], args.command)


def read_only_root(writable: list[str], keep: list[str]) -> None:
    """``readOnlyRootFilesystem: true``: everything read-only but the volumes (hostPaths) and /proc, /dev, /sys."""
    for directory in writable:
        pathlib.Path(directory).mkdir(parents=True, exist_ok=True)
        syscalls.mount(directory.encode(), directory.encode(), syscalls.MS_BIND)  # a hostPath volume
    spared = [*writable, *keep, *CONTAINER_KEEPS_WRITABLE]
    for point in top_mounts(read_mountinfo()):
        if _under(point, spared):
            continue
        try:
            syscalls.mount_setattr(syscalls.AT_FDCWD, syscalls.MOUNT_ATTR_RDONLY, point.encode(), 0)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.EACCES, errno.EINVAL):  # shadowed or special mounts
                raise


def deny_syscalls(numbers: list[int]) -> None:
    """A seccomp filter that answers ENOSYS for ``numbers``: a kernel without them, as the driver sees it."""

    class SockFilter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint32)]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    load, jump_if_equal, ret = 0x20, 0x15, 0x06
    allow, enosys = 0x7FFF0000, 0x00050000 | errno.ENOSYS
    count = len(numbers)
    program = [(load, 0, 0, 4), (jump_if_equal, 0, count + 1, AUDIT_ARCH[platform.machine()]), (load, 0, 0, 0)]
    program += [(jump_if_equal, count - i, 0, number) for i, number in enumerate(numbers)]
    program += [(ret, 0, 0, allow), (ret, 0, 0, enosys)]
    filters = (SockFilter * len(program))(*[SockFilter(*instruction) for instruction in program])
    prog = SockFprog(len(program), filters)
    libc = syscalls.libc()
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    if libc.prctl(22, 2, ctypes.byref(prog), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP")


# -- pod container -------------------------------------------------------------------------------


def container(args: argparse.Namespace) -> None:
    """The runtime's way: a private namespace, an rbind of the host's copy of the volume, read-only only
    if the volumeMount says so (bind, then remount: fine here, nothing propagates out of a private tree)."""
    syscalls.unshare(syscalls.CLONE_NEWNS)
    syscalls.mount(None, b"/", syscalls.MS_REC | syscalls.MS_PRIVATE)
    destination = pathlib.Path(args.destination)
    destination.mkdir(parents=True, exist_ok=True)
    syscalls.mount(args.source.encode(), bytes(destination), syscalls.MS_BIND | syscalls.MS_REC)
    if args.read_only:  # runc keeps the flags the bind has (a remount without them would clear them)
        kept = sum(flag for st, flag in KEPT_ON_REMOUNT if os.statvfs(destination).f_flag & st)
        syscalls.mount(None, bytes(destination), syscalls.MS_REMOUNT | syscalls.MS_BIND | syscalls.MS_RDONLY | kept)
    answer({"ready": True, "pid": os.getpid()})
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "exit":
            return
        try:
            answer({"ok": True, **OPERATIONS[request["op"]](destination / request.get("name", ""), request)})
        except OSError as exc:
            answer({"ok": False, "errno": errno.errorcode.get(exc.errno or 0, str(exc.errno))})


def answer(message: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def _read(path: pathlib.Path, request: dict[str, object]) -> dict[str, object]:
    data = path.read_bytes()
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def _write(path: pathlib.Path, request: dict[str, object]) -> dict[str, object]:
    with open(path, "r+b") as handle:  # rewrite in place: same size, other bytes
        handle.write(bytes.fromhex(str(request["hex"])))
    return {}


def _chmod(path: pathlib.Path, request: dict[str, object]) -> dict[str, object]:
    os.chmod(path, int(str(request["mode"]), 8))
    return {}


def _truncate(path: pathlib.Path, request: dict[str, object]) -> dict[str, object]:
    os.truncate(path, 0)
    return {}


def _create(path: pathlib.Path, request: dict[str, object]) -> dict[str, object]:
    path.write_bytes(b"planted")
    return {}


def _stat(path: pathlib.Path, request: dict[str, object]) -> dict[str, object]:
    info = os.stat(path)
    return {"mode": oct(info.st_mode), "inode": info.st_ino, "size": info.st_size}


def _options(path: pathlib.Path, request: dict[str, object]) -> dict[str, object]:
    entry = top_mounts(read_mountinfo()).get(str(path).rstrip("/"))
    return {"options": sorted(entry.options) if entry else None}


OPERATIONS = {"read": _read, "write": _write, "chmod": _chmod, "truncate": _truncate, "create": _create,
              "stat": _stat, "options": _options}  # fmt: skip


# -- a driver before issue 12 ---------------------------------------------------------------------


def old_publish(args: argparse.Namespace) -> None:
    syscalls.unshare(syscalls.CLONE_NEWNS)
    target = pathlib.Path(args.target)
    target.mkdir(exist_ok=True)
    syscalls.mount(args.view.encode(), bytes(target), syscalls.MS_BIND)
    syscalls.mount(None, bytes(target), syscalls.MS_REMOUNT | syscalls.MS_BIND | READ_ONLY_FLAGS)


def main() -> None:
    parser = argparse.ArgumentParser()
    modes = parser.add_subparsers(dest="mode", required=True)
    run = modes.add_parser("driver")
    run.add_argument("--pods", required=True)
    run.add_argument("--pods-propagation", choices=["shared", "private", "slave"], default="shared")
    run.add_argument("--read-only-root", action="store_true")
    run.add_argument("--writable", action="append", default=[])
    run.add_argument("--deny-syscalls", default="")
    run.add_argument("command", nargs="+")
    pod = modes.add_parser("container")
    pod.add_argument("source")
    pod.add_argument("destination")
    pod.add_argument("--read-only", action="store_true")
    old = modes.add_parser("old-publish")
    old.add_argument("view")
    old.add_argument("target")
    args = parser.parse_args()
    {"driver": driver, "container": container, "old-publish": old_publish}[args.mode](args)


if __name__ == "__main__":
    main()
