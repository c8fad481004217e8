"""scripts/sanity.sh and the helper it runs (csi_wasm.demo.sanity).

csi-sanity itself (a Go binary) is not on this machine's test path; these check what the script owns: it
refuses cleanly without csi-sanity, and the helper serves the real driver and stops everything it started.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
from typing import Iterator

import grpc
import pytest
import yaml

from csi_wasm._gen import csi_pb2, csi_pb2_grpc
from csi_wasm.demo.sanity import DRIVER_NAME, SanityLayout
from csi_wasm.mounts import LinuxMounter
from csi_wasm.wasm import MAGIC

from conftest import wait_for

ROOT = pathlib.Path(__file__).resolve().parent.parent
INSTALL_HINT = re.compile(r"go install github\.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@(v5\.\d+\.\d+)")
# Everything the script would run once past its csi-sanity check: setup, the namespace, mounts, the helper.
SETUP_COMMANDS = ("apt-get", "python3", "pip", "unshare", "mount", "setsid", "mktemp", "docker-registry")
MOUNT_CAPABILITY = csi_pb2.VolumeCapability(
    mount=csi_pb2.VolumeCapability.MountVolume(),
    access_mode=csi_pb2.VolumeCapability.AccessMode(mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER),
)


def test_without_csi_sanity_the_script_exits_2_with_the_install_hint_and_starts_nothing(tmp_path: pathlib.Path) -> None:
    # The script and its setup step run from a scratch checkout, so any setup work it started (a .venv,
    # a package install) would show up there instead of vanishing into the real checkout's .venv.
    checkout = tmp_path / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    for name in ("sanity.sh", "setup.sh"):
        shutil.copy2(ROOT / "scripts" / name, checkout / "scripts" / name)
    calls = tmp_path / "calls.log"
    shims = tmp_path / "shims"
    shims.mkdir()
    for command in SETUP_COMMANDS:
        shim = shims / command
        shim.write_text(f'#!/bin/sh\necho "{command} $*" >> {calls}\nexit 97\n')
        shim.chmod(0o755)
    for tool in ("bash", "cat", "dirname", "id"):  # real; every other command is absent or a recording shim
        (shims / tool).symlink_to(shutil.which(tool) or f"/usr/bin/{tool}")
    path = str(shims)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    mounts_before = pathlib.Path("/proc/self/mountinfo").read_text()

    result = subprocess.run(
        ["/bin/bash", str(checkout / "scripts" / "sanity.sh")],
        env={"PATH": path, "TMPDIR": str(scratch), "HOME": str(tmp_path)},
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip

    assert result.returncode == 2, result.stderr
    hint = INSTALL_HINT.search(result.stderr)
    assert hint is not None, result.stderr
    assert f"csi-sanity@{hint.group(1)}" in (ROOT / "README.md").read_text(), "README names another version"
    assert not calls.exists(), calls.read_text()
    assert sorted(str(p.relative_to(checkout)) for p in checkout.rglob("*")) == [
        "scripts", "scripts/sanity.sh", "scripts/setup.sh",
    ]  # fmt: skip
    assert list(scratch.iterdir()) == []
    assert pathlib.Path("/proc/self/mountinfo").read_text() == mounts_before


@pytest.fixture
def shared_pods_dir(tmp_path: pathlib.Path) -> Iterator[SanityLayout]:
    """The work directory as scripts/sanity.sh prepares it: kubelet's pods dir a shared mount."""
    layout = SanityLayout(tmp_path / "sanity")
    pods = layout.kubelet_dir / "pods"
    pods.mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(pods), str(pods)], check=True)
    try:
        subprocess.run(["mount", "--make-shared", str(pods)], check=True)
        yield layout
    finally:
        subprocess.run(["umount", "-R", str(pods)], check=True)


def test_the_helper_serves_the_demo_module_and_stops_driver_and_registry_on_sigterm(
    shared_pods_dir: SanityLayout,
) -> None:
    layout = shared_pods_dir
    log = (layout.workdir / "helper.log").open("wb")
    helper = subprocess.Popen(
        [sys.executable, "-m", "csi_wasm.demo.sanity", str(layout.workdir)],
        stdout=subprocess.DEVNULL, stderr=log, start_new_session=True,  # its own group, as setsid gives it
    )  # fmt: skip
    try:
        assert wait_for(lambda: layout.ready_file.exists() or helper.poll() is not None, timeout=60)
        assert helper.poll() is None, (layout.workdir / "helper.log").read_text()
        image = yaml.safe_load(layout.parameters_file.read_text())["image"]
        assert layout.ready_file.read_text().strip() == image
        _publish_and_unpublish_as_csi_sanity_would(layout, image)

        helper.send_signal(signal.SIGTERM)
        assert helper.wait(timeout=90) == 0
        with pytest.raises(ProcessLookupError):
            os.killpg(helper.pid, 0)  # nothing of its group is left: the registry was stopped too
        assert not pathlib.Path(layout.endpoint.removeprefix("unix://")).exists()
    finally:
        try:
            os.killpg(helper.pid, signal.SIGKILL)  # only if an assertion above failed
        except ProcessLookupError:
            pass
        helper.wait()
        log.close()


def _publish_and_unpublish_as_csi_sanity_would(layout: SanityLayout, image: str) -> None:
    """csi-sanity's mount dir under kubelet's pods dir, its ``<mountdir>/target``, the parameters' image."""
    mount_dir = layout.kubelet_dir / "pods" / "csi-sanity-target"
    mount_dir.mkdir()
    target = mount_dir / "target"
    with grpc.insecure_channel(layout.endpoint) as channel:
        identity, node = csi_pb2_grpc.IdentityStub(channel), csi_pb2_grpc.NodeStub(channel)
        assert identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=10).name == DRIVER_NAME
        node.NodePublishVolume(
            csi_pb2.NodePublishVolumeRequest(
                volume_id="sanity-volume", target_path=str(target), volume_capability=MOUNT_CAPABILITY,
                volume_context={"image": image},
            ),
            timeout=60,
        )  # fmt: skip
        assert (target / "plugin.wasm").read_bytes()[:4] == MAGIC
        entry = LinuxMounter().mount_at(target)
        assert entry is not None and "ro" in entry.options
        node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id="sanity-volume", target_path=str(target)), timeout=60
        )
    assert not target.exists()
    mount_dir.rmdir()
