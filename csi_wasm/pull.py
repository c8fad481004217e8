"""Get a module into the store: resolve the reference, select the layer, stream, verify.

``Puller.ensure`` is what a publish calls. It answers from the store when it can
(pinned digest already stored, or a tag resolved within ``tag_cache_seconds``) so
the hot path makes no network call, and otherwise pulls, if ``Admission`` lets it
(a bounded number of publishes may wait on registries, per registry too). Downloads
are single-flight per layer digest and origin and run on their own workers, shared
fairly between registries (``FairDownloads``), so a download outlives the gRPC call
that started it and kubelet's retry joins it. What a download does with the bytes (caps, digest
checks, the compat tar+gzip layer) is ``csi_wasm.layerfetch``.

A module already in the store is handed to a pod only under the access rule of
``csi_wasm.access`` (applied in ``_from_store``, at the ``known`` shortcut of
``_pull``, at the stored-layer shortcut of ``_download`` and when joining a flight),
always before any byte is mounted.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import enum
import functools
import threading
import time
from dataclasses import dataclass
from typing import Callable

from csi_wasm.access import AccessRecords, AccessRule, Decision, ProofCache
from csi_wasm.admission import Admission
from csi_wasm.config import NodeConfig, PullConfig
from csi_wasm.credentials import Credentials
from csi_wasm.errors import (
    AccessDenied,
    DigestMismatch,
    DriverError,
    InvalidRequest,
    ModuleNotFound,
    RegistryError,
    RegistryTimeout,
    TooLarge,
)
from csi_wasm.downloads import FairDownloads
from csi_wasm.layerfetch import LayerFetcher
from csi_wasm.layouts import ModuleLayer, is_index, select_from_index, select_module_layer
from csi_wasm.metrics import Metrics
from csi_wasm.pins import Pins
from csi_wasm.reference import Reference
from csi_wasm.registry import FetchedManifest, RegistryClient
from csi_wasm.resolutions import ResolutionKey, Resolutions
from csi_wasm.signatures import SignatureVerifier
from csi_wasm.store import ManifestEntry, ModuleStore, StoredModule

PIN_ATTEMPTS = 3
# A module that has just landed is kept from the GC this long (monotonic), so the publishes
# that waited for it can pin it: the collector deletes only under the pins lock, never these.
LANDED_PROTECTION_SECONDS = 60.0


class PullPolicy(enum.Enum):
    IF_NOT_PRESENT = "IfNotPresent"
    ALWAYS = "Always"
    NEVER = "Never"

    @classmethod
    def parse(cls, text: str) -> PullPolicy:
        for policy in cls:
            if policy.value == text:
                return policy
        raise InvalidRequest(f"pullPolicy {text[:40]!r}: expected IfNotPresent, Always or Never")


@dataclass(frozen=True)
class ModuleRequest:
    ref: Reference
    policy: PullPolicy = PullPolicy.IF_NOT_PRESENT
    credentials: Credentials | None = None
    module_digest: str | None = None  # the pod's moduleDigest attribute, if any


@dataclass(frozen=True)
class ResolvedModule:
    digest: str
    size: int
    manifest_digest: str
    layout: str
    from_cache: bool


@dataclass(frozen=True)
class _TagEntry:
    manifest_digest: str
    resolved_at: float


class Puller:
    def __init__(
        self,
        store: ModuleStore,
        client: RegistryClient,
        config: PullConfig,
        metrics: Metrics,
        auth_cache_seconds: float = 300.0,
        clock: Callable[[], float] = time.time,
        admission: Admission | None = None,
    ) -> None:
        self._store = store
        self._client = client
        self._config = config
        self._metrics = metrics
        self._auth_cache_seconds = auth_cache_seconds
        self._clock = clock
        self._tags: dict[str, _TagEntry] = {}
        self._access = AccessRule(AccessRecords(store.access_dir), ProofCache(auth_cache_seconds, clock))
        self._flights: dict[str, concurrent.futures.Future[StoredModule]] = {}
        # manifest GETs and tag HEADs shared by the publishes of a burst, per credential (csi_wasm.resolutions)
        self._manifests: Resolutions[FetchedManifest] = Resolutions(config.tag_cache_seconds, clock)
        self._heads: Resolutions[str | None] = Resolutions(config.tag_cache_seconds, clock)
        self._landed: dict[str, float] = {}
        self._lock = threading.Lock()
        # the allow-list and signature requirements live in the node config the client carries
        self.node: NodeConfig = getattr(client, "node", None) or NodeConfig()
        self._signatures = SignatureVerifier(client, self.node)
        self._admission = admission or Admission(
            config.max_pulling_publishes, config.max_pulling_publishes_per_registry
        )
        self._layers = LayerFetcher(store, client, config, metrics, landing=self._shield_from_gc)
        self._downloads = FairDownloads(config.max_concurrent_downloads, config.max_concurrent_downloads_per_registry)

    def close(self) -> None:
        self._downloads.shutdown(wait=False, cancel_futures=True)

    def recently_landed(self) -> set[str]:
        """Modules downloaded in the last ``LANDED_PROTECTION_SECONDS``: not for the garbage collector."""
        horizon = time.monotonic() - LANDED_PROTECTION_SECONDS
        with self._lock:
            for digest in [d for d, at in self._landed.items() if at < horizon]:
                del self._landed[digest]
            return set(self._landed)

    # -- the entry point -------------------------------------------------

    def ensure_pinned(self, request: ModuleRequest, pins: Pins, deadline: float | None = None) -> ResolvedModule:
        """``ensure``, returning the module pinned against garbage collection; the caller unpins it."""
        for _ in range(PIN_ATTEMPTS):
            module = self.ensure(request, deadline)
            if pins.pin_if_present(module.digest, self._store.has):
                return module
            # collected between landing in the store and the pin: fetch it again
        raise RegistryError(f"image {request.ref}: the module keeps leaving the store (store cap too small?)")

    def ensure(self, request: ModuleRequest, deadline: float | None = None) -> ResolvedModule:
        cached = self._from_store(request, deadline)
        if cached is not None:
            self._metrics.cache_lookups.labels("hit").inc()
            return self._checked(request, cached)
        self._metrics.cache_lookups.labels("miss").inc()
        if request.policy is PullPolicy.NEVER:
            raise ModuleNotFound(
                f"image {request.ref}: not in the node's store and pullPolicy is Never; "
                "pre-pull it with `csi-wasm pull` or use IfNotPresent"
            )
        try:
            with self._admission.pulling(request.ref.registry, str(request.ref)):
                pulled = self._pull(request, deadline)
        except DriverError as exc:
            self._metrics.pull_total.labels(exc.reason).inc()
            raise
        self._metrics.pull_total.labels("success").inc()
        return self._checked(request, pulled)

    def _checked(self, request: ModuleRequest, module: ResolvedModule) -> ResolvedModule:
        if request.module_digest and module.digest != request.module_digest:
            raise DigestMismatch(
                f"image {request.ref}: module digest {module.digest} does not match moduleDigest "
                f"{request.module_digest}"
            )
        return module

    # -- answering from the store ----------------------------------------

    def _from_store(self, request: ModuleRequest, deadline: float | None) -> ResolvedModule | None:
        ref = request.ref
        if ref.digest is not None:
            manifest_digest: str | None = ref.digest
        elif request.policy is PullPolicy.ALWAYS:
            return None
        else:
            manifest_digest = self._cached_tag(ref, fresh_only=request.policy is PullPolicy.IF_NOT_PRESENT)
        if manifest_digest is None:
            return None
        return self._stored_for(request, manifest_digest, deadline)

    def _stored_for(
        self, request: ModuleRequest, manifest_digest: str, deadline: float | None, admitted: bool = False
    ) -> ResolvedModule | None:
        """The stored module ``manifest_digest`` resolved to, if this pod may have it without a pull.
        ``admitted``: the publish already holds its admission to wait on the registry."""
        ref = request.ref
        entry = self._store.manifest(manifest_digest)
        if entry is None or not self._store.has(entry.module_digest):
            return None
        if not self._may_share_stored(request, entry, deadline, admitted):
            return None  # pull the reference: the pod's registry must serve the bytes
        if not self._signatures.is_verified(ref, entry.manifest_digest):
            if request.policy is not PullPolicy.NEVER:
                return None  # resolve and verify through the registry; a stored module is not downloaded again
            self._signatures.verify(ref, entry.manifest_digest, request.credentials)
        return ResolvedModule(entry.module_digest, entry.size, entry.manifest_digest, entry.layout, True)

    def _cached_tag(self, ref: Reference, fresh_only: bool) -> str | None:
        entry = self._tag_entry(ref)
        if entry is None or (fresh_only and not self._fresh(entry)):
            return None
        return entry.manifest_digest

    def _tag_entry(self, ref: Reference) -> _TagEntry | None:
        key = str(ref)
        with self._lock:
            entry = self._tags.get(key)
        if entry is None:
            remembered = self._store.tag(key)  # resolved by an earlier run or by `csi-wasm pull`
            if remembered is None:
                return None
            entry = _TagEntry(*remembered)
            with self._lock:
                self._tags[key] = entry
        return entry

    def _fresh(self, entry: _TagEntry) -> bool:
        return self._clock() - entry.resolved_at <= self._config.tag_cache_seconds

    def _may_share_stored(
        self, request: ModuleRequest, entry: ManifestEntry, deadline: float | None, admitted: bool = False
    ) -> bool:
        """The access rule (csi_wasm.access) for a stored module reached through the pod's reference alone.

        True: hand it over. False: pull the reference instead (rule 3). Raises when refused.
        """
        ref, creds, module = request.ref, request.credentials, entry.module_digest
        decision = self._access.before_network(module, ref, creds)
        if decision is Decision.SHARE:
            return True
        never = request.policy is PullPolicy.NEVER
        if decision is Decision.PROVE_POSSESSION:
            if never:
                raise ModuleNotFound(
                    f"image {ref}: no copy on this node that this reference may use, and pullPolicy is Never "
                    "(a module pulled through another registry or repository is shared only once this one "
                    "serves it); use IfNotPresent"
                )
            return False
        if never:
            raise AccessDenied(
                f"image {ref} is private and this pod's access was not checked within the last "
                f"{self._auth_cache_seconds:.0f} s; pullPolicy Never forbids asking the registry (use IfNotPresent)"
            )
        try:
            # the registry that served the module as private vouches for this pod's credentials, or refuses
            # (PERMISSION_DENIED); a registry error is UNAVAILABLE: never a reason to hand the module over
            admission = contextlib.nullcontext() if admitted else self._admission.pulling(ref.registry, str(ref))
            with admission:  # it waits on a registry like any pull
                self._client.fetch_manifest(ref, creds, key=entry.manifest_digest, deadline=deadline)
        except ModuleNotFound:
            return False  # the origin no longer has that manifest: resolve the reference afresh
        self._access.vouched(module, ref, creds)
        return True

    def _remember_tag(self, ref: Reference, manifest_digest: str) -> None:
        with self._lock:
            self._tags[str(ref)] = _TagEntry(manifest_digest, self._clock())

    def _persist_tag(self, ref: Reference, manifest_digest: str) -> None:
        """Write the tag entry (for pullPolicy Never after a restart) once its manifest entry exists: the
        garbage collector drops tag entries whose manifest entry is gone, and must not race a pull."""
        if ref.digest is not None:
            return
        stored = self._store.tag(str(ref))
        if stored is None or stored[0] != manifest_digest:
            self._store.remember_tag(str(ref), manifest_digest, self._clock())

    # -- pulling ---------------------------------------------------------

    def _pull(self, request: ModuleRequest, deadline: float | None) -> ResolvedModule:
        ref, creds = request.ref, request.credentials
        current = self._current_digest(request, deadline)
        if current is not None:
            unchanged = self._stored_for(request, current, deadline, admitted=True)
            if unchanged is not None:  # the tag still names a module the store holds: no GET at all
                self._remember_tag(ref, current)
                self._persist_tag(ref, current)
                return unchanged
        manifest = self._resolve(request, deadline, key=current)  # by the digest the HEAD named: bytes checked
        self._signatures.verify(ref, manifest.digest, creds, deadline)  # before any blob is downloaded
        if is_index(manifest.media_type, manifest.body):
            child = select_from_index(str(ref), manifest.body)
            manifest = _merge_auth(self._resolve(request, deadline, key=child), manifest)
            self._signatures.vouch(ref, manifest.digest)
        if ref.digest is None:
            self._remember_tag(ref, manifest.digest)
        known = self._store.manifest(manifest.digest)
        if (
            known is not None
            and self._store.has(known.module_digest)
            and self._access.after_fetch(known.module_digest, ref, creds)
        ):
            self._persist_tag(ref, known.manifest_digest)
            return ResolvedModule(known.module_digest, known.size, known.manifest_digest, known.layout, True)
        layer = select_module_layer(str(ref), manifest.media_type, manifest.body)
        manifest_digest, used_credentials = manifest.digest, manifest.used_credentials
        del manifest  # its parsed body may be MiBs: not held while waiting for the download
        # a manifest served without credentials is public: fetch its module the same way, so that
        # "public" in the access record means the bytes were served to anyone
        stored = self._download(ref, layer, creds if used_credentials else None, deadline)
        self._access.vouched(stored.digest, ref, creds)  # its own origin served it (rule 2 or 3)
        self._store.remember_manifest_once(
            ManifestEntry(manifest_digest, stored.digest, stored.size, layer.layout, used_credentials)
        )
        self._persist_tag(ref, manifest_digest)
        return ResolvedModule(stored.digest, stored.size, manifest_digest, layer.layout, False)

    def _resolve(self, request: ModuleRequest, deadline: float | None, key: str | None = None) -> FetchedManifest:
        """The manifest of the pod's reference (or of ``key``, a digest). Publishes with the same credentials
        share one fetch, and under IfNotPresent its answer for ``tag_cache_seconds``: a burst of pods costs
        the registry one manifest GET (Docker Hub counts them), not one each."""
        ref, creds = request.ref, request.credentials
        wanted = key or ref.manifest_key
        reuse = request.policy is PullPolicy.IF_NOT_PRESENT or wanted.startswith("sha256:")
        manifest, fetched = self._manifests.get(
            ResolutionKey.of(ref, creds, f"GET {wanted}"),
            lambda: self._client.fetch_manifest(ref, creds, key=key, deadline=deadline),
            deadline,
            reuse,
        )
        if fetched and wanted != manifest.digest:  # fetched by tag: the answer for its digest too
            self._manifests.remember(ResolutionKey.of(ref, creds, f"GET {manifest.digest}"), manifest)
        return manifest

    def _current_digest(self, request: ModuleRequest, deadline: float | None) -> str | None:
        """The digest the pod's tag names now, known without a GET: from the tag cache while it is fresh
        (pullPolicy IfNotPresent: a download of it may still be running), else, for a tag this node has
        resolved before, from a HEAD, which Docker Hub does not count as a pull. None for a digest
        reference, or a tag never seen (it is fetched at once: a HEAD first would only add a trip)."""
        ref, creds = request.ref, request.credentials
        if ref.digest is not None:
            return None
        # one look at the tag cache: a publish of the same burst may fill it at any moment, and a tag
        # first seen as unknown must stay unknown here (its GET is shared), not turn into a HEAD
        entry = self._tag_entry(ref)
        if entry is None:
            return None
        if request.policy is PullPolicy.IF_NOT_PRESENT and self._fresh(entry):
            return entry.manifest_digest
        digest, _ = self._heads.get(
            ResolutionKey.of(ref, creds, f"HEAD {ref.manifest_key}"),
            lambda: self._client.head_manifest(ref, creds, deadline),
            deadline,
            reuse=request.policy is PullPolicy.IF_NOT_PRESENT,  # a HEAD answered moments ago is a fresh resolution
        )
        return digest

    def _download(
        self, ref: Reference, layer: ModuleLayer, creds: Credentials | None, deadline: float | None
    ) -> StoredModule:
        existing = self._shareable_copy(ref, layer, creds)
        if existing is not None:
            return existing
        if layer.size > self._layers.cap(layer):
            raise TooLarge(
                f"image {ref}: module layer is {layer.size} bytes, over the node's limit of "
                f"{self._config.max_module_bytes}"
            )
        # Flights are per origin: joining one shares a download from the registry and repository this
        # publish just fetched its manifest from (rule 2 of csi_wasm.access), never another pod's.
        key = f"{layer.digest} {ref.registry}/{ref.repository}"
        with self._lock:
            flight = self._flights.get(key)
            if flight is None:
                # a download may have landed since the check above: never fetch the same blob twice
                existing = self._shareable_copy(ref, layer, creds)
                if existing is not None:
                    return existing
            started = flight is None
            if flight is None:
                flight = self._downloads.submit(ref.registry, self._download_from_origin, ref, layer, creds)
                self._flights[key] = flight
            else:
                self._metrics.pull_joins.inc()
        if started:
            # outside the lock: a download that already finished (a fast failure) runs the callback
            # right here, and _land takes the lock (it deadlocked under load: found by test_faults)
            flight.add_done_callback(functools.partial(self._land, key))
        # a publish waits for the download until its deadline, but never longer than max_wait_seconds:
        # a registry that drips bytes just under the read timeout gets an answer well inside kubelet's 2 min
        timeout = (
            None if deadline is None else max(0.0, min(deadline - time.monotonic(), self._config.max_wait_seconds))
        )
        try:
            return flight.result(timeout=timeout)
        except concurrent.futures.TimeoutError as exc:
            raise RegistryTimeout(
                f"image {ref}: download still running when this call's wait ended; "
                "it continues and kubelet's retry will use it"
            ) from exc

    def _shareable_copy(self, ref: Reference, layer: ModuleLayer, creds: Credentials | None) -> StoredModule | None:
        """The stored copy of a raw layer, if the access rule lets this pod have it without a download."""
        if layer.packaging != "raw":
            return None
        existing = self._store.stat(layer.digest)
        if existing is None or not self._access.after_fetch(layer.digest, ref, creds):
            return None
        return existing

    def _download_from_origin(self, ref: Reference, layer: ModuleLayer, creds: Credentials | None) -> StoredModule:
        stored = self._layers.fetch(ref, layer, creds)
        self._access.downloaded(stored.digest, ref, creds)  # durable before anyone is handed the module
        return stored

    def _shield_from_gc(self, digest: str) -> None:
        """Called before the module appears in the store: a collection that can see it also sees this."""
        with self._lock:
            self._landed[digest] = time.monotonic()

    def _land(self, key: str, flight: object = None) -> None:
        with self._lock:
            if flight is None or self._flights.get(key) is flight:
                self._flights.pop(key, None)


def _merge_auth(child: FetchedManifest, parent: FetchedManifest) -> FetchedManifest:
    if parent.used_credentials and not child.used_credentials:
        return FetchedManifest(child.digest, child.media_type, child.body, True)
    return child
