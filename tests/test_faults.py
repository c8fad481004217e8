"""Registry faults, injected by a proxy of our own in front of the real registry.

For each fault: the right gRPC code within kubelet's contract, nothing stored,
nothing mounted, the right number of attempts (retries only for transient
failures), and the next publish succeeds once the registry is healthy. Also: a
download outlives the call that started it, and kubelet's retry joins it; and
every integrity check (a manifest's digest when pinned, a compat layer's digest,
a blob's declared size, the store's size cap) is driven into by a registry that
serves otherwise valid bytes, so no other check catches the fault first.

No timing is asserted. A slow fault (a stall, a drip) answers in full after
``SLOW_FAULT_SECONDS``, well inside the call's deadline but long after every bound
the driver sets itself: the expected error can only come from that bound, since
without it the fault would end and the publish succeed, however loaded the machine is.
"""

from __future__ import annotations

import gzip
import json
import pathlib
import random
import re
import socket
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import grpc
import pytest

import faultproxy as fp
from conftest import RunningDriver, start_driver, stop_driver, wait_for
from csi_wasm.config import NodeConfig, PullConfig
from csi_wasm.demo.push import Pushed, Pusher
from csi_wasm.demo.registry import LocalRegistry
from csi_wasm.demo.wasm_modules import make_module
from csi_wasm.errors import RegistryError
from csi_wasm.reference import parse_reference
from csi_wasm.registry import MAX_RETRY_AFTER_SECONDS, RegistryClient, Transient, backoff, parse_retry_after
from csi_wasm.registry.retry import Retrier

MODULE = make_module(64 * 1024, "faults")
UNAVAILABLE, FAILED_PRECONDITION = grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION
KUBELET_DEADLINE_SECONDS = 120.0
CALL_TIMEOUT_SECONDS = 30.0  # kubelet sends 120 s; the driver's own bounds here are a few seconds
# After every bound the driver sets itself, here (read 2 s, a manifest exchange 4 s, max_wait 3 s) and
# with production defaults (read 30 s, a manifest exchange 60 s, max_wait 60 s: tools/soak.py
# --fault-table runs these rows so), and before kubelet's 120 s deadline.
SLOW_FAULT_SECONDS = 90.0


def fault_pull_config() -> PullConfig:
    # read 2 s: a stall ends after 2 s, a manifest exchange after 4 s (two read timeouts);
    # max_wait 3 s: a publish answers UNAVAILABLE after 3 s while its download goes on
    return PullConfig(connect_timeout_seconds=1.0, read_timeout_seconds=2.0, attempts=3,
                      download_timeout_seconds=60.0, max_wait_seconds=3.0)  # fmt: skip


@dataclass(frozen=True)
class FaultCase:
    name: str
    where: str  # "manifest", "blob" or "all" (connection refused)
    fault: fp.Fault | None  # None: the proxy stops listening
    expected: grpc.StatusCode
    attempts: int | None  # requests (connections, when refused) for ``where``: retries only for transient faults
    call_timeout: float = KUBELET_DEADLINE_SECONDS
    download_outlives_call: bool = False
    detail: str = ""  # a pattern the error's message must hold: which bound answered
    slow: bool = False  # ends after SLOW_FAULT_SECONDS: the driver must answer while it still runs


FAULT_CASES = [
    FaultCase("connection refused", "all", None, UNAVAILABLE, 3),
    FaultCase("reset mid-body (manifest)", "manifest", fp.reset_after(100), UNAVAILABLE, 3),
    FaultCase("reset mid-body (blob)", "blob", fp.reset_after(20_000), UNAVAILABLE, 1),
    FaultCase("HTTP 500 (manifest)", "manifest", fp.status(500), UNAVAILABLE, 3),
    FaultCase("HTTP 502 (blob)", "blob", fp.status(502), UNAVAILABLE, 3),
    FaultCase("HTTP 503 (manifest)", "manifest", fp.status(503), UNAVAILABLE, 3),
    FaultCase("HTTP 429, Retry-After: 1 (manifest)", "manifest", fp.status(429, {"Retry-After": "1"}),
              UNAVAILABLE, 3),  # fmt: skip
    FaultCase("truncated body (manifest)", "manifest", fp.truncate_after(100), UNAVAILABLE, 3),
    FaultCase("truncated body (blob)", "blob", fp.truncate_after(20_000), UNAVAILABLE, 1),
    FaultCase("wrong bytes, not JSON (manifest)", "manifest", fp.corrupt, FAILED_PRECONDITION, 1),
    FaultCase("wrong bytes (blob)", "blob", fp.corrupt, FAILED_PRECONDITION, 1),
    # the slow faults: each ends after SLOW_FAULT_SECONDS, so only the driver's own bound can answer first
    FaultCase("stalled headers (manifest)", "manifest", fp.hold(SLOW_FAULT_SECONDS), UNAVAILABLE, 1,
              slow=True),  # fmt: skip
    FaultCase("stalled body (blob)", "blob", fp.hold_tail(count=len(MODULE) - 16, seconds=SLOW_FAULT_SECONDS),
              UNAVAILABLE, 1, detail="read timeout", slow=True),  # fmt: skip
    FaultCase("slow drip under the read timeout (manifest)", "manifest", fp.drip(SLOW_FAULT_SECONDS, pieces=400),
              UNAVAILABLE, 1, detail="deadline", slow=True),  # fmt: skip
    FaultCase("slow drip under the read timeout (blob)", "blob", fp.drip(SLOW_FAULT_SECONDS, pieces=400),
              UNAVAILABLE, 1, download_outlives_call=True, detail="continues", slow=True),  # fmt: skip
    FaultCase("headers dripped (manifest)", "manifest", fp.drip_headers(total_seconds=SLOW_FAULT_SECONDS),
              UNAVAILABLE, 1, detail="deadline", slow=True),  # fmt: skip
    FaultCase("headers dripped (blob)", "blob", fp.drip_headers(total_seconds=SLOW_FAULT_SECONDS), UNAVAILABLE, 1,
              download_outlives_call=True, detail="continues", slow=True),  # fmt: skip
    FaultCase("redirect loop (manifest)", "manifest", fp.redirect_loop, UNAVAILABLE, 6),
    FaultCase("oversized manifest (5 MiB)", "manifest", fp.oversized(5 * 1024 * 1024), FAILED_PRECONDITION, 1),
    FaultCase("endless chunked body (manifest)", "manifest", fp.endless_chunked(), FAILED_PRECONDITION, 1),
    FaultCase("endless chunked body (blob)", "blob", fp.endless_chunked(), FAILED_PRECONDITION, 1),
]


def request_pattern(pushed: Pushed, where: str) -> str:
    repo = pushed.reference.split("/", 1)[1].rsplit(":", 1)[0]
    return {"manifest": rf"^GET /v2/{repo}/manifests/", "blob": rf"^GET /v2/{repo}/blobs/{pushed.layer_digest}",
            "all": r"^GET "}[where]  # fmt: skip


@dataclass
class Outcome:
    code: grpc.StatusCode | None
    seconds: float
    detail: str


def inject_and_publish(case: FaultCase, proxy: fp.FaultProxy, csi: RunningDriver, pushed: Pushed) -> Outcome:
    """Inject ``case``, publish once through the proxy; return the code and the time to error."""
    proxy.arm()
    if case.fault is None:
        proxy.refuse()
    else:
        proxy.add(request_pattern(pushed, case.where), case.fault)
    image = pushed.reference.replace(pushed.reference.split("/", 1)[0], proxy.host, 1)
    volume = csi.volume(image)
    started = time.monotonic()
    try:
        csi.kubelet.mount(volume, timeout=case.call_timeout)
    except grpc.RpcError as exc:
        return Outcome(exc.code(), time.monotonic() - started, exc.details() or "")
    return Outcome(None, time.monotonic() - started, "")


def heal(case: FaultCase, proxy: fp.FaultProxy) -> None:
    if case.fault is None:
        proxy.accept()
    proxy.clear()


# -- fixtures ------------------------------------------------------------------


@pytest.fixture(scope="module")
def pushed(pusher: Pusher) -> Pushed:
    return pusher.wasm_artifact("faults/raw", "v1", MODULE)



def _start(tmp_path: pathlib.Path, proxy: fp.FaultProxy, **pull: object) -> RunningDriver:
    node = NodeConfig(pull=replace(fault_pull_config(), **pull)).with_insecure([proxy.host])  # type: ignore[arg-type]
    return start_driver(tmp_path, node)


@pytest.fixture
def fault_csi(tmp_path: pathlib.Path, proxy: fp.FaultProxy) -> Iterator[RunningDriver]:
    running = _start(tmp_path, proxy)
    yield running
    stop_driver(running)


def _proxied(pushed: Pushed, proxy: fp.FaultProxy) -> str:
    return pushed.reference.replace(pushed.reference.split("/", 1)[0], proxy.host, 1)


# -- the fault table -------------------------------------------------------------


@pytest.fixture
def connects(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every address this process connects a TCP socket to (the driver runs in it): attempts a proxy that
    refuses connections never sees."""
    addresses: list[object] = []
    connect = socket.socket.connect

    def counted(self: socket.socket, address: object) -> None:
        addresses.append(address)
        connect(self, address)  # type: ignore[arg-type]

    monkeypatch.setattr(socket.socket, "connect", counted)
    return addresses


@pytest.mark.parametrize("case", FAULT_CASES, ids=[c.name for c in FAULT_CASES])
def test_fault(
    case: FaultCase, proxy: fp.FaultProxy, fault_csi: RunningDriver, pushed: Pushed, connects: list[object]
) -> None:
    outcome = inject_and_publish(case, proxy, fault_csi, pushed)
    if case.slow:  # the driver answered while the fault still ran: its own bound cut it short
        assert proxy.finished(request_pattern(pushed, case.where)) == 0, outcome
    assert outcome.code == case.expected, outcome.detail
    assert re.search(case.detail, outcome.detail), outcome.detail
    store = fault_csi.driver.store
    assert fault_csi.mounts_under_kubelet() == []
    assert not fault_csi.kubelet.target_path(fault_csi.volumes[-1]).exists()
    assert fault_csi.driver.records.all() == []
    if case.fault is None:
        assert case.attempts is not None, "a refused connection is counted at the client: say how many"
        assert [a for a in connects if a == ("127.0.0.1", proxy.port)] == [("127.0.0.1", proxy.port)] * case.attempts
    elif case.attempts is not None:
        assert proxy.count(request_pattern(pushed, case.where)) == case.attempts, proxy.seen()
    if not case.download_outlives_call:
        assert store.modules() == []
        assert wait_for(lambda: not any(store.tmp_dir.iterdir())), "a partial download was left in the store"
    heal(case, proxy)
    volume = fault_csi.volume(_proxied(pushed, proxy))
    assert (fault_csi.kubelet.mount(volume, timeout=30) / "plugin.wasm").read_bytes() == MODULE
    fault_csi.kubelet.unmount(volume)
    assert fault_csi.mounts_under_kubelet() == []


def test_retries_back_off_and_honour_retry_after(
    proxy: fp.FaultProxy, fault_csi: RunningDriver, pushed: Pushed
) -> None:
    proxy.add(request_pattern(pushed, "manifest"), fp.status(429, {"Retry-After": "1"}), times=2)
    volume = fault_csi.volume(_proxied(pushed, proxy))
    assert (fault_csi.kubelet.mount(volume, timeout=30) / "plugin.wasm").read_bytes() == MODULE
    asks = proxy.seen(request_pattern(pushed, "manifest"))
    assert len(asks) == 3
    gaps = [b.at - a.at for a, b in zip(asks, asks[1:])]
    assert all(gap >= 0.95 for gap in gaps), gaps  # the registry asked for a second; it got it
    fault_csi.kubelet.unmount(volume)


def test_a_transient_blip_is_retried_and_succeeds(
    proxy: fp.FaultProxy, fault_csi: RunningDriver, pushed: Pushed
) -> None:
    proxy.add(request_pattern(pushed, "blob"), fp.status(503), times=1)
    proxy.add(request_pattern(pushed, "manifest"), fp.reset_after(50), times=1)
    volume = fault_csi.volume(_proxied(pushed, proxy))
    assert (fault_csi.kubelet.mount(volume, timeout=30) / "plugin.wasm").read_bytes() == MODULE
    assert proxy.count(request_pattern(pushed, "blob")) == 2
    assert proxy.count(request_pattern(pushed, "manifest")) == 2
    fault_csi.kubelet.unmount(volume)


def test_a_retry_after_longer_than_the_deadline_fails_at_once(
    proxy: fp.FaultProxy, fault_csi: RunningDriver, pushed: Pushed
) -> None:
    """Retry-After (capped at 10 s) is longer than what is left of a 5 s call: no retry, an answer at once."""
    proxy.add(request_pattern(pushed, "manifest"), fp.status(503, {"Retry-After": "3600"}))
    with pytest.raises(grpc.RpcError) as failure:
        fault_csi.kubelet.mount(fault_csi.volume(_proxied(pushed, proxy)), timeout=5)
    assert failure.value.code() == UNAVAILABLE and "deadline" in (failure.value.details() or "")
    assert proxy.count(request_pattern(pushed, "manifest")) == 1  # did not sleep into the deadline


# -- issue 3: a download outlives the call that started it ------------------------


def test_a_download_outlives_the_call_and_the_retry_joins_it(
    proxy: fp.FaultProxy, fault_csi: RunningDriver, registry: LocalRegistry
) -> None:
    module = make_module(96 * 1024, "outlives")
    slow = Pusher(registry.host).wasm_artifact("faults/outlives", "v1", module)
    blob = request_pattern(slow, "blob")
    proxy.add(blob, fp.drip(600.0, pieces=600))  # a piece a second (under the read timeout), until released
    volume = fault_csi.volume(_proxied(slow, proxy))
    with pytest.raises(grpc.RpcError) as failure:
        fault_csi.kubelet.mount(volume, timeout=CALL_TIMEOUT_SECONDS)  # answered after max_wait_seconds
    assert failure.value.code() == UNAVAILABLE and "continues" in (failure.value.details() or "")
    assert fault_csi.mounts_under_kubelet() == [] and not fault_csi.kubelet.target_path(volume).exists()
    assert any(fault_csi.driver.store.tmp_dir.iterdir()), "the download should still be running"
    proxy.clear()  # the registry recovers: the rest of the blob arrives
    target = fault_csi.kubelet.mount(volume, timeout=CALL_TIMEOUT_SECONDS)  # kubelet's retry, same volume
    assert (target / "plugin.wasm").read_bytes() == module
    assert proxy.count(blob) == 1  # the retry joined the download (or found it done): one GET
    fault_csi.kubelet.unmount(volume)


# -- the proxy's own faults ------------------------------------------------------


def test_the_proxys_reset_comes_after_the_bytes_it_promised(proxy: fp.FaultProxy, pusher: Pusher) -> None:
    """A reset throws away what is still in the proxy's send queue: the proxy waits until the client's kernel
    has the promised bytes (3 MiB, more than the socket buffers hold), so "reset after N bytes" means N."""
    large = pusher.wasm_artifact("faults/reset", "v1", make_module(4 * 1024 * 1024, "reset"))
    promised = 3 * 1024 * 1024
    proxy.add(request_pattern(large, "blob"), fp.reset_after(promised))
    received = bytearray()
    with socket.socket() as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a slow reader: the proxy's queue fills
        client.connect(("127.0.0.1", proxy.port))
        client.sendall(f"GET /v2/faults/reset/blobs/{large.layer_digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        with pytest.raises(ConnectionResetError):
            while chunk := client.recv(1024):
                received += chunk
    assert len(received.partition(b"\r\n\r\n")[2]) == promised


# -- retry arithmetic, driven directly ---------------------------------------------


def test_backoff_is_exponential_capped_and_jittered() -> None:
    random.seed(1234)
    for number in range(1, 8):
        base = min(0.2 * 2 ** (number - 1), 2.0)
        samples = [backoff(number) for _ in range(200)]
        assert all(0.5 * base <= s <= 1.5 * base for s in samples)
        assert len({round(s, 6) for s in samples}) > 150  # jitter: no two clients retry in lockstep
    # Retry-After is a floor (capped), with a spread above it so turned-away clients do not return at once
    long = [backoff(1, retry_after=3600) for _ in range(200)]
    assert all(MAX_RETRY_AFTER_SECONDS <= s <= 1.5 * MAX_RETRY_AFTER_SECONDS for s in long)
    short = [backoff(1, retry_after=0.5) for _ in range(200)]
    assert all(0.5 <= s <= 1.5 for s in short) and max(short) - min(short) > 0.5


def test_retries_are_bounded_and_stop_at_the_deadline() -> None:
    now = [0.0]
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    retrier = Retrier(attempts=4, clock=lambda: now[0], sleep=sleep)
    calls = []

    def flaky() -> None:
        calls.append(now[0])
        raise Transient("HTTP 503")

    with pytest.raises(RegistryError):
        retrier.run(flaky)
    assert len(calls) == 4 and len(sleeps) == 3
    calls.clear()
    sleeps.clear()
    with pytest.raises(RegistryError, match="deadline"):
        retrier.run(lambda: (_ for _ in ()).throw(Transient("429", retry_after=8.0)), deadline=5.0)
    assert sleeps == []  # sleeping 8 s would pass the deadline: give up at once
    non_transient = []

    def not_found() -> None:
        non_transient.append(1)
        raise RegistryError("HTTP 400")

    with pytest.raises(RegistryError):
        retrier.run(not_found)
    assert non_transient == [1]  # a non-transient failure is never retried


@pytest.mark.parametrize(
    "header, expected",
    [("", None), ("3", 3.0), ("  12 ", 12.0), ("soon", None), ("-1", None), ("99999999999999", 1e9),
     ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0)],
)  # fmt: skip
def test_retry_after_parsing(header: str, expected: float | None) -> None:
    assert parse_retry_after(header, time.time()) == expected


def test_retry_after_as_a_date_in_the_future() -> None:
    import email.utils

    now = time.time()
    assert 9 <= parse_retry_after(email.utils.formatdate(now + 10, usegmt=True), now)  <= 11  # type: ignore[operator]


def test_a_manifest_call_never_outlives_its_deadline(proxy: fp.FaultProxy, pushed: Pushed) -> None:
    """The call's deadline (1.5 s) is the only bound shorter than the drip: reads 60 s, so the client's own
    bound for a manifest is 120 s. Without the deadline the drip would end and the manifest arrive."""
    manifest = request_pattern(pushed, "manifest")
    proxy.add(manifest, fp.drip(SLOW_FAULT_SECONDS, pieces=600))
    config = replace(fault_pull_config(), read_timeout_seconds=60.0)
    client = RegistryClient(NodeConfig(pull=config).with_insecure([proxy.host]))
    try:
        with pytest.raises(RegistryError, match="deadline"):
            client.fetch_manifest(parse_reference(_proxied(pushed, proxy)), None, deadline=time.monotonic() + 1.5)
        assert proxy.finished(manifest) == 0  # cut short mid-drip
    finally:
        client.close()


# -- kill -9 mid-publish (the long loop is tools/soak.py) ----------------------------------------


def test_kill_9_mid_publish_leaves_a_clean_store_and_a_retry_that_works(
    tmp_path: pathlib.Path, registry: LocalRegistry
) -> None:
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tools"))
    import soak

    results = {r.phase: r for r in soak.crash_loop(tmp_path, 1, registry)}
    assert set(results) == set(soak.PHASES)
    for phase, result in results.items():
        assert result.killed == result.iterations == 1, phase  # the hook really killed it mid-phase
        assert result.retry_failures == [], (phase, result.retry_failures)  # kubelet's retry publishes ro
    for phase, result in results.items():
        # the store verifies clean; the volume is fully published (mounted ro,nosuid,nodev,noexec and
        # recorded: the mount phase's is adopted) or cleanly absent (the stage phase's detached mount
        # died with the process)
        assert result.violations == [], (phase, result.violations)
        assert result.absent_after_restart + result.published_after_restart == 1, phase
    assert results["mount"].published_after_restart == 1 and results["stage"].absent_after_restart == 1


def test_a_publish_never_waits_longer_than_max_wait_for_a_download(
    proxy: fp.FaultProxy, tmp_path: pathlib.Path, pushed: Pushed
) -> None:
    """max_wait (1 s) is the only bound shorter than the download (a drip that ends after 90 s, inside
    kubelet's 120 s): without it the publish would wait for the download and succeed."""
    blob = request_pattern(pushed, "blob")
    proxy.add(blob, fp.drip(SLOW_FAULT_SECONDS, pieces=600))
    running = _start(tmp_path, proxy, max_wait_seconds=1.0, download_timeout_seconds=KUBELET_DEADLINE_SECONDS)
    try:
        with pytest.raises(grpc.RpcError) as failure:
            running.kubelet.mount(running.volume(_proxied(pushed, proxy)), timeout=KUBELET_DEADLINE_SECONDS)
        assert failure.value.code() == UNAVAILABLE and "continues" in (failure.value.details() or "")
        assert proxy.finished(blob) == 0 and any(running.driver.store.tmp_dir.iterdir())  # still downloading
    finally:
        proxy.clear()
        stop_driver(running)


def test_a_download_that_fails_at_once_does_not_deadlock_the_puller(tmp_path: pathlib.Path) -> None:
    """A download that ends before its done-callback is attached runs the callback inline (under load,
    an endless body refused on its first chunk did): the callback must not need a lock the caller holds."""
    import concurrent.futures
    import contextlib
    import threading

    from csi_wasm.layouts import ModuleLayer
    from csi_wasm.metrics import Metrics
    from csi_wasm.pull import Puller
    from csi_wasm.store import ModuleStore

    class Immediate:  # the worst schedule: the download finishes inside submit()
        def submit(self, registry: str, fn: Callable[..., object], *args: object) -> concurrent.futures.Future[object]:
            future: concurrent.futures.Future[object] = concurrent.futures.Future()
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to the future, as an executor does
                future.set_exception(exc)
            return future

        def shutdown(self, **_: object) -> None:
            pass

    class RefusingClient:
        node = NodeConfig()

        @contextlib.contextmanager
        def open_blob(self, *args: object, **kwargs: object) -> Iterator[object]:
            raise RegistryError("refused at once")
            yield  # pragma: no cover

    puller = Puller(ModuleStore(tmp_path / "store"), RefusingClient(), PullConfig(), Metrics(process=False))  # type: ignore[arg-type]
    puller._downloads = Immediate()  # type: ignore[assignment]
    layer = ModuleLayer("sha256:" + "1" * 64, 10, "application/wasm", "cncf-wasm-artifact", "raw")
    outcome: list[BaseException] = []

    def download() -> None:
        try:
            puller._download(parse_reference("registry.example/a:v1"), layer, None, time.monotonic() + 5)
        except BaseException as exc:  # noqa: BLE001 - asserted below
            outcome.append(exc)

    worker = threading.Thread(target=download, daemon=True)
    worker.start()
    worker.join(5)
    assert not worker.is_alive(), "the puller deadlocked on its own lock"
    assert len(outcome) == 1 and isinstance(outcome[0], RegistryError)
    assert puller._flights == {}  # the failed flight is gone: the next publish starts afresh


# -- integrity: each check reached by bytes that pass every other one ------------------------------


def _failure(csi: RunningDriver, image: str) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as failure:
        csi.kubelet.mount(csi.volume(image), timeout=CALL_TIMEOUT_SECONDS)
    return failure.value.code(), failure.value.details() or ""


def _nothing_stored(csi: RunningDriver) -> None:
    store = csi.driver.store
    assert store.modules() == [] and csi.mounts_under_kubelet() == [] and csi.driver.records.all() == []
    assert wait_for(lambda: not any(store.tmp_dir.iterdir()))


def test_a_manifest_fetched_by_digest_must_have_that_digest(
    proxy: fp.FaultProxy, fault_csi: RunningDriver, pushed: Pushed
) -> None:
    """The same manifest, valid JSON, written with other whitespace: only the digest check refuses it."""
    proxy.add(rf"/manifests/{pushed.manifest_digest}$",
              fp.replace_body(lambda body: json.dumps(json.loads(body), indent=1).encode()))  # fmt: skip
    code, detail = _failure(fault_csi, _proxied(pushed, proxy).rsplit(":", 1)[0] + f"@{pushed.manifest_digest}")
    assert code == FAILED_PRECONDITION and f"not {pushed.manifest_digest}" in detail, detail
    _nothing_stored(fault_csi)


def test_a_compat_layer_must_match_its_digest(proxy: fp.FaultProxy, fault_csi: RunningDriver, pusher: Pusher) -> None:
    """The same tar, gzipped again with another timestamp: same length, same module, other bytes."""
    compat = pusher.compat_image("faults/compat", "v1", MODULE)
    proxy.add(rf"/blobs/{compat.layer_digest}$",
              fp.replace_body(lambda layer: gzip.compress(gzip.decompress(layer), mtime=1)))  # fmt: skip
    code, detail = _failure(fault_csi, _proxied(compat, proxy))
    assert code == FAILED_PRECONDITION and "layer content digest" in detail, detail
    _nothing_stored(fault_csi)


def test_a_blob_that_keeps_sending_past_its_declared_size_is_cut_there(
    proxy: fp.FaultProxy, fault_csi: RunningDriver, pushed: Pushed
) -> None:
    """Valid Wasm bytes first (nothing refuses the magic), then more for ever: cut at the declared size,
    not at the node's module cap (256 MiB)."""
    proxy.add(request_pattern(pushed, "blob"), fp.endless_chunked(prefix=MODULE))
    code, detail = _failure(fault_csi, _proxied(pushed, proxy))
    assert code == FAILED_PRECONDITION and f"more than the {len(MODULE)} bytes expected" in detail, detail
    assert proxy.bytes_sent(request_pattern(pushed, "blob")) < 64 * 1024 * 1024
    _nothing_stored(fault_csi)


def test_a_blob_that_announces_more_than_its_declared_size_is_refused_unread(
    proxy: fp.FaultProxy, fault_csi: RunningDriver, pushed: Pushed
) -> None:
    proxy.add(request_pattern(pushed, "blob"), fp.replace_body(lambda blob: blob + b"\0" * 4096))
    code, detail = _failure(fault_csi, _proxied(pushed, proxy))
    assert code == FAILED_PRECONDITION and f"announces {len(MODULE) + 4096} bytes" in detail, detail
    _nothing_stored(fault_csi)


def test_the_stores_streaming_cap_refuses_a_module_over_the_limit(tmp_path: pathlib.Path) -> None:
    """Behind the declared size, the store caps what it writes (a compat layer's entry, a blob)."""
    from csi_wasm.errors import TooLarge
    from csi_wasm.store import ModuleStore

    store = ModuleStore(tmp_path / "store")
    with pytest.raises(TooLarge, match="limit"):
        with store.ingest("registry.example/a:v1", len(MODULE) - 1) as ingest:
            for offset in range(0, len(MODULE), 8192):
                ingest.write(MODULE[offset : offset + 8192])
            ingest.commit(expected_digest=None)
    assert store.modules() == [] and not any(store.tmp_dir.iterdir())
