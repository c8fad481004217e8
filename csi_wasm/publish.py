"""Where a publish goes: from a validated request to a read-only module at the pod's target.

This module knows nothing of gRPC. The servicer checks the CSI-required fields,
then calls ``Publisher.publish``/``unpublish``; every failure is a ``DriverError``.

Publish, in order: parse the volume attributes (image, pullPolicy, fileName,
moduleDigest) and the secrets; check the target lies in kubelet's pods tree;
claim the target (one call per target at a time: a second gets ABORTED); get the
module into the store (``Puller.ensure``); bind its view directory at the target
read-only; write the record. Any failure undoes what was done: no stray mount,
no empty target directory, no record.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping

from csi_wasm.credentials import Credentials, Keychain, keychain_from_secrets
from csi_wasm.errors import DriverError, InvalidRequest, MountError, OperationPending, TargetConflict
from csi_wasm.metrics import Metrics
from csi_wasm.mounts import REQUIRED_OPTIONS, Mounter
from csi_wasm.policy import ImagePolicy
from csi_wasm.pins import Pins
from csi_wasm.pull import ModuleRequest, PullPolicy, Puller, ResolvedModule
from csi_wasm.records import RecordStore, VolumeRecord
from csi_wasm.reference import is_sha256_digest, parse_reference
from csi_wasm.store import ModuleStore, validate_file_name


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
MAX_PATH_BYTES = 4096
# pods/<uid>/volumes/kubernetes.io~csi/<volume-name>/mount
_KUBELET_LAYOUT = re.compile(r"^([^/]+)/volumes/kubernetes\.io~csi/[^/]+/mount$")


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
        self._pods_dir = pathlib.Path(os.path.realpath(kubelet_dir)) / "pods"
        self._store = store
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
        target = self.resolve_target(request.target_path, request.volume_context.get(POD_UID))
        with self._claim(target):
            existing = self._records.get(str(target))
            if existing is not None and existing.volume_id not in (request.volume_id, ""):
                raise TargetConflict(
                    f"target {target} already holds volume {existing.volume_id}, not {request.volume_id}"
                )
            with self._module_pinned(spec, deadline) as module:
                if self._already_published(target, existing, module, spec):
                    return Published(module.digest, module.from_cache, already=True)
                self._mount_and_record(request, spec, module, target)
        return Published(module.digest, module.from_cache, already=False)

    def _already_published(
        self, target: pathlib.Path, existing: VolumeRecord | None, module: ResolvedModule, spec: VolumeSpec
    ) -> bool:
        mounted = self._mounter.mount_at(target)
        if mounted is not None and not REQUIRED_OPTIONS <= mounted.options and self._store.view_of(mounted.root, target):
            # A crash between the bind and the read-only remount left a writable bind of our view
            # (recovery may even have adopted it): never report that as published. Redo it.
            self._mounter.unmount(target)
            if existing is not None:
                self._records.delete(str(target))
            return False
        if existing is None and mounted is None:
            return False
        if existing is not None and mounted is None:
            self._records.delete(str(target))  # stale: its mount is gone; publish afresh
            return False
        if existing is not None and (existing.module_digest, existing.file_name) == (module.digest, spec.file_name):
            return True
        what = f"image {existing.image} ({existing.module_digest})" if existing else "another mount"
        raise TargetConflict(
            f"target {target} already publishes {what}; this request asks for {spec.module.ref} "
            f"({module.digest}, {spec.file_name}); unpublish it first"
        )

    def _mount_and_record(
        self, request: PublishRequest, spec: VolumeSpec, module: ResolvedModule, target: pathlib.Path
    ) -> None:
        view = self._store.view(module.digest, spec.file_name)
        created = _make_target(target)
        try:
            self._mounter.bind_read_only(view, target)
            try:
                self._records.put(
                    VolumeRecord(
                        volume_id=request.volume_id,
                        target_path=str(target),
                        image=str(spec.module.ref),
                        module_digest=module.digest,
                        file_name=spec.file_name,
                        published_at=self._clock(),
                        pod_namespace=request.volume_context.get(POD_NAMESPACE, ""),
                        pod_name=request.volume_context.get(POD_NAME, ""),
                    )
                )
            except BaseException:
                self._mounter.unmount(target)
                raise
        except BaseException:
            if created:
                _remove_target(target)
            raise
        self._store.touch(module.digest)

    # -- unpublish -----------------------------------------------------------

    def unpublish(self, volume_id: str, target_path: str) -> VolumeRecord | None:
        """Unmount, remove the target, drop the record; return the record it had (None if unknown)."""
        target = self.resolve_target(target_path, None)
        with self._claim(target):
            record = self._records.get(str(target))
            if record is not None and record.volume_id not in (volume_id, ""):
                raise InvalidRequest(f"target {target} belongs to volume {record.volume_id}, not {volume_id}")
            if record is not None and self._store.shows_view(target, record.module_digest, record.file_name):
                self._mounter.unmount(target)  # its record's view is on top: ours, without reading the mount table
            else:
                mounted = self._mounter.mount_at(target)
                if mounted is not None:
                    if record is None and self._store.view_of(mounted.root, target) is None:
                        raise InvalidRequest(f"target {target} is a mount this driver did not make; refusing to unmount")
                    self._mounter.unmount(target)
            _remove_target(target)
            if record is not None:
                self._records.delete(str(target))
                self._store.touch(record.module_digest)  # the LRU clock starts at the last release
        return record

    # -- targets -------------------------------------------------------------

    def resolve_target(self, target_path: str, pod_uid: str | None) -> pathlib.Path:
        """The real target path, which must lie in kubelet's pods tree (and the pod's own dir)."""
        if "\0" in target_path or len(target_path.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
            raise InvalidRequest("target_path contains a NUL byte or is too long")
        if not os.path.isabs(target_path):
            raise InvalidRequest(f"target_path {target_path[:200]!r} is not absolute")
        name = os.path.basename(os.path.normpath(target_path))
        parent = os.path.realpath(os.path.dirname(os.path.normpath(target_path)))
        if name in ("", ".", "..") or os.path.islink(os.path.join(parent, name)):
            raise InvalidRequest(f"target_path {target_path[:200]!r} is a symlink or has no final name")
        target = pathlib.Path(parent) / name
        if not target.is_relative_to(self._pods_dir) or target == self._pods_dir:
            raise InvalidRequest(
                f"target_path {target_path[:200]!r} resolves to {target}, outside kubelet's pods directory "
                f"{self._pods_dir} (check --kubelet-dir)"
            )
        layout = _KUBELET_LAYOUT.match(str(target.relative_to(self._pods_dir)))
        if pod_uid and layout and layout.group(1) != pod_uid:
            raise InvalidRequest(
                f"target_path belongs to pod {layout.group(1)}, but the request is for pod {pod_uid}"
            )
        return target

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
    def _module_pinned(self, spec: VolumeSpec, deadline: float | None) -> Iterator[ResolvedModule]:
        """The module, kept from the garbage collector until its use is recorded."""
        module = self._puller.ensure_pinned(spec.module, self._pins, deadline)
        try:
            yield module
        finally:
            self._pins.unpin(module.digest)


def _make_target(target: pathlib.Path) -> bool:
    """Create the target directory kubelet expects us to make; True if we made it."""
    try:
        os.mkdir(target, 0o755)
        return True
    except FileExistsError:
        if target.is_symlink() or not target.is_dir():
            raise InvalidRequest(f"target_path {target} exists and is not a directory") from None
        return False
    except FileNotFoundError:
        raise InvalidRequest(f"the parent of target_path {target} does not exist (kubelet creates it)") from None


def _remove_target(target: pathlib.Path) -> None:
    try:
        os.rmdir(target)
    except FileNotFoundError:
        return
    except NotADirectoryError:
        raise InvalidRequest(f"target_path {target} is not a directory; refusing to remove it") from None
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise MountError(f"target {target} is not empty after unmount; left in place") from exc
        raise MountError(f"cannot remove target {target}: {exc.strerror}") from exc


def pod_of(context: Mapping[str, str]) -> str:
    namespace, name = context.get(POD_NAMESPACE, ""), context.get(POD_NAME, "")
    return f"{namespace}/{name}" if namespace or name else ""


__all__ = ["Publisher", "PublishRequest", "VolumeSpec", "DriverError"]
