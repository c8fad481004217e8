"""The CSI Identity and Node gRPC services: validate the request, delegate, map errors.

Servicers are thin. The CSI-required fields are checked here, in the order the
CSI sanity suite expects (volume_id, target_path, volume_capability, access
type); the rest is the publisher's. ``grpc_errors`` is the one place that turns
our exceptions into gRPC status codes.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from typing import Any, Callable, Iterator, Mapping, TypeVar

import grpc
from google.protobuf import wrappers_pb2

from csi_wasm import __version__
from csi_wasm._gen import csi_pb2, csi_pb2_grpc
from csi_wasm.errors import (
    AccessDenied,
    ContentError,
    DriverError,
    InvalidRequest,
    ModuleNotFound,
    MountError,
    NotReady,
    OperationPending,
    RegistryError,
    StorageFull,
    TargetConflict,
)
from csi_wasm.logs import event
from csi_wasm.metrics import Metrics
from csi_wasm.publish import PublishRequest, Publisher, pod_of

log = logging.getLogger("csi_wasm.servicers")

STATUS_BY_ERROR: tuple[tuple[type[DriverError], grpc.StatusCode], ...] = (
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (TargetConflict, grpc.StatusCode.ALREADY_EXISTS),
    (OperationPending, grpc.StatusCode.ABORTED),
    (AccessDenied, grpc.StatusCode.PERMISSION_DENIED),
    (ModuleNotFound, grpc.StatusCode.NOT_FOUND),
    (RegistryError, grpc.StatusCode.UNAVAILABLE),
    (NotReady, grpc.StatusCode.UNAVAILABLE),
    (ContentError, grpc.StatusCode.FAILED_PRECONDITION),
    (StorageFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (MountError, grpc.StatusCode.INTERNAL),
)
# Leave this much of kubelet's deadline for undoing work and answering.
DEADLINE_MARGIN_SECONDS = 1.0
NO_DEADLINE_SECONDS = 24 * 3600.0

F = TypeVar("F", bound=Callable[..., Any])


def status_for(error: DriverError) -> grpc.StatusCode:
    for cls, code in STATUS_BY_ERROR:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


def grpc_errors(method: F) -> F:
    """Turn a DriverError into its status; anything unforeseen into INTERNAL, logged with its trace."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except DriverError as exc:
            context.abort(status_for(exc), str(exc))
        except Exception:
            log.exception("unexpected error in %s", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{method.__name__}: internal error, see the driver's log")

    return wrapper  # type: ignore[return-value]


def _require(value: str, name: str) -> None:
    if not value:
        raise InvalidRequest(f"{name} is required")


class IdentityServicer(csi_pb2_grpc.IdentityServicer):
    def __init__(self, driver_name: str, is_ready: Callable[[], bool]) -> None:
        self._driver_name = driver_name
        self._is_ready = is_ready

    @grpc_errors
    def GetPluginInfo(
        self, request: csi_pb2.GetPluginInfoRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetPluginInfoResponse:
        return csi_pb2.GetPluginInfoResponse(name=self._driver_name, vendor_version=__version__)

    @grpc_errors
    def GetPluginCapabilities(
        self, request: csi_pb2.GetPluginCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetPluginCapabilitiesResponse:
        # Node-only plugin: no CONTROLLER_SERVICE, no topology constraints.
        return csi_pb2.GetPluginCapabilitiesResponse()

    @grpc_errors
    def Probe(self, request: csi_pb2.ProbeRequest, context: grpc.ServicerContext) -> csi_pb2.ProbeResponse:
        return csi_pb2.ProbeResponse(ready=wrappers_pb2.BoolValue(value=self._is_ready()))


class NodeServicer(csi_pb2_grpc.NodeServicer):
    """NodePublishVolume/NodeUnpublishVolume for ephemeral inline volumes; the rest stays UNIMPLEMENTED."""

    def __init__(
        self,
        node_id: str,
        publisher: Publisher,
        metrics: Metrics,
        is_ready: Callable[[], bool],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._node_id = node_id
        self._publisher = publisher
        self._metrics = metrics
        self._is_ready = is_ready
        self._clock = clock

    @grpc_errors
    def NodeGetCapabilities(
        self, request: csi_pb2.NodeGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetCapabilitiesResponse:
        # Nothing beyond publish/unpublish: each extra capability makes the CO call RPCs we do not serve.
        return csi_pb2.NodeGetCapabilitiesResponse()

    @grpc_errors
    def NodeGetInfo(
        self, request: csi_pb2.NodeGetInfoRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetInfoResponse:
        return csi_pb2.NodeGetInfoResponse(node_id=self._node_id, max_volumes_per_node=0)

    @grpc_errors
    def NodePublishVolume(
        self, request: csi_pb2.NodePublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodePublishVolumeResponse:
        with self._observed("publish", request.volume_id, request.volume_context) as fields:
            _require(request.volume_id, "volume_id")
            _require(request.target_path, "target_path")
            if not request.HasField("volume_capability"):
                raise InvalidRequest("volume_capability is required")
            if request.volume_capability.HasField("block"):
                raise InvalidRequest("block access is not supported: Wasm volumes are filesystem (mount) volumes")
            self._check_ready()
            published = self._publisher.publish(
                PublishRequest(
                    volume_id=request.volume_id,
                    target_path=request.target_path,
                    volume_context=dict(request.volume_context),
                    secrets=dict(request.secrets),
                ),
                deadline=self._deadline(context),
            )
            fields.update(digest=published.digest, cached=published.from_cache, repeat=published.already)
        return csi_pb2.NodePublishVolumeResponse()

    @grpc_errors
    def NodeUnpublishVolume(
        self, request: csi_pb2.NodeUnpublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeUnpublishVolumeResponse:
        with self._observed("unpublish", request.volume_id, {}) as fields:
            _require(request.volume_id, "volume_id")
            _require(request.target_path, "target_path")
            self._check_ready()
            record = self._publisher.unpublish(request.volume_id, request.target_path)
            if record is not None:
                fields.update(image=record.image, digest=record.module_digest,
                              pod=f"{record.pod_namespace}/{record.pod_name}".strip("/"))  # fmt: skip
            else:
                fields.update(known=False)
        return csi_pb2.NodeUnpublishVolumeResponse()

    @contextlib.contextmanager
    def _observed(self, operation: str, volume_id: str, context: Mapping[str, str]) -> Iterator[dict[str, Any]]:
        """One log line and one metric sample per call, whatever its outcome."""
        started = self._clock()
        fields: dict[str, Any] = {"volume_id": volume_id}
        if context:
            fields.update(pod=pod_of(context), image=context.get("image", ""))
        total = self._metrics.publish_total if operation == "publish" else self._metrics.unpublish_total
        seconds = self._metrics.publish_seconds if operation == "publish" else self._metrics.unpublish_seconds
        result, level = "success", logging.INFO
        try:
            yield fields
        except DriverError as exc:
            result, level = exc.reason, logging.WARNING
            fields["error"] = str(exc)
            raise
        except Exception:
            result, level = "internal", logging.ERROR
            raise
        finally:
            elapsed = self._clock() - started
            total.labels(result).inc()
            seconds.observe(elapsed)
            event(log, operation, level, result=result, seconds=round(elapsed, 6), **fields)

    # Staging, stats and expansion are not advertised in NodeGetCapabilities; a CO that calls them anyway
    # gets UNIMPLEMENTED, as the CSI spec asks.

    def NodeStageVolume(
        self, request: csi_pb2.NodeStageVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeStageVolumeResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "NodeStageVolume: this plugin serves ephemeral volumes only")

    def NodeUnstageVolume(
        self, request: csi_pb2.NodeUnstageVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeUnstageVolumeResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "NodeUnstageVolume: this plugin serves ephemeral volumes only")

    def NodeGetVolumeStats(
        self, request: csi_pb2.NodeGetVolumeStatsRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetVolumeStatsResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "NodeGetVolumeStats: not offered (GET_VOLUME_STATS unset)")

    def NodeExpandVolume(
        self, request: csi_pb2.NodeExpandVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeExpandVolumeResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "NodeExpandVolume: Wasm volumes are read-only and fixed")

    def _check_ready(self) -> None:
        if not self._is_ready():
            raise NotReady("the driver is still recovering its state after a restart; retry shortly")

    def _deadline(self, context: grpc.ServicerContext) -> float | None:
        remaining = context.time_remaining()
        if remaining is None or remaining > NO_DEADLINE_SECONDS:
            return None  # the caller set no deadline (gRPC reports a huge remaining time)
        return self._clock() + max(0.0, remaining - DEADLINE_MARGIN_SECONDS)
