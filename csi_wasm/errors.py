"""Every failure the driver foresees, as one exception tree.

The publish logic raises these and knows nothing of gRPC; the servicers map
each class to one status code in one place (``csi_wasm.servicers.STATUS_BY_ERROR``).
Messages are written for a cluster admin reading ``kubectl describe pod``: they
name the image and say what to do. They never contain secrets.

    DriverError
    ├── InvalidRequest          INVALID_ARGUMENT   the request itself is wrong
    ├── TargetConflict          ALREADY_EXISTS     target already holds another module
    ├── OperationPending        ABORTED            another call for this target is running
    ├── AccessDenied            PERMISSION_DENIED  policy or the registry refused
    ├── ModuleNotFound          NOT_FOUND          image, tag or (pullPolicy Never) stored module absent
    ├── RegistryError           UNAVAILABLE        registry unreachable, 5xx, timed out
    │   ├── RegistryTimeout     UNAVAILABLE        (a timeout is transient: kubelet retries)
    │   └── Overloaded          UNAVAILABLE        too many publishes already wait on registries
    ├── ContentError            FAILED_PRECONDITION the registry served something we refuse
    │   ├── DigestMismatch
    │   ├── NotWasm
    │   ├── UnsupportedLayout
    │   └── TooLarge
    ├── NotReady                UNAVAILABLE        still recovering state after a start
    ├── StorageFull             RESOURCE_EXHAUSTED the free-space floor would be crossed
    └── MountError              INTERNAL           the kernel refused a mount we expected to work
"""

from __future__ import annotations


class DriverError(Exception):
    """Base of every error the driver raises on purpose."""

    #: short stable label for metrics and logs (bounded cardinality)
    reason = "error"


class InvalidRequest(DriverError):
    reason = "invalid_argument"


class TargetConflict(DriverError):
    reason = "already_exists"


class OperationPending(DriverError):
    reason = "aborted"


class AccessDenied(DriverError):
    reason = "unauthorized"


class ModuleNotFound(DriverError):
    reason = "not_found"


class RegistryError(DriverError):
    reason = "unavailable"


class RegistryTimeout(RegistryError):
    reason = "timeout"


class Overloaded(RegistryError):
    reason = "busy"


class ContentError(DriverError):
    reason = "bad_content"


class DigestMismatch(ContentError):
    reason = "digest_mismatch"


class NotWasm(ContentError):
    reason = "invalid_wasm"


class UnsupportedLayout(ContentError):
    reason = "unsupported_layout"


class TooLarge(ContentError):
    reason = "too_large"


class NotReady(DriverError):
    reason = "not_ready"


class StorageFull(DriverError):
    reason = "resource_exhausted"


class MountError(DriverError):
    reason = "mount_failed"
