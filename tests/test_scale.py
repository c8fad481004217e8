"""What a burst of publishes costs the registry, counted where the registry sees it.

A burst of 64 publishes of a tag not yet on the node costs one manifest GET (two for an
index), one blob GET and one token per scope; a tag re-checked after the tag cache has
expired costs a HEAD (not counted by Docker Hub's pull limit), not a GET; resolutions
are shared per credential only. Every count is taken by the fault proxy in front of a
real registry (it records synchronously) or in the registry's own log.
"""

from __future__ import annotations

import os
import pathlib
import uuid
from typing import Iterator

import grpc
import pytest

from conftest import DRIVER_NAME, PRIVATE_AUTH, RunningDriver, fast_pull_config, start_driver, stop_driver
from csi_wasm.config import DriverConfig, NodeConfig, PullConfig, RegistryHostConfig
from csi_wasm.demo.kubelet import InlineVolume, Kubelet
from csi_wasm.demo.push import Pusher
from csi_wasm.demo.registry import LocalRegistry
from csi_wasm.demo.wasm_modules import make_module
from csi_wasm.server import BackgroundServer, Driver
from csi_wasm.topology import share_directory
from faultproxy import FaultProxy, passthrough, stall_headers, status
from test_bearer_auth import USERS, TokenRegistry, TokenServer, token_setup  # noqa: F401 - token_setup: a fixture

BURST = 64


def _node(*insecure: str, pull: PullConfig | None = None) -> NodeConfig:
    return NodeConfig(pull=pull or fast_pull_config()).with_insecure(list(insecure))


@pytest.fixture
def counted(tmp_path: pathlib.Path, registry: LocalRegistry, proxy: FaultProxy) -> Iterator[RunningDriver]:
    """A driver whose pods name the registry through the counting proxy."""
    running = start_driver(tmp_path, _node(proxy.host, registry.host))
    yield running
    stop_driver(running)


def _fire(csi: RunningDriver, volumes: list[InlineVolume]) -> list[grpc.Future]:
    for volume in volumes:
        csi.kubelet.target_path(volume).parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    return [csi.kubelet.node.NodePublishVolume.future(csi.kubelet.publish_request(v), timeout=60) for v in volumes]


def _burst(csi: RunningDriver, image: str, count: int = BURST, secrets: dict[str, str] | None = None) -> list[InlineVolume]:
    volumes = [csi.inline({"image": image}, secrets) for _ in range(count)]
    for call in _fire(csi, volumes):
        call.result()
    return volumes


def _inodes(csi: RunningDriver, volumes: list[InlineVolume]) -> set[int]:
    return {os.stat(csi.kubelet.target_path(v) / "plugin.wasm").st_ino for v in volumes}


def _unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def test_a_burst_of_64_publishes_of_a_new_tag_costs_one_manifest_get_and_one_blob_get(
    counted: RunningDriver, proxy: FaultProxy, pusher: Pusher
) -> None:
    repo = _unique("burst/tag")
    pusher.wasm_artifact(repo, "v1", make_module(300_000, repo))
    volumes = _burst(counted, f"{proxy.host}/{repo}:v1")
    assert len(_inodes(counted, volumes)) == 1
    assert proxy.count(rf"^GET /v2/{repo}/manifests/") == 1, [x.line for x in proxy.seen()]
    assert proxy.count(rf"^GET /v2/{repo}/blobs/") == 1
    assert proxy.count(rf"^HEAD /v2/{repo}/") == 0, "a tag never seen is fetched at once: a HEAD would add a trip"


def test_a_burst_of_an_index_costs_two_manifest_gets(counted: RunningDriver, proxy: FaultProxy, pusher: Pusher) -> None:
    repo = _unique("burst/index")
    child = pusher.wasm_artifact(repo, "wasm", make_module(20_000, repo))
    pusher.index(repo, "v1", [(child, {"architecture": "wasm", "os": "wasip1"})])
    volumes = _burst(counted, f"{proxy.host}/{repo}:v1")
    assert len(_inodes(counted, volumes)) == 1
    assert proxy.count(rf"^GET /v2/{repo}/manifests/") == 2  # the index, then the child it selects
    assert proxy.count(rf"^GET /v2/{repo}/blobs/") == 1


class Clock:
    """The puller's wall clock, moved by the test (tag cache and proof cache ages)."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _driver_with_clock(tmp_path: pathlib.Path, node: NodeConfig, clock: Clock) -> RunningDriver:
    config = DriverConfig(driver_name=DRIVER_NAME, node_id="test-node", endpoint=f"unix://{tmp_path}/csi/csi.sock",
                          state_dir=tmp_path / "state", kubelet_dir=tmp_path / "kubelet", node=node)  # fmt: skip
    share_directory(config.kubelet_dir / "pods")
    pathlib.Path(config.socket_path).parent.mkdir(parents=True, exist_ok=True)
    server = BackgroundServer(Driver(config, clock=clock))
    return RunningDriver(server.driver, Kubelet(config.socket_path, config.kubelet_dir), config, server)


TAG_CACHE_SECONDS = 300.0


@pytest.fixture
def aging(tmp_path: pathlib.Path, registry: LocalRegistry, proxy: FaultProxy) -> Iterator[tuple[RunningDriver, Clock]]:
    clock = Clock()
    pull = PullConfig(connect_timeout_seconds=2.0, read_timeout_seconds=5.0, attempts=2,
                      tag_cache_seconds=TAG_CACHE_SECONDS)  # fmt: skip
    running = _driver_with_clock(tmp_path, _node(proxy.host, registry.host, pull=pull), clock)
    yield running, clock
    stop_driver(running)


def _gets_and_heads(proxy: FaultProxy, repo: str) -> tuple[int, int]:
    return proxy.count(rf"^GET /v2/{repo}/manifests/"), proxy.count(rf"^HEAD /v2/{repo}/manifests/")


def test_a_stale_tag_is_rechecked_with_a_head_not_a_get(
    aging: tuple[RunningDriver, Clock], proxy: FaultProxy, pusher: Pusher
) -> None:
    """Once the tag cache has expired, a burst re-checks an unchanged tag with one HEAD and no GET; a moved
    tag costs a HEAD and one GET of the new manifest, by the digest the HEAD named."""
    running, clock = aging
    repo = _unique("stale/tag")
    first = pusher.wasm_artifact(repo, "v1", make_module(20_000, f"{repo}-1"))
    image = f"{proxy.host}/{repo}:v1"
    old = _burst(running, image, 16)
    assert _gets_and_heads(proxy, repo) == (1, 0)
    again = _burst(running, image, 16)  # within the tag cache: no request at all
    assert _gets_and_heads(proxy, repo) == (1, 0)

    clock.now += TAG_CACHE_SECONDS + 1
    later = _burst(running, image, 16)
    assert _gets_and_heads(proxy, repo) == (1, 1)  # the tag has not moved: served from the store after a HEAD
    assert _inodes(running, old + again + later) == _inodes(running, old)

    moved = pusher.wasm_artifact(repo, "v1", make_module(20_000, f"{repo}-2"))
    clock.now += TAG_CACHE_SECONDS + 1
    new = _burst(running, image, 16)
    assert _gets_and_heads(proxy, repo) == (2, 2)
    # the new manifest is fetched by the digest the HEAD named, so its bytes are checked against it
    assert proxy.count(rf"^GET /v2/{repo}/manifests/{moved.manifest_digest}$") == 1
    assert first.module_digest != moved.module_digest
    assert len(_inodes(running, new)) == 1 and _inodes(running, new) != _inodes(running, old)


def test_pull_policy_always_rechecks_with_a_head(
    counted: RunningDriver, proxy: FaultProxy, pusher: Pusher
) -> None:
    repo = _unique("always/tag")
    pusher.wasm_artifact(repo, "v1", make_module(20_000, repo))
    image = f"{proxy.host}/{repo}:v1"
    _burst(counted, image, 1)
    volumes = [counted.inline({"image": image, "pullPolicy": "Always"}) for _ in range(3)]
    for volume in volumes:  # one after another: each asks the registry, as Always means
        counted.kubelet.mount(volume, timeout=30)
    assert _gets_and_heads(proxy, repo) == (1, 3)


@pytest.mark.parametrize("digest", [None, "sha256:not-a-digest", "sha512:" + "0" * 128], ids=["none", "bad", "sha512"])
def test_a_head_without_a_usable_digest_falls_back_to_a_get(
    aging: tuple[RunningDriver, Clock], proxy: FaultProxy, pusher: Pusher, digest: str | None
) -> None:
    running, clock = aging
    repo = _unique("stale/nodigest")
    module = make_module(20_000, repo)
    pusher.wasm_artifact(repo, "v1", module)
    image = f"{proxy.host}/{repo}:v1"
    _burst(running, image, 1)
    headers = {"Content-Type": "application/json"} | ({"Docker-Content-Digest": digest} if digest else {})
    proxy.add(rf"^HEAD /v2/{repo}/manifests/", status(200, headers))
    clock.now += TAG_CACHE_SECONDS + 1
    volumes = _burst(running, image, 4)
    assert (running.kubelet.target_path(volumes[0]) / "plugin.wasm").read_bytes() == module
    assert _gets_and_heads(proxy, repo) == (2, 1)
    assert proxy.count(rf"^GET /v2/{repo}/manifests/v1$") == 2  # by tag again, never by what the HEAD said


# -- credentials ---------------------------------------------------------------------------------


def test_a_burst_with_one_credential_costs_one_token_per_scope(
    tmp_path: pathlib.Path, token_setup: tuple[TokenServer, TokenRegistry, Pusher]
) -> None:
    """Bearer auth, for real (a registry in ``auth: token`` mode): 64 pods with the same pull secret cost one
    token request, one manifest GET answered and one blob GET."""
    tokens, guarded, pusher = token_setup
    tokens.requests.clear()
    repo = _unique("team/token-burst")
    pusher.wasm_artifact(repo, "v1", make_module(50_000, repo))
    running = start_driver(tmp_path, _node(guarded.host))
    try:
        secret = {"username": "reader", "password": USERS["reader"]}
        volumes = _burst(running, f"{guarded.host}/{repo}:v1", secrets=secret)
        assert len(_inodes(running, volumes)) == 1
        assert [(r.scope, r.user) for r in tokens.requests] == [(f"repository:{repo}:pull", "reader")]
        guarded.sync()
        answered = r"http\.response\.status=200"
        assert guarded.requests_matching(rf'method=GET .*uri="?/v2/{repo}/manifests/.*{answered}') == 1
        assert guarded.requests_matching(rf'method=GET .*uri="?/v2/{repo}/blobs/.*{answered}') == 1
    finally:
        stop_driver(running)


@pytest.fixture
def private_proxy(
    private_registry: LocalRegistry, tls_files: tuple[pathlib.Path, pathlib.Path]
) -> Iterator[FaultProxy]:
    cert, key = (str(p) for p in tls_files)
    with FaultProxy(private_registry.host, upstream_scheme="https", upstream_ca=cert, tls=(cert, key)) as running:
        yield running


def test_a_pod_without_credentials_never_shares_another_pods_authenticated_resolution(
    tmp_path: pathlib.Path,
    private_proxy: FaultProxy,
    private_pusher: Pusher,
    tls_files: tuple[pathlib.Path, pathlib.Path],
) -> None:
    """The authorised resolution of a private tag is held in flight while pods without credentials (and
    with wrong ones) ask for the same tag: each of those gets the registry's own answer, PERMISSION_DENIED."""
    repo = _unique("team/private-burst")
    module = make_module(30_000, repo)
    private_pusher.wasm_artifact(repo, "v1", module)
    # a read timeout far longer than the hold: the held request must still be the one in flight when released
    node = NodeConfig(registries={private_proxy.host: RegistryHostConfig(ca_bundle=str(tls_files[0]))},
                      pull=PullConfig(connect_timeout_seconds=2.0, read_timeout_seconds=60.0, attempts=2))  # fmt: skip
    running = start_driver(tmp_path, node)
    try:
        image = f"{private_proxy.host}/{repo}:v1"
        good = {"username": PRIVATE_AUTH.username, "password": PRIVATE_AUTH.password}
        bad = {"username": PRIVATE_AUTH.username, "password": "wrong"}
        # the first manifest request (no credentials yet) gets the registry's 401; the second, with the
        # pod's credentials, is held until released: the authorised resolution stays in flight
        private_proxy.add(rf"^GET /v2/{repo}/manifests/", passthrough, times=1)
        private_proxy.add(rf"^GET /v2/{repo}/manifests/", stall_headers(60), times=1)
        leader = _fire(running, [running.inline({"image": image}, good)])
        assert _wait(lambda: private_proxy.count(rf"^GET /v2/{repo}/manifests/") == 2)
        authorised = [running.inline({"image": image}, good) for _ in range(15)]
        anonymous = [running.inline({"image": image}) for _ in range(16)]
        wrong = [running.inline({"image": image}, bad) for _ in range(8)]
        calls = _fire(running, authorised + anonymous + wrong)
        # every pod without (valid) credentials asks the registry itself, while the leader still waits
        assert _wait(lambda: private_proxy.count(rf"^GET /v2/{repo}/manifests/") >= 4)
        private_proxy.clear()
        leader[0].result()
        outcomes = [_outcome(call) for call in calls]
        assert outcomes[:15] == [grpc.StatusCode.OK] * 15
        assert outcomes[15:] == [grpc.StatusCode.PERMISSION_DENIED] * 24
        assert all((running.kubelet.target_path(v) / "plugin.wasm").read_bytes() == module for v in authorised)
        assert not any(running.kubelet.target_path(v).exists() for v in anonymous + wrong)
    finally:
        stop_driver(running)


def _outcome(call: grpc.Future) -> grpc.StatusCode:
    try:
        call.result()
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def _wait(condition: object, timeout: float = 10.0) -> bool:
    from conftest import wait_for

    return wait_for(condition, timeout)  # type: ignore[arg-type]
