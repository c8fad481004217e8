"""Where a publish goes: from a validated request to a read-only module at the pod's target.

This module knows nothing of gRPC. The servicer checks the CSI-required fields,
then calls ``Publisher.publish``/``unpublish``; every failure is a ``DriverError``.

Publish, in order: parse the volume attributes (image, pullPolicy, fileName,
moduleDigest) and the secrets; open the target's parent inside kubelet's pods
tree without following a symlink (``csi_wasm.targets``); claim the target (one
call per target at a time: a second gets ABORTED); get the module into the store
(``Puller.ensure``) and check its seal (``csi_wasm.integrity``); attach a
read-only bind of its view directory at the target; write the record. Any
failure undoes what was done: no stray mount, no empty target directory, no record.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping

from csi_wasm.credentials import Credentials, Keychain, keychain_from_secrets
from csi_wasm.errors import DigestMismatch, DriverError, InvalidRequest, MountError, OperationPending, TargetConflict
from csi_wasm.integrity import ModuleIntegrity
from csi_wasm.metrics import Metrics
from csi_wasm.mounts import REQUIRED_OPTIONS, MountEntry, Mounter
from csi_wasm.policy import ImagePolicy
from csi_wasm.pins import Pins
from csi_wasm.pull import ModuleRequest, PullPolicy, Puller, ResolvedModule
from csi_wasm.records import RecordStore, VolumeRecord
from csi_wasm.reference import is_sha256_digest, parse_reference
from csi_wasm.store import ModuleStore, names_view, validate_file_name
from csi_wasm.targets import MAX_PATH_BYTES, Target, Targets


ATTR_IMAGE = "image"
ATTR_FILE_NAME = "fileName"
ATTR_PULL_POLICY = "pullPolicy"
ATTR_MODULE_DIGEST = "moduleDigest"
KNOWN_ATTRIBUTES = frozenset({ATTR_IMAGE, ATTR_FILE_NAME, ATTR_PULL_POLICY, ATTR_MODULE_DIGEST})
POD_UID = "csi.storage.k8s.io/pod.uid"
POD_NAME = "csi.storage.k8s.io/pod.name"
POD_NAMESPACE = "csi.storage.k8s.io/pod.namespace"
K8S_PREFIX = "csi.storage.k8s.io/"
DEFAULT_FILE_NAME = "plugin.wasm"
MAX_ATTRIBUTES = 64
MAX_ATTRIBUTE_BYTES = 4096
MAX_STACKED_MOUNTS = 8  # ours on ours (a read-only cover over an old writable bind) is 2


@dataclass(frozen=True)
class PublishRequest:
    volume_id: str
    target_path: str
    volume_context: Mapping[str, str] = field(default_factory=dict)
    secrets: Mapping[str, str] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class Published:
    digest: str
    from_cache: bool  # no download was needed
    already: bool  # an identical publish of this target was already in place


@dataclass(frozen=True)
class VolumeSpec:
    """The pod's volume attributes, validated."""

    module: ModuleRequest
    file_name: str

    @classmethod
    def parse(
        cls,
        context: Mapping[str, str],
        secrets: Mapping[str, str],
        node_keychain: Keychain,
        policy: ImagePolicy | None = None,
    ) -> VolumeSpec:
        _check_sizes(context)
        unknown = sorted(k for k in context if k not in KNOWN_ATTRIBUTES and not k.startswith(K8S_PREFIX))
        if unknown:
            raise InvalidRequest(
                f"unknown volume attribute {unknown[0][:60]!r} (known: {', '.join(sorted(KNOWN_ATTRIBUTES))})"
            )
        image = context.get(ATTR_IMAGE, "")
        if not image:
            raise InvalidRequest("volume attribute 'image' is required (an OCI reference to a Wasm module)")
        ref = parse_reference(image)
        if policy is not None:
            policy.check(ref)  # the node's allowed_images, before the store or the network is touched
        module_digest = context.get(ATTR_MODULE_DIGEST) or None
        if module_digest is not None and not is_sha256_digest(module_digest):
            raise InvalidRequest(f"moduleDigest {module_digest[:80]!r}: expected sha256:<64 lowercase hex>")
        creds: Credentials | None = keychain_from_secrets(secrets, ref.registry) if secrets else None
        if creds is None and not secrets:
            creds = node_keychain.lookup(ref.registry)
        return cls(
            module=ModuleRequest(
                ref=ref,
                policy=PullPolicy.parse(context.get(ATTR_PULL_POLICY) or PullPolicy.IF_NOT_PRESENT.value),
                credentials=creds,
                module_digest=module_digest,
            ),
            file_name=validate_file_name(context.get(ATTR_FILE_NAME) or DEFAULT_FILE_NAME),
        )


def _check_sizes(context: Mapping[str, str]) -> None:
    if len(context) > MAX_ATTRIBUTES:
        raise InvalidRequest(f"too many volume attributes ({len(context)} > {MAX_ATTRIBUTES})")
    for key, value in context.items():
        if len(key) + len(value) > MAX_ATTRIBUTE_BYTES:
            raise InvalidRequest(f"volume attribute {key[:60]!r} is longer than {MAX_ATTRIBUTE_BYTES} bytes")


class Publisher:
    def __init__(
        self,
        kubelet_dir: pathlib.Path,
        store: ModuleStore,
        records: RecordStore,
        puller: Puller,
        mounter: Mounter,
        metrics: Metrics,
        pins: Pins,
        node_keychain: Keychain | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.targets = Targets(kubelet_dir)
        self._store = store
        self._integrity = ModuleIntegrity(store)
        self._records = records
        self._puller = puller
        self._mounter = mounter
        self._metrics = metrics
        self._keychain = node_keychain or Keychain()
        self._policy = ImagePolicy(puller.node.allowed_images)
        self._clock = clock
        self._pins = pins
        self._busy: set[str] = set()
        self._lock = threading.Lock()

    # -- publish -----------------------------------------------------------

    def publish(self, request: PublishRequest, deadline: float | None = None) -> Published:
        spec = VolumeSpec.parse(request.volume_context, request.secrets, self._keychain, self._policy)
        with self.targets.open(request.target_path, request.volume_context.get(POD_UID)) as target:
            if not target.parent_exists:
                raise InvalidRequest(f"the parent of target_path {target.path} does not exist (kubelet creates it)")
            with self._claim(target.path):
                existing = self._records.get(str(target.path))
                if existing is not None and existing.volume_id not in (request.volume_id, ""):
                    raise TargetConflict(
                        f"target {target.path} already holds volume {existing.volume_id}, not {request.volume_id}"
                    )
                with self._module_pinned(spec, deadline) as (module, view):
                    if self._already_published(target, existing, module, spec, view):
                        if existing is None:
                            self._record(request, spec, module, target)  # our mount, its record lost: keep both
                        return Published(module.digest, module.from_cache, already=True)
                    self._mount_and_record(request, spec, module, view, target)
        return Published(module.digest, module.from_cache, already=False)

    def _already_published(
        self, target: Target, existing: VolumeRecord | None, module: ResolvedModule, spec: VolumeSpec,
        view: pathlib.Path,
    ) -> bool:  # fmt: skip
        """True if the target already shows this module read-only; False if a mount is to be made.

        A writable bind of our view (an older driver bound, then remounted, and the host's copy
        stayed writable) gets a read-only mount on top of it, not an unmount: containers started
        later see the read-only one, and running containers keep their module.
        """
        info = target.lstat()
        wanted = (module.digest, spec.file_name)
        if info is None:
            self._drop_stale(existing)
            return False
        if existing is not None and (existing.module_digest, existing.file_name) == wanted:
            if os.path.samestat(info, os.stat(view)) and target.read_only():
                return True  # the record's view is on top, read-only: no mount table read
        mounted = self._mounter.mount_at(target.path)
        if mounted is None:
            self._drop_stale(existing)
            return False  # an empty directory (kubelet's, or a node reboot's): publish into it
        ours = self._store.view_of(mounted.root, target.path)
        if ours != wanted:
            what = f"image {existing.image} ({existing.module_digest})" if existing else "another mount"
            raise TargetConflict(
                f"target {target.path} already publishes {what}; this request asks for {spec.module.ref} "
                f"({module.digest}, {spec.file_name}); unpublish it first"
            )
        return REQUIRED_OPTIONS <= mounted.options

    def _drop_stale(self, existing: VolumeRecord | None) -> None:
        if existing is not None:
            self._records.delete(existing.target_path)  # its mount is gone: publish afresh

    def _mount_and_record(
        self, request: PublishRequest, spec: VolumeSpec, module: ResolvedModule, view: pathlib.Path, target: Target
    ) -> None:
        target.check_in_place()
        created = target.make()
        try:
            self._mounter.bind_read_only(view, target)
            try:
                self._record(request, spec, module, target)
            except BaseException:
                self._mounter.unmount(target)
                raise
        except BaseException:
            if created:
                with contextlib.suppress(DriverError, OSError):  # the original error is the one to report
                    target.remove()
            raise
        self._store.touch(module.digest)

    def _record(self, request: PublishRequest, spec: VolumeSpec, module: ResolvedModule, target: Target) -> None:
        self._records.put(
            VolumeRecord(
                volume_id=request.volume_id,
                target_path=str(target.path),
                image=str(spec.module.ref),
                module_digest=module.digest,
                file_name=spec.file_name,
                published_at=self._clock(),
                pod_namespace=request.volume_context.get(POD_NAMESPACE, ""),
                pod_name=request.volume_context.get(POD_NAME, ""),
            )
        )

    # -- unpublish -----------------------------------------------------------

    def unpublish(self, volume_id: str, target_path: str) -> VolumeRecord | None:
        """Unmount our mounts, remove the target, drop the record; return the record it had (None if unknown)."""
        with self.targets.open(target_path, None) as target:
            with self._claim(target.path):
                record = self._records.get(str(target.path))
                if record is not None and record.volume_id not in (volume_id, ""):
                    raise InvalidRequest(
                        f"target {target.path} belongs to volume {record.volume_id}, not {volume_id}"
                    )
                self._take_down(target, record)
                if record is not None:
                    self._records.delete(str(target.path))
                    self._store.touch(record.module_digest)  # the LRU clock starts at the last release
        return record

    def _take_down(self, target: Target, record: VolumeRecord | None) -> None:
        """Unmount every mount of ours stacked on the target, then remove it. A mount we did not make
        (kubelet's, another driver's) is never unmounted: the call fails and names it."""
        recorded = self._view_identity(record)
        for _ in range(MAX_STACKED_MOUNTS):
            info = target.lstat()
            if info is None:
                return
            if recorded is not None and (info.st_dev, info.st_ino) == recorded:
                self._mounter.unmount(target)  # the record's view is on top: ours, no mount table read
                continue
            if target.remove():
                return
            mounted = self._mounter.mount_at(target.path)  # something else is mounted on it
            if mounted is None or not self._ours(mounted, target, record):
                raise InvalidRequest(f"target {target.path} is a mount this driver did not make; refusing to unmount it")
            self._mounter.unmount(target)
        raise MountError(f"target {target.path}: more than {MAX_STACKED_MOUNTS} mounts stacked on it; left in place")

    def _ours(self, mounted: MountEntry, target: Target, record: VolumeRecord | None) -> bool:
        """A bind of one of our views; or of the record's view since removed (its module quarantined)."""
        if self._store.view_of(mounted.root, target.path) is not None:
            return True
        return record is not None and names_view(mounted.root, record.module_digest, record.file_name)

    def _view_identity(self, record: VolumeRecord | None) -> tuple[int, int] | None:
        if record is None:
            return None
        try:
            info = os.stat(self._store.views_dir / record.module_digest.removeprefix("sha256:") / record.file_name)
        except OSError:
            return None
        return info.st_dev, info.st_ino

    # -- targets -------------------------------------------------------------

    def resolve_target(self, target_path: str, pod_uid: str | None) -> pathlib.Path:
        """The target path, which must lie in kubelet's pods tree (and the pod's own dir) with no symlink
        on the way; raises InvalidRequest otherwise."""
        with self.targets.open(target_path, pod_uid) as target:
            return target.path

    @contextlib.contextmanager
    def _claim(self, target: pathlib.Path) -> Iterator[None]:
        key = str(target)
        with self._lock:
            if key in self._busy:
                raise OperationPending(f"an operation on target {target} is already in progress; retry")
            self._busy.add(key)
        try:
            yield
        finally:
            with self._lock:
                self._busy.discard(key)

    @contextlib.contextmanager
    def _module_pinned(self, spec: VolumeSpec, deadline: float | None) -> Iterator[tuple[ResolvedModule, pathlib.Path]]:
        """The module and its view, intact, kept from the garbage collector until its use is recorded."""
        for _ in range(2):
            module = self._puller.ensure_pinned(spec.module, self._pins, deadline)
            try:
                view = self._store.view(module.digest, spec.file_name)
                intact = self._integrity.intact(module.digest, view, spec.file_name)
            except BaseException:
                self._pins.unpin(module.digest)
                raise
            if intact:
                break
            self._pins.unpin(module.digest)  # quarantined: fetch it again
        else:
            raise DigestMismatch(f"image {spec.module.ref}: module {module.digest} was corrupt again after a re-fetch")
        try:
            yield module, view
        finally:
            self._pins.unpin(module.digest)


def pod_of(context: Mapping[str, str]) -> str:
    namespace, name = context.get(POD_NAMESPACE, ""), context.get(POD_NAME, "")
    return f"{namespace}/{name}" if namespace or name else ""


__all__ = ["Publisher", "PublishRequest", "VolumeSpec", "DriverError", "MAX_PATH_BYTES"]
