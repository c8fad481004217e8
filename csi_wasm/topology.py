"""Mount propagation around kubelet's pods directory: the start-up check, and the shared mount that
tests and the demo make to stand in for a node's.

On a node, kubelet's pods dir is on a shared mount and the DaemonSet's ``mountPropagation:
Bidirectional`` makes the driver's view of it a peer (mountinfo's ``shared:N``). Without that
setting the driver's mounts stay in its own namespace: every publish answers OK and no pod ever
sees its module. So the driver refuses to start when the pods dir exists and is not shared.
"""

from __future__ import annotations

import pathlib

from csi_wasm import syscalls
from csi_wasm.config import ConfigError
from csi_wasm.mounts import MOUNTINFO, mount_holding

SETTING = "mountPropagation: Bidirectional on the pods-dir volumeMount of the csi-wasm container"


def require_shared_pods_dir(pods_dir: pathlib.Path, mountinfo: pathlib.Path = MOUNTINFO) -> None:
    """Raise ConfigError if ``pods_dir`` exists and the mount holding it is not shared.

    A pods dir that does not exist yet is accepted (csi-sanity creates its own later; the CLI warns).
    """
    if not pods_dir.is_dir():
        return
    holder = mount_holding(pods_dir, mountinfo)
    if holder is None or holder.shared:
        return  # no entry for that mount id is the kernel's business, not a configuration error
    propagation = ",".join(sorted(holder.propagation)) or "private"
    raise ConfigError(
        f"kubelet's pods directory {pods_dir} is not a shared mount in the driver's mount namespace "
        f"(mount {holder.mount_point}: {propagation}), so kubelet would never see a module mount; set {SETTING}"
    )


def share_directory(path: pathlib.Path) -> None:
    """Make ``path`` a shared mount of its own (bind it onto itself, make it shared), as kubelet's pods
    dir is on a node. For tests and the demo, inside their private mount namespace; idempotent."""
    path.mkdir(parents=True, exist_ok=True)
    holder = mount_holding(path)
    if holder is None or holder.mount_point != str(path.resolve()):
        syscalls.mount(bytes(path), bytes(path), syscalls.MS_BIND)
    syscalls.mount(None, bytes(path), syscalls.MS_SHARED)
