"""Who may be handed a module that is already on the node: the access rule of the shared store.

The store keeps one copy of a module for every pod on the node. A module a pod
pulled with its credentials must not reach a pod that could not have pulled it.
Module digests are public (Istio puts them in pod annotations), and a registry a
pod names can claim anything in a manifest or a HEAD, so neither "the pod knows
the digest" nor "the pod's registry lists it" proves anything. Two things do: the
registry that served the module as private vouching for the pod's credentials,
and the pod's own registry actually serving the module's bytes (verified by
digest) to the pod.

Each module has an access record (``ModuleAccess``, by module digest, persisted in
``<store>/access/<hex>.json``, written atomically):

* ``public``: its bytes were once downloaded without credentials (the manifest was
  served to anyone, and so was the blob);
* ``private_at``: each origin (canonical registry + repository) that served its
  bytes to a pod's credentials.

The rule. A stored module D is handed to a pod whose reference names origin O,
with credentials C (none is a credential too: anonymous), only if

1. D is public; or
2. O is in D's ``private_at``, and O itself served this pod's reference (the
   manifest, by tag or by the stored digest) to C: now, or within
   ``auth_cache_seconds`` (the positive answer is cached per C's fingerprint, O
   and D, on the Puller's injected clock); or
3. the pod proves possession: its own registry, O, serves D's bytes to it and they
   hash to D. The module is downloaded again from O (the store keeps its one
   inode), and O joins D's record.

Everything else follows from that:

* a module first seen public stays public (its bytes were served to anyone); a
  module first private becomes public once a registry serves its bytes to a pod
  without credentials;
* the same module private in two repositories: the second one proves itself once
  by serving the bytes (rule 3), then rule 2 holds there too;
* an index is checked like its selected child: both are fetched from the pod's
  origin, with the pod's credentials;
* ``moduleDigest`` is a constraint on the bytes, never a proof: it grants nothing;
* a download in flight is joined only by publishes for the same origin (flights
  are keyed by layer digest and origin): their own manifest fetch there is rule 2;
* pullPolicy Never makes no network call, so only rule 1 or a fresh rule-2 answer
  in the cache serves it; otherwise PERMISSION_DENIED (private at this origin) or
  NOT_FOUND (no copy this reference may use);
* a module without a record (a store written before records existed, or a lost
  record) is treated like one private elsewhere: rule 3;
* a registry error while checking is UNAVAILABLE, refused credentials
  PERMISSION_DENIED; neither ever serves the module.
"""

from __future__ import annotations

import enum
import json
import pathlib
import threading
from dataclasses import dataclass
from typing import Any, Callable

from csi_wasm.credentials import Credentials
from csi_wasm.reference import Reference
from csi_wasm.store import write_atomic

# An origin can only be added by serving the module's bytes; past this many the oldest is
# forgotten (which only makes the rule stricter for it: it proves itself again by rule 3).
MAX_ORIGINS = 64
# Positive answers kept at most (expired ones are dropped first, then the oldest).
MAX_PROOFS = 10_000


@dataclass(frozen=True, order=True)
class Origin:
    """Where a module was served from: a canonical registry host and a repository."""

    registry: str
    repository: str

    @classmethod
    def of(cls, ref: Reference) -> Origin:
        return cls(ref.registry, ref.repository)

    def __str__(self) -> str:
        return f"{self.registry}/{self.repository}"


@dataclass(frozen=True)
class ModuleAccess:
    digest: str
    public: bool = False
    private_at: tuple[Origin, ...] = ()

    def served(self, origin: Origin, private: bool) -> ModuleAccess:
        """This record after ``origin`` served the module's bytes (with credentials if ``private``)."""
        if not private:
            return ModuleAccess(self.digest, True, self.private_at)
        kept = tuple(o for o in self.private_at if o != origin)
        return ModuleAccess(self.digest, self.public, (kept + (origin,))[-MAX_ORIGINS:])

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "digest": self.digest,
                "public": self.public,
                "private_at": [{"registry": o.registry, "repository": o.repository} for o in self.private_at],
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json(cls, digest: str, data: Any) -> ModuleAccess | None:
        """The record, or None if it is not one we wrote (then the module counts as unknown)."""
        if not isinstance(data, dict) or data.get("digest") != digest or not isinstance(data.get("public"), bool):
            return None
        entries = data.get("private_at")
        if not isinstance(entries, list):
            return None
        origins = []
        for entry in entries:
            if not isinstance(entry, dict):
                return None
            registry, repository = entry.get("registry"), entry.get("repository")
            if not isinstance(registry, str) or not isinstance(repository, str):
                return None
            origins.append(Origin(registry, repository))
        return cls(digest, data["public"], tuple(origins))


class AccessRecords:
    """Per-module access records on disk, read through a memory cache.

    Absent records are not cached: ``csi-wasm pull`` (another process) may write one.
    Two processes recording at once can lose one update, which only makes the rule
    stricter for the lost origin until it proves itself again.
    """

    def __init__(self, directory: pathlib.Path) -> None:
        self._directory = directory
        self._directory.mkdir(parents=True, exist_ok=True, mode=0o755)
        self._cache: dict[str, ModuleAccess] = {}
        self._lock = threading.Lock()

    def get(self, digest: str) -> ModuleAccess | None:
        cached = self._cache.get(digest)
        return cached if cached is not None else self._read(digest)

    def record(self, digest: str, origin: Origin, private: bool) -> ModuleAccess:
        """``origin`` served ``digest``'s bytes: durable before the module is handed to anyone."""
        with self._lock:
            current = self._read(digest) or ModuleAccess(digest)
            updated = current.served(origin, private)
            if updated != current:
                write_atomic(self._path(digest), updated.to_json())
                self._cache[digest] = updated
            return updated

    def _read(self, digest: str) -> ModuleAccess | None:
        try:
            data = json.loads(self._path(digest).read_bytes())
        except (OSError, ValueError, RecursionError):
            return None
        record = ModuleAccess.from_json(digest, data)
        if record is not None:
            self._cache[digest] = record
        return record

    def _path(self, digest: str) -> pathlib.Path:
        return self._directory / f"{digest.removeprefix('sha256:')}.json"


class ProofCache:
    """Positive answers of rule 2: (credentials, origin, module) -> valid until (on ``clock``)."""

    def __init__(self, seconds: float, clock: Callable[[], float]) -> None:
        self._seconds = seconds
        self._clock = clock
        self._until: dict[tuple[str, Origin, str], float] = {}
        self._lock = threading.Lock()

    def fresh(self, creds: Credentials | None, origin: Origin, digest: str) -> bool:
        with self._lock:
            until = self._until.get(_key(creds, origin, digest))
        return until is not None and self._clock() < until

    def remember(self, creds: Credentials | None, origin: Origin, digest: str) -> None:
        now = self._clock()
        with self._lock:
            key = _key(creds, origin, digest)
            self._until.pop(key, None)  # re-inserted last: the dict's order is the age order
            self._until[key] = now + self._seconds
            if len(self._until) > MAX_PROOFS:
                for stale in [k for k, until in self._until.items() if until <= now]:
                    del self._until[stale]
                while len(self._until) > MAX_PROOFS:
                    del self._until[next(iter(self._until))]


def _key(creds: Credentials | None, origin: Origin, digest: str) -> tuple[str, Origin, str]:
    return (creds.fingerprint if creds is not None else "", origin, digest)


class Decision(enum.Enum):
    """What a stored module needs before a pod may have it, judged without the network."""

    SHARE = "share"  # public, or this pod's access at its origin is cached and fresh
    ASK_ORIGIN = "ask origin"  # private at the pod's origin: that registry must accept the pod's credentials
    PROVE_POSSESSION = "prove possession"  # private elsewhere or unknown: the pod's registry must serve the bytes


class AccessRule:
    """The rule above, over the records and the cache; ``csi_wasm.pull.Puller`` applies it."""

    def __init__(self, records: AccessRecords, proofs: ProofCache) -> None:
        self._records = records
        self._proofs = proofs

    def before_network(self, digest: str, ref: Reference, creds: Credentials | None) -> Decision:
        """For a module found in the store through the pod's reference, before any request."""
        record = self._records.get(digest)
        if record is None:
            return Decision.PROVE_POSSESSION
        if record.public:
            return Decision.SHARE
        origin = Origin.of(ref)
        if origin not in record.private_at:
            return Decision.PROVE_POSSESSION
        return Decision.SHARE if self._proofs.fresh(creds, origin, digest) else Decision.ASK_ORIGIN

    def after_fetch(self, digest: str, ref: Reference, creds: Credentials | None) -> bool:
        """The pod's origin just served it a manifest naming ``digest``: may it have the stored copy?"""
        record = self._records.get(digest)
        if record is None:
            return False
        if record.public:
            return True
        if Origin.of(ref) not in record.private_at:
            return False
        self.vouched(digest, ref, creds)
        return True

    def vouched(self, digest: str, ref: Reference, creds: Credentials | None) -> None:
        """The pod's origin served its reference to ``creds`` (rule 2): remember it for the hot path."""
        self._proofs.remember(creds, Origin.of(ref), digest)

    def downloaded(self, digest: str, ref: Reference, creds: Credentials | None) -> None:
        """The pod's origin served the module's bytes (rule 3); ``creds`` None: without credentials."""
        self._records.record(digest, Origin.of(ref), private=creds is not None)
        if creds is not None:
            self.vouched(digest, ref, creds)

    def record_of(self, digest: str) -> ModuleAccess | None:
        return self._records.get(digest)


__all__ = ["AccessRecords", "AccessRule", "Decision", "ModuleAccess", "Origin", "ProofCache"]
