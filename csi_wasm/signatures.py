"""Optional cosign signature verification, required per registry by the node configuration.

For a registry with ``require_signature: true`` and ``cosign_public_key: <PEM file>``,
a module is used only if the manifest the pod's reference resolves to carries a
valid cosign signature by that key. The format is cosign's "simple signing":

* the signature manifest sits in the same repository at tag ``sha256-<hex>.sig``
  (``<hex>`` is the signed manifest digest);
* each of its layers of media type ``application/vnd.dev.cosign.simplesigning.v1+json``
  is a JSON payload whose ``critical.image.docker-manifest-digest`` names the signed
  manifest, and carries the base64 signature of the payload bytes in the annotation
  ``dev.cosignproject.cosign/signature``;
* the signature is ECDSA P-256 with SHA-256 (cosign's default key type), DER encoded.

One good signature is enough. No signature manifest, no layer that verifies, or a
payload naming another digest: PERMISSION_DENIED (the node's policy refuses it). A
registry that cannot be reached while checking: UNAVAILABLE, as for any pull.

When it is checked (``csi_wasm.pull.Puller``): right after a pull resolves the
reference's manifest, before any blob is downloaded; and before a module already in
the store is served for a manifest digest this process has not verified yet (after
a restart, or after ``csi-wasm pull``), so an unsigned module pre-pulled onto the
node is never mounted. Verified digests are remembered in memory for the life of
the process. Keyless (Fulcio/Rekor) verification is not supported.
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from csi_wasm.config import NodeConfig
from csi_wasm.credentials import Credentials
from csi_wasm.errors import AccessDenied, ContentError, DigestMismatch, ModuleNotFound, TooLarge
from csi_wasm.reference import Reference, is_sha256_digest

SIMPLESIGNING_MEDIA_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
MAX_PAYLOAD_BYTES = 64 * 1024
MAX_SIGNATURE_LAYERS = 16


def signature_tag(manifest_digest: str) -> str:
    """``sha256:abc...`` -> ``sha256-abc....sig`` (where cosign stores the signature)."""
    return manifest_digest.replace(":", "-", 1) + ".sig"


class SignatureVerifier:
    def __init__(self, client: Any, node: NodeConfig) -> None:
        self._client = client
        self._node = node
        self._keys: dict[str, ec.EllipticCurvePublicKey] = {}
        self._verified: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def required(self, ref: Reference) -> bool:
        return self._node.registry(ref.registry).require_signature

    def is_verified(self, ref: Reference, manifest_digest: str) -> bool:
        if not self.required(ref):
            return True
        with self._lock:
            return (ref.registry, manifest_digest) in self._verified

    def vouch(self, ref: Reference, manifest_digest: str) -> None:
        """Mark a digest covered by a verified one (an index's selected child)."""
        with self._lock:
            self._verified.add((ref.registry, manifest_digest))

    def verify(
        self, ref: Reference, manifest_digest: str, creds: Credentials | None, deadline: float | None = None
    ) -> None:
        """Raise AccessDenied unless ``manifest_digest`` carries a valid signature (when one is required)."""
        if self.is_verified(ref, manifest_digest):
            return
        key = self._key(ref)
        sig_ref = Reference(ref.registry, ref.repository, tag=signature_tag(manifest_digest))
        try:
            manifest = self._client.fetch_manifest(sig_ref, creds, key=sig_ref.tag, deadline=deadline)
        except ModuleNotFound:
            raise AccessDenied(
                f"image {ref}: this node requires a cosign signature for {ref.registry}, and {manifest_digest} "
                f"has none (no {sig_ref.tag} in the repository); sign it with `cosign sign --key`"
            ) from None
        listed = manifest.body.get("layers")
        layers = [
            layer
            for layer in (listed if isinstance(listed, list) else [])
            if isinstance(layer, dict) and layer.get("mediaType") == SIMPLESIGNING_MEDIA_TYPE
        ][:MAX_SIGNATURE_LAYERS]
        problems: list[str] = []
        for layer in layers:
            problem = self._check_layer(sig_ref, layer, key, manifest_digest, creds, deadline)
            if problem is None:
                with self._lock:
                    self._verified.add((ref.registry, manifest_digest))
                return
            problems.append(problem)
        detail = "; ".join(sorted(set(problems))) if problems else "no simple-signing layer"
        raise AccessDenied(
            f"image {ref}: no valid cosign signature for {manifest_digest} by the key configured for "
            f"{ref.registry} ({detail[:300]}); refused"
        )

    def _check_layer(
        self,
        sig_ref: Reference,
        layer: dict[str, Any],
        key: ec.EllipticCurvePublicKey,
        manifest_digest: str,
        creds: Credentials | None,
        deadline: float | None,
    ) -> str | None:
        annotations = layer.get("annotations")
        encoded = annotations.get(SIGNATURE_ANNOTATION) if isinstance(annotations, dict) else None
        digest, size = layer.get("digest"), layer.get("size")
        if not isinstance(encoded, str) or not encoded:
            return "a layer has no signature annotation"
        if not isinstance(digest, str) or not is_sha256_digest(digest):
            return "a layer has no valid digest"
        if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= MAX_PAYLOAD_BYTES:
            return "a payload is empty or too large"
        try:
            signature = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            return "a signature is not base64"
        try:
            payload = self._client.fetch_blob_bytes(sig_ref, digest, creds, min(size, MAX_PAYLOAD_BYTES), deadline)
        except ModuleNotFound:
            return "a payload is missing from the registry"
        except TooLarge:
            return "a payload is larger than its layer says"
        except DigestMismatch:
            return "a payload does not match its digest"
        except ContentError:
            return "a payload could not be read"
        try:
            key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            return "a signature does not verify with the configured key"
        try:
            signed = json.loads(payload)["critical"]["image"]["docker-manifest-digest"]
        except (ValueError, KeyError, TypeError):
            return "a signed payload is not a cosign simple-signing document"
        if signed != manifest_digest:
            return f"a signature is for {str(signed)[:80]}, another manifest"
        return None

    def _key(self, ref: Reference) -> ec.EllipticCurvePublicKey:
        path = self._node.registry(ref.registry).cosign_public_key
        with self._lock:
            cached = self._keys.get(ref.registry)
        if cached is not None:
            return cached
        try:
            with open(path or "", "rb") as handle:
                key = serialization.load_pem_public_key(handle.read())
        except (OSError, ValueError, UnsupportedAlgorithm) as exc:
            raise AccessDenied(
                f"image {ref}: signatures are required for {ref.registry} but the node's cosign_public_key "
                f"{path!r} cannot be read ({type(exc).__name__}); refused until the node configuration is fixed"
            ) from exc
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
            raise AccessDenied(
                f"image {ref}: the node's cosign_public_key for {ref.registry} is not an ECDSA P-256 key; refused"
            )
        with self._lock:
            self._keys[ref.registry] = key
        return key


__all__ = ["SignatureVerifier", "signature_tag", "SIMPLESIGNING_MEDIA_TYPE", "SIGNATURE_ANNOTATION"]
