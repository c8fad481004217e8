"""kubelet's target paths, walked without following symlinks and then used only through descriptors.

Checking the target path as a string and then calling mkdir(2) and mount(2) on it follows whatever
the path resolves to *later*: a volume directory swapped for a symlink during a slow pull got a
module mounted outside the pods tree. So the target's parent is opened once, beneath kubelet's pods
directory and refusing every symlink on the way (``openat2`` with ``RESOLVE_BENEATH |
RESOLVE_NO_SYMLINKS``; where openat2 is missing, one ``O_NOFOLLOW`` directory at a time), and every
later step (mkdir, stat, open, mount, unmount, rmdir) is relative to that descriptor.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import pathlib
import re
import stat
from typing import Callable, Iterator

from csi_wasm import syscalls
from csi_wasm.errors import DriverError, InvalidRequest, MountError
from csi_wasm.mounts import ST_READ_ONLY

MAX_PATH_BYTES = 4096
NAME_MAX = 255
OPEN_DIR = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
RESOLVE_SAFELY = syscalls.RESOLVE_BENEATH | syscalls.RESOLVE_NO_SYMLINKS | syscalls.RESOLVE_NO_MAGICLINKS
RENAME_RACE_RETRIES = 3  # openat2 answers EAGAIN when a rename raced the walk
# pods/<uid>/volumes/kubernetes.io~csi/<volume-name>/mount
_KUBELET_LAYOUT = re.compile(r"^([^/]+)/volumes/kubernetes\.io~csi/[^/]+/mount$")


class Target:
    """The target directory's parent, held open, and the target's name in it.

    ``parent_exists`` is False when some directory on the way does not exist: then there is nothing
    at the target to find or remove, and nothing may be created there (kubelet creates the parent).
    """

    def __init__(self, path: pathlib.Path, parent_fd: int | None, reopen: Callable[[], int | None]) -> None:
        self._path = path
        self._parent_fd = parent_fd
        self._name = path.name
        self._reopen = reopen

    @property
    def path(self) -> pathlib.Path:
        return self._path

    @property
    def parent_exists(self) -> bool:
        return self._parent_fd is not None

    @property
    def at(self) -> str:
        """The target reached through the held parent (a /proc magic link, then one name, no symlink)."""
        return f"/proc/self/fd/{self._require_parent()}/{self._name}"

    def lstat(self) -> os.stat_result | None:
        if self._parent_fd is None:
            return None
        try:
            return os.stat(self._name, dir_fd=self._parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def read_only(self) -> bool:
        """The mount on top at the target is ro,nosuid,nodev,noexec (call only when it is a directory)."""
        return os.statvfs(self.at).f_flag & ST_READ_ONLY == ST_READ_ONLY

    def check_in_place(self) -> None:
        """The held parent is still the directory the path leads to (walked again, symlinks refused):
        a parent moved away and replaced during a slow pull would otherwise take the mount with it."""
        held = os.fstat(self._require_parent())
        fresh = self._reopen()
        if fresh is None:
            raise InvalidRequest(f"the parent of target_path {self._path} disappeared during the publish")
        try:
            moved = not os.path.samestat(held, os.fstat(fresh))
        finally:
            os.close(fresh)
        if moved:
            raise InvalidRequest(f"the parent of target_path {self._path} was replaced during the publish; refusing")

    def make(self) -> bool:
        """Create the target directory kubelet expects us to make; True if we made it."""
        parent = self._require_parent()
        try:
            os.mkdir(self._name, 0o755, dir_fd=parent)
            return True
        except FileExistsError:
            info = self.lstat()
            if info is None or not stat.S_ISDIR(info.st_mode):
                raise InvalidRequest(f"target_path {self._path} exists and is not a directory") from None
            return False

    def open_dir(self) -> int:
        """An O_PATH descriptor of the target directory (or of the mount on top of it); never a symlink."""
        try:
            return os.open(self._name, OPEN_DIR | os.O_NOFOLLOW, dir_fd=self._require_parent())
        except OSError as exc:
            raise _refusal(self._path, exc) from exc

    def remove(self) -> bool:
        """Remove the (empty) target directory; True if it is gone, False if a mount still sits on it."""
        if self._parent_fd is None:
            return True
        try:
            os.rmdir(self._name, dir_fd=self._parent_fd)
        except FileNotFoundError:
            return True
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                return False
            if exc.errno == errno.ENOTDIR:
                raise InvalidRequest(f"target_path {self._path} is not a directory; refusing to remove it") from None
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise MountError(f"target {self._path} is not empty after unmount; left in place") from exc
            raise MountError(f"cannot remove target {self._path}: {exc.strerror}") from exc
        return True

    def close(self) -> None:
        if self._parent_fd is not None:
            os.close(self._parent_fd)
            self._parent_fd = None

    def _require_parent(self) -> int:
        if self._parent_fd is None:
            raise InvalidRequest(f"the parent of target_path {self._path} does not exist (kubelet creates it)")
        return self._parent_fd


class Targets:
    """Turns a target path from a request into a ``Target`` inside kubelet's pods directory."""

    def __init__(self, kubelet_dir: pathlib.Path, use_openat2: bool | None = None) -> None:
        self.pods_dir = pathlib.Path(os.path.realpath(kubelet_dir)) / "pods"
        # kubelet may name its root through a symlink the admin also passed as --kubelet-dir
        self._named_pods_dir = pathlib.Path(os.path.normpath(os.path.abspath(kubelet_dir))) / "pods"
        self._openat2 = syscalls.has_openat2() if use_openat2 is None else use_openat2

    def canonical(self, target_path: str, pod_uid: str | None) -> pathlib.Path:
        """The target as a path under the (real) pods dir; checks of the string only."""
        if "\0" in target_path or len(target_path.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
            raise InvalidRequest("target_path contains a NUL byte or is too long")
        if not os.path.isabs(target_path):
            raise InvalidRequest(f"target_path {target_path[:200]!r} is not absolute")
        normal = pathlib.Path(os.path.normpath(target_path))
        relative = next((normal.relative_to(d) for d in (self.pods_dir, self._named_pods_dir) if normal.is_relative_to(d)), None)
        if relative is None or relative == pathlib.Path("."):
            raise InvalidRequest(
                f"target_path {target_path[:200]!r} is outside kubelet's pods directory {self.pods_dir} "
                "(check --kubelet-dir)"
            )
        long_names = [part for part in relative.parts if len(part.encode("utf-8", "surrogateescape")) > NAME_MAX]
        if long_names:
            raise InvalidRequest(f"target_path has a component longer than {NAME_MAX} bytes ({long_names[0][:40]!r}...)")
        layout = _KUBELET_LAYOUT.match(relative.as_posix())
        if pod_uid and layout and layout.group(1) != pod_uid:
            raise InvalidRequest(f"target_path belongs to pod {layout.group(1)}, but the request is for pod {pod_uid}")
        return self.pods_dir / relative

    @contextlib.contextmanager
    def open(self, target_path: str, pod_uid: str | None = None) -> Iterator[Target]:
        path = self.canonical(target_path, pod_uid)
        target = Target(path, self._open_parent(path), functools.partial(self._open_parent, path))
        try:
            info = target.lstat()
            if info is not None and stat.S_ISLNK(info.st_mode):
                raise InvalidRequest(f"target_path {path} is a symlink; refusing to follow it")
            yield target
        finally:
            target.close()

    def _open_parent(self, path: pathlib.Path) -> int | None:
        try:
            root = os.open(self.pods_dir, OPEN_DIR)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise MountError(f"cannot open kubelet's pods directory {self.pods_dir}: {exc.strerror}") from exc
        relative = path.parent.relative_to(self.pods_dir)
        if relative == pathlib.Path("."):
            return root
        try:
            return self._walk(root, relative)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _refusal(path.parent, exc) from exc
        finally:
            os.close(root)

    def _walk(self, root: int, relative: pathlib.Path) -> int:
        if self._openat2:
            for _ in range(RENAME_RACE_RETRIES):
                try:
                    return syscalls.openat2(root, bytes(relative), OPEN_DIR, RESOLVE_SAFELY)
                except BlockingIOError:
                    continue
            raise MountError(f"{relative}: renames kept racing the walk of the target path; retry")
        current = os.dup(root)
        try:
            for part in relative.parts:
                step = os.open(part, OPEN_DIR | os.O_NOFOLLOW, dir_fd=current)  # a symlink: ENOTDIR
                os.close(current)
                current = step
        except BaseException:
            os.close(current)
            raise
        return current


def _refusal(path: pathlib.Path, exc: OSError) -> DriverError:
    reasons = {
        errno.ELOOP: "has a symlink on the way; refusing to follow it",
        errno.ENOTDIR: "has a file or a symlink where a directory should be",
        errno.EXDEV: "leads out of kubelet's pods directory",
        errno.ENAMETOOLONG: "is too long",
        errno.ENOENT: "does not exist",
    }
    reason = reasons.get(exc.errno or 0)
    if reason is None:
        return MountError(f"cannot open {path}: {exc.strerror}")
    return InvalidRequest(f"target_path {path} {reason}")

