"""Hostile registries: SSRF through token realms and redirects, downgrades, credential leaks, and the
node's allow-list of images.

A socket guard (autouse) refuses and records any connection this test process tries
to make to an address outside loopback: a failing test here can never reach a
metadata service or a private network, and "refused before connecting" is asserted.
"""

from __future__ import annotations

import ipaddress
import pathlib
import socket
import time
from typing import Iterator

import grpc
import pytest

import faultproxy as fp
from conftest import DRIVER_NAME, PRIVATE_AUTH, RunningDriver, fast_pull_config, start_driver, stop_driver
from csi_wasm.config import ConfigError, DriverConfig, NodeConfig, RegistryHostConfig, parse_node_config
from csi_wasm.demo.kubelet import Kubelet
from csi_wasm.demo.push import Pushed, Pusher
from csi_wasm.demo.registry import LocalRegistry
from csi_wasm.demo.wasm_modules import make_module
from csi_wasm.errors import AccessDenied
from csi_wasm.policy import ImagePolicy, validate_pattern
from csi_wasm.reference import parse_reference
from csi_wasm.registry import RegistryClient, forbidden_reason, refuse_forbidden_host
from csi_wasm.server import BackgroundServer, Driver
from csi_wasm.servicers import NO_DEADLINE_SECONDS
from csi_wasm.topology import share_directory

MODULE = make_module(8 * 1024, "hostile-registry")
MiB = 1024 * 1024
CREDS = {"username": PRIVATE_AUTH.username, "password": PRIVATE_AUTH.password}
DENIED = grpc.StatusCode.PERMISSION_DENIED


@pytest.fixture(autouse=True)
def dialled(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    attempts: list[object] = []
    connect = socket.socket.connect

    def guarded(self: socket.socket, address: object) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            host = ipaddress.ip_address(str(address[0]).split("%")[0])  # type: ignore[index]
            if not host.is_loopback:
                attempts.append(address)
                raise ConnectionRefusedError(f"test guard: {host} is not loopback")
        connect(self, address)  # type: ignore[arg-type]

    monkeypatch.setattr(socket.socket, "connect", guarded)
    return attempts


@pytest.fixture(scope="module")
def pushed(pusher: Pusher) -> Pushed:
    return pusher.wasm_artifact("hostile/registry", "v1", MODULE)



def _image(pushed: Pushed, host: str) -> str:
    return f"{host}/{pushed.reference.split('/', 1)[1]}"


def _code(csi: RunningDriver, image: str, secrets: dict[str, str] | None = None) -> tuple[grpc.StatusCode | None, str]:
    volume = csi.inline({"image": image}, secrets)
    try:
        csi.kubelet.mount(volume, timeout=20)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    csi.kubelet.unmount(volume)
    return None, ""


def _nothing_left(csi: RunningDriver) -> None:
    assert csi.mounts_under_kubelet() == []
    assert csi.driver.store.modules() == []
    assert not any(csi.driver.store.tmp_dir.iterdir())


# -- SSRF: token realms and redirects ------------------------------------------------------

FORBIDDEN_REALMS = [
    "https://169.254.169.254/latest/api/token",  # cloud metadata (link-local)
    "https://100.100.100.200/token",  # Alibaba metadata
    "https://[fd00:ec2::254]/token",  # AWS IPv6 metadata
    "https://[::ffff:169.254.169.254]/token",  # the same, IPv4-mapped
    "https://[fe80::1]/token",
    "https://10.0.0.1/token",  # private ranges the registry (on loopback) is not in
    "https://172.16.5.4/token",
    "https://192.168.1.1/token",
    "https://100.64.0.1/token",
    "https://[fc00::1]/token",
]


@pytest.mark.parametrize("realm", FORBIDDEN_REALMS)
def test_a_token_realm_on_a_forbidden_address_is_refused_before_connecting(
    proxy: fp.FaultProxy, proxied_csi: RunningDriver, pushed: Pushed, realm: str, dialled: list[object]
) -> None:
    challenge = f'Bearer realm="{realm}",service="evil",scope="repository:hostile/registry:pull"'
    proxy.add(r"^GET /v2/", fp.status(401, {"WWW-Authenticate": challenge}))
    code, detail = _code(proxied_csi, _image(pushed, proxy.host), CREDS)
    assert code == DENIED, detail
    assert "token realm" in detail and "refused" in detail
    assert dialled == []
    _nothing_left(proxied_csi)


@pytest.mark.parametrize("target", ["http://169.254.169.254/latest/meta-data/", "http://10.0.0.5/v2/x",
                                    "http://[::ffff:a9fe:a9fe]/", "http://192.168.0.1:5000/blob"])  # fmt: skip
@pytest.mark.parametrize("where", ["manifests", "blobs"])
def test_a_redirect_to_a_forbidden_address_is_refused_before_connecting(
    proxy: fp.FaultProxy, proxied_csi: RunningDriver, pushed: Pushed, target: str, where: str, dialled: list[object]
) -> None:
    proxy.add(rf"^GET /v2/hostile/registry/{where}/", fp.redirect_to(target))
    code, detail = _code(proxied_csi, _image(pushed, proxy.host))
    assert code == DENIED, detail
    assert "redirect" in detail
    assert dialled == []
    _nothing_left(proxied_csi)


def test_the_registry_itself_on_a_metadata_address_is_refused(
    proxied_csi: RunningDriver, dialled: list[object]
) -> None:
    for image in ("169.254.169.254/latest/meta-data:v1", "[fd00:ec2::254]/x:v1", "100.100.100.200/x:v1",
                  "[64:ff9b::a9fe:a9fe]/x:v1", "[2002:a9fe:a9fe::1]/x:v1", "[::a9fe:a9fe]/x:v1",
                  "192.0.0.192/opc:v1", "168.63.129.16/machine:v1"):  # fmt: skip
        code, detail = _code(proxied_csi, image)
        assert code == DENIED, detail
    assert dialled == []


@pytest.mark.parametrize(
    "destination, origin, allowed, refused",
    [("169.254.169.254", None, (), True), ("169.254.169.254", "169.254.1.1", ("169.254.0.0/16",), True),
     ("10.1.2.3", None, (), False),  # a pod may name an in-cluster registry
     ("10.1.2.3", "203.0.113.7", (), True),  # a public registry may not point the node at its network
     ("10.1.2.3", "10.9.9.9", (), False),  # a registry in 10/8 may use a token server in 10/8
     ("10.1.2.3", "203.0.113.7", ("10.1.0.0/16",), False),  # unless the admin allows the block
     ("127.0.0.1", "127.0.0.1", (), False), ("127.0.0.1", "203.0.113.7", (), True),
     ("0.0.0.0", "203.0.113.7", (), True), ("::1", "2001:db8::1", (), True),
     ("203.0.113.9", "127.0.0.1", (), False), ("::ffff:10.0.0.1", "203.0.113.7", (), True),
     # IPv4 carried in IPv6: NAT64, 6to4, compatible, translated, Teredo; more metadata services
     ("64:ff9b::a9fe:a9fe", None, (), True), ("64:ff9b:1::a9fe:a9fe", None, (), True),
     ("2002:a9fe:a9fe::1", None, (), True), ("::a9fe:a9fe", None, (), True), ("::ffff:0:a9fe:a9fe", None, (), True),
     ("2001:0:4136:e378:8000:63bf:5601:5601", None, (), True), ("64:ff9b::a00:5", "203.0.113.7", (), True),
     ("64:ff9b::a00:5", None, (), False), ("64:ff9b::cb00:7109", "203.0.113.7", (), False),
     ("192.0.0.192", None, (), True), ("168.63.129.16", None, (), True), ("fd20:ce::254", None, (), True),
     ("::1", None, (), False), ("2001:db8::1", "203.0.113.7", (), False)],
)  # fmt: skip
def test_the_ssrf_rule(destination: str, origin: str | None, allowed: tuple[str, ...], refused: bool) -> None:
    from csi_wasm.registry import resolve

    reason = forbidden_reason(
        resolve(destination), resolve(origin) if origin else None, [ipaddress.ip_network(n) for n in allowed]
    )
    assert (reason is not None) is refused, reason


NAMES = {"metadata.csi-wasm.test": ["169.254.169.254"], "nat64-metadata.csi-wasm.test": ["64:ff9b::a9fe:a9fe"],
         "private.csi-wasm.test": ["10.0.0.7"], "loopback.csi-wasm.test": ["127.0.0.1"],
         "mixed.csi-wasm.test": ["127.0.0.1", "169.254.169.254"]}  # fmt: skip


@pytest.fixture
def hosts_file(tmp_path: pathlib.Path) -> Iterator[None]:
    """Host names the tests resolve: /etc/hosts with NAMES added, bind-mounted over the real one (the test
    session runs in a private mount namespace, so the host never sees it)."""
    import subprocess

    hosts = tmp_path / "hosts"
    extra = "".join(f"{address} {name}\n" for name, addresses in NAMES.items() for address in addresses)
    hosts.write_text(pathlib.Path("/etc/hosts").read_text() + extra)
    subprocess.run(["mount", "--bind", str(hosts), "/etc/hosts"], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", "/etc/hosts"], check=True)


@pytest.mark.usefixtures("hosts_file")
@pytest.mark.parametrize("name", ["metadata", "nat64-metadata", "mixed"])
def test_a_registry_named_by_a_name_that_resolves_to_metadata_is_refused(
    proxied_csi: RunningDriver, proxy: fp.FaultProxy, name: str, dialled: list[object]
) -> None:
    code, detail = _code(proxied_csi, f"{name}.csi-wasm.test:{proxy.port}/x:v1")
    assert code == DENIED and "metadata" in detail, detail
    assert dialled == [] and proxy.count() == 0


@pytest.mark.usefixtures("hosts_file")
def test_a_token_realm_or_redirect_by_name_is_resolved_and_refused(
    proxy: fp.FaultProxy, proxied_csi: RunningDriver, pushed: Pushed, dialled: list[object]
) -> None:
    challenge = 'Bearer realm="https://metadata.csi-wasm.test/token",service="evil"'
    proxy.add(r"^GET /v2/hostile/registry/manifests/", fp.status(401, {"WWW-Authenticate": challenge}), times=1)
    code, detail = _code(proxied_csi, _image(pushed, proxy.host), CREDS)
    assert code == DENIED and "token realm" in detail and "169.254.169.254" in detail, detail
    proxy.add(r"^GET /v2/hostile/registry/blobs/", fp.redirect_to("http://private.csi-wasm.test/v2/x"))
    code, detail = _code(proxied_csi, _image(pushed, proxy.host))
    assert code == DENIED and "redirect" in detail and "10.0.0.0/8" in detail, detail
    assert dialled == []
    _nothing_left(proxied_csi)


@pytest.mark.usefixtures("hosts_file")
def test_a_pod_cannot_name_the_nodes_loopback_by_a_name(proxied_csi: RunningDriver, proxy: fp.FaultProxy) -> None:
    code, detail = _code(proxied_csi, f"loopback.csi-wasm.test:{proxy.port}/x:v1")
    assert code == DENIED and "loopback" in detail, detail
    assert proxy.count() == 0  # it listens there: the refusal came before any connection


def test_refuse_forbidden_host_names_the_reason() -> None:
    with pytest.raises(AccessDenied, match="link-local/metadata"):
        refuse_forbidden_host("169.254.169.254", "token realm", origin="127.0.0.1")
    with pytest.raises(AccessDenied, match="private block 192.168.0.0/16"):
        refuse_forbidden_host("192.168.3.3", "redirect", origin="127.0.0.1")
    refuse_forbidden_host("127.0.0.2", "redirect", origin="127.0.0.1")  # same block: fine


def test_allowed_private_networks_are_validated() -> None:
    assert parse_node_config({"allowed_private_networks": ["10.0.0.0/8"]}).allowed_private_networks == ("10.0.0.0/8",)
    for bad in (["169.254.0.0/16"], ["fe80::/64"], ["10.0.0.0/33"], "10.0.0.0/8", [7]):
        with pytest.raises(ConfigError):
            parse_node_config({"allowed_private_networks": bad})


# -- downgrades and credential leaks -----------------------------------------------------------


@pytest.fixture
def tls_proxies(
    private_registry: LocalRegistry, registry: LocalRegistry, tls_files: tuple[pathlib.Path, pathlib.Path]
) -> Iterator[tuple[fp.FaultProxy, fp.FaultProxy, fp.FaultProxy]]:
    """(A) https in front of the private registry; (B) https on another port in front of the public one,
    standing in for a blob CDN; (C) plain http in front of the public one."""
    cert, key = str(tls_files[0]), str(tls_files[1])
    a = fp.FaultProxy(private_registry.host, "https", upstream_ca=cert, tls=(cert, key)).start()
    b = fp.FaultProxy(registry.host, tls=(cert, key)).start()
    c = fp.FaultProxy(registry.host).start()
    yield a, b, c
    for proxy in (a, b, c):
        proxy.stop()


@pytest.fixture
def private_pushed(private_pusher: Pusher, pusher: Pusher) -> Pushed:
    pusher.wasm_artifact("hostile/private", "v1", MODULE)  # the same blob on the public registry (the "CDN")
    return private_pusher.wasm_artifact("hostile/private", "v1", MODULE)


@pytest.fixture
def tls_csi(
    tmp_path: pathlib.Path, tls_proxies: tuple[fp.FaultProxy, ...], tls_files: tuple[pathlib.Path, pathlib.Path]
) -> Iterator[RunningDriver]:
    registries = {p.host: RegistryHostConfig(ca_bundle=str(tls_files[0])) for p in tls_proxies[:2]}
    running = start_driver(tmp_path, NodeConfig(registries=registries, pull=fast_pull_config()))
    yield running
    stop_driver(running)


def test_https_is_never_downgraded_to_http_by_a_redirect(
    tls_proxies: tuple[fp.FaultProxy, ...], tls_csi: RunningDriver, private_pushed: Pushed
) -> None:
    a, _, plain = tls_proxies
    a.add(r"^GET /v2/hostile/private/blobs/", fp.redirect_to(lambda s: f"http://{plain.host}{s.path}"))
    code, detail = _code(tls_csi, _image(private_pushed, a.host), CREDS)
    assert code == DENIED and "https to http" in detail
    assert plain.count() == 0
    _nothing_left(tls_csi)


def test_credentials_are_not_sent_to_the_host_a_blob_redirects_to(
    tls_proxies: tuple[fp.FaultProxy, ...], tls_csi: RunningDriver, private_pushed: Pushed
) -> None:
    a, cdn, _ = tls_proxies
    a.add(r"^GET /v2/hostile/private/blobs/", fp.redirect_to(lambda s: f"https://{cdn.host}{s.path}"))
    code, detail = _code(tls_csi, _image(private_pushed, a.host), CREDS)
    assert code is None, detail  # the module came from the "CDN"
    assert cdn.count(r"/blobs/") == 1
    assert all("Authorization" not in s.headers for s in cdn.seen())
    assert any(s.headers.get("Authorization", "").startswith("Basic ") for s in a.seen(r"/manifests/"))


def test_a_redirected_host_that_asks_for_credentials_gets_none(
    tls_proxies: tuple[fp.FaultProxy, ...], tls_csi: RunningDriver, private_pushed: Pushed
) -> None:
    a, cdn, _ = tls_proxies
    a.add(r"^GET /v2/hostile/private/blobs/", fp.redirect_to(lambda s: f"https://{cdn.host}{s.path}"))
    challenge = f'Bearer realm="https://{cdn.host}/token",service="phish"'
    cdn.add(r"/blobs/", fp.status(401, {"WWW-Authenticate": challenge}))
    code, detail = _code(tls_csi, _image(private_pushed, a.host), CREDS)
    assert code == DENIED and "only sent to the registry itself" in detail
    assert cdn.count("/token") == 0
    assert all("Authorization" not in s.headers for s in cdn.seen())
    _nothing_left(tls_csi)


def test_a_plain_http_token_realm_on_another_host_is_refused(
    proxy: fp.FaultProxy, proxied_csi: RunningDriver, pushed: Pushed, registry: LocalRegistry
) -> None:
    with fp.FaultProxy(registry.host) as token_server:
        realm = f"http://localhost:{token_server.port}/token"  # another host name, plain http
        proxy.add(r"^GET /v2/", fp.status(401, {"WWW-Authenticate": f'Bearer realm="{realm}",service="s"'}))
        code, detail = _code(proxied_csi, _image(pushed, proxy.host), CREDS)
        assert code == DENIED and "plain http" in detail
        assert token_server.count() == 0


def test_an_https_registry_may_not_send_the_password_to_a_plain_http_realm(
    tls_proxies: tuple[fp.FaultProxy, ...], tls_csi: RunningDriver, private_pushed: Pushed
) -> None:
    a, _, plain = tls_proxies
    realm = f"http://127.0.0.1:{plain.port}/token"  # same host name, but a downgrade
    a.add(r"^GET /v2/", fp.status(401, {"WWW-Authenticate": f'Bearer realm="{realm}",service="s"'}))
    code, detail = _code(tls_csi, _image(private_pushed, a.host), CREDS)
    assert code == DENIED
    assert plain.count() == 0


# -- the node's allow-list ------------------------------------------------------------------------


@pytest.fixture
def allow_csi(tmp_path: pathlib.Path, proxy: fp.FaultProxy) -> Iterator[RunningDriver]:
    node = NodeConfig(pull=fast_pull_config(), allowed_images=(f"{proxy.host}/hostile/*", f"{proxy.host}/team/**"))
    running = start_driver(tmp_path, node.with_insecure([proxy.host]))
    yield running
    stop_driver(running)


def test_a_denied_image_is_refused_before_any_network_call(
    proxy: fp.FaultProxy, allow_csi: RunningDriver, pushed: Pushed, pusher: Pusher
) -> None:
    deep = pusher.wasm_artifact("hostile/deep/er", "v1", make_module(4096, "deep"))
    for image in (_image(deep, proxy.host), f"{proxy.host}/other/x:v1", "registry.example/hostile/registry:v1",
                  f"{proxy.host.replace('127.0.0.1', 'localhost')}/hostile/registry:v1"):  # fmt: skip
        code, detail = _code(allow_csi, image)
        assert code == DENIED and "allowed_images" in detail, image
    assert proxy.count() == 0
    assert _code(allow_csi, _image(pushed, proxy.host)) == (None, "")  # hostile/* allows one level
    assert proxy.count() > 0


def test_a_denied_image_is_refused_even_when_its_module_is_stored(
    proxy: fp.FaultProxy, allow_csi: RunningDriver, pushed: Pushed, pusher: Pusher
) -> None:
    assert _code(allow_csi, _image(pushed, proxy.host)) == (None, "")
    pusher.wasm_artifact("denied/same", "v1", MODULE)  # the same module under a name the node refuses
    seen = proxy.count()
    code, _ = _code(allow_csi, f"{proxy.host}/denied/same:v1")
    assert code == DENIED and proxy.count() == seen


@pytest.mark.parametrize(
    "pattern, image, allowed",
    [("registry.example/filters/*", "registry.example/filters/rate", True),
     ("registry.example/filters/*", "registry.example/filters/a/b", False),
     ("registry.example/filters/**", "registry.example/filters/a/b", True),
     ("registry.example/filters/*", "registry.example/filtersx/a", False),
     ("registry.example/*", "registry.example:5000/a", False),
     ("*.corp.example/**", "r1.corp.example/a/b", True),
     ("*.corp.example/**", "corp.example/a", False),
     ("*.corp.example/**", "evil.example/r1.corp.example/a", False),
     ("REGISTRY.example/a", "registry.example/a", True),
     ("docker.io/library/*", "nginx", True),
     ("registry.example/a-*", "registry.example/a-b", True),
     ("registry.example/a", "registry.example/a@sha256:" + "0" * 64, True)],
)  # fmt: skip
def test_allow_list_patterns(pattern: str, image: str, allowed: bool) -> None:
    assert ImagePolicy([pattern]).allows(parse_reference(image)) is allowed
    assert ImagePolicy([]).allows(parse_reference(image))


@pytest.mark.parametrize("pattern", ["", "nginx", "/a", "a/", "a b/c", "r.example/***", "r.example/a\n", "x" * 600])
def test_bad_allow_list_patterns_are_configuration_errors(pattern: str) -> None:
    assert validate_pattern(pattern)
    with pytest.raises(ConfigError):
        parse_node_config({"allowed_images": [pattern]})


# -- hostile answers: manifests and token services ---------------------------------------------------

FAILED = grpc.StatusCode.FAILED_PRECONDITION
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
GOOD_LAYER = {"mediaType": "application/wasm", "digest": "sha256:" + "1" * 64, "size": 10}


def _manifest(**fields: object) -> bytes:
    import json

    return json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json"} | fields).encode()


HOSTILE_MANIFESTS = [
    ("200,000 nested arrays", b"[" * 200_000 + b"]" * 200_000, "JSON values"),
    ("5,000 nested arrays", b"[" * 5_000 + b"]" * 5_000, "nested too deeply"),
    ("5,000 nested objects", b'{"a":' * 5_000 + b"1" + b"}" * 5_000, "nested too deeply"),
    ("a JSON list", b"[]", "not a JSON object"),
    ("not JSON", b"\x89PNG\r\n", "not JSON"),
    ("layers is a number", _manifest(layers=5), "no layers"),
    ("layers is an object", _manifest(layers={"mediaType": "application/wasm"}), "no layers"),
    ("a layer media type that is a list", _manifest(layers=[GOOD_LAYER | {"mediaType": ["application/wasm"]}]),
     "no Wasm module layer"),
    ("a last layer media type that is an object", _manifest(layers=[{"mediaType": {"a": 1}, "size": 1}]),
     "no Wasm module layer"),
    ("a size that is a string", _manifest(layers=[GOOD_LAYER | {"size": "10"}]), "no valid size"),
    ("a digest that is a list", _manifest(layers=[GOOD_LAYER | {"digest": ["sha256:1"]}]), "not a sha256 digest"),
    ("a media type that is a number", _manifest(layers=[GOOD_LAYER]) .replace(b'"application/vnd.oci.image.manifest.v1+json"', b"7"),
     "unsupported manifest media type"),
    ("manifests is a number (index)", _manifest(mediaType="application/vnd.oci.image.index.v1+json", manifests=7),
     "lists no manifests"),
    ("a platform that is a list (index)",
     _manifest(mediaType="application/vnd.oci.image.index.v1+json",
               manifests=[{"digest": "sha256:" + "2" * 64, "platform": ["wasm"]}] * 2), "expected exactly one"),
    ("a schema 1 media type", _manifest(mediaType="application/vnd.docker.distribution.manifest.v1+prettyjws",
                                        layers=[GOOD_LAYER]), "unsupported manifest media type"),
    ("an image config's media type", _manifest(mediaType="application/vnd.oci.image.config.v1+json",
                                               layers=[GOOD_LAYER]), "unsupported manifest media type"),
    ("no layers", _manifest(layers=[]), "the manifest has no layers"),
    ("layers missing", _manifest(), "the manifest has no layers"),
    ("layers that are not objects", _manifest(layers=["application/wasm", 7, None]), "the manifest has no layers"),
    ("two module layers of two layouts", _manifest(layers=[
        GOOD_LAYER, GOOD_LAYER | {"mediaType": "application/vnd.module.wasm.content.layer.v1+wasm"}]), "2 Wasm layers"),
    ("only a tar layer that is not last", _manifest(layers=[
        GOOD_LAYER | {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip"},
        GOOD_LAYER | {"mediaType": "text/plain"}]), "layer media types: application/vnd.oci.image.layer.v1.tar+gzip, text/plain"),
    ("a negative size", _manifest(layers=[GOOD_LAYER | {"size": -1}]), "no valid size"),
    ("a size that is true", _manifest(layers=[GOOD_LAYER | {"size": True}]), "no valid size"),
    ("a size that is a float", _manifest(layers=[GOOD_LAYER | {"size": 10.5}]), "no valid size"),
    ("no size", _manifest(layers=[{k: v for k, v in GOOD_LAYER.items() if k != "size"}]), "no valid size"),
    ("a size of 2**62", _manifest(layers=[GOOD_LAYER | {"size": 2**62}]), "over the node's limit"),
    ("a sha512 digest", _manifest(layers=[GOOD_LAYER | {"digest": "sha512:" + "1" * 128}]), "not a sha256 digest"),
    ("a sha256 digest in upper case", _manifest(layers=[GOOD_LAYER | {"digest": "sha256:" + "A" * 64}]),
     "not a sha256 digest"),
    ("a sha256 digest one digit short", _manifest(layers=[GOOD_LAYER | {"digest": "sha256:" + "1" * 63}]),
     "not a sha256 digest"),
    ("a digest that is a path", _manifest(layers=[GOOD_LAYER | {"digest": "sha256:../../../etc/passwd"}]),
     "not a sha256 digest"),
    ("no manifests (index)", _manifest(mediaType="application/vnd.oci.image.index.v1+json", manifests=[]),
     "lists no manifests"),
    ("a sha512 child (index)", _manifest(mediaType="application/vnd.oci.image.index.v1+json",
                                         manifests=[{"digest": "sha512:" + "2" * 128, "platform": {"os": "wasip1"}}]),
     "not a sha256 digest"),
    ("two wasm children (index)", _manifest(mediaType="application/vnd.docker.distribution.manifest.list.v2+json",
                                            manifests=[{"digest": "sha256:" + "2" * 64, "platform": {"os": "wasip1"}},
                                                       {"digest": "sha256:" + "3" * 64, "platform": {"architecture": "wasm"}}]),
     "2 for platform wasm"),
]  # fmt: skip


@pytest.mark.parametrize("body, message", [(b, m) for _, b, m in HOSTILE_MANIFESTS], ids=[n for n, _, _ in HOSTILE_MANIFESTS])
def test_hostile_manifests_are_refused_precisely(
    proxy: fp.FaultProxy, proxied_csi: RunningDriver, pushed: Pushed, body: bytes, message: str
) -> None:
    proxy.add(r"^GET /v2/hostile/registry/manifests/", fp.status(200, {"Content-Type": "application/json"}, body))
    code, detail = _code(proxied_csi, _image(pushed, proxy.host))
    assert (code, message in detail) == (FAILED, True), detail
    _nothing_left(proxied_csi)


def test_a_config_descriptor_claiming_exabytes_is_never_fetched(
    proxy: fp.FaultProxy, proxied_csi: RunningDriver, pushed: Pushed
) -> None:
    """Only the module's layer is read: a config that would exhaust the disk or the memory costs nothing."""
    layer = {"mediaType": "application/wasm", "digest": pushed.layer_digest, "size": len(MODULE)}
    config = {"mediaType": "application/vnd.wasm.config.v0+json", "digest": "sha256:" + "3" * 64, "size": 2**62}
    proxy.add(r"^GET /v2/hostile/registry/manifests/",
              fp.status(200, {"Content-Type": "application/json"}, _manifest(config=config, layers=[layer])))  # fmt: skip
    volume = proxied_csi.inline({"image": _image(pushed, proxy.host)})
    assert (proxied_csi.kubelet.mount(volume, timeout=20) / "plugin.wasm").read_bytes() == MODULE
    assert proxy.count(r"/blobs/sha256:3333") == 0 and proxy.count(rf"^GET /v2/hostile/registry/blobs/{layer['digest']}") == 1
    proxied_csi.kubelet.unmount(volume)


TOKEN_ANSWERS = [
    ("not JSON", fp.status(200, {}, b"<html>sign in</html>"), UNAVAILABLE, "not JSON"),
    ("a JSON list", fp.status(200, {}, b'["token"]'), UNAVAILABLE, "not a JSON object"),
    ("nested 30,000 deep", fp.status(200, {}, b"[" * 30_000 + b"]" * 30_000), UNAVAILABLE, "JSON values"),
    ("nested 5,000 deep", fp.status(200, {}, b"[" * 5_000 + b"]" * 5_000), UNAVAILABLE, "nested too deeply"),
    ("no token", fp.status(200, {}, b'{"expires_in": 60}'), UNAVAILABLE, "no usable token"),
    ("a token that is a number", fp.status(200, {}, b'{"token": 12345}'), UNAVAILABLE, "no usable token"),
    ("a token with a space", fp.status(200, {}, b'{"token": "a b"}'), UNAVAILABLE, "no usable token"),
    ("a token that injects a header", fp.status(200, {}, b'{"token": "a\\r\\nX-Evil: 1"}'), UNAVAILABLE,
     "no usable token"),
    ("a token of 9,000 bytes", fp.status(200, {}, b'{"token": "' + b"t" * 9000 + b'"}'), UNAVAILABLE,
     "no usable token"),
    ("gzip the client did not ask for", fp.status(200, {"Content-Encoding": "gzip"}, __import__("gzip").compress(
        b'{"token": "zipped"}')), UNAVAILABLE, "not JSON"),
    ("an endless body", fp.endless_chunked(), FAILED, "exceeds the node's limit"),
    ("headers dripped", fp.drip_headers(0.5), UNAVAILABLE, "deadline"),
    ("HTTP 401", fp.status(401), DENIED, "refused the pod credentials"),
    ("HTTP 503", fp.status(503), UNAVAILABLE, "gave up after 2 attempts"),
    ("HTTP 500 with a 1 MiB body", fp.status(500, {}, b"e" * MiB), UNAVAILABLE, "answered HTTP 500 (gave up after 2"),
    ("HTTP 500 with an endless body", fp.endless_chunked(code=500, fill=b"e"), UNAVAILABLE,
     "answered HTTP 500 (gave up after 2"),
    ("HTTP 404", fp.status(404), UNAVAILABLE, "token service answered HTTP 404"),
    ("HTTP 403", fp.status(403), DENIED, "refused the pod credentials"),
    ("a redirect", fp.redirect_to("http://169.254.169.254/token"), UNAVAILABLE, "answered HTTP 307"),
    ("expires_in that is a word", fp.status(200, {}, b'{"token": "ok", "expires_in": "soon"}'), None, ""),
    ("expires_in NaN", fp.status(200, {}, b'{"token": "ok", "expires_in": NaN}'), None, ""),
    ("expires_in 1e308", fp.status(200, {}, b'{"token": "ok", "expires_in": 1e308}'), None, ""),
    ("expires_in negative", fp.status(200, {}, b'{"token": "ok", "expires_in": -5}'), None, ""),
    ("access_token", fp.status(200, {}, b'{"access_token": "ok"}'), None, ""),
]  # fmt: skip


@pytest.mark.parametrize("answer, expected, message", [(a, e, m) for _, a, e, m in TOKEN_ANSWERS],
                         ids=[n for n, _, _, _ in TOKEN_ANSWERS])  # fmt: skip
def test_hostile_token_service_answers(
    proxy: fp.FaultProxy, proxied_csi: RunningDriver, pushed: Pushed, answer: fp.Fault,
    expected: grpc.StatusCode | None, message: str, dialled: list[object],
) -> None:  # fmt: skip
    proxy.add(r"^GET /token", answer)
    proxy.add(r"^GET /v2/", fp.challenge(f"http://{proxy.host}/token"))
    code, detail = _code(proxied_csi, _image(pushed, proxy.host), CREDS)
    assert (code, message in detail) == (expected, True), detail
    sent = {s.headers.get("Authorization", "") for s in proxy.seen(r"^GET /v2/")} - {""}
    assert sent == ({"Bearer ok"} if expected is None else set())  # nothing else ever became a header
    assert dialled == []
    # an error answer is not read (the endless one would run to 2 GiB): what the proxy wrote is what socket
    # buffers took before the driver hung up
    assert proxy.bytes_sent(r"^GET /token") < 64 * MiB
    if expected is not None:
        _nothing_left(proxied_csi)


# -- how long a token from a hostile answer is used (the registry client's injected clock; no sleeps) ------------

TOKEN_LIFETIMES = [
    # expires_in as the token service wrote it, and how long the driver may use the token: the lifetime,
    # 60 s when it is not a positive finite number, at most a day, and always 10 s less (refreshed early)
    ("3600", b"3600", 3590.0),
    ("absent", None, 50.0),
    ("negative", b"-5", 50.0),
    ("zero", b"0", 50.0),
    ("a word", b'"soon"', 50.0),
    ("true", b"true", 50.0),
    ("NaN", b"NaN", 50.0),
    ("Infinity", b"Infinity", 50.0),
    ("1e308", b"1e308", 24 * 3600.0 - 10.0),
]


class SteppedClock:
    """Monotonic time plus what the test adds: the registry client's deadlines keep working."""

    def __init__(self) -> None:
        self.added = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.added


def _driver_with_client(tmp_path: pathlib.Path, node: NodeConfig, client: RegistryClient) -> RunningDriver:
    """``conftest.start_driver``, with the registry client (and so its clock) given by the test."""
    config = DriverConfig(DRIVER_NAME, "test-node", f"unix://{tmp_path}/csi/csi.sock", tmp_path / "state",
                          tmp_path / "kubelet", node)  # fmt: skip
    share_directory(config.kubelet_dir / "pods")
    pathlib.Path(config.socket_path).parent.mkdir(parents=True, exist_ok=True)
    server = BackgroundServer(Driver(config, registry_client=client))
    return RunningDriver(server.driver, Kubelet(config.socket_path, config.kubelet_dir), config, server)


@pytest.mark.parametrize("expires_in, usable", [(e, u) for _, e, u in TOKEN_LIFETIMES],
                         ids=[n for n, _, _ in TOKEN_LIFETIMES])  # fmt: skip
def test_a_token_is_used_for_a_bounded_lifetime_whatever_expires_in_says(
    tmp_path: pathlib.Path, proxy: fp.FaultProxy, pushed: Pushed, expires_in: bytes | None, usable: float
) -> None:
    answer = b'{"token": "ok"' + (b', "expires_in": ' + expires_in if expires_in is not None else b"") + b"}"
    proxy.add(r"^GET /token", fp.status(200, {}, answer))
    proxy.add(r"^(GET|HEAD) /v2/", fp.challenge(f"http://{proxy.host}/token"))
    node = NodeConfig(pull=fast_pull_config()).with_insecure([proxy.host])
    clock = SteppedClock()
    running = _driver_with_client(tmp_path, node, RegistryClient(node, clock=clock))
    image = _image(pushed, proxy.host)
    try:
        for added, tokens in ((0.0, 1), (usable - 1.0, 1), (usable + 1.0, 2)):
            clock.added = added
            # pullPolicy Always asks the registry every time (a HEAD for the tag), with the token while it is valid
            volume = running.inline({"image": image, "pullPolicy": "Always"}, CREDS)
            # a call without a deadline: kubelet's would be on real monotonic time, which the stepped clock passed
            running.kubelet.mount(volume, timeout=2 * NO_DEADLINE_SECONDS)
            running.kubelet.unmount(volume)
            assert proxy.count(r"^GET /token") == tokens, (added, proxy.count(r"^GET /token"))
    finally:
        stop_driver(running)
