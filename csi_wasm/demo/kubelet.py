"""A client that calls the driver exactly as kubelet does for a CSI ephemeral inline volume.

kubelet itself cannot run here, so this is the one fake in the project: it
reproduces kubelet's volume id derivation, target layout, parent-directory
creation, volume context keys and secrets, and calls the real driver over its
real unix socket.
"""

from __future__ import annotations

import hashlib
import pathlib
import shutil
import uuid
from dataclasses import dataclass, field
from typing import Mapping

import grpc

from csi_wasm._gen import csi_pb2, csi_pb2_grpc
from csi_wasm.mounts import LinuxMounter

DEFAULT_TIMEOUT = 120.0  # kubelet's per-call timeout for CSI operations


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


def new_pod_uid() -> str:
    return str(uuid.uuid4())


class Kubelet:
    def __init__(self, endpoint: str, kubelet_dir: pathlib.Path, pod_info_on_mount: bool = True) -> None:
        self.kubelet_dir = kubelet_dir
        self.pod_info_on_mount = pod_info_on_mount
        self.channel = grpc.insecure_channel(f"unix://{endpoint}")
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)
        self.node = csi_pb2_grpc.NodeStub(self.channel)

    def close(self) -> None:
        self.channel.close()

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
        """What kubelet's SetUp does: create the parent of the target, then NodePublishVolume."""
        target = self.target_path(volume)
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        self.node.NodePublishVolume(self.publish_request(volume), timeout=timeout)
        return target

    def unmount(self, volume: InlineVolume, timeout: float = DEFAULT_TIMEOUT) -> None:
        """What kubelet's TearDown does: NodeUnpublishVolume, then remove the volume directory."""
        target = self.target_path(volume)
        self.node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume.volume_id, target_path=str(target)), timeout=timeout
        )
        if target.exists():
            raise AssertionError(f"driver left {target} behind after NodeUnpublishVolume")
        # kubelet removes vol_data.json and the volume dir once the target is gone
        shutil.rmtree(target.parent, ignore_errors=True)

    def delete_pod(self, pod_uid: str) -> None:
        pod_dir = self.kubelet_dir / "pods" / pod_uid
        # os.path.ismount misses same-filesystem bind mounts: ask the mount table
        leftover = [m.mount_point for m in LinuxMounter().mounts() if m.mount_point.startswith(f"{pod_dir}/")]
        if leftover:
            raise AssertionError(f"pod directory still has mounts at deletion: {leftover}")
        shutil.rmtree(pod_dir, ignore_errors=True)
