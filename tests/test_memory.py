"""The real driver under the DaemonSet's memory limit (256 MiB, a cgroup v1 memory group) against registries
that answer to exhaust it (issue 13, items 3 and 6).

Each attack used to get the driver OOM-killed: two 4 MiB manifests of small JSON values parsed at once, an
error body that is a gzip bomb or never ends, a compat layer whose pax header or GNU long name is 400 MB.
Now each is refused with a precise code and the driver lives on, with every default at its production value.
"""

from __future__ import annotations

import gzip
import io
import json
import pathlib
import tarfile
import threading
import uuid
import zlib
from typing import Iterator

import grpc
import pytest

import faultproxy as fp
from conftest import DriverProcess, driver_process, wait_for
from csi_wasm._gen import csi_pb2
from csi_wasm.demo.kubelet import InlineVolume, Kubelet, new_pod_uid
from csi_wasm.demo.push import Pusher
from csi_wasm.demo.registry import LocalRegistry
from csi_wasm.demo.wasm_modules import make_module
from csi_wasm.layouts import OCI_MANIFEST

MiB = 1024 * 1024
LIMIT = 256 * MiB  # deploy/daemonset.yaml: resources.limits.memory
MODULE = make_module(4096, "memory")
FAILED_PRECONDITION, NOT_FOUND = grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND


class MemoryGroup:
    """A cgroup v1 memory group below this process's own, with a hard limit and no swap."""

    def __init__(self, limit: int) -> None:
        own = next(line.split(":", 2)[2] for line in pathlib.Path("/proc/self/cgroup").read_text().splitlines()
                   if line.split(":", 2)[1] == "memory")  # fmt: skip
        self.path = pathlib.Path("/sys/fs/cgroup/memory") / own.lstrip("/") / f"csi-wasm-test-{uuid.uuid4().hex[:8]}"
        self.path.mkdir()
        (self.path / "memory.limit_in_bytes").write_text(str(limit))
        swap = self.path / "memory.memsw.limit_in_bytes"
        if swap.exists():
            swap.write_text(str(limit))

    @property
    def procs(self) -> pathlib.Path:
        return self.path / "cgroup.procs"

    def oom_kills(self) -> int:
        fields = dict(line.split() for line in (self.path / "memory.oom_control").read_text().splitlines())
        return int(fields.get("oom_kill", 0))

    def peak(self) -> int:
        return int((self.path / "memory.max_usage_in_bytes").read_text())

    def remove(self) -> None:
        self.path.rmdir()


@pytest.fixture
def limited(tmp_path: pathlib.Path, proxy: fp.FaultProxy) -> Iterator[tuple[DriverProcess, MemoryGroup, Kubelet]]:
    group = MemoryGroup(LIMIT)
    plain = driver_process(tmp_path, "--insecure-registry", proxy.host)
    # the shell joins the group, then becomes the driver: every byte the driver allocates is counted
    driver = DriverProcess(["sh", "-c", f'echo $$ > {group.procs} && exec "$@"', "sh", *plain.args], plain.socket)
    driver.start()
    kubelet = Kubelet(driver.socket, tmp_path / "kubelet")
    try:
        yield driver, group, kubelet
    finally:
        kubelet.close()
        if driver.process is not None and driver.process.poll() is None:
            driver.kill()
        group.remove()


def _publish_all(kubelet: Kubelet, images: list[str]) -> list[grpc.StatusCode | None]:
    """Publish every image at once (distinct pods); the code of each."""
    codes: list[grpc.StatusCode | None] = [None] * len(images)
    start = threading.Barrier(len(images))

    def publish(index: int) -> None:
        volume = InlineVolume(new_pod_uid(), "app", "default", "wasm", {"image": images[index]})
        start.wait()
        try:
            kubelet.mount(volume, timeout=120)
        except grpc.RpcError as exc:
            codes[index] = exc.code()

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(len(images))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(150)
    return codes


def _alive(driver: DriverProcess, group: MemoryGroup, kubelet: Kubelet) -> None:
    assert driver.process is not None and driver.process.poll() is None, "the driver died"
    assert group.oom_kills() == 0
    assert kubelet.identity.Probe(csi_pb2.ProbeRequest(), timeout=30).ready.value


def _small_values(size: int) -> bytes:
    """4 MiB of ``{}``s: a million Python dicts, about 100 MB once parsed."""
    head = b'{"schemaVersion": 2, "layers": ['
    count = (size - len(head) - 2) // 3
    return head + b",".join([b"{}"] * count) + b"]}"


def _valid_manifest(size: int) -> bytes:
    """A valid manifest of ``size`` bytes (an annotation fills it up) whose layer is not in the registry."""
    head = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                       "layers": [{"mediaType": "application/wasm", "digest": "sha256:" + "0" * 64, "size": 4096}],
                       "annotations": {"note": ""}}).encode()  # fmt: skip
    return head[:-3] + b"a" * (size - len(head)) + head[-3:]


def test_concurrent_large_manifests_stay_within_the_limit(
    limited: tuple[DriverProcess, MemoryGroup, Kubelet], proxy: fp.FaultProxy
) -> None:
    """8 manifests of small values are refused unparsed. Then 64 valid 4 MiB manifests arrive at once, all
    but their last byte, which the registry holds back: read at once they would hold 256 MiB. Each read
    first reserves its worst case from pull.max_buffered_bytes, so they are read (and parsed) in turn."""
    driver, group, kubelet = limited
    size = 4 * MiB - 1024  # under the 4 MiB cap
    small, large = _small_values(size), _valid_manifest(size)
    assert len(small) <= 4 * MiB and len(json.loads(large)["annotations"]["note"]) > 4 * MiB - 2048
    proxy.add(r"/memory/small-\d+/manifests/", fp.status(200, {"Content-Type": OCI_MANIFEST}, small))
    codes = _publish_all(kubelet, [f"{proxy.host}/memory/small-{i}:v1" for i in range(8)])
    _alive(driver, group, kubelet)
    assert codes == [FAILED_PRECONDITION] * 8, codes
    repos = [f"memory/large-{i}" for i in range(64)]
    proxy.add(r"/memory/large-\d+/manifests/", fp.hold_tail(large))
    outcome: list[list[grpc.StatusCode | None]] = []
    publishing = threading.Thread(target=lambda: outcome.append(
        _publish_all(kubelet, [f"{proxy.host}/{repo}:v1" for repo in repos])))  # fmt: skip
    publishing.start()
    try:
        died = lambda: driver.process is None or driver.process.poll() is not None  # noqa: E731
        assert wait_for(lambda: proxy.count("/memory/large-") == len(repos) or died(), timeout=120)
        wait_for(died, timeout=5)  # had every body been read at once, the driver would be dead by now
        _alive(driver, group, kubelet)
    finally:
        proxy.clear()
        publishing.join(150)
    _alive(driver, group, kubelet)
    assert outcome == [[NOT_FOUND] * len(repos)], outcome  # parsed, in turn; then their layer is not there
    print(f"peak memory of the driver's group: {group.peak() / MiB:.1f} MiB")


def _gzip_bomb(inflated: int) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = b"\0" * MiB
    return b"".join(compressor.compress(zeros) for _ in range(inflated // MiB)) + compressor.flush()


def test_error_bodies_that_inflate_or_never_end_stay_within_the_limit(
    limited: tuple[DriverProcess, MemoryGroup, Kubelet], proxy: fp.FaultProxy
) -> None:
    driver, group, kubelet = limited
    bomb = _gzip_bomb(1024 * MiB)  # about 1 MB that inflates to 1 GiB
    proxy.add(r"/memory/bomb/manifests/", fp.status(404, {"Content-Encoding": "gzip", "Content-Type": "application/json"},
                                            bomb))  # fmt: skip
    proxy.add(r"/memory/endless/manifests/", fp.endless_chunked(code=404, fill=b" "))
    codes = _publish_all(kubelet, [f"{proxy.host}/memory/bomb:v1", f"{proxy.host}/memory/endless:v1"])
    _alive(driver, group, kubelet)
    assert codes == [NOT_FOUND] * 2


def _hostile_tar(header_type: bytes, size: int) -> bytes:
    """A compat layer whose first entry is a pax header or GNU long name of ``size`` bytes, then plugin.wasm."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    meta = tarfile.TarInfo("././@LongLink" if header_type == tarfile.GNUTYPE_LONGNAME else "././@PaxHeader")
    meta.type, meta.size = header_type, size
    out = [compressor.compress(meta.tobuf(tarfile.GNU_FORMAT))]
    if header_type == tarfile.XHDTYPE:
        digits = len(str(size))
        out.append(compressor.compress(f"{size} comment=".encode()))
        filler = size - digits - len(" comment=") - 1
    else:
        filler = size - 1
    chunk = b"z" * MiB
    while filler > 0:
        out.append(compressor.compress(chunk[: min(filler, MiB)]))
        filler -= min(filler, MiB)
    out.append(compressor.compress(b"\n" if header_type == tarfile.XHDTYPE else b"\0"))
    out.append(compressor.compress(b"\0" * (-size % 512)))
    member = tarfile.TarInfo("plugin.wasm")
    member.size = len(MODULE)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as archive:
        archive.addfile(member, io.BytesIO(MODULE))
    out.append(compressor.compress(raw.getvalue()))
    return b"".join(out) + compressor.flush()


@pytest.fixture(scope="module")
def hostile_layers(registry: LocalRegistry) -> dict[str, str]:
    pusher = Pusher(registry.host)
    images = {}
    for name, kind in (("pax", tarfile.XHDTYPE), ("longname", tarfile.GNUTYPE_LONGNAME)):
        layer = pusher.blob(f"memory/{name}", _hostile_tar(kind, 400 * 1000 * 1000))
        config = pusher.blob(f"memory/{name}", b"{}")
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                    "config": config | {"mediaType": "application/vnd.oci.image.config.v1+json"},
                    "layers": [layer | {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip"}]}  # fmt: skip
        pusher.manifest(f"memory/{name}", "v1", manifest, OCI_MANIFEST)
        images[name] = f"memory/{name}:v1"
    return images


def test_compat_layers_with_huge_tar_headers_stay_within_the_limit(
    limited: tuple[DriverProcess, MemoryGroup, Kubelet], proxy: fp.FaultProxy, hostile_layers: dict[str, str]
) -> None:
    driver, group, kubelet = limited
    images = [f"{proxy.host}/{image}" for image in hostile_layers.values()]
    codes = _publish_all(kubelet, images)
    _alive(driver, group, kubelet)
    assert codes == [FAILED_PRECONDITION] * 2
    assert gzip.decompress(_hostile_tar(tarfile.XHDTYPE, 10_000))[512:522] == b"10000 comm"  # the layer is what it says


def test_publishes_waiting_for_downloads_hold_no_manifest(
    limited: tuple[DriverProcess, MemoryGroup, Kubelet], proxy: fp.FaultProxy, registry: LocalRegistry
) -> None:
    """16 publishes whose valid manifests carry a 4 MiB annotation (16 MiB once parsed) wait for their
    blobs, which the registry holds back: the parsed manifests are not kept while they wait."""
    driver, group, kubelet = limited
    pusher = Pusher(registry.host)
    modules = [pusher.wasm_artifact(f"memory/held-{i}", "v1", make_module(4096, f"held-{i}")) for i in range(16)]
    note = "\U0001F600" + "a" * (4 * MiB - 4096)

    def padded(body: bytes) -> bytes:
        manifest = json.loads(body)
        manifest["annotations"] = {"note": note}
        return json.dumps(manifest, ensure_ascii=False).encode()

    proxy.add(r"/memory/held-\d+/manifests/", fp.replace_body(padded))
    proxy.add(r"/memory/held-\d+/blobs/sha256:", fp.hold())
    images = [f"{proxy.host}/memory/held-{i}:v1" for i in range(len(modules))]
    outcome: list[list[grpc.StatusCode | None]] = []
    publishing = threading.Thread(target=lambda: outcome.append(_publish_all(kubelet, images)))
    publishing.start()
    try:  # every manifest fetched and parsed in turn (the memory budget), then the publishes wait
        died = lambda: driver.process is None or driver.process.poll() is not None  # noqa: E731
        assert wait_for(lambda: proxy.count("/blobs/") == 2 or died(), timeout=120)  # 2 per registry run
        assert wait_for(lambda: proxy.count("/manifests/") == len(images) or died(), timeout=120)
        _alive(driver, group, kubelet)
    finally:
        proxy.clear()
        publishing.join(150)
    _alive(driver, group, kubelet)
    assert outcome == [[None] * len(images)]
    print(f"peak memory of the driver's group: {group.peak() / MiB:.1f} MiB")
