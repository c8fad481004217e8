"""The CSI unix socket: what may stand at its path, and who may remove it.

A driver binds only in a directory that exists (kubelet's plugin dir, mounted into the
container): it never creates one on a mistyped path. Only a stale socket is replaced —
a socket file nothing answers on — never a regular file and never a live socket. At
exit a driver removes the socket only if it is still the one it bound: the path may hold
another driver's by then.

gRPC itself unlinks whatever socket sits at the path it bound, at bind time and again at
shutdown, without asking whose it is. So gRPC is given a private name in the endpoint's
directory (``.csi-wasm-binding.<random>``), and the bound socket is renamed onto the
endpoint: at shutdown gRPC's unlink finds nothing at its private name, and the endpoint is
removed here, by inode, only if it is still ours. The private name is reached through
``/proc/self/fd/<directory fd>/`` so that it is short whatever the directory: a socket path
must fit in 107 bytes (``sun_path``).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import secrets
import socket
import stat

from csi_wasm.config import UsageError

CONNECT_TIMEOUT_SECONDS = 1.0
MAX_SOCKET_PATH_BYTES = 107  # sun_path holds 108 bytes with the terminating NUL
STAGING_PREFIX = ".csi-wasm-binding."


def check_endpoint(path: pathlib.Path) -> None:
    """Refuse an endpoint whose directory is missing or whose path holds something other than a socket."""
    if len(bytes(path)) > MAX_SOCKET_PATH_BYTES:
        raise UsageError(
            f"--endpoint unix://{path}: {len(bytes(path))} bytes, but a unix socket path can have at most "
            f"{MAX_SOCKET_PATH_BYTES}; choose a shorter path"
        )
    parent = path.parent
    if not parent.is_dir():
        what = "does not exist" if not parent.exists() else "is not a directory"
        raise UsageError(
            f"--endpoint unix://{path}: the directory {parent} {what}; create it or fix the path "
            "(in the DaemonSet it is the plugin-dir volume)"
        )
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise UsageError(
            f"--endpoint unix://{path}: {path} exists and is not a socket; refusing to replace it "
            "(fix --endpoint or move that file away)"
        )


def is_live(path: pathlib.Path) -> bool:
    """True if something accepts connections on the socket at ``path``; False if none is there or it is stale."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(CONNECT_TIMEOUT_SECONDS)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError as exc:
        raise UsageError(f"--endpoint unix://{path}: cannot check the existing socket: {exc.strerror}") from exc
    finally:
        probe.close()
    return True


def refuse_live_socket(path: pathlib.Path) -> None:
    if is_live(path):
        raise UsageError(
            f"--endpoint unix://{path}: another process is serving on this socket; refusing to take it over "
            "(another csi-wasm with a different --state-dir?)"
        )


def clear_stale_socket(path: pathlib.Path) -> None:
    """Remove a socket file left by a driver that is gone; refuse one that something still answers on."""
    check_endpoint(path)
    refuse_live_socket(path)
    path.unlink(missing_ok=True)


def sweep_stale_bindings(path: pathlib.Path) -> None:
    """Remove private names a killed driver left between bind and rename (stale sockets only)."""
    for leftover in path.parent.glob(f"{STAGING_PREFIX}*"):
        if stat.S_ISSOCK(leftover.lstat().st_mode) and not is_live(leftover):
            leftover.unlink(missing_ok=True)


class SocketBinding:
    """The endpoint's socket, from gRPC's bind at a private name to its removal at exit."""

    def __init__(self, endpoint: pathlib.Path) -> None:
        self.endpoint = endpoint
        self._dir = os.open(endpoint.parent, os.O_PATH | os.O_DIRECTORY)
        self._name = f"{STAGING_PREFIX}{secrets.token_hex(4)}"  # random: every container's driver is pid 1
        self._identity: tuple[int, int] | None = None

    @property
    def address(self) -> str:
        """What gRPC binds: the private name, through this process's descriptor of the directory."""
        return f"unix:/proc/self/fd/{self._dir}/{self._name}"

    def publish(self) -> None:
        """Rename the bound socket onto the endpoint (atomic: there is no moment without a socket there)."""
        os.rename(self._name, self.endpoint.name, src_dir_fd=self._dir, dst_dir_fd=self._dir)
        info = os.stat(self.endpoint.name, dir_fd=self._dir, follow_symlinks=False)
        self._identity = (info.st_dev, info.st_ino)

    def close(self) -> None:
        """After gRPC has stopped: remove the endpoint if it is still the socket this process bound."""
        try:
            if self._identity is not None:
                try:
                    info = os.stat(self.endpoint.name, dir_fd=self._dir, follow_symlinks=False)
                except FileNotFoundError:
                    return
                if (info.st_dev, info.st_ino) == self._identity:
                    os.unlink(self.endpoint.name, dir_fd=self._dir)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._name, dir_fd=self._dir)  # bound but never published
        finally:
            os.close(self._dir)
