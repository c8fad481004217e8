"""The CSI unix socket: what may stand at its path, and who may remove it.

A driver binds only in a directory that exists (kubelet's plugin dir, mounted into the
container): it never creates one on a mistyped path. Only a stale socket is replaced —
a socket file nothing answers on — never a regular file and never a live socket. At
exit a driver removes the socket only if it is still the one it bound: the path may hold
another driver's by then.

gRPC itself unlinks whatever socket sits at the path it bound, at bind time and again at
shutdown, without asking whose it is. So gRPC is given a private name beside the endpoint
(``.csi.sock.<random>.tmp``), and the bound socket is renamed onto the endpoint: at
shutdown gRPC's unlink finds nothing at its private name, and the endpoint is removed here,
by inode, only if it is still ours.
"""

from __future__ import annotations

import os
import pathlib
import secrets
import socket
import stat

from csi_wasm.config import UsageError

CONNECT_TIMEOUT_SECONDS = 1.0


def check_endpoint(path: pathlib.Path) -> None:
    """Refuse an endpoint whose directory is missing or whose path holds something other than a socket."""
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


def private_name(path: pathlib.Path) -> pathlib.Path:
    """Where gRPC binds before the socket is renamed onto ``path`` (random: every container's driver is pid 1)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


def sweep_private_names(path: pathlib.Path) -> None:
    """Remove private names a killed driver left between bind and rename (stale sockets only)."""
    for leftover in path.parent.glob(f".{path.name}.*.tmp"):
        if stat.S_ISSOCK(leftover.lstat().st_mode) and not is_live(leftover):
            leftover.unlink(missing_ok=True)


class BoundSocket:
    """The socket file this process bound, remembered by inode so it is never confused with another's."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        info = path.lstat()
        self._identity = (info.st_dev, info.st_ino)

    @classmethod
    def rename_onto(cls, bound: pathlib.Path, endpoint: pathlib.Path) -> BoundSocket:
        """Move the socket gRPC bound at its private name onto the endpoint (atomic: no moment without one)."""
        os.rename(bound, endpoint)
        return cls(endpoint)

    def remove(self) -> None:
        try:
            info = self.path.lstat()
        except FileNotFoundError:
            return
        if (info.st_dev, info.st_ino) == self._identity:
            os.unlink(self.path)
