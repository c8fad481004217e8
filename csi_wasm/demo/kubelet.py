"""A client that calls the driver exactly as kubelet does for a CSI ephemeral inline volume.

kubelet itself cannot run here, so this is the one fake in the project: it
reproduces kubelet's volume id derivation, target layout, parent-directory
creation and ``vol_data.json``, volume context keys and secrets, its clean-up
after a final error, its tear-down (unpublish, then removal of the volume
directory) and its refusal to delete a pod directory that still holds volumes,
and calls the real driver over its real unix socket. The two sidecars that
also talk to the driver, node-driver-registrar and livenessprobe, are here too,
reduced to the calls they make.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import shutil
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Mapping

import grpc

from csi_wasm._gen import csi_pb2, csi_pb2_grpc
from csi_wasm.mounts import LinuxMounter

DEFAULT_TIMEOUT = 120.0  # kubelet's per-call timeout for CSI operations
# kubelet retries a failed MountVolume.SetUp, whatever the code, with exponential backoff
# (nestedpendingoperations: 500 ms, doubling, at most 2m2s)
RETRY_INITIAL_SECONDS = 0.5
RETRY_MAX_SECONDS = 122.0
VOL_DATA_FILE = "vol_data.json"  # kubelet's record of the volume, next to the target
# Codes after which kubelet cannot know whether the operation is still running on the driver's side
# ("uncertain"): it keeps the volume directory and retries. Any other error is final: kubelet
# removes the target directory (if not mounted), vol_data.json and the volume directory.
NON_FINAL_CODES = frozenset(
    {
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)


@dataclass(frozen=True)
class InlineVolume:
    pod_uid: str
    pod_name: str
    namespace: str
    volume_name: str
    attributes: Mapping[str, str]
    secrets: Mapping[str, str] = field(default_factory=dict, repr=False)
    read_only: bool = True
    service_account: str = "default"

    @property
    def volume_id(self) -> str:
        # kubelet: "csi-" + hex(sha256(podUID + volumeName))
        return "csi-" + hashlib.sha256(f"{self.pod_uid}{self.volume_name}".encode()).hexdigest()


@dataclass(frozen=True)
class Mounted:
    """A volume kubelet got mounted, and the codes of the calls that failed before."""

    target: pathlib.Path
    failed: tuple[grpc.StatusCode, ...] = ()

    @property
    def calls(self) -> int:
        return len(self.failed) + 1


def new_pod_uid() -> str:
    return str(uuid.uuid4())


class Kubelet:
    def __init__(
        self,
        endpoint: str,
        kubelet_dir: pathlib.Path,
        pod_info_on_mount: bool = True,
        node_name: str = "test-node",
        driver_name: str = "csi-wasm.dev",
    ) -> None:
        self.kubelet_dir = kubelet_dir
        self.pod_info_on_mount = pod_info_on_mount
        self.node_name = node_name
        self.driver_name = driver_name
        self.channel = grpc.insecure_channel(f"unix://{endpoint}")
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)
        self.node = csi_pb2_grpc.NodeStub(self.channel)
        self._mounter = LinuxMounter()

    def close(self) -> None:
        self.channel.close()

    def register(self, timeout: float = DEFAULT_TIMEOUT) -> csi_pb2.NodeGetInfoResponse:
        """What kubelet does when node-driver-registrar announces the driver: NodeGetInfo."""
        info = self.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=timeout)
        if not info.node_id:
            raise AssertionError("kubelet rejects a plugin whose NodeGetInfo has no node_id")
        return info

    def volume_data(self, volume: InlineVolume) -> dict[str, str]:
        """The vol_data.json kubelet writes before NodePublishVolume (and reads to tear down after a restart)."""
        attachment = hashlib.sha256(f"{volume.volume_id}{self.driver_name}{self.node_name}".encode()).hexdigest()
        return {
            "specVolID": volume.volume_name,
            "volumeHandle": volume.volume_id,
            "driverName": self.driver_name,
            "nodeName": self.node_name,
            "attachmentID": f"csi-{attachment}",
            "volumeLifecycleMode": "Ephemeral",
        }

    def target_path(self, volume: InlineVolume) -> pathlib.Path:
        return (
            self.kubelet_dir / "pods" / volume.pod_uid / "volumes" / "kubernetes.io~csi" / volume.volume_name / "mount"
        )

    def publish_request(self, volume: InlineVolume) -> csi_pb2.NodePublishVolumeRequest:
        context = dict(volume.attributes)
        if self.pod_info_on_mount:
            context.update(
                {
                    "csi.storage.k8s.io/ephemeral": "true",
                    "csi.storage.k8s.io/pod.name": volume.pod_name,
                    "csi.storage.k8s.io/pod.namespace": volume.namespace,
                    "csi.storage.k8s.io/pod.uid": volume.pod_uid,
                    "csi.storage.k8s.io/serviceAccount.name": volume.service_account,
                }
            )
        return csi_pb2.NodePublishVolumeRequest(
            volume_id=volume.volume_id,
            target_path=str(self.target_path(volume)),
            volume_capability=csi_pb2.VolumeCapability(
                mount=csi_pb2.VolumeCapability.MountVolume(),
                access_mode=csi_pb2.VolumeCapability.AccessMode(
                    mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
                ),
            ),
            readonly=volume.read_only,
            secrets=dict(volume.secrets),
            volume_context=context,
        )

    def mount(self, volume: InlineVolume, timeout: float = DEFAULT_TIMEOUT) -> pathlib.Path:
        """What kubelet's SetUp does: create the parent of the target (0750), write vol_data.json there,
        then NodePublishVolume. After a final error it cleans the volume directory up; after an
        uncertain one (timeout, UNAVAILABLE, ABORTED, ...) it leaves it for the retry."""
        target = self.target_path(volume)
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        (target.parent / VOL_DATA_FILE).write_text(json.dumps(self.volume_data(volume)))
        try:
            self.node.NodePublishVolume(self.publish_request(volume), timeout=timeout)
        except grpc.RpcError as exc:
            if exc.code() not in NON_FINAL_CODES:
                self._remove_mount_dir(target)
            raise
        return target

    def mount_retrying(
        self,
        volume: InlineVolume,
        give_up_after: float = 600.0,
        timeout: float = DEFAULT_TIMEOUT,
        initial_backoff: float = RETRY_INITIAL_SECONDS,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> Mounted:
        """``mount`` until it succeeds, waiting between calls as kubelet's backoff does; the last error
        is raised once the next wait would end past ``give_up_after`` seconds (kubelet never gives up)."""
        failed: list[grpc.StatusCode] = []
        backoff = initial_backoff
        started = clock()
        while True:
            try:
                return Mounted(self.mount(volume, timeout), tuple(failed))
            except grpc.RpcError as exc:
                failed.append(exc.code())
                if clock() + backoff - started > give_up_after:
                    raise
            sleep(backoff)
            backoff = min(backoff * 2, RETRY_MAX_SECONDS)

    def unmount(self, volume: InlineVolume, timeout: float = DEFAULT_TIMEOUT) -> None:
        """What kubelet's TearDown does: NodeUnpublishVolume, then remove the volume directory."""
        target = self.target_path(volume)
        self.node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume.volume_id, target_path=str(target)), timeout=timeout
        )
        if self._is_mounted(target):
            raise AssertionError(f"{target} is still mounted after NodeUnpublishVolume (kubelet fails TearDown)")
        if target.exists():
            # kubelet would remove it itself, but the CSI spec makes it the driver's job
            raise AssertionError(f"driver left {target} behind after NodeUnpublishVolume")
        self._remove_mount_dir(target, checked=True)

    def delete_pod(self, pod_uid: str) -> None:
        """What kubelet's orphaned-pod clean-up does: refuse while a mount or volume directory remains."""
        pod_dir = self.kubelet_dir / "pods" / pod_uid
        # os.path.ismount misses same-filesystem bind mounts: ask the mount table
        leftover = [m.mount_point for m in self._mounter.mounts() if m.mount_point.startswith(f"{pod_dir}/")]
        if leftover:
            raise AssertionError(f"pod directory still has mounts at deletion: {leftover}")
        volume_dirs = sorted(str(path) for path in pod_dir.glob("volumes/*/*"))
        if volume_dirs:
            raise AssertionError(f"orphaned pod {pod_uid}: volume paths are still present on disk: {volume_dirs}")
        shutil.rmtree(pod_dir, ignore_errors=True)

    def _remove_mount_dir(self, target: pathlib.Path, checked: bool = False) -> None:
        """kubelet's removeMountDir: the target (unless mounted), then vol_data.json, then the volume dir
        with rmdir, which fails if anything else was left in it."""
        if not checked and self._is_mounted(target):
            return
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(target)
        with contextlib.suppress(FileNotFoundError):
            (target.parent / VOL_DATA_FILE).unlink()
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(target.parent)

    def _is_mounted(self, target: pathlib.Path) -> bool:
        return self._mounter.mount_at(target) is not None


class NodeDriverRegistrar:
    """The calls node-driver-registrar makes: wait for the socket, then GetPluginInfo for the name it
    registers with kubelet (as ``<name>-reg.sock`` in the plugin registration directory)."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint

    def driver_name(self, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(f"unix://{self.endpoint}") as channel:
            identity = csi_pb2_grpc.IdentityStub(channel)
            while True:
                try:
                    return identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=5.0).name
                except grpc.RpcError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)


class LivenessProbe:
    """The call the livenessprobe sidecar makes for each kubelet liveness check: Probe. Healthy only if
    the call succeeds and the driver says it is ready."""

    def __init__(self, endpoint: str, probe_timeout: float = 3.0) -> None:
        self._channel = grpc.insecure_channel(f"unix://{endpoint}")
        self._identity = csi_pb2_grpc.IdentityStub(self._channel)
        self._timeout = probe_timeout

    def healthy(self) -> bool:
        try:
            response = self._identity.Probe(csi_pb2.ProbeRequest(), timeout=self._timeout)
        except grpc.RpcError:
            return False
        return not response.HasField("ready") or response.ready.value

    def close(self) -> None:
        self._channel.close()
