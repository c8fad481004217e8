"""Cosign signature verification, required per registry by the node configuration (issue 8).

Signatures are made here exactly as ``cosign sign --key`` stores them (simple signing:
the payload blob, the base64 ECDSA P-256 signature in the layer annotation, the
manifest at tag ``sha256-<hex>.sig``) and pushed to the real registry.
"""

from __future__ import annotations

import base64
import json
import pathlib
from typing import Iterator

import grpc
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from conftest import RunningDriver, fast_pull_config, start_driver, stop_driver
from csi_wasm import layouts
from csi_wasm.config import ConfigError, NodeConfig, RegistryHostConfig, parse_node_config
from csi_wasm.demo.push import Pushed, Pusher
from csi_wasm.demo.registry import LocalRegistry
from csi_wasm.demo.wasm_modules import make_module
from csi_wasm.signatures import SIGNATURE_ANNOTATION, SIMPLESIGNING_MEDIA_TYPE, signature_tag

DENIED = grpc.StatusCode.PERMISSION_DENIED


def payload_for(reference: str, digest: str) -> bytes:
    return json.dumps({"critical": {"identity": {"docker-reference": reference.rsplit(":", 1)[0]},
                                    "image": {"docker-manifest-digest": digest},
                                    "type": "cosign container image signature"}, "optional": None}).encode()  # fmt: skip


def push_signature(
    pusher: Pusher, pushed: Pushed, key: ec.EllipticCurvePrivateKey, *, signed_digest: str | None = None,
    payload: bytes | None = None, signature: str | None = None,
) -> None:  # fmt: skip
    """What ``cosign sign --key`` pushes for ``pushed`` (the knobs let a test forge a bad one)."""
    repo = pushed.reference.split("/", 1)[1].rsplit(":", 1)[0]
    body = payload_for(pushed.reference, signed_digest or pushed.manifest_digest)
    signed = base64.b64encode(key.sign(body, ec.ECDSA(hashes.SHA256()))).decode()
    layer = pusher.blob(repo, payload if payload is not None else body) | {
        "mediaType": SIMPLESIGNING_MEDIA_TYPE, "annotations": {SIGNATURE_ANNOTATION: signature or signed}}
    config = pusher.blob(repo, b"{}") | {"mediaType": "application/vnd.oci.image.config.v1+json"}
    manifest = {"schemaVersion": 2, "mediaType": layouts.OCI_MANIFEST, "config": config, "layers": [layer]}
    pusher.manifest(repo, signature_tag(pushed.manifest_digest), manifest, layouts.OCI_MANIFEST)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[ec.EllipticCurvePrivateKey, ec.EllipticCurvePrivateKey, pathlib.Path]:
    trusted, stranger = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    path = tmp_path_factory.mktemp("cosign") / "cosign.pub"
    path.write_bytes(trusted.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo))  # fmt: skip
    return trusted, stranger, path


def _node(registry: LocalRegistry, key_path: pathlib.Path | str, require: bool = True) -> NodeConfig:
    config = RegistryHostConfig(insecure=True, require_signature=require, cosign_public_key=str(key_path))
    return NodeConfig(registries={registry.host: config}, pull=fast_pull_config())


@pytest.fixture
def signed_csi(tmp_path: pathlib.Path, registry: LocalRegistry, keys: tuple[object, object, pathlib.Path]) -> Iterator[RunningDriver]:
    running = start_driver(tmp_path, _node(registry, keys[2]))
    yield running
    stop_driver(running)


def _publish(csi: RunningDriver, image: str, **attributes: str) -> tuple[grpc.StatusCode | None, str]:
    volume = csi.volume(image, **attributes)
    try:
        csi.kubelet.mount(volume, timeout=30)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    csi.kubelet.unmount(volume)
    return None, ""


def test_a_signed_module_is_published(
    signed_csi: RunningDriver, pusher: Pusher, keys: tuple[ec.EllipticCurvePrivateKey, object, pathlib.Path]
) -> None:
    pushed = pusher.wasm_artifact("signed/good", "v1", make_module(5000, "signed-good"))
    push_signature(pusher, pushed, keys[0])
    assert _publish(signed_csi, pushed.reference) == (None, "")
    assert _publish(signed_csi, pushed.pinned) == (None, "")


@pytest.mark.parametrize("forgery", ["unsigned", "another key", "another digest", "tampered payload",
                                     "not base64", "signature of other bytes"])  # fmt: skip
def test_a_module_without_a_valid_signature_is_refused_before_download(
    signed_csi: RunningDriver, pusher: Pusher, registry: LocalRegistry,
    keys: tuple[ec.EllipticCurvePrivateKey, ec.EllipticCurvePrivateKey, pathlib.Path], forgery: str,
) -> None:  # fmt: skip
    trusted, stranger, _ = keys
    repo = "signed/" + forgery.replace(" ", "-")
    pushed = pusher.wasm_artifact(repo, "v1", make_module(5000, f"forged-{forgery}"))
    other = pusher.wasm_artifact(repo, "v2", make_module(5000, f"other-{forgery}"))
    if forgery == "another key":
        push_signature(pusher, pushed, stranger)
    elif forgery == "another digest":  # a real signature, for another manifest, replayed
        push_signature(pusher, pushed, trusted, signed_digest=other.manifest_digest)
    elif forgery == "tampered payload":
        push_signature(pusher, pushed, trusted, payload=payload_for(pushed.reference, pushed.manifest_digest) + b" ")
    elif forgery == "not base64":
        push_signature(pusher, pushed, trusted, signature="%%%not-base64%%%")
    elif forgery == "signature of other bytes":
        bogus = base64.b64encode(trusted.sign(b"something else", ec.ECDSA(hashes.SHA256()))).decode()
        push_signature(pusher, pushed, trusted, signature=bogus)
    code, detail = _publish(signed_csi, pushed.reference)
    assert code == DENIED, detail
    assert "cosign signature" in detail
    registry.sync()
    assert registry.blob_gets(repo, pushed.layer_digest) == 0  # refused before the module was downloaded
    assert signed_csi.driver.store.modules() == [] and signed_csi.mounts_under_kubelet() == []


def test_a_stored_unsigned_module_is_not_served_once_signatures_are_required(
    tmp_path: pathlib.Path, registry: LocalRegistry, pusher: Pusher,
    keys: tuple[ec.EllipticCurvePrivateKey, object, pathlib.Path],
) -> None:  # fmt: skip
    unsigned = pusher.wasm_artifact("signed/prepulled", "v1", make_module(5000, "prepulled"))
    signed = pusher.wasm_artifact("signed/prepulled-ok", "v1", make_module(5000, "prepulled-ok"))
    push_signature(pusher, signed, keys[0])
    lax = start_driver(tmp_path, _node(registry, keys[2], require=False))
    try:
        for pushed in (unsigned, signed):
            assert _publish(lax, pushed.reference) == (None, "")
    finally:
        stop_driver(lax)
    strict = start_driver(tmp_path, _node(registry, keys[2]))  # same store, now signatures are required
    try:
        assert strict.driver.store.has(unsigned.module_digest)
        for image, policy in ((unsigned.reference, "IfNotPresent"), (unsigned.pinned, "IfNotPresent"),
                              (unsigned.reference, "Never"), (unsigned.pinned, "Never")):  # fmt: skip
            code, detail = _publish(strict, image, pullPolicy=policy)
            assert code == DENIED, (image, policy, detail)
        registry.sync()
        blob_gets = registry.blob_gets("signed/prepulled-ok", signed.layer_digest)
        for image, policy in ((signed.pinned, "Never"), (signed.reference, "IfNotPresent")):
            assert _publish(strict, image, pullPolicy=policy) == (None, "")
        registry.sync()
        assert registry.blob_gets("signed/prepulled-ok", signed.layer_digest) == blob_gets  # served from the store
    finally:
        stop_driver(strict)


def test_an_unreadable_or_wrong_key_refuses_rather_than_allows(
    tmp_path: pathlib.Path, registry: LocalRegistry, pusher: Pusher,
    keys: tuple[ec.EllipticCurvePrivateKey, object, pathlib.Path],
) -> None:  # fmt: skip
    pushed = pusher.wasm_artifact("signed/keyless", "v1", make_module(5000, "keyless"))
    push_signature(pusher, pushed, keys[0])
    rsa_key = tmp_path / "rsa.pub"
    rsa_key.write_bytes(rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))  # fmt: skip
    for key in (tmp_path / "missing.pub", rsa_key):
        running = start_driver(tmp_path / key.stem, _node(registry, key))
        try:
            code, detail = _publish(running, pushed.reference)
            assert code == DENIED and "cosign_public_key" in detail
        finally:
            stop_driver(running)


def test_signature_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match="cosign_public_key"):
        parse_node_config({"registries": {"r.example": {"require_signature": True}}})
    with pytest.raises(ConfigError):
        parse_node_config({"registries": {"r.example": {"require_signature": "yes", "cosign_public_key": "/k"}}})
    config = parse_node_config({"registries": {"r.example": {"require_signature": True, "cosign_public_key": "/k"}}})
    assert config.registry("r.example").require_signature and config.registry("r.example").cosign_public_key == "/k"
    assert not config.registry("other.example").require_signature
