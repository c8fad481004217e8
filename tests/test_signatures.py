"""Cosign signature verification, required per registry by the node configuration (issue 8).

Signatures are made here exactly as ``cosign sign --key`` stores them (simple signing:
the payload blob, the base64 ECDSA P-256 signature in the layer annotation, the
manifest at tag ``sha256-<hex>.sig``) and pushed to the real registry.
"""

from __future__ import annotations

import base64
import json
import pathlib
from dataclasses import dataclass
from typing import Callable, Iterator

import grpc
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from conftest import RunningDriver, fast_pull_config, start_driver, stop_driver
from csi_wasm import layouts
from csi_wasm.config import ConfigError, NodeConfig, RegistryHostConfig, parse_node_config
from csi_wasm.demo.push import Pushed, Pusher
from csi_wasm.demo.registry import LocalRegistry
from csi_wasm.demo.wasm_modules import make_module, sha256_digest
from csi_wasm.signatures import SIGNATURE_ANNOTATION, SIMPLESIGNING_MEDIA_TYPE, signature_tag
from hostile_registry import HostileRegistry

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


# -- malformed signature layers: each refused for its own reason (signatures.py, every path) -----------------
#
# The real registry refuses to store most malformed manifests, so a registry of our own serves them here
# (tests/hostile_registry.py): exactly what a hostile or broken registry could answer.


@dataclass
class Staged:
    registry: HostileRegistry
    reference: str
    manifest_digest: str


def stage_module(registry: HostileRegistry, repo: str, module: bytes) -> Staged:
    layer = {"mediaType": "application/wasm", "digest": registry.blob(module), "size": len(module)}
    config_body = json.dumps({"architecture": "wasm", "os": "wasip1", "layerDigests": [layer["digest"]]}).encode()
    config = {"mediaType": layouts.WASM_CONFIG_V0, "digest": registry.blob(config_body), "size": len(config_body)}
    digest = registry.manifest(repo, "v1", {"schemaVersion": 2, "mediaType": layouts.OCI_MANIFEST, "config": config,
                                            "layers": [layer]}, layouts.OCI_MANIFEST)  # fmt: skip
    return Staged(registry, f"{registry.host}/{repo}:v1", digest)


def signed_layer(staged: Staged, key: ec.EllipticCurvePrivateKey, payload: bytes | None = None,
                 **overrides: object) -> dict[str, object]:  # fmt: skip
    body = payload if payload is not None else payload_for(staged.reference, staged.manifest_digest)
    signature = base64.b64encode(key.sign(body, ec.ECDSA(hashes.SHA256()))).decode()
    layer = {"mediaType": SIMPLESIGNING_MEDIA_TYPE, "digest": staged.registry.blob(body), "size": len(body),
             "annotations": {SIGNATURE_ANNOTATION: signature}}  # fmt: skip
    return layer | overrides


def served_other_bytes(staged: Staged, layer: dict[str, object]) -> dict[str, object]:
    """The registry answers the layer's digest with other bytes of the same length."""
    digest = str(layer["digest"])
    real = staged.registry.blobs[digest]
    staged.registry.blobs[digest] = real[:-1] + (b" " if real[-1:] != b" " else b"\n")
    return layer


def serve_signature(staged: Staged, layers: object) -> None:
    repo = staged.reference.split("/", 1)[1].rsplit(":", 1)[0]
    config = {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": staged.registry.blob(b"{}"), "size": 2}
    staged.registry.manifest(repo, signature_tag(staged.manifest_digest), {"schemaVersion": 2, "config": config,
                             "mediaType": layouts.OCI_MANIFEST, "layers": layers}, layouts.OCI_MANIFEST)  # fmt: skip


Layers = Callable[[Staged, ec.EllipticCurvePrivateKey], object]
MALFORMED: dict[str, tuple[str, Layers]] = {
    "no annotation": ("a layer has no signature annotation", lambda s, k: [signed_layer(s, k, annotations={})]),
    "annotation not a string": ("no signature annotation",
                                lambda s, k: [signed_layer(s, k, annotations={SIGNATURE_ANNOTATION: 5})]),
    "annotations a list": ("no signature annotation", lambda s, k: [signed_layer(s, k, annotations=["x"])]),
    "bad base64": ("not base64", lambda s, k: [signed_layer(s, k, annotations={SIGNATURE_ANNOTATION: "@@@="})]),
    "no valid digest": ("no valid digest", lambda s, k: [signed_layer(s, k, digest="sha256:xyz")]),
    "oversized": ("empty or too large", lambda s, k: [signed_layer(s, k, size=64 * 1024 + 1)]),
    "size not a number": ("empty or too large", lambda s, k: [signed_layer(s, k, size="12")]),
    "larger than declared": ("larger than its layer says", lambda s, k: [signed_layer(s, k, size=10)]),
    "payload missing": ("missing from the registry", lambda s, k: [signed_layer(s, k, digest="sha256:" + "0" * 64)]),
    "payload digest mismatch": ("does not match its digest", lambda s, k: [served_other_bytes(s, signed_layer(s, k))]),
    "not a simple-signing document": ("not a cosign simple-signing document",
                                      lambda s, k: [signed_layer(s, k, payload=b'{"critical": 1}')]),
    "payload for another manifest": ("another manifest", lambda s, k: [signed_layer(
        s, k, payload=payload_for(s.reference, "sha256:" + "1" * 64))]),
    "layers not a list": ("no simple-signing layer", lambda s, k: 5),
    "layers a list of strings": ("no simple-signing layer", lambda s, k: ["layer"]),
    "no simple-signing layer": ("no simple-signing layer",
                                lambda s, k: [signed_layer(s, k, mediaType="application/octet-stream")]),
}  # fmt: skip


@pytest.fixture
def hostile_signed(
    tmp_path: pathlib.Path, keys: tuple[object, object, pathlib.Path]
) -> Iterator[tuple[HostileRegistry, RunningDriver]]:
    with HostileRegistry() as hostile:
        config = RegistryHostConfig(insecure=True, require_signature=True, cosign_public_key=str(keys[2]))
        running = start_driver(tmp_path, NodeConfig(registries={hostile.host: config}, pull=fast_pull_config()))
        yield hostile, running
        stop_driver(running)


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_signature_layer_is_refused_for_its_reason(
    hostile_signed: tuple[HostileRegistry, RunningDriver], keys: tuple[ec.EllipticCurvePrivateKey, object, object],
    case: str,
) -> None:  # fmt: skip
    hostile, running = hostile_signed
    reason, layers = MALFORMED[case]
    module = make_module(5000, f"bad-{case}")
    staged = stage_module(hostile, "signed/malformed", module)
    serve_signature(staged, layers(staged, keys[0]))
    code, detail = _publish(running, staged.reference)
    assert code == DENIED and reason in detail, (case, code, detail)
    assert hostile.count(r"GET /v2/signed/malformed/blobs/" + sha256_digest(module)) == 0  # before any download
    assert running.driver.store.modules() == [] and running.mounts_under_kubelet() == []
    # the same module with a good signature is published by the same driver
    serve_signature(staged, [signed_layer(staged, keys[0])])
    assert _publish(running, staged.reference) == (None, "")


def test_a_key_of_another_curve_is_refused(
    tmp_path: pathlib.Path, registry: LocalRegistry, pusher: Pusher,
) -> None:  # fmt: skip
    p384 = ec.generate_private_key(ec.SECP384R1())
    key_path = tmp_path / "p384.pub"
    key_path.write_bytes(p384.public_key().public_bytes(serialization.Encoding.PEM,
                                                        serialization.PublicFormat.SubjectPublicKeyInfo))  # fmt: skip
    pushed = pusher.wasm_artifact("signed/p384", "v1", make_module(5000, "p384"))
    push_signature(pusher, pushed, p384)  # a valid signature, by a key of a curve that is not cosign's default
    running = start_driver(tmp_path / "d", _node(registry, key_path))
    try:
        code, detail = _publish(running, pushed.reference)
        assert code == DENIED and "not an ECDSA P-256 key" in detail, detail
    finally:
        stop_driver(running)
