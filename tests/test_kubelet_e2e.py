"""kubelet-faithful end to end: the real ``csi-wasm serve`` process, started with the DaemonSet's own
flags, driven exactly as node-driver-registrar (GetPluginInfo), kubelet (NodeGetInfo on registration;
parent directory, vol_data.json, NodePublishVolume with podInfoOnMount context and nodePublishSecretRef
secrets; NodeUnpublishVolume, then removal of the volume directory and of the pod directory) and
livenessprobe (Probe) do for inline ephemeral volumes, over a pod's life: create, container restart,
delete. Also: the module stays readable while the driver process is down, a restarted driver adopts
what it had published, and SIGTERM exits 0 and removes the socket.

Containers are modelled the way the runtime starts them: a read-only bind of the volume's host path
into the container's root (a restart is a new bind of the same path; kubelet calls no CSI method).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Iterator

import grpc
import pytest
import yaml

from csi_wasm._gen import csi_pb2
from csi_wasm.demo.kubelet import VOL_DATA_FILE, InlineVolume, Kubelet, LivenessProbe, NodeDriverRegistrar, new_pod_uid
from csi_wasm.demo.push import Pusher
from csi_wasm.demo.registry import LocalRegistry
from csi_wasm.demo.wasm_modules import make_module, sha256_digest
from csi_wasm import syscalls
from csi_wasm.mounts import LinuxMounter, unmount_path
from csi_wasm.topology import share_directory

from conftest import PRIVATE_AUTH

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
NODE_NAME = "e2e-node"
PUBLIC_MODULE = make_module(96 * 1024, "e2e-public")
PRIVATE_MODULE = make_module(48 * 1024, "e2e-private")
MiB = 1024 * 1024
# What a pod's life (two publishes, a TLS session to the private registry, container restarts, a metrics
# scrape) may add to the driver's RSS over its own baseline once ready: about 2 MiB measured, so a
# module held in memory per publish, or a session per call, shows; the baseline itself (Python, grpcio,
# cryptography) moves with library versions and is not asserted.
RSS_GROWTH_BUDGET = 16 * MiB


def manifests(path: pathlib.Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name))


DAEMONSET_DOCS = manifests(DEPLOY / "daemonset.yaml")
DRIVER_CONTAINER = next(
    c for c in find(DAEMONSET_DOCS, "DaemonSet")["spec"]["template"]["spec"]["containers"] if c["name"] == "csi-wasm"
)


# -- the driver process, started as the DaemonSet starts it -------------------------------------


def daemonset_args(overrides: dict[str, str]) -> list[str]:
    """The driver container's args with $(VAR) expanded from its env, and host paths moved under tmp."""
    env = {e["name"]: e.get("value", NODE_NAME) for e in DRIVER_CONTAINER["env"]}  # fieldRef spec.nodeName
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg) for arg in DRIVER_CONTAINER["args"]]
    out = []
    for arg in args:
        flag = arg.split("=", 1)[0]
        out.append(f"{flag}={overrides.pop(flag)}" if flag in overrides else arg)
    assert not overrides, f"the DaemonSet does not pass {sorted(overrides)}: the test would not run it as deployed"
    return out


@dataclass
class ServeProcess:
    """``python -m csi_wasm <the DaemonSet's args>``; its JSON log lines are collected from stderr."""

    args: list[str]
    socket: pathlib.Path
    process: subprocess.Popen[str] | None = None
    log: list[dict[str, Any]] = field(default_factory=list)

    def start(self, timeout: float = 30.0) -> ServeProcess:
        self.log = []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "csi_wasm", *self.args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        threading.Thread(target=self._read, args=(self.process,), daemon=True).start()
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            assert self.process.poll() is None, f"driver exited with {self.process.returncode}: {self.log[-5:]}"
            assert time.monotonic() < deadline, "driver did not create its socket"
            time.sleep(0.02)
        return self

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stderr is not None
        for line in process.stderr:
            try:
                self.log.append(json.loads(line))
            except ValueError:
                self.log.append({"event": "unparsed", "line": line})

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def events(self, name: str) -> list[dict[str, Any]]:
        return [entry for entry in list(self.log) if entry.get("event") == name]

    def metrics_url(self, path: str) -> str:
        deadline = time.monotonic() + 10
        while not self.events("metrics"):
            assert time.monotonic() < deadline, "driver never logged its metrics address"
            time.sleep(0.02)
        return f"http://{self.events('metrics')[0]['address']}{path}"

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(30)

    def terminate(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(60)

    def ensure_stopped(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)


def wait_until(predicate: Any, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class Prober(threading.Thread):
    """livenessprobe's loop, sped up: Probe every 20 ms and count the failures kubelet would act on."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(daemon=True)
        self.probe = LivenessProbe(endpoint)
        self.stopping = threading.Event()
        self.answers = 0
        self.failures = 0

    def run(self) -> None:
        while not self.stopping.is_set():
            if self.probe.healthy():
                self.answers += 1
            else:
                self.failures += 1
            self.stopping.wait(0.02)

    def stop(self) -> tuple[int, int]:
        self.stopping.set()
        self.join(10)
        self.probe.close()
        return self.answers, self.failures


# -- the container runtime ------------------------------------------------------------------------


class Container:
    """A container's view of a volume: the runtime bind-mounts the volume's host path, read-only."""

    def __init__(self, root: pathlib.Path, volume_dir: pathlib.Path) -> None:
        self.root, self.volume_dir, self.starts = root, volume_dir, 0
        self.mount_point: pathlib.Path | None = None

    def start(self) -> pathlib.Path:
        self.starts += 1
        self.mount_point = self.root / f"run-{self.starts}" / "wasm"
        self.mount_point.mkdir(parents=True)
        syscalls.mount(bytes(self.volume_dir), bytes(self.mount_point), syscalls.MS_BIND | syscalls.MS_REC)
        syscalls.mount(None, bytes(self.mount_point), syscalls.MS_REMOUNT | syscalls.MS_BIND | syscalls.MS_RDONLY)
        return self.mount_point

    def stop(self) -> None:
        assert self.mount_point is not None
        unmount_path(self.mount_point)
        self.mount_point = None


# -- node setup -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def public_image(pusher: Pusher) -> str:
    return pusher.wasm_artifact("e2e/ratelimit", "v1", PUBLIC_MODULE).reference


@pytest.fixture(scope="module")
def private_image(private_pusher: Pusher) -> str:
    return private_pusher.wasm_artifact("e2e/authz", "v2", PRIVATE_MODULE).reference


@dataclass
class Node:
    driver: ServeProcess
    kubelet: Kubelet
    endpoint: str
    kubelet_dir: pathlib.Path
    root: pathlib.Path

    def restart_driver(self) -> None:
        self.driver.start()


@pytest.fixture
def node(
    tmp_path: pathlib.Path,
    registry: LocalRegistry,
    private_registry: LocalRegistry,
    tls_files: tuple[pathlib.Path, pathlib.Path],
) -> Iterator[Node]:
    """One node: the driver as the DaemonSet runs it (its args, the ConfigMap's node config plus the
    private registry's CA), host paths under tmp_path."""
    kubelet_dir = tmp_path / "var-lib-kubelet"
    share_directory(kubelet_dir / "pods")  # a shared mount, as on a node: the driver refuses a private one
    socket = tmp_path / "plugins" / "csi-wasm.dev" / "csi.sock"
    socket.parent.mkdir(parents=True)  # the DaemonSet's plugin-dir hostPath (DirectoryOrCreate)
    config = yaml.safe_load(find(DAEMONSET_DOCS, "ConfigMap")["data"]["config.yaml"])
    config["registries"] = {private_registry.host: {"ca_bundle": str(tls_files[0])}}
    config_path = tmp_path / "etc-csi-wasm" / "config.yaml"
    config_path.parent.mkdir()
    config_path.write_text(yaml.safe_dump(config))
    args = daemonset_args(
        {
            "--endpoint": f"unix://{socket}",
            "--state-dir": str(tmp_path / "var-lib-csi-wasm"),
            "--kubelet-dir": str(kubelet_dir),
            "--config": str(config_path),
            "--metrics-address": "127.0.0.1:0",
        }
    ) + [f"--insecure-registry={registry.host}"]
    driver = ServeProcess(args, socket).start()
    kubelet = Kubelet(str(socket), kubelet_dir, node_name=NODE_NAME, driver_name="csi-wasm.dev")
    try:
        yield Node(driver, kubelet, str(socket), kubelet_dir, tmp_path)
    finally:
        kubelet.close()
        driver.ensure_stopped()
        for mount_point in sorted(
            (m.mount_point for m in LinuxMounter().mounts() if m.mount_point.startswith(f"{tmp_path}/")), reverse=True
        ):
            unmount_path(pathlib.Path(mount_point))


def registered(node: Node) -> None:
    """Plugin registration: the registrar learns the name, kubelet asks for the node's info."""
    assert NodeDriverRegistrar(node.endpoint).driver_name() == "csi-wasm.dev"
    assert node.kubelet.register().node_id == NODE_NAME
    wait_until(LivenessProbe(node.endpoint).healthy, what="the driver to report ready")


def dockerconfigjson_secret(host: str) -> dict[str, str]:
    """The data kubelet reads from deploy/examples/private.yaml's Secret, pointed at the test registry."""
    secret = find(manifests(DEPLOY / "examples" / "private.yaml"), "Secret", "wasm-registry")
    assert secret["type"] == "kubernetes.io/dockerconfigjson"
    config = json.loads(secret["stringData"][".dockerconfigjson"])
    (entry,) = config["auths"].values()
    entry.update(username=PRIVATE_AUTH.username, password=PRIVATE_AUTH.password)
    return {".dockerconfigjson": json.dumps({"auths": {host: entry}})}


def rss_bytes(pid: int, key: str = "VmRSS") -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"{key} missing from /proc/{pid}/status")


def mount_points_under(directory: pathlib.Path) -> list[str]:
    return sorted(m.mount_point for m in LinuxMounter().mounts() if m.mount_point.startswith(f"{directory}/"))


def module_file(target: pathlib.Path, name: str = "plugin.wasm") -> pathlib.Path:
    return target / name


def stored_module(node: Node, module: bytes) -> pathlib.Path:
    """The node store's copy of ``module`` (its file under the DaemonSet's state dir)."""
    return node.root / "var-lib-csi-wasm" / "store" / "modules" / "sha256" / sha256_digest(module).removeprefix("sha256:")


# -- tests ----------------------------------------------------------------------------------------


def test_pod_lifecycle_create_container_restart_delete(
    node: Node, public_image: str, private_image: str, private_registry: LocalRegistry
) -> None:
    registered(node)
    baseline_rss, baseline_peak = rss_bytes(node.driver.pid), rss_bytes(node.driver.pid, "VmHWM")
    prober = Prober(node.endpoint)
    prober.start()

    # create: kubelet sets up both inline volumes of one pod (volume names as in the pod spec)
    pod_uid = new_pod_uid()
    filter_volume = InlineVolume(pod_uid, "gateway-0", "shop", "filter", {"image": public_image}, read_only=True)
    authz_volume = InlineVolume(
        pod_uid, "gateway-0", "shop", "authz", {"image": private_image, "fileName": "authz.wasm",
                                                 "moduleDigest": sha256_digest(PRIVATE_MODULE)},
        secrets=dockerconfigjson_secret(private_registry.host), service_account="gateway",
    )  # fmt: skip
    filter_target = node.kubelet.mount(filter_volume)
    authz_target = node.kubelet.mount(authz_volume)
    assert filter_target == node.kubelet_dir / "pods" / pod_uid / "volumes" / "kubernetes.io~csi" / "filter" / "mount"
    for volume, target in ((filter_volume, filter_target), (authz_volume, authz_target)):
        assert json.loads((target.parent / VOL_DATA_FILE).read_text())["volumeHandle"] == volume.volume_id
        entry = LinuxMounter().mount_at(target)
        assert entry is not None and {"ro", "nosuid", "nodev", "noexec"} <= entry.options
    assert module_file(filter_target).read_bytes() == PUBLIC_MODULE
    assert module_file(authz_target, "authz.wasm").read_bytes() == PRIVATE_MODULE
    # the log line is written before the answer, but read from the pipe by a thread: wait for it
    wait_until(lambda: len(node.driver.events("publish")) == 2, what="both publish log lines")
    publish = {e["volume_id"]: e for e in node.driver.events("publish")}
    assert publish[authz_volume.volume_id]["pod"] == "shop/gateway-0"

    # the containers start: the runtime binds each volume's host path into the container, and the
    # container reads the node store's one copy of the module (its inode), not a copy of its own
    proxy = Container(node.root / "containers" / pod_uid / "proxy", filter_target)
    inode = module_file(proxy.start()).stat().st_ino
    assert inode == stored_module(node, PUBLIC_MODULE).stat().st_ino

    # container restart: kubelet calls no CSI method; the new container sees the same file
    calls_before = len(node.driver.events("publish")) + len(node.driver.events("unpublish"))
    proxy.stop()
    mount_point = proxy.start()
    assert module_file(mount_point).stat().st_ino == inode
    assert module_file(mount_point).read_bytes() == PUBLIC_MODULE
    assert len(node.driver.events("publish")) + len(node.driver.events("unpublish")) == calls_before

    # memory: growth over the same process's baseline, now and at its peak
    grown = rss_bytes(node.driver.pid) - baseline_rss
    peak = rss_bytes(node.driver.pid, "VmHWM") - baseline_peak
    assert max(grown, peak) < RSS_GROWTH_BUDGET, f"RSS grew {grown / MiB:.1f} MiB, its peak {peak / MiB:.1f} MiB"

    # the readiness probe's endpoint and the metrics the DaemonSet advertises to Prometheus
    with urllib.request.urlopen(node.driver.metrics_url("/healthz"), timeout=5) as response:
        assert response.status == 200
    with urllib.request.urlopen(node.driver.metrics_url("/metrics"), timeout=5) as response:
        metrics = response.read().decode()
    assert re.search(r'^csi_wasm_publish_total\{[^}]*result="success"[^}]*\} 2\.0$', metrics, re.M), metrics[:2000]

    answers, failures = prober.stop()
    assert failures == 0 and answers > 0, f"Probe failed {failures} times while the pod was running"

    # delete: the containers stop, kubelet tears the volumes down, then removes the pod directory.
    # The container's exit takes only its own bind away: the driver's two mounts stay until unpublish.
    proxy.stop()
    assert mount_points_under(node.kubelet_dir / "pods" / pod_uid) == sorted([str(filter_target), str(authz_target)])
    node.kubelet.unmount(filter_volume)
    node.kubelet.unmount(authz_volume)
    assert not filter_target.parent.exists() and not authz_target.parent.exists()
    node.kubelet.delete_pod(pod_uid)
    assert not (node.kubelet_dir / "pods" / pod_uid).exists()
    assert mount_points_under(node.kubelet_dir / "pods") == []

    assert node.driver.terminate() == 0
    assert not node.driver.socket.exists(), "the driver left its socket behind after SIGTERM"
    assert node.driver.events("stopped")


def test_module_stays_readable_while_the_driver_is_down(node: Node, public_image: str) -> None:
    registered(node)
    volume = InlineVolume(new_pod_uid(), "web-0", "default", "filter", {"image": public_image})
    target = node.kubelet.mount(volume)
    proxy = Container(node.root / "containers" / volume.pod_uid / "proxy", target)
    proxy.start()

    node.driver.kill()  # OOM kill, node-pressure eviction, a crash: no clean-up at all
    assert not LivenessProbe(node.endpoint).healthy(), "livenessprobe must report a dead driver"
    assert module_file(target).read_bytes() == PUBLIC_MODULE
    assert module_file(proxy.mount_point).stat().st_ino == stored_module(node, PUBLIC_MODULE).stat().st_ino  # type: ignore[arg-type]
    proxy.stop()
    assert module_file(proxy.start()).read_bytes() == PUBLIC_MODULE  # a container restart meanwhile

    node.restart_driver()  # the DaemonSet restarts the container on the same host paths
    registered(node)
    assert node.driver.events("serving")
    proxy.stop()
    node.kubelet.unmount(volume)  # the new process adopted the volume from its records
    assert not target.exists() and LinuxMounter().mount_at(target) is None
    node.kubelet.delete_pod(volume.pod_uid)
    (unpublish,) = node.driver.events("unpublish")
    assert unpublish["volume_id"] == volume.volume_id and unpublish["image"] == public_image  # from its record

    assert node.driver.terminate() == 0
    assert not node.driver.socket.exists()


def test_private_module_needs_the_pods_own_secret(
    node: Node, private_image: str, private_registry: LocalRegistry
) -> None:
    registered(node)
    attributes = {"image": private_image, "fileName": "authz.wasm"}
    anonymous = InlineVolume(new_pod_uid(), "intruder", "other", "authz", attributes)
    with pytest.raises(grpc.RpcError) as refused:
        node.kubelet.mount(anonymous)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # a final error: kubelet removed the volume directory it had prepared; nothing is mounted
    assert not node.kubelet.target_path(anonymous).parent.exists()

    basic = find(manifests(DEPLOY / "examples" / "private.yaml"), "Secret", "wasm-registry-basic")
    assert set(basic["stringData"]) == {"username", "password"}
    for secrets in (
        dockerconfigjson_secret(private_registry.host),
        {"username": PRIVATE_AUTH.username, "password": PRIVATE_AUTH.password},
    ):
        volume = InlineVolume(new_pod_uid(), "gateway-0", "shop", "authz", attributes, secrets=secrets)
        target = node.kubelet.mount(volume)
        assert module_file(target, "authz.wasm").read_bytes() == PRIVATE_MODULE
        node.kubelet.unmount(volume)
        node.kubelet.delete_pod(volume.pod_uid)

    wrong = InlineVolume(new_pod_uid(), "intruder", "other", "authz", attributes,
                         secrets={"username": PRIVATE_AUTH.username, "password": "guessed"})  # fmt: skip
    with pytest.raises(grpc.RpcError) as denied:
        node.kubelet.mount(wrong)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert node.driver.terminate() == 0


def test_identity_calls_answer_before_the_node_is_used(node: Node) -> None:
    """What the sidecars see first: the name the registrar registers, and a ready Probe."""
    with grpc.insecure_channel(f"unix://{node.endpoint}") as channel:
        from csi_wasm._gen import csi_pb2_grpc

        info = csi_pb2_grpc.IdentityStub(channel).GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=5)
    assert info.name == "csi-wasm.dev" and info.vendor_version
    registered(node)
    assert os.stat(node.endpoint).st_mode & 0o170000 == 0o140000  # a unix socket
    assert node.driver.terminate() == 0
    assert not pathlib.Path(node.endpoint).exists()
