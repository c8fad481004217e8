"""One spelling per registry host (issue 13 item 2): every rule written for a host holds for every way a
pod can spell it.

The regression: with signatures required for a registry, ``GHCR.IO/...`` or ``ghcr.io:443/...`` mounted an
unsigned module, because the node config and the signature verifier matched the host string exactly.
Reproduced end to end here with ``LOCALHOST:<port>`` against the real registry.
"""

from __future__ import annotations

import base64
import json
import pathlib
import subprocess
from typing import Iterator

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from conftest import RunningDriver, fast_pull_config, start_driver, stop_driver
from csi_wasm.config import ConfigError, NodeConfig, RegistryHostConfig, parse_node_config
from csi_wasm.credentials import keychain_from_secrets, load_docker_config
from csi_wasm.demo.push import Pusher
from csi_wasm.demo.registry import LocalRegistry
from csi_wasm.demo.wasm_modules import make_module
from csi_wasm.errors import InvalidRequest
from csi_wasm.policy import ImagePolicy
from csi_wasm.reference import InvalidHost, Reference, canonical_host, parse_reference
from csi_wasm.signatures import SignatureVerifier
from test_signatures import push_signature


@pytest.mark.parametrize(
    "spelled, canonical",
    [("ghcr.io", "ghcr.io"), ("GHCR.IO", "ghcr.io"), ("ghcr.io:443", "ghcr.io"), ("GhCr.Io:00443", "ghcr.io"),
     ("ghcr.io:5000", "ghcr.io:5000"), ("LOCALHOST:5000", "localhost:5000"), ("docker.io", "docker.io"),
     ("index.docker.io", "docker.io"), ("registry-1.docker.io", "docker.io"), ("Registry-1.Docker.IO:443", "docker.io"),
     ("[0:0::1]", "[::1]"), ("[::1]:443", "[::1]"), ("[::1]:5000", "[::1]:5000"), ("127.0.0.1:443", "127.0.0.1")],
)  # fmt: skip
def test_canonical_host(spelled: str, canonical: str) -> None:
    assert canonical_host(spelled) == canonical
    assert canonical_host(canonical) == canonical  # a fixpoint


@pytest.mark.parametrize("bad", ["", "ghcr.io:0", "ghcr.io:65536", "ghcr.io:", "a_b.example", "[zz::1]", "127.1",
                                 "0x7f.0.0.1", "2130706433", "127.000.000.001", "0177.0.0.1", "ghcr.io/x", " ghcr.io"])
def test_hosts_that_are_not_hosts_are_refused(bad: str) -> None:
    with pytest.raises(InvalidHost):
        canonical_host(bad)


@pytest.mark.parametrize("image", ["GHCR.IO/org/f:v1", "ghcr.io:443/org/f:v1", "Ghcr.Io:443/org/f:v1", "ghcr.io/org/f:v1"])
def test_every_spelling_of_a_host_meets_the_same_rules(image: str, tmp_path: pathlib.Path) -> None:
    ref = parse_reference(image)
    assert ref.registry == "ghcr.io" and str(ref) == "ghcr.io/org/f:v1"
    assert Reference(image.split("/")[0], "org/f", "v1") == ref  # however a reference is made
    config = parse_node_config({"registries": {"GHCR.IO:443": {"require_signature": True, "cosign_public_key": "/k",
                                                               "mirrors": ["Mirror.Example:443"]}},
                                "allowed_images": ["GHCR.io:443/org/*"]})  # fmt: skip
    assert list(config.registries) == ["ghcr.io"]
    assert config.registry(ref.registry).require_signature and config.registry(image.split("/")[0]).require_signature
    assert config.registry("ghcr.io").mirrors == ("mirror.example",)
    assert SignatureVerifier(object(), config).required(ref)
    assert ImagePolicy(config.allowed_images).allows(ref)
    assert not ImagePolicy(config.allowed_images).allows(parse_reference("ghcr.io.evil.example/org/f:v1"))
    insecure = NodeConfig().with_insecure(["GHCR.IO:443"])
    assert insecure.registry(ref.registry).insecure
    auth = base64.b64encode(b"u:p").decode()
    for key in ("GHCR.IO", "https://ghcr.io:443/v1/", "ghcr.io"):
        creds = keychain_from_secrets({".dockerconfigjson": json.dumps({"auths": {key: {"auth": auth}}})}, ref.registry)
        assert creds is not None and (creds.username, creds.password) == ("u", "p"), key
    node_wide = tmp_path / "config.json"
    node_wide.write_text(json.dumps({"auths": {"https://GHCR.IO": {"auth": auth}}}))
    assert load_docker_config(node_wide).lookup(ref.registry) is not None


def test_docker_hub_is_one_registry() -> None:
    names = ["nginx", "library/nginx", "docker.io/nginx", "index.docker.io/library/nginx", "registry-1.docker.io/nginx",
             "DOCKER.IO/library/nginx", "docker.io:443/nginx"]  # fmt: skip
    assert {str(parse_reference(n)) for n in names} == {"docker.io/library/nginx:latest"}
    config = NodeConfig(registries={"index.docker.io": RegistryHostConfig(mirrors=("mirror.example",))})
    assert config.registry("registry-1.docker.io").mirrors == ("mirror.example",)
    assert ImagePolicy(["index.docker.io/library/*"]).allows(parse_reference("nginx"))


def test_two_keys_for_one_registry_are_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match="same registry"):
        parse_node_config({"registries": {"ghcr.io": {}, "GHCR.IO:443": {"insecure": True}}})
    with pytest.raises(ConfigError, match="same registry"):
        NodeConfig(registries={"docker.io": RegistryHostConfig(), "index.docker.io": RegistryHostConfig()})
    with pytest.raises(ConfigError, match="insecure-registry"):
        NodeConfig().with_insecure(["not a host"])
    with pytest.raises(ConfigError, match="mirrors"):
        parse_node_config({"registries": {"r.example": {"mirrors": ["registry-1.docker.io"]}}})
    with pytest.raises(InvalidRequest, match="same registry"):
        keychain_from_secrets({".dockerconfigjson": json.dumps({"auths": {
            "ghcr.io": {"username": "a", "password": "1"}, "GHCR.IO": {"username": "b", "password": "2"}}})}, "ghcr.io")


# -- end to end: the bypass, reproduced against the real registry ------------------------------------------
#
# A TLS registry whose certificate names localhost, trusted through REQUESTS_CA_BUNDLE the way a public
# CA is trusted for ghcr.io (so a spelling the node config does not know still connects), and loopback
# allowed (allowed_private_networks) so that nothing but the signature rule stands between a pod and
# the unsigned module. Before canonical hosts, LOCALHOST:<port> mounted it.


@pytest.fixture(scope="module")
def signing(tmp_path_factory: pytest.TempPathFactory) -> tuple[ec.EllipticCurvePrivateKey, pathlib.Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path_factory.mktemp("canonical-cosign") / "cosign.pub"
    path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo))  # fmt: skip
    return key, path


@pytest.fixture(scope="module")
def localhost_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalRegistry, pathlib.Path]]:
    directory = tmp_path_factory.mktemp("localhost-tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    with LocalRegistry(directory / "registry", tls=(cert, key)) as running:
        yield running, cert


@pytest.fixture
def strict_csi(
    tmp_path: pathlib.Path, localhost_registry: tuple[LocalRegistry, pathlib.Path],
    signing: tuple[object, pathlib.Path], monkeypatch: pytest.MonkeyPatch,
) -> Iterator[RunningDriver]:  # fmt: skip
    registry, cert = localhost_registry
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
    port = registry.host.rsplit(":", 1)[1]
    # the admin wrote the rule for Localhost:<port>; pods may spell it any way they like
    config = RegistryHostConfig(ca_bundle=str(cert), require_signature=True, cosign_public_key=str(signing[1]))
    node = NodeConfig(registries={f"Localhost:{port}": config}, pull=fast_pull_config(),
                      allowed_private_networks=("127.0.0.0/8",))  # fmt: skip
    running = start_driver(tmp_path, node)
    yield running
    stop_driver(running)


def _publish(csi: RunningDriver, image: str) -> tuple[grpc.StatusCode | None, str, bytes | None]:
    volume = csi.volume(image)
    try:
        target = csi.kubelet.mount(volume, timeout=30)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", None
    data = (target / "plugin.wasm").read_bytes()
    csi.kubelet.unmount(volume)
    return None, "", data


@pytest.mark.parametrize("spelling", ["localhost", "LOCALHOST", "LocalHost"])
def test_require_signature_holds_however_the_host_is_spelled(
    strict_csi: RunningDriver, localhost_registry: tuple[LocalRegistry, pathlib.Path],
    signing: tuple[ec.EllipticCurvePrivateKey, pathlib.Path], spelling: str,
) -> None:  # fmt: skip
    registry, cert = localhost_registry
    pusher = Pusher(registry.host, "https", verify=str(cert))
    port = registry.host.rsplit(":", 1)[1]
    tag = spelling.lower() + "x"
    unsigned = pusher.wasm_artifact("canonical/unsigned", tag, make_module(5000, f"unsigned-{spelling}"))
    signed_module = make_module(5000, f"signed-{spelling}")
    signed = pusher.wasm_artifact("canonical/signed", tag, signed_module)
    push_signature(pusher, signed, signing[0])
    host = f"{spelling}:{port}"
    for image in (f"{host}/canonical/unsigned:{tag}", f"{host}/canonical/unsigned@{unsigned.manifest_digest}"):
        code, detail, data = _publish(strict_csi, image)
        assert code == grpc.StatusCode.PERMISSION_DENIED and "cosign signature" in detail, (image, code, detail)
        assert data is None
    assert strict_csi.driver.store.modules() == [] and strict_csi.mounts_under_kubelet() == []
    code, detail, data = _publish(strict_csi, f"{host}/canonical/signed:{tag}")
    assert (code, data) == (None, signed_module), detail
