"""A hostile registry must not hang, starve or exhaust the driver (issue 13, items 3 to 7).

Every exchange has a total deadline, headers included; error bodies are read only a
few KiB, undecoded; sessions to registries are bounded; slow publishes leave gRPC
workers for Probe, capabilities and warm publishes, and one registry cannot take
every download slot. Memory under a real limit is tests/test_memory.py.
"""

from __future__ import annotations

import pathlib
import selectors
import socket
import threading
import time
from dataclasses import replace
from typing import Iterator

import grpc
import pytest

import faultproxy as fp
from conftest import RunningDriver, start_driver, stop_driver
from csi_wasm.config import NodeConfig, PullConfig
from csi_wasm.demo.push import Pushed, Pusher
from csi_wasm.demo.wasm_modules import make_module
from csi_wasm.errors import ModuleNotFound
from csi_wasm.reference import parse_reference
from csi_wasm.registry import RegistryClient
from csi_wasm.mounts import unmount_path
from csi_wasm.topology import share_directory

MODULE = make_module(32 * 1024, "availability")
UNAVAILABLE, NOT_FOUND = grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND
# kubelet's deadline in these tests: far longer than any bound the driver sets itself (a few seconds),
# so an answer before it shows the driver's own bound, however loaded the machine is
CALL_TIMEOUT = 60.0


def _pull(**overrides: object) -> PullConfig:
    base = PullConfig(connect_timeout_seconds=1.0, read_timeout_seconds=2.0, attempts=2, max_wait_seconds=30.0)
    return replace(base, **overrides)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def pushed(pusher: Pusher) -> Pushed:
    return pusher.wasm_artifact("availability/filter", "v1", MODULE)


def _through(pushed: Pushed, proxy: fp.FaultProxy) -> str:
    return f"{proxy.host}/{pushed.reference.split('/', 1)[1]}"


def _repo(pushed: Pushed) -> str:
    return pushed.reference.split("/", 1)[1].rsplit(":", 1)[0]


def _start(tmp_path: pathlib.Path, hosts: list[str], **pull: object) -> RunningDriver:
    return start_driver(tmp_path, NodeConfig(pull=_pull(**pull)).with_insecure(hosts))


def _failure(running: RunningDriver, image: str) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as failure:
        running.kubelet.mount(running.volume(image), timeout=CALL_TIMEOUT)
    return failure.value.code(), failure.value.details() or ""


# -- item 4: a total deadline for every exchange, headers included --------------------------------


def test_dripped_manifest_headers_end_at_the_exchanges_deadline(
    tmp_path: pathlib.Path, proxy: fp.FaultProxy, pushed: Pushed
) -> None:
    """One header byte every 0.5 s never trips a 2 s read timeout; the exchange's own bound (two read
    timeouts) ends it. Without it the call ran into kubelet's deadline (DEADLINE_EXCEEDED)."""
    proxy.add(rf"^GET /v2/{_repo(pushed)}/manifests/", fp.drip_headers(0.5))
    running = _start(tmp_path, [proxy.host])
    try:
        code, detail = _failure(running, _through(pushed, proxy))
        assert code == UNAVAILABLE and "deadline" in detail, detail
        assert proxy.count(rf"/manifests/") == 1  # a timeout is not retried inside the call
        assert running.mounts_under_kubelet() == [] and running.driver.store.modules() == []
    finally:
        proxy.clear()
        stop_driver(running)


def test_dripped_blob_headers_free_the_download_slot_at_the_download_deadline(
    tmp_path: pathlib.Path, proxy: fp.FaultProxy, pushed: Pushed
) -> None:
    """The publish would wait 30 s (max_wait_seconds); the download itself ends at its own 3 s deadline,
    headers included, and the publish says so. Before, the download held its slot until the headers
    were complete, and the publish answered only at max_wait ("continues")."""
    proxy.add(rf"^GET /v2/{_repo(pushed)}/blobs/{pushed.layer_digest}", fp.drip_headers(0.5))
    running = _start(tmp_path, [proxy.host], download_timeout_seconds=3.0)
    try:
        code, detail = _failure(running, _through(pushed, proxy))
        assert code == UNAVAILABLE and "deadline" in detail and "continues" not in detail, detail
        assert running.driver.puller._flights == {}  # the slot is free again
        assert not any(running.driver.store.tmp_dir.iterdir())
    finally:
        proxy.clear()
        stop_driver(running)


# -- item 3: error bodies are read a few KiB at most, never decoded -------------------------------


def test_an_endless_error_body_is_not_read(tmp_path: pathlib.Path, proxy: fp.FaultProxy, pushed: Pushed) -> None:
    proxy.add(rf"^GET /v2/{_repo(pushed)}/manifests/", fp.endless_chunked(code=404, fill=b"["))
    running = _start(tmp_path, [proxy.host])
    try:
        code, detail = _failure(running, _through(pushed, proxy))
        assert code == NOT_FOUND, detail
        # the client hung up after a few KiB; the rest of what the proxy wrote sat in socket buffers
        assert proxy.bytes_sent("/manifests/") < 16 * 1024 * 1024
    finally:
        proxy.clear()
        stop_driver(running)


def test_error_bodies_give_their_codes_but_are_never_inflated(
    tmp_path: pathlib.Path, proxy: fp.FaultProxy, pushed: Pushed
) -> None:
    import gzip

    plain = b'{"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]}'
    proxy.add(r"/manifests/plain$", fp.status(404, {"Content-Type": "application/json"}, plain))
    proxy.add(r"/manifests/zipped$", fp.status(404, {"Content-Encoding": "gzip"}, gzip.compress(plain)))
    running = _start(tmp_path, [proxy.host])
    try:
        repo = f"{proxy.host}/{_repo(pushed)}"
        assert _failure(running, f"{repo}:plain") == (NOT_FOUND, f"image {repo}:plain: not found in registry "
                                                                 f"{proxy.host}: MANIFEST_UNKNOWN")  # fmt: skip
        code, detail = _failure(running, f"{repo}:zipped")
        assert code == NOT_FOUND and "MANIFEST_UNKNOWN" not in detail  # read as it came: gzip, not JSON
    finally:
        stop_driver(running)


# -- item 7: a bounded set of sessions --------------------------------------------------------------


class KeepAliveRegistries:
    """``count`` registries (one port each) that answer every request 404 and keep the connection open,
    as real registries do. ``open_connections`` is how many connections clients still hold open."""

    BODY = b'{"errors":[{"code":"NAME_UNKNOWN"}]}'

    def __init__(self, count: int) -> None:
        self._selector = selectors.DefaultSelector()
        self.ports: list[int] = []
        for _ in range(count):
            listener = socket.socket()
            listener.bind(("127.0.0.1", 0))
            listener.listen(16)
            listener.setblocking(False)
            self._selector.register(listener, selectors.EVENT_READ, "listener")
            self.ports.append(listener.getsockname()[1])
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def hosts(self) -> list[str]:
        return [f"127.0.0.1:{port}" for port in self.ports]

    def open_connections(self) -> int:
        with self._lock:
            return len(self._open)

    def _serve(self) -> None:
        answer = (f"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: {len(self.BODY)}"
                  "\r\n\r\n").encode() + self.BODY  # fmt: skip
        while not self._stop.is_set():
            for key, _ in self._selector.select(0.05):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if key.data == "listener":
                    connection, _ = sock.accept()
                    self._selector.register(connection, selectors.EVENT_READ, b"")
                    with self._lock:
                        self._open.add(connection)
                    continue
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if not data:  # the client closed it
                    self._selector.unregister(sock)
                    sock.close()
                    with self._lock:
                        self._open.discard(sock)
                    continue
                pending = key.data + data
                while b"\r\n\r\n" in pending:
                    _, pending = pending.split(b"\r\n\r\n", 1)
                    sock.sendall(answer)
                self._selector.modify(sock, selectors.EVENT_READ, pending)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for key in list(self._selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self._selector.close()


@pytest.fixture
def many_registries() -> Iterator[KeepAliveRegistries]:
    registries = KeepAliveRegistries(48)
    yield registries
    registries.close()


def test_connections_to_many_registries_stay_bounded(
    tmp_path: pathlib.Path, many_registries: KeepAliveRegistries
) -> None:
    """Each registry keeps its connection alive after answering; the driver keeps at most
    MAX_SESSIONS of them (least recently used closed first). It used to keep one per host for ever."""
    from csi_wasm.registry.sessions import MAX_SESSIONS

    running = _start(tmp_path, many_registries.hosts)
    try:
        for host in many_registries.hosts:
            assert _failure(running, f"{host}/nothing/here:v1")[0] == NOT_FOUND
        assert MAX_SESSIONS < len(many_registries.hosts)
        assert _eventually(lambda: 0 < many_registries.open_connections() <= MAX_SESSIONS), (
            many_registries.open_connections()
        )
    finally:
        stop_driver(running)


def test_idle_sessions_are_closed(many_registries: KeepAliveRegistries) -> None:
    from csi_wasm.registry.sessions import IDLE_SECONDS

    now = [time.monotonic()]
    client = RegistryClient(NodeConfig(pull=_pull()).with_insecure(many_registries.hosts), clock=lambda: now[0])
    try:
        for host in many_registries.hosts[:3]:
            with pytest.raises(ModuleNotFound):
                client.fetch_manifest(parse_reference(f"{host}/x:v1"), None)
        assert many_registries.open_connections() == 3  # kept alive for the next pull from each
        now[0] += IDLE_SECONDS + 1
        with pytest.raises(ModuleNotFound):
            client.fetch_manifest(parse_reference(f"{many_registries.hosts[3]}/x:v1"), None)
        assert _eventually(lambda: many_registries.open_connections() == 1)
    finally:
        client.close()


def test_a_retired_session_closes_its_connections_even_while_a_response_is_kept(
    many_registries: KeepAliveRegistries,
) -> None:
    """A response kept alive (a traceback holds one) references its connection pool; retiring the session
    must still close that pool's connections (urllib3 leaves it to the garbage collector)."""
    from csi_wasm.registry.sessions import IDLE_SECONDS, SessionPool
    from csi_wasm.registry.watchdog import WatchSlot

    now = [0.0]
    pool = SessionPool(WatchSlot(), clock=lambda: now[0])
    first, second = many_registries.hosts[:2]
    with pool.use("http", first, True) as session:
        kept = session.get(f"http://{first}/v2/", timeout=10)
        kept.content  # read to the end: the connection goes back to the session's pool, kept alive
    assert _eventually(lambda: many_registries.open_connections() == 1)
    now[0] += IDLE_SECONDS + 1
    with pool.use("http", second, True) as session:  # the first session is idle: retired and closed
        session.get(f"http://{second}/v2/", timeout=10).content
    assert _eventually(lambda: many_registries.open_connections() == 1)  # only the second's
    assert kept.status_code == 404
    pool.close()


def test_a_request_on_a_session_retired_under_it_leaves_no_connection_open(
    many_registries: KeepAliveRegistries,
) -> None:
    """A session retired (and closed) while a request is about to start on it: the request opens a new
    connection pool on it, which the session's second close, when that request is done, closes."""
    from csi_wasm.registry.sessions import IDLE_SECONDS, SessionPool
    from csi_wasm.registry.watchdog import WatchSlot

    now = [0.0]
    pool = SessionPool(WatchSlot(), clock=lambda: now[0])
    first, second = many_registries.hosts[:2]
    with pool.use("http", first, True) as held:
        now[0] += IDLE_SECONDS + 1
        with pool.use("http", second, True) as other:  # retires the first session (idle), closing it
            other.get(f"http://{second}/v2/", timeout=10).content
        held.get(f"http://{first}/v2/", timeout=10).content  # the request that had its session
        assert _eventually(lambda: many_registries.open_connections() == 2)
    assert _eventually(lambda: many_registries.open_connections() == 1)  # closed when its request was done
    pool.close()
    assert _eventually(lambda: many_registries.open_connections() == 0)


def _eventually(condition: object, timeout: float = 10.0) -> bool:
    from conftest import wait_for

    return wait_for(condition, timeout)  # type: ignore[arg-type]


# -- item 5: slow publishes leave workers for the rest; one registry cannot take every download slot ----


@pytest.fixture
def healthy_proxy(registry: object) -> Iterator[fp.FaultProxy]:
    with fp.FaultProxy(registry.host) as running:  # type: ignore[attr-defined]
        yield running


def test_a_dripping_registry_next_to_a_healthy_one(
    tmp_path: pathlib.Path, pusher: Pusher, proxy: fp.FaultProxy, healthy_proxy: fp.FaultProxy
) -> None:
    """30 publishes from a registry whose blobs drip (more than the gRPC server has workers): 4 wait (the
    per-registry cap), the rest are refused at once; 2 of their downloads run (the per-registry download
    cap), 2 queue. Meanwhile Probe, capabilities, a publish of a stored module and a cold publish from a
    healthy registry all answer. Then the dripping registry heals and the 4 waiting publishes complete."""
    from csi_wasm._gen import csi_pb2

    hostile = [pusher.wasm_artifact(f"availability/hostile-{i}", "v1", make_module(4096, f"hostile-{i}"))
               for i in range(30)]  # fmt: skip
    warm = pusher.wasm_artifact("availability/warm", "v1", make_module(4096, "warm"))
    cold = pusher.wasm_artifact("availability/cold", "v1", make_module(4096, "cold"))
    running = _start(tmp_path, [proxy.host, healthy_proxy.host], max_pulling_publishes=6,
                     max_pulling_publishes_per_registry=4, max_concurrent_downloads=4,
                     max_concurrent_downloads_per_registry=2, max_wait_seconds=120.0)  # fmt: skip
    kubelet = running.kubelet
    stored = running.volume(_through(warm, healthy_proxy))
    kubelet.mount(stored, timeout=CALL_TIMEOUT)
    proxy.add(r"^GET /v2/availability/hostile-\d+/blobs/sha256:", fp.drip(600.0, pieces=600))
    outcomes: dict[str, grpc.StatusCode | None] = {}
    start = threading.Barrier(len(hostile))

    def publish(volume: object) -> None:
        start.wait()
        try:
            kubelet.mount(volume, timeout=CALL_TIMEOUT)  # type: ignore[arg-type]
            outcomes[volume.volume_id] = None  # type: ignore[attr-defined]
        except grpc.RpcError as exc:
            outcomes[volume.volume_id] = exc.code()  # type: ignore[attr-defined]

    volumes = [running.volume(_through(p, proxy)) for p in hostile]
    threads = [threading.Thread(target=publish, args=(v,), daemon=True) for v in volumes]
    try:
        for thread in threads:
            thread.start()
        settled = _eventually(lambda: len(outcomes) + proxy.count("/manifests/") >= len(hostile), timeout=30)
        assert settled, "hostile publishes were neither admitted nor refused: the gRPC workers are all parked"
        assert _eventually(lambda: proxy.count("/blobs/") == 2)
        assert list(outcomes.values()) == [UNAVAILABLE] * (len(hostile) - 4)  # refused at once, not queued
        assert running.driver.puller._admission.pulling_now(proxy.host) == 4
        assert running.driver.puller._downloads.queued(proxy.host) == 2  # waiting their turn, not running

        ready = kubelet.identity.Probe(csi_pb2.ProbeRequest(), timeout=10)
        assert ready.ready.value
        kubelet.node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest(), timeout=10)
        again = running.volume(_through(warm, healthy_proxy))
        assert (kubelet.mount(again, timeout=CALL_TIMEOUT) / "plugin.wasm").read_bytes() == make_module(4096, "warm")
        other = running.volume(_through(cold, healthy_proxy))
        assert (kubelet.mount(other, timeout=20) / "plugin.wasm").read_bytes() == make_module(4096, "cold")
        assert healthy_proxy.count(rf"/blobs/{cold.layer_digest}") == 1
        assert proxy.count("/blobs/") == 2  # the hostile registry's queued downloads still wait
    finally:
        proxy.clear()
        for thread in threads:
            thread.join(CALL_TIMEOUT)
    try:
        assert sorted(outcomes.values(), key=str) == sorted([UNAVAILABLE] * (len(hostile) - 4) + [None] * 4, key=str)
        assert proxy.count("/blobs/") == 4
        for volume in [stored, again, other] + [v for v in volumes if outcomes[v.volume_id] is None]:
            kubelet.unmount(volume)
    finally:
        stop_driver(running)


# -- item 8: the free-space floor while writing; a full disk is RESOURCE_EXHAUSTED ----------------


@pytest.fixture
def small_disk(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    """A 32 MiB filesystem for the driver's state (a tmpfs, inside the tests' private mount namespace)."""
    import subprocess

    state = tmp_path / "state"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "csi-wasm-test", str(state)], check=True)
    yield state
    subprocess.run(["umount", "-l", str(state)], check=True)


def _compat(pusher: Pusher, name: str, size: int) -> Pushed:
    """A compat image whose few-KB layer inflates to a module of ``size`` bytes."""
    return pusher.compat_image(f"availability/{name}", "v1", make_module(size, name))


def test_the_free_space_floor_holds_while_a_module_is_written(
    tmp_path: pathlib.Path, small_disk: pathlib.Path, registry: object, pusher: Pusher
) -> None:
    """The layer is a few KB, so the floor holds at the start; the module it inflates to does not fit
    above the floor. Before, the floor was checked only against the layer's size."""
    from csi_wasm.config import StoreConfig

    big = _compat(pusher, "inflates-12m", 12 * 1024 * 1024)
    second = _compat(pusher, "inflates-12m-second", 12 * 1024 * 1024)
    node = NodeConfig(pull=_pull(), store=StoreConfig(min_free_bytes=16 * 1024 * 1024))
    running = start_driver(tmp_path, node.with_insecure([registry.host]))  # type: ignore[attr-defined]
    try:
        first = running.volume(big.reference)
        running.kubelet.mount(first, timeout=CALL_TIMEOUT)  # 32 -> 20 MiB free: above the floor
        code, detail = _failure(running, second.reference)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "floor" in detail, detail
        store = running.driver.store
        assert [m.digest for m in store.modules()] == [big.module_digest]
        assert not any(store.tmp_dir.iterdir())
        running.kubelet.unmount(first)
    finally:
        stop_driver(running)


def test_a_full_disk_is_resource_exhausted_and_leaves_nothing(
    tmp_path: pathlib.Path, small_disk: pathlib.Path, registry: object, pusher: Pusher
) -> None:
    from csi_wasm.config import StoreConfig

    huge = _compat(pusher, "inflates-40m", 40 * 1024 * 1024)
    node = NodeConfig(pull=_pull(), store=StoreConfig(min_free_bytes=0))  # no floor: the disk fills up
    running = start_driver(tmp_path, node.with_insecure([registry.host]))  # type: ignore[attr-defined]
    try:
        code, detail = _failure(running, huge.reference)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "full" in detail, detail
        assert running.driver.store.modules() == [] and not any(running.driver.store.tmp_dir.iterdir())
        assert running.mounts_under_kubelet() == []
    finally:
        stop_driver(running)


# -- readiness: until start-up recovery ends, the driver says so ----------------------------------


def test_not_ready_until_start_up_recovery_has_finished(
    tmp_path: pathlib.Path, registry: object, pusher: Pusher
) -> None:
    """Probe ready=false, publish and unpublish UNAVAILABLE, /healthz 503 while recovery runs (here it waits
    for an event); then ready, 200 and a working publish."""
    import urllib.error
    import urllib.request

    from conftest import DRIVER_NAME
    from csi_wasm._gen import csi_pb2
    from csi_wasm.config import DriverConfig
    from csi_wasm.demo.kubelet import InlineVolume, Kubelet, new_pod_uid
    from csi_wasm.http import MetricsServer
    from csi_wasm.recovery import RecoveryReport
    from csi_wasm.server import Driver, serve

    release, recovering = threading.Event(), threading.Event()

    class SlowRecovery(Driver):
        def recover(self) -> RecoveryReport:
            recovering.set()
            release.wait(60)
            return super().recover()

    config = DriverConfig(DRIVER_NAME, "test-node", f"unix://{tmp_path}/csi/csi.sock", tmp_path / "state",
                          tmp_path / "kubelet", NodeConfig(pull=_pull()).with_insecure([registry.host]))  # type: ignore[attr-defined]  # fmt: skip
    share_directory(config.kubelet_dir / "pods")
    (tmp_path / "csi").mkdir()
    driver = SlowRecovery(config)
    stop = threading.Event()
    server = threading.Thread(target=serve, args=(driver, stop), daemon=True)
    server.start()
    metrics = MetricsServer("127.0.0.1", 0, driver.metrics.registry, driver.is_ready).start()
    kubelet = Kubelet(config.socket_path, config.kubelet_dir)

    def healthz() -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics.port}/healthz", timeout=30) as answer:
                return int(answer.status)
        except urllib.error.HTTPError as refused:
            return refused.code

    try:
        assert recovering.wait(30)
        assert not kubelet.identity.Probe(csi_pb2.ProbeRequest(), timeout=30).ready.value
        assert healthz() == 503
        image = pusher.wasm_artifact("availability/filter", "v1", MODULE).reference
        volume = InlineVolume(new_pod_uid(), "app", "default", "wasm", {"image": image})
        with pytest.raises(grpc.RpcError) as failure:
            kubelet.mount(volume, timeout=CALL_TIMEOUT)
        assert failure.value.code() == UNAVAILABLE and "recovering" in (failure.value.details() or "")
        with pytest.raises(grpc.RpcError) as failure:
            kubelet.unmount(volume, timeout=CALL_TIMEOUT)
        assert failure.value.code() == UNAVAILABLE
        release.set()
        assert driver._ready.wait(30)
        assert kubelet.identity.Probe(csi_pb2.ProbeRequest(), timeout=30).ready.value
        assert healthz() == 200
        assert (kubelet.mount(volume, timeout=CALL_TIMEOUT) / "plugin.wasm").read_bytes() == MODULE
        kubelet.unmount(volume)
    finally:
        release.set()
        kubelet.close()
        metrics.stop()
        stop.set()
        server.join(60)
        unmount_path(config.kubelet_dir / "pods")



# -- a burst of one new module costs the registry one manifest GET and one blob GET ------------------


def test_a_burst_of_publishes_of_one_tag_resolves_it_once(
    tmp_path: pathlib.Path, proxy: fp.FaultProxy, pusher: Pusher
) -> None:
    """16 pods of one new tag at once: the manifest is fetched once (the registry holds it until all 16 are
    waiting), the blob once; every pod gets the module."""
    burst = pusher.wasm_artifact("availability/burst", "v1", make_module(8192, "burst"))
    proxy.add(r"/availability/burst/manifests/v1$", fp.hold())
    running = _start(tmp_path, [proxy.host], read_timeout_seconds=30.0)
    volumes = [running.volume(_through(burst, proxy)) for _ in range(16)]
    errors: list[BaseException] = []

    def publish(volume: object) -> None:
        try:
            running.kubelet.mount(volume, timeout=CALL_TIMEOUT)  # type: ignore[arg-type]
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(v,)) for v in volumes]
    try:
        for thread in threads:
            thread.start()
        assert _eventually(lambda: running.driver.puller._admission.pulling_now(proxy.host) == 16, timeout=30)
    finally:
        proxy.clear()
        for thread in threads:
            thread.join(CALL_TIMEOUT)
    try:
        assert errors == []
        assert proxy.count("/manifests/") == 1 and proxy.count("/blobs/") == 1
        for volume in volumes:
            assert (running.kubelet.target_path(volume) / "plugin.wasm").read_bytes() == make_module(8192, "burst")
            running.kubelet.unmount(volume)
    finally:
        stop_driver(running)
