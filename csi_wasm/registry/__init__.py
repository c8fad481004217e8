"""Talk to OCI registries: manifests and blobs, with deadlines, bounded retries and per-scope auth.

What a node agent cannot leave to an HTTP library is owned here, one module per concern:

| module | concern |
| --- | --- |
| ``client`` | ``RegistryClient``: manifests and blobs across mirrors; the API the puller uses |
| ``transport`` | one bounded exchange: send, redirects by hand, status, body reading (``BlobStream``) |
| ``watchdog`` | the exchange's total deadline, headers and TLS handshake included |
| ``sessions`` | HTTP sessions per registry, bounded and idle-closed; connections that report their sockets |
| ``bodies`` | bodies read whole: the node's memory budget, JSON counted before it is parsed |
| ``auth`` | 401 challenges: Basic, Bearer tokens per registry, scope and credential |
| ``retry`` | bounded retries of transient failures, backoff, ``Retry-After``, the call's deadline |
| ``mirrors`` | mirrors that gave no answer are skipped for a while |
| ``ssrf`` | which addresses may be contacted on a registry's behalf |
"""

from csi_wasm.registry.client import FetchedManifest, RegistryClient
from csi_wasm.registry.retry import MAX_RETRY_AFTER_SECONDS, Transient, backoff, parse_retry_after
from csi_wasm.registry.ssrf import (
    FORBIDDEN_NETWORKS,
    PRIVATE_NETWORKS,
    forbidden_reason,
    refuse_forbidden_host,
    refuse_local_registry,
    resolve,
)
from csi_wasm.registry.transport import BlobStream, Endpoint

__all__ = [
    "RegistryClient", "FetchedManifest", "BlobStream", "Endpoint", "Transient", "backoff", "parse_retry_after",
    "MAX_RETRY_AFTER_SECONDS", "FORBIDDEN_NETWORKS", "PRIVATE_NETWORKS", "forbidden_reason",
    "refuse_forbidden_host", "refuse_local_registry", "resolve",
]  # fmt: skip
