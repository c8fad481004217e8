"""Private registries (TLS + basic auth), credentials in every form, mirrors, caps, pull policies,
single-flight downloads and tenant isolation, all against real registry processes."""

from __future__ import annotations

import base64
import json
import pathlib
import socket
import subprocess
import sys
import threading
from dataclasses import replace
from typing import Iterator

import grpc
import pytest

from csi_wasm.config import NodeConfig, PullConfig, RegistryHostConfig
from csi_wasm.credentials import MAX_CREDENTIAL_CHARS
from csi_wasm.demo.push import Pusher
from csi_wasm.demo.registry import LocalRegistry
from csi_wasm.demo.wasm_modules import make_module, sha256_digest

from conftest import PRIVATE_AUTH, RunningDriver, fast_pull_config, start_driver, stop_driver, wait_for

PRIVATE_MODULE = make_module(6000, "private")


@pytest.fixture(scope="module")
def private_image(private_pusher: Pusher) -> str:
    return private_pusher.wasm_artifact("team/private-filter", "v1", PRIVATE_MODULE).reference


def _node(private_registry: LocalRegistry, tls_files: tuple[pathlib.Path, pathlib.Path], **extra: object) -> NodeConfig:
    registries = {private_registry.host: RegistryHostConfig(ca_bundle=str(tls_files[0]))}
    return NodeConfig(registries=registries, pull=fast_pull_config(), **extra)  # type: ignore[arg-type]


@pytest.fixture
def private_csi(
    tmp_path: pathlib.Path, private_registry: LocalRegistry, tls_files: tuple[pathlib.Path, pathlib.Path]
) -> Iterator[RunningDriver]:
    running = start_driver(tmp_path, _node(private_registry, tls_files))
    yield running
    stop_driver(running)


def _secret_forms(host: str) -> dict[str, dict[str, str]]:
    auth = base64.b64encode(f"{PRIVATE_AUTH.username}:{PRIVATE_AUTH.password}".encode()).decode()
    return {
        "username-password": {"username": PRIVATE_AUTH.username, "password": PRIVATE_AUTH.password},
        "dockerconfigjson": {".dockerconfigjson": json.dumps({"auths": {host: {"auth": auth}}})},
        "dockerconfigjson-fields": {".dockerconfigjson": json.dumps(
            {"auths": {f"https://{host}": {"username": PRIVATE_AUTH.username, "password": PRIVATE_AUTH.password}}})},
        "dockercfg": {".dockercfg": json.dumps({host: {"auth": auth}})},
    }  # fmt: skip


@pytest.mark.parametrize("form", ["username-password", "dockerconfigjson", "dockerconfigjson-fields", "dockercfg"])
def test_each_secret_form_authenticates(
    private_csi: RunningDriver, private_registry: LocalRegistry, private_image: str, form: str
) -> None:
    volume = private_csi.inline({"image": private_image}, _secret_forms(private_registry.host)[form])
    target = private_csi.kubelet.mount(volume)
    assert (target / "plugin.wasm").read_bytes() == PRIVATE_MODULE
    private_csi.kubelet.unmount(volume)


def test_node_wide_docker_config_authenticates(
    tmp_path: pathlib.Path, private_registry: LocalRegistry, tls_files: tuple[pathlib.Path, pathlib.Path],
    private_image: str,
) -> None:  # fmt: skip
    config = tmp_path / "docker-config.json"
    config.write_text(_secret_forms(private_registry.host)["dockerconfigjson"][".dockerconfigjson"])
    running = start_driver(tmp_path / "driver", _node(private_registry, tls_files, docker_config=str(config)))
    try:
        volume = running.volume(private_image)
        assert (running.kubelet.mount(volume) / "plugin.wasm").read_bytes() == PRIVATE_MODULE
        running.kubelet.unmount(volume)
    finally:
        stop_driver(running)


def test_wrong_credentials_are_permission_denied(private_csi: RunningDriver, private_image: str) -> None:
    volume = private_csi.inline({"image": private_image}, {"username": PRIVATE_AUTH.username, "password": "wrong"})
    with pytest.raises(grpc.RpcError) as failure:
        private_csi.kubelet.mount(volume)
    assert failure.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "nodePublishSecretRef" in (failure.value.details() or "")
    assert private_csi.mounts_under_kubelet() == [] and private_csi.driver.store.modules() == []


def test_no_credentials_for_a_private_registry_is_permission_denied(
    private_csi: RunningDriver, private_image: str
) -> None:
    with pytest.raises(grpc.RpcError) as failure:
        private_csi.kubelet.mount(private_csi.volume(private_image))
    assert failure.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_malformed_secret_is_invalid(private_csi: RunningDriver, private_image: str) -> None:
    volume = private_csi.inline({"image": private_image}, {".dockerconfigjson": "{not json"})
    with pytest.raises(grpc.RpcError) as failure:
        private_csi.kubelet.mount(volume)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def _oversized_secrets(host: str) -> list[tuple[str, dict[str, str], str]]:
    """Credentials too long for any request header (a wrong file pasted into the Secret, say)."""
    huge = "x" * (MAX_CREDENTIAL_CHARS + 1)
    auth = base64.b64encode(f"{PRIVATE_AUTH.username}:{huge}".encode()).decode()
    return [
        ("password", {"username": PRIVATE_AUTH.username, "password": huge},
         f"nodePublishSecretRef: the password is {len(huge)} characters"),
        ("username", {"username": huge, "password": "p"}, f"nodePublishSecretRef: the username is {len(huge)} characters"),
        ("dockerconfigjson auth", {".dockerconfigjson": json.dumps({"auths": {host: {"auth": auth}}})},
         f".dockerconfigjson: the password for '{host}' is {len(huge)} characters"),
        ("dockerconfigjson fields", {".dockerconfigjson": json.dumps({"auths": {host: {"username": huge, "password": "p"}}})},
         f".dockerconfigjson: the username for '{host}' is {len(huge)} characters"),
        ("dockercfg", {".dockercfg": json.dumps({host: {"auth": auth}})},
         f".dockercfg: the password for '{host}' is {len(huge)} characters"),
    ]  # fmt: skip


@pytest.mark.parametrize("form", ["password", "username", "dockerconfigjson auth", "dockerconfigjson fields", "dockercfg"])
def test_oversized_credentials_are_invalid_not_sent(
    private_csi: RunningDriver, private_registry: LocalRegistry, private_image: str, form: str
) -> None:
    """Sent, a 1 MiB password drew HTTP 431 from the registry: UNAVAILABLE, retried by kubelet for ever."""
    (secrets, message), = [(s, m) for f, s, m in _oversized_secrets(private_registry.host) if f == form]
    volume = private_csi.inline({"image": private_image}, secrets)
    with pytest.raises(grpc.RpcError) as failure:
        private_csi.kubelet.mount(volume)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (failure.value.details() or "").startswith(message), failure.value.details()
    assert private_csi.mounts_under_kubelet() == []
    at_the_limit = {"username": PRIVATE_AUTH.username, "password": "x" * MAX_CREDENTIAL_CHARS}
    with pytest.raises(grpc.RpcError) as sent:  # the longest allowed is sent, and the registry has its say
        private_csi.kubelet.mount(private_csi.inline({"image": private_image}, at_the_limit))
    assert sent.value.code() == grpc.StatusCode.PERMISSION_DENIED, sent.value.details()


def test_secrets_never_reach_the_logs(
    private_csi: RunningDriver, private_image: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG", logger="csi_wasm")
    good = private_csi.inline({"image": private_image}, {"username": PRIVATE_AUTH.username,
                                                         "password": PRIVATE_AUTH.password})  # fmt: skip
    private_csi.kubelet.mount(good)
    bad = private_csi.inline({"image": private_image}, {"username": "x", "password": "another-Secret-value"})
    with pytest.raises(grpc.RpcError):
        private_csi.kubelet.mount(bad)
    private_csi.kubelet.unmount(good)
    text = caplog.text + "".join(str(getattr(r, "event_fields", "")) for r in caplog.records)
    assert "publish" in text  # the events were captured
    for secret in (PRIVATE_AUTH.password, "another-Secret-value",
                   base64.b64encode(f"{PRIVATE_AUTH.username}:{PRIVATE_AUTH.password}".encode()).decode()):  # fmt: skip
        assert secret not in text


def test_tls_is_verified_by_default(
    tmp_path: pathlib.Path, private_registry: LocalRegistry, private_image: str
) -> None:
    # the registry is declared (loopback registries must be) but given no ca_bundle for its self-signed cert
    node = NodeConfig(registries={private_registry.host: RegistryHostConfig()}, pull=fast_pull_config())
    running = start_driver(tmp_path, node)
    try:
        volume = running.inline({"image": private_image},
                                {"username": PRIVATE_AUTH.username, "password": PRIVATE_AUTH.password})  # fmt: skip
        with pytest.raises(grpc.RpcError) as failure:
            running.kubelet.mount(volume)
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "TLS verification" in (failure.value.details() or "")
    finally:
        stop_driver(running)


def test_a_pod_cannot_point_the_driver_at_an_undeclared_loopback_registry(
    tmp_path: pathlib.Path, registry: LocalRegistry, pusher: Pusher
) -> None:
    pushed = pusher.wasm_artifact("loopback/filter", "v1", make_module(2000, "loopback"))
    running = start_driver(tmp_path, NodeConfig(pull=fast_pull_config()))  # 127.0.0.1 not in the node config
    try:
        with pytest.raises(grpc.RpcError) as failure:
            running.kubelet.mount(running.volume(pushed.reference))
        assert failure.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "loopback" in (failure.value.details() or "")
        registry.sync()
        assert _manifest_gets(registry, "loopback/filter") == 0  # refused before connecting
    finally:
        stop_driver(running)


def test_a_pod_cannot_mark_a_registry_insecure(csi: RunningDriver) -> None:
    volume = csi.volume("registry.example/a/b:v1", insecure="true")
    with pytest.raises(grpc.RpcError) as failure:
        csi.kubelet.mount(volume)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "insecure" in (failure.value.details() or "")


# -- tenant isolation on the shared store ------------------------------------


def test_a_cached_private_module_is_not_served_to_a_pod_without_access(
    private_csi: RunningDriver, private_image: str
) -> None:
    creds = {"username": PRIVATE_AUTH.username, "password": PRIVATE_AUTH.password}
    owner = private_csi.inline({"image": private_image}, creds)
    private_csi.kubelet.mount(owner)
    assert private_csi.driver.store.has(sha256_digest(PRIVATE_MODULE))
    for secrets in ({}, {"username": PRIVATE_AUTH.username, "password": "guess"}):
        intruder = private_csi.inline({"image": private_image}, secrets)
        with pytest.raises(grpc.RpcError) as failure:
            private_csi.kubelet.mount(intruder)
        assert failure.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert not private_csi.kubelet.target_path(intruder).exists()
    # a pinned digest reference goes through the same check
    entry = next(iter(private_csi.driver.store.manifests_dir.iterdir()))
    by_digest = private_image.rsplit(":", 1)[0] + "@sha256:" + entry.stem
    with pytest.raises(grpc.RpcError) as failure:
        private_csi.kubelet.mount(private_csi.volume(by_digest))
    assert failure.value.code() == grpc.StatusCode.PERMISSION_DENIED
    second = private_csi.inline({"image": private_image}, creds)  # a pod with access shares the copy
    private_csi.kubelet.mount(second)
    private_csi.kubelet.unmount(second)
    private_csi.kubelet.unmount(owner)


# -- registry reachability, mirrors, caps -------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_unreachable_registry_is_unavailable_after_a_bounded_number_of_attempts(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = _closed_port()
    host = f"127.0.0.1:{port}"
    attempts: list[object] = []  # the driver runs in this process: count its connection attempts
    connect = socket.socket.connect

    def counted(self: socket.socket, address: object) -> None:
        attempts.append(address)
        connect(self, address)  # type: ignore[arg-type]

    monkeypatch.setattr(socket.socket, "connect", counted)
    running = start_driver(tmp_path, NodeConfig(pull=PullConfig(attempts=3)).with_insecure([host]))
    try:
        with pytest.raises(grpc.RpcError) as failure:
            running.kubelet.mount(running.volume(f"{host}/nobody/home:v1"))
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
        assert host in (failure.value.details() or "")
        # the driver gave up by itself after pull.attempts, well before kubelet's deadline would have
        assert [a for a in attempts if a == ("127.0.0.1", port)] == [("127.0.0.1", port)] * 3
    finally:
        stop_driver(running)


def test_a_missing_tag_is_not_found(csi: RunningDriver, registry: LocalRegistry) -> None:
    with pytest.raises(grpc.RpcError) as failure:
        csi.kubelet.mount(csi.volume(f"{registry.host}/no/such-image:v9"))
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no/such-image:v9" in (failure.value.details() or "")


def test_mirrors_are_tried_before_the_upstream(
    tmp_path: pathlib.Path, registry: LocalRegistry, pusher: Pusher
) -> None:
    module = make_module(3000, "mirrored")
    pusher.wasm_artifact("mirrored/filter", "v1", module)
    upstream = f"127.0.0.1:{_closed_port()}"  # the real upstream is down; the mirror has the image
    node = NodeConfig(
        registries={upstream: RegistryHostConfig(insecure=True, mirrors=(registry.host,)),
                    registry.host: RegistryHostConfig(insecure=True)},
        pull=fast_pull_config(),
    )  # fmt: skip
    running = start_driver(tmp_path, node)
    try:
        volume = running.volume(f"{upstream}/mirrored/filter:v1")
        assert (running.kubelet.mount(volume) / "plugin.wasm").read_bytes() == module
        running.kubelet.unmount(volume)
    finally:
        stop_driver(running)


def test_a_mirror_without_the_image_falls_back_to_the_upstream(
    tmp_path: pathlib.Path, registry: LocalRegistry, pusher: Pusher, tmp_path_factory: pytest.TempPathFactory
) -> None:
    module = make_module(3000, "fallback")
    pusher.wasm_artifact("fallback/filter", "v1", module)
    with LocalRegistry(tmp_path_factory.mktemp("empty-mirror")) as empty:
        node = NodeConfig(
            registries={registry.host: RegistryHostConfig(insecure=True, mirrors=(empty.host,)),
                        empty.host: RegistryHostConfig(insecure=True)},
            pull=fast_pull_config(),
        )  # fmt: skip
        running = start_driver(tmp_path, node)
        try:
            volume = running.volume(f"{registry.host}/fallback/filter:v1")
            assert (running.kubelet.mount(volume) / "plugin.wasm").read_bytes() == module
            assert wait_for(lambda: empty.requests_matching("fallback/filter/manifests") >= 1)
            running.kubelet.unmount(volume)
        finally:
            stop_driver(running)


@pytest.mark.parametrize("cap, expected", [("max_module_bytes", "module"), ("max_manifest_bytes", "manifest")])
def test_size_caps_are_enforced(
    tmp_path: pathlib.Path, registry: LocalRegistry, pusher: Pusher, cap: str, expected: str
) -> None:
    pushed = pusher.wasm_artifact("caps/filter", "v1", make_module(50_000, "caps"))
    node = NodeConfig(pull=replace(fast_pull_config(), **{cap: 200})).with_insecure([registry.host])
    running = start_driver(tmp_path, node)
    try:
        with pytest.raises(grpc.RpcError) as failure:
            running.kubelet.mount(running.volume(pushed.reference))
        assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert expected in (failure.value.details() or "") and "limit" in (failure.value.details() or "")
        assert running.driver.store.modules() == [] and not any(running.driver.store.tmp_dir.iterdir())
    finally:
        stop_driver(running)


# -- pull policies -------------------------------------------------------------


def _manifest_gets(registry: LocalRegistry, repo: str) -> int:
    return registry.requests_matching(rf"method=GET .*uri=\"?/v2/{repo}/manifests/")


def test_if_not_present_serves_a_fresh_tag_from_the_store(
    csi: RunningDriver, registry: LocalRegistry, pusher: Pusher
) -> None:
    pushed = pusher.wasm_artifact("policy/cached", "v1", make_module(3000, "cached"))
    first = csi.volume(pushed.reference)
    csi.kubelet.mount(first)
    assert wait_for(lambda: _manifest_gets(registry, "policy/cached") == 1)
    second = csi.volume(pushed.reference)
    csi.kubelet.mount(second)
    registry.sync()
    assert _manifest_gets(registry, "policy/cached") == 1  # served without the network
    csi.kubelet.unmount(first)
    csi.kubelet.unmount(second)


def test_always_re_resolves_the_tag_and_downloads_only_a_new_digest(
    csi: RunningDriver, registry: LocalRegistry, pusher: Pusher
) -> None:
    old = pusher.wasm_artifact("policy/always", "v1", make_module(3000, "always-old"))
    a = csi.volume(old.reference, pullPolicy="Always")
    csi.kubelet.mount(a)
    b = csi.volume(old.reference, pullPolicy="Always")
    csi.kubelet.mount(b)
    registry.sync()
    # the second publish re-resolves the tag with a HEAD (not a pull on Docker Hub): unchanged, no GET
    assert _manifest_gets(registry, "policy/always") == 1
    assert registry.requests_matching(r'method=HEAD .*uri="?/v2/policy/always/manifests/v1') == 1
    assert registry.blob_gets("policy/always", old.layer_digest) == 1
    new = pusher.wasm_artifact("policy/always", "v1", make_module(3000, "always-new"))
    c = csi.volume(old.reference, pullPolicy="Always")
    assert (csi.kubelet.mount(c) / "plugin.wasm").read_bytes() == make_module(3000, "always-new")
    assert (csi.kubelet.target_path(a) / "plugin.wasm").read_bytes() == make_module(3000, "always-old")
    registry.sync()
    assert registry.blob_gets("policy/always", new.layer_digest) == 1
    for volume in (a, b, c):
        csi.kubelet.unmount(volume)


def test_never_fails_when_absent_and_works_after_csi_wasm_pull(
    csi: RunningDriver, registry: LocalRegistry, pusher: Pusher
) -> None:
    pushed = pusher.wasm_artifact("policy/never", "v1", make_module(3000, "never"))
    with pytest.raises(grpc.RpcError) as failure:
        csi.kubelet.mount(csi.volume(pushed.reference, pullPolicy="Never"))
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND and "Never" in (failure.value.details() or "")
    assert csi.mounts_under_kubelet() == []
    warm = subprocess.run(
        [sys.executable, "-m", "csi_wasm", "pull", "--state-dir", str(csi.config.state_dir),
         "--insecure-registry", registry.host, pushed.reference, pushed.pinned],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert warm.returncode == 0, warm.stderr
    assert pushed.module_digest in warm.stdout
    for image in (pushed.reference, pushed.pinned):
        volume = csi.volume(image, pullPolicy="Never")
        assert (csi.kubelet.mount(volume) / "plugin.wasm").read_bytes() == make_module(3000, "never")
        csi.kubelet.unmount(volume)


def test_an_unknown_pull_policy_is_invalid(csi: RunningDriver, registry: LocalRegistry) -> None:
    with pytest.raises(grpc.RpcError) as failure:
        csi.kubelet.mount(csi.volume(f"{registry.host}/a/b:v1", pullPolicy="Sometimes"))
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "pullPolicy" in (failure.value.details() or "")


# -- single flight -------------------------------------------------------------


def test_concurrent_publishes_of_one_module_download_it_once(
    csi: RunningDriver, registry: LocalRegistry, pusher: Pusher
) -> None:
    module = make_module(8 * 1024 * 1024, "burst")
    pushed = pusher.wasm_artifact("burst/filter", "v1", module)
    volumes = [csi.volume(pushed.reference) for _ in range(16)]
    errors: list[BaseException] = []
    start = threading.Barrier(len(volumes))

    def publish(volume: object) -> None:
        try:
            start.wait()
            csi.kubelet.mount(volume)  # type: ignore[arg-type]
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(v,)) for v in volumes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    registry.sync()
    assert registry.blob_gets("burst/filter", pushed.layer_digest) == 1
    inodes = {(csi.kubelet.target_path(v) / "plugin.wasm").stat().st_ino for v in volumes}
    assert len(inodes) == 1
    for volume in volumes:
        csi.kubelet.unmount(volume)
