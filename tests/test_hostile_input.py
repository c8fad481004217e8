"""Hostile input: everything a pod author controls, and every layer a registry can serve.

Property tests (hypothesis) drive the pure functions directly, thousands of cases:
``parse_reference``, ``VolumeSpec.parse``, ``Publisher.resolve_target`` and the
compat-layer extraction; a smaller number go through gRPC. A table of known
attacks goes through gRPC against the real driver. Expected every time: a precise
error (INVALID_ARGUMENT, PERMISSION_DENIED or FAILED_PRECONDITION), never INTERNAL,
never a crash, no write or mount outside the store and the pod's own target.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pathlib
import subprocess
import re
import socket
import tarfile
import zlib
from typing import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from csi_wasm._gen import csi_pb2
from conftest import RunningDriver, fast_pull_config, start_driver, stop_driver
from csi_wasm.config import NodeConfig, PullConfig
from csi_wasm.credentials import Keychain
from csi_wasm.demo.kubelet import InlineVolume, new_pod_uid
from csi_wasm.demo.push import Pusher
from csi_wasm.demo.registry import LocalRegistry
from csi_wasm.demo.wasm_modules import make_module, sha256_digest
from csi_wasm.errors import AccessDenied, ContentError, InvalidRequest, TooLarge, UnsupportedLayout
from csi_wasm.layerfetch import LayerFetcher
from csi_wasm.layouts import ModuleLayer
from csi_wasm.metrics import Metrics
from csi_wasm.mounts import LinuxMounter, unmount_path
from csi_wasm.policy import ImagePolicy
from csi_wasm.publish import KNOWN_ATTRIBUTES, MAX_PATH_BYTES, VolumeSpec
from csi_wasm.reference import parse_reference
from csi_wasm.store import ModuleStore
from csi_wasm.tarstream import MAX_METADATA_BYTES

MODULE = make_module(4096, "hostile")
SAFE_REFERENCE = re.compile(r"[A-Za-z0-9._:/@\-\[\]]+")
ODD = ["", ".", "..", "/", "//", "\n", "\r", "\t", "\0", " ", ":", "::", "@", "%2e%2e", "\\", "é", "\u202e", "ǅ",
       "A", "-", "_", "__", "---", "[::1]", "169.254.169.254", "localhost", "sha256:", "a" * 130, ":99999",
       ":0", "\x7f", "\ufeff"]  # fmt: skip


# -- references --------------------------------------------------------------------


@st.composite
def near_references(draw: st.DrawFn) -> str:
    """Well-formed references with odd pieces spliced in at random places."""
    component = st.sampled_from(["a", "b0", "filters", "x.y", "a_b", "a-b", "a--b", "a__b", "9", "wasm-filter"])
    host = draw(st.sampled_from(["registry.example", "127.0.0.1:5000", "localhost", "[::1]:443", "a.b.c:1", ""]))
    path = "/".join(draw(st.lists(component, min_size=1, max_size=4)))
    text = f"{host}/{path}" if host else path
    if draw(st.booleans()):
        text += ":" + draw(st.sampled_from(["v1", "latest", "V1.2-rc_3", "_x", "a" * 128, "1.0.0"]))
    if draw(st.booleans()):
        text += "@sha256:" + draw(st.binary(min_size=32, max_size=32)).hex()
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(ODD)) + text[at:]
    return text


@settings(max_examples=2000, deadline=None, database=None)
@given(st.one_of(near_references(), st.text(max_size=300)))
def test_parse_reference_accepts_only_well_formed_names(text: str) -> None:
    try:
        ref = parse_reference(text)
    except InvalidRequest as exc:
        assert str(exc)  # a message that says what is wrong
        return
    rendered = str(ref)
    assert SAFE_REFERENCE.fullmatch(rendered), rendered  # nothing that could bend a URL, a path or a log line
    assert ".." not in ref.repository.split("/") and not ref.repository.startswith("/")
    assert parse_reference(rendered) == ref  # the canonical form is stable


# -- volume attributes ----------------------------------------------------------------


def _keys() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(sorted(KNOWN_ATTRIBUTES)), st.sampled_from(
        ["csi.storage.k8s.io/pod.uid", "csi.storage.k8s.io/ephemeral", "insecure", "registry", "image\0"]),
        st.text(max_size=40))  # fmt: skip


def _values() -> st.SearchStrategy[str]:
    return st.one_of(near_references(), st.sampled_from(ODD + ["IfNotPresent", "Always", "Never", "plugin.wasm",
                     "../../etc/passwd", "a/b", "x\0y", "sha256:" + "a" * 64]), st.text(max_size=200))  # fmt: skip


POLICY = ImagePolicy(["registry.example/**", "127.0.0.1:5000/*"])


@settings(max_examples=1000, deadline=None, database=None)
@given(
    context=st.dictionaries(_keys(), _values(), max_size=6),
    secrets=st.one_of(st.just({}), st.dictionaries(st.sampled_from(["username", "password", ".dockerconfigjson",
                      ".dockercfg", "token"]), st.text(max_size=60), max_size=3)),  # fmt: skip
)
def test_volume_attributes_are_parsed_or_refused_precisely(context: dict[str, str], secrets: dict[str, str]) -> None:
    try:
        spec = VolumeSpec.parse(context, secrets, Keychain(), POLICY)
    except (InvalidRequest, AccessDenied) as exc:
        assert str(exc)
        return
    name = spec.file_name
    assert name not in (".", "..") and "/" not in name and "\0" not in name and name.isprintable()
    assert len(name.encode()) <= 255
    assert POLICY.allows(spec.module.ref)


@pytest.mark.parametrize(
    "attributes",
    [{"image": "registry.example/a:v1", "fileName": name} for name in
     ("../x", "a/b", "x\0", ".", "..", "/etc/passwd", "n" * 300, "line\nbreak", "")[:-1]]
    + [{"image": "registry.example/a:v1", "x" * 5000: "1"},
       {"image": "registry.example/a:v1", **{f"k{i}": "v" for i in range(10_000)}},
       {"image": "registry.example/a:v1", "image2": "x"},
       {"image": "registry.example/a:v1", "moduleDigest": "sha256:" + "a" * 64 + "\n"},
       {"image": "registry.example/a:v1", "pullPolicy": "never"},
       {"image": "registry.example/a:v1\n"}, {"image": "registry.example/a\n:v1"},
       {"image": "registry.example\n/a:v1"}, {"image": "registry.example/a:vé"},
       {"image": "registry.example:99999/a:v1"}, {"image": "http://registry.example/a:v1"},
       {"image": "registry.example/../../etc:v1"}, {"image": "registry.example/A:v1"}, {}],
)  # fmt: skip
def test_known_bad_attributes_are_invalid(attributes: dict[str, str]) -> None:
    with pytest.raises(InvalidRequest):
        VolumeSpec.parse(attributes, {}, Keychain(), POLICY)


# -- target paths ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hostile_csi(tmp_path_factory: pytest.TempPathFactory, registry: LocalRegistry) -> Iterator[RunningDriver]:
    """A driver that may only pull hostile/** from the test registry: nothing else reaches the network."""
    tmp = tmp_path_factory.mktemp("hostile")
    node = NodeConfig(pull=fast_pull_config(), allowed_images=(f"{registry.host}/hostile/**",))
    running = start_driver(tmp, node.with_insecure([registry.host]))
    yield running
    stop_driver(running)


UID = "0b5e2a4c-1111-4222-8333-944455556666"


@pytest.fixture(scope="module")
def planted(hostile_csi: RunningDriver, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A kubelet tree with symlinks planted where a hostile node user or container might put them."""
    pods = hostile_csi.driver.pods_dir
    csi_dir = pods / UID / "volumes" / "kubernetes.io~csi"
    (csi_dir / "vol").mkdir(parents=True, exist_ok=True)
    fake_etc = tmp_path_factory.mktemp("fake-etc")
    (csi_dir / "to-etc").symlink_to("/etc")
    (csi_dir / "to-fake-etc").symlink_to(fake_etc)
    (csi_dir / "up").symlink_to("../../..")
    (csi_dir / "vol2").mkdir(exist_ok=True)
    (csi_dir / "vol2" / "mount").symlink_to(fake_etc)
    (pods / "other-pod" / "volumes" / "kubernetes.io~csi" / "v").mkdir(parents=True, exist_ok=True)
    return fake_etc


SEGMENTS = ["..", ".", "", UID, "other-pod", "volumes", "kubernetes.io~csi", "vol", "vol2", "to-etc", "to-fake-etc",
            "up", "mount", "etc", "pods", "\0", "x" * 255, "é", " ", "mount\n"]  # fmt: skip


@st.composite
def target_paths(draw: st.DrawFn, pods: str) -> str:
    prefix = draw(st.sampled_from([pods, pods + "/" + UID, "/", "", "/etc", pods + "/..", "relative"]))
    return prefix + "/" + "/".join(draw(st.lists(st.sampled_from(SEGMENTS), max_size=9)))


def test_target_paths_stay_in_the_pods_tree(hostile_csi: RunningDriver, planted: pathlib.Path) -> None:
    publisher, pods = hostile_csi.driver.publisher, hostile_csi.driver.pods_dir

    @settings(max_examples=1500, deadline=None, database=None)
    @given(path=st.one_of(target_paths(str(pods)), st.text(max_size=80)),
           uid=st.sampled_from([None, UID, "other-pod"]))  # fmt: skip
    def check(path: str, uid: str | None) -> None:
        try:
            target = publisher.resolve_target(path, uid)
        except InvalidRequest as exc:
            assert str(exc)
            return
        assert target.is_relative_to(pods) and target != pods
        assert os.path.realpath(target.parent) == str(target.parent)  # no symlink left on the way
        assert not target.is_symlink()
        parts = target.relative_to(pods).parts
        if uid and len(parts) == 5 and parts[1:3] == ("volumes", "kubernetes.io~csi") and parts[4] == "mount":
            assert parts[0] == uid  # a pod's request never lands in another pod's directory

    check()
    assert not any(planted.iterdir())


# -- compat layers ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tar_fetcher(tmp_path_factory: pytest.TempPathFactory) -> tuple[LayerFetcher, ModuleStore, pathlib.Path]:
    sandbox = tmp_path_factory.mktemp("tar-sandbox")
    store = ModuleStore(sandbox / "store")
    # no registry: the tests hand the layer's bytes straight to store_from_tar
    fetcher = LayerFetcher(store, object(), PullConfig(max_module_bytes=64 * 1024), Metrics(process=False))  # type: ignore[arg-type]
    return fetcher, store, sandbox


def _layer(data: bytes) -> ModuleLayer:
    return ModuleLayer(sha256_digest(data), len(data), "application/vnd.oci.image.layer.v1.tar+gzip",
                       "compat-oci", "tar+gzip")  # fmt: skip


def _tar(members: list[tuple[str, str, bytes]]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            info.type = {"reg": tarfile.REGTYPE, "sym": tarfile.SYMTYPE, "lnk": tarfile.LNKTYPE,
                         "chr": tarfile.CHRTYPE, "blk": tarfile.BLKTYPE, "fifo": tarfile.FIFOTYPE,
                         "dir": tarfile.DIRTYPE}[kind]  # fmt: skip
            if kind in ("sym", "lnk"):
                info.linkname = data.decode("latin-1") or "/etc/shadow"
            if kind in ("chr", "blk"):
                info.devmajor, info.devminor = 1, 3
            info.size = len(data) if kind == "reg" else 0
            archive.addfile(info, io.BytesIO(data) if kind == "reg" else None)
    return gzip.compress(raw.getvalue(), mtime=0)


def _chunks(data: bytes, size: int = 7000) -> Iterator[bytes]:
    for offset in range(0, len(data), size):
        yield data[offset : offset + size]


NAMES = ["plugin.wasm", "./plugin.wasm", "/plugin.wasm", "../plugin.wasm", "a/../../plugin.wasm", "a/b/plugin.wasm",
         "plugin.wasm/", "Plugin.wasm", "plugin.wasm\n", "x", "etc/passwd", "/etc/cron.d/evil", "a" * 200]  # fmt: skip
DATA = [MODULE, b"", b"not wasm at all", b"\0asm\x01\0\0\0", make_module(70 * 1024, "too-big"), b"/etc/shadow"]


def _expected(members: list[tuple[str, str, bytes]]) -> bytes | None:
    for name, kind, data in members:
        if kind in ("sym", "lnk") and len(data) > MAX_METADATA_BYTES:
            return None  # its link name needs a pax header larger than a node reads: the layer is refused
        if name.rstrip("/").rsplit("/", 1)[-1] != "plugin.wasm":
            continue
        if name.startswith("/") or ".." in name.split("/") or kind != "reg" or len(data) > 64 * 1024:
            return None
        return data if data[:8] == MODULE[:8] else None
    return None


def test_compat_layers_never_write_outside_the_store(
    tar_fetcher: tuple[LayerFetcher, ModuleStore, pathlib.Path],
) -> None:
    fetcher, store, sandbox = tar_fetcher
    ref = parse_reference("registry.example/hostile/tar:v1")
    before = {p for p in sandbox.parent.iterdir()}

    @settings(max_examples=1000, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(["reg", "reg", "sym", "lnk", "chr", "blk",
           "fifo", "dir"]), st.sampled_from(DATA)), max_size=4))  # fmt: skip
    def check(members: list[tuple[str, str, bytes]]) -> None:
        layer_bytes = _tar(members)
        expected = _expected(members)
        try:
            stored = fetcher.store_from_tar(ref, _layer(layer_bytes), _chunks(layer_bytes))
        except ContentError as exc:
            assert expected is None, (members, exc)
        else:
            assert expected is not None and stored.path.read_bytes() == expected
            assert stored.path.parent == store.modules_dir
        assert not any(store.tmp_dir.iterdir())

    check()
    assert {p for p in sandbox.parent.iterdir()} == before
    assert {p.name for p in sandbox.iterdir()} == {"store"}
    assert {p.name for p in store.root.iterdir()} <= {"modules", "views", "manifests", "tmp", "tags", "pins", "access", "seals"}


def test_a_gzip_bomb_is_refused_early(tar_fetcher: tuple[LayerFetcher, ModuleStore, pathlib.Path]) -> None:
    fetcher, store, _ = tar_fetcher
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    header = tarfile.TarInfo("plugin.wasm")
    header.size = 1 << 30  # claims a GiB of zeros
    bomb = compressor.compress(header.tobuf(tarfile.GNU_FORMAT))
    zeros = b"\0" * (1 << 20)
    for _ in range(64):  # 64 MiB inflated from about 64 KiB
        bomb += compressor.compress(zeros)
    bomb += compressor.flush()
    assert len(bomb) < 200 * 1024
    chunks = list(_chunks(bomb))
    read = iter(chunks)
    with pytest.raises(TooLarge, match="inflates past"):
        fetcher.store_from_tar(parse_reference("registry.example/hostile/bomb:v1"), _layer(bomb), read)
    assert len(list(read)) == len(chunks) - 1  # refused on the first chunk of the layer, not after 64 MiB
    assert not any(store.tmp_dir.iterdir())


def test_a_huge_pax_header_is_refused(tar_fetcher: tuple[LayerFetcher, ModuleStore, pathlib.Path]) -> None:
    fetcher, store, _ = tar_fetcher
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo("plugin.wasm")
        info.pax_headers = {"comment": "z" * (2 * 1024 * 1024)}  # inflates past 4 x 64 KiB before any module
        info.size = len(MODULE)
        archive.addfile(info, io.BytesIO(MODULE))
    layer = gzip.compress(raw.getvalue())
    with pytest.raises(TooLarge):
        fetcher.store_from_tar(parse_reference("registry.example/hostile/pax:v1"), _layer(layer), _chunks(layer))


# -- through gRPC --------------------------------------------------------------------------


def _publish(csi: RunningDriver, volume: InlineVolume, **overrides: object) -> grpc.StatusCode | None:
    """NodePublishVolume as kubelet sends it, with some fields replaced; the error code or None."""
    csi.kubelet.target_path(volume).parent.mkdir(parents=True, exist_ok=True)
    request = csi.kubelet.publish_request(volume)
    for key, value in overrides.items():
        if isinstance(value, dict):
            getattr(request, key).clear()
            getattr(request, key).update(value)
        else:
            setattr(request, key, value)
    try:
        csi.kubelet.node.NodePublishVolume(request, timeout=20)
    except grpc.RpcError as exc:
        return exc.code()
    return None


@pytest.fixture(scope="module")
def hostile_image(pusher: Pusher) -> str:
    return pusher.wasm_artifact("hostile/good", "v1", MODULE).reference


def test_grpc_survives_random_attributes(hostile_csi: RunningDriver, hostile_image: str) -> None:
    @settings(max_examples=150, deadline=None, database=None)
    @given(context=st.dictionaries(_keys(), _values(), max_size=6), use_image=st.booleans())
    def check(context: dict[str, str], use_image: bool) -> None:
        if use_image:
            context = {**context, "image": hostile_image}
        volume = InlineVolume(new_pod_uid(), "p", "default", "wasm", context)
        code = _publish(hostile_csi, volume)
        assert code in (None, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED,
                        grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION), code  # fmt: skip
        if code is None:
            hostile_csi.kubelet.unmount(volume)
        assert hostile_csi.mounts_under_kubelet() == []

    check()


def _attack_table(csi: RunningDriver, image: str, fake_etc: pathlib.Path) -> list[tuple[str, InlineVolume, dict[str, object], grpc.StatusCode]]:
    pods = csi.driver.pods_dir
    good = InlineVolume(UID, "p", "default", "wasm", {"image": image})
    other = InlineVolume(new_pod_uid(), "p", "default", "wasm", {"image": image})
    csi_dir = pods / UID / "volumes" / "kubernetes.io~csi"
    INVALID, DENIED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED
    return [
        ("dot-dot out of the pods tree", good, {"target_path": f"{csi_dir}/vol/../../../../../../tmp/mount"}, INVALID),
        ("symlinked parent to /etc", good, {"target_path": f"{csi_dir}/to-etc/mount"}, INVALID),
        ("symlinked parent to a host dir", good, {"target_path": f"{csi_dir}/to-fake-etc/mount"}, INVALID),
        ("symlink climbing out", good, {"target_path": f"{csi_dir}/up/up/mount"}, INVALID),
        ("target is a symlink", good, {"target_path": f"{csi_dir}/vol2/mount"}, INVALID),
        ("NUL in target_path", good, {"target_path": f"{csi_dir}/vol/mount\0/etc"}, INVALID),
        ("very long target_path", good, {"target_path": f"{csi_dir}/" + "d/" * (MAX_PATH_BYTES // 2) + "mount"}, INVALID),
        ("relative target_path", good, {"target_path": "pods/x/mount"}, INVALID),
        ("another pod's directory", other, {"target_path": f"{csi_dir}/vol/mount"}, INVALID),
        ("the pods directory itself", good, {"target_path": str(pods)}, INVALID),
        ("image on the metadata address", good, {"volume_context": {"image": "169.254.169.254/latest/meta-data:v1"}}, DENIED),
        ("image not in allowed_images", good, {"volume_context": {"image": "registry.example/evil/x:v1"}}, DENIED),
        ("image with a newline", good, {"volume_context": {"image": image + "\n"}}, INVALID),
        ("fileName with a slash", good, {"volume_context": {"image": image, "fileName": "../../x"}}, INVALID),
        ("fileName with NUL", good, {"volume_context": {"image": image, "fileName": "a\0b"}}, INVALID),
        ("huge attribute map", good, {"volume_context": {"image": image, **{f"k{i}": "v" for i in range(5000)}}}, INVALID),
        ("unknown attribute", good, {"volume_context": {"image": image, "insecure": "true"}}, INVALID),
        ("malformed secret", good, {"secrets": {".dockerconfigjson": "{"}}, INVALID),
        ("secret without a password", good, {"secrets": {"username": "u" * 100_000}}, INVALID),
    ]  # fmt: skip


@pytest.fixture
def host_etc_mount() -> Iterator[pathlib.Path]:
    """/etc/mount, where a publish that followed the planted /etc symlink would land. Only the mounts are
    private to the test session, not the root filesystem: a run that fails must not leave it on the host."""
    path = pathlib.Path("/etc/mount")
    existed = os.path.lexists(path)
    yield path
    while not existed and path.is_dir() and LinuxMounter().mount_at(path) is not None:
        unmount_path(path)
    if not existed and path.is_dir():
        path.rmdir()


def test_known_attacks_are_refused_precisely(
    hostile_csi: RunningDriver, planted: pathlib.Path, hostile_image: str, monkeypatch: pytest.MonkeyPatch,
    host_etc_mount: pathlib.Path,
) -> None:
    dialled: list[object] = []
    connect = socket.socket.connect

    def guarded(self: socket.socket, address: object) -> None:  # nothing may leave loopback
        if self.family in (socket.AF_INET, socket.AF_INET6) and not str(address[0]).startswith(("127.", "::1")):  # type: ignore[index]
            dialled.append(address)
            raise ConnectionRefusedError("test guard: non-loopback destination")
        connect(self, address)  # type: ignore[arg-type]

    monkeypatch.setattr(socket.socket, "connect", guarded)
    for name, volume, overrides, expected in _attack_table(hostile_csi, hostile_image, planted):
        if "volume_context" in overrides:
            overrides = {**overrides, "volume_context": {**overrides["volume_context"],  # type: ignore[dict-item]
                         "csi.storage.k8s.io/pod.uid": volume.pod_uid}}  # fmt: skip
        code = _publish(hostile_csi, volume, **overrides)
        assert code == expected, name
        assert hostile_csi.mounts_under_kubelet() == [], name
        assert not any(planted.iterdir()) and not host_etc_mount.exists(), name
        assert not (hostile_csi.driver.pods_dir / UID / "volumes" / "kubernetes.io~csi" / "vol" / "mount").exists()
    assert dialled == []
    assert _mounts_at_or_under(planted) == [] and LinuxMounter().mount_at(host_etc_mount) is None
    # and after all that, a good publish still works
    good = InlineVolume(new_pod_uid(), "p", "default", "wasm", {"image": hostile_image})
    assert (hostile_csi.kubelet.mount(good) / "plugin.wasm").read_bytes() == MODULE
    hostile_csi.kubelet.unmount(good)


def _mounts_at_or_under(directory: pathlib.Path) -> list[str]:
    """Mount points at ``directory`` or inside it (a publish that followed a planted symlink lands there)."""
    root = os.path.realpath(directory)
    return [m.mount_point for m in LinuxMounter().mounts()
            if m.mount_point == root or m.mount_point.startswith(root + "/")]  # fmt: skip


def test_the_planted_directory_check_sees_a_mount_there(planted: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """The check above can fail: a bind mount inside the planted directory is reported."""
    source, target = tmp_path / "source", planted / "mount"
    source.mkdir()
    target.mkdir()
    subprocess.run(["mount", "--bind", str(source), str(target)], check=True)
    try:
        assert _mounts_at_or_under(planted) == [str(target)]
    finally:
        unmount_path(target)
        target.rmdir()
    assert _mounts_at_or_under(planted) == []


@pytest.mark.parametrize("volume_id", ["x" * 100_000, "id\0with-nul", "../../../etc", "é\u202e", " ", "a/b"])
def test_odd_volume_ids_publish_or_are_refused_but_never_crash(
    hostile_csi: RunningDriver, hostile_image: str, volume_id: str
) -> None:
    volume = InlineVolume(new_pod_uid(), "p", "default", "wasm", {"image": hostile_image})
    code = _publish(hostile_csi, volume, volume_id=volume_id)
    assert code in (None, grpc.StatusCode.INVALID_ARGUMENT)
    if code is None:
        target = str(hostile_csi.kubelet.target_path(volume))
        hostile_csi.kubelet.node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target), timeout=20
        )
        assert not os.path.exists(target)
    assert hostile_csi.mounts_under_kubelet() == []


@pytest.mark.parametrize(
    "members, expected",
    [([("/plugin.wasm", "reg", MODULE)], UnsupportedLayout),
     ([("../plugin.wasm", "reg", MODULE)], UnsupportedLayout),
     ([("plugin.wasm", "sym", b"/etc/shadow")], UnsupportedLayout),
     ([("x", "reg", MODULE), ("plugin.wasm", "lnk", b"x")], UnsupportedLayout),
     ([("plugin.wasm", "chr", b"")], UnsupportedLayout),
     ([("plugin.wasm", "blk", b"")], UnsupportedLayout),
     ([("plugin.wasm", "fifo", b"")], UnsupportedLayout)],
)  # fmt: skip
def test_hostile_compat_layers_through_grpc(
    hostile_csi: RunningDriver, pusher: Pusher, members: list[tuple[str, str, bytes]], expected: type
) -> None:
    layer = _tar(members)
    blob = pusher.blob("hostile/compat", layer) | {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip"}
    config = pusher.blob("hostile/compat", b"{}") | {"mediaType": "application/vnd.oci.image.config.v1+json"}
    tag = "t" + hashlib.sha256(layer).hexdigest()[:12]
    pusher.manifest("hostile/compat", tag, {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": config, "layers": [blob]}, "application/vnd.oci.image.manifest.v1+json")  # fmt: skip
    volume = InlineVolume(new_pod_uid(), "p", "default", "wasm", {"image": f"{pusher.host}/hostile/compat:{tag}"})
    assert _publish(hostile_csi, volume) == grpc.StatusCode.FAILED_PRECONDITION
    assert hostile_csi.mounts_under_kubelet() == []
    assert not any(hostile_csi.driver.store.tmp_dir.iterdir())
