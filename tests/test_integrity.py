"""Store integrity on the warm path: a module file whose size, mode, owner or inode changed since it was
stored is re-hashed before it is mounted again; corrupt bytes are quarantined and fetched again, intact
ones are resealed. Blob downloads are counted at the fault proxy (it records each request as it comes)."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
from typing import Callable

import pytest

from csi_wasm.config import NodeConfig
from csi_wasm.demo.push import Pushed, Pusher
from csi_wasm.demo.wasm_modules import make_module, sha256_digest

import faultproxy as fp
from conftest import RunningDriver, fast_pull_config, start_driver, stop_driver

MODULE = make_module(20 * 1024, "integrity")
BLOBS = r"GET /v2/integrity/filter/blobs/"


@pytest.fixture(scope="module")
def pushed(pusher: Pusher) -> Pushed:
    return pusher.wasm_artifact("integrity/filter", "v1", MODULE)


def stored(csi: RunningDriver) -> pathlib.Path:
    return csi.driver.store.module_path(sha256_digest(MODULE))


def rewrite(path: pathlib.Path) -> None:
    with open(path, "r+b") as handle:  # root on the node; the file is 0444, root writes anyway
        handle.seek(100)
        handle.write(b"\xff" * 16)


def replace_with_a_copy(path: pathlib.Path) -> None:
    copy = path.with_name("copy")
    shutil.copy2(path, copy)
    os.chmod(copy, 0o444)
    rewrite(copy)
    os.replace(copy, path)  # same size, mode and owner; another inode, other bytes


TAMPERING: dict[str, Callable[[pathlib.Path], None]] = {
    "rewritten and made setuid": lambda p: (rewrite(p), os.chmod(p, 0o4755)),  # issue 12's attack
    "grown": lambda p: p.open("ab").write(b"\0" * 10),
    "rewritten and chowned": lambda p: (rewrite(p), os.chown(p, 65534, 65534)),
    "replaced by another file": replace_with_a_copy,
}


@pytest.mark.parametrize("how", list(TAMPERING))
def test_a_tampered_module_is_quarantined_and_fetched_again(
    proxied_csi: RunningDriver, proxy: fp.FaultProxy, pushed: Pushed, how: str
) -> None:
    reference = f"{proxy.host}/integrity/filter:v1"
    first = proxied_csi.volume(reference)
    proxied_csi.kubelet.mount(first)
    assert proxy.count(BLOBS) == 1
    TAMPERING[how](stored(proxied_csi))

    pinned = proxied_csi.volume(reference, moduleDigest=sha256_digest(MODULE))  # a later pod, pinned by content
    target = proxied_csi.kubelet.mount(pinned)
    assert (target / "plugin.wasm").read_bytes() == MODULE
    assert proxy.count(BLOBS) == 2  # fetched again
    assert len(list(proxied_csi.driver.store.quarantine_dir.iterdir())) == 1
    info = stored(proxied_csi).stat()
    assert (info.st_mode, info.st_uid) == (0o100444, 0)
    for volume in (first, pinned):
        proxied_csi.kubelet.unmount(volume)


def test_a_module_made_setuid_with_its_bytes_intact_is_resealed_not_fetched_again(
    proxied_csi: RunningDriver, proxy: fp.FaultProxy, pushed: Pushed
) -> None:
    reference = f"{proxy.host}/integrity/filter:v1"
    first = proxied_csi.volume(reference)
    inode = (proxied_csi.kubelet.mount(first) / "plugin.wasm").stat().st_ino
    os.chmod(stored(proxied_csi), 0o4755)
    second = proxied_csi.volume(reference)
    info = (proxied_csi.kubelet.mount(second) / "plugin.wasm").stat()
    assert (info.st_ino, info.st_mode) == (inode, 0o100444)  # the one shared copy, its mode put back
    assert proxy.count(BLOBS) == 1 and not proxied_csi.driver.store.quarantine_dir.exists()
    for volume in (first, second):
        proxied_csi.kubelet.unmount(volume)


def test_a_module_stored_without_a_seal_is_hashed_once_and_sealed(
    tmp_path: pathlib.Path, proxy: fp.FaultProxy, pushed: Pushed
) -> None:
    """Modules stored by a driver version without seals: the first publish hashes and seals them."""
    node = NodeConfig(pull=fast_pull_config()).with_insecure([proxy.host])
    running = start_driver(tmp_path, node)
    reference = f"{proxy.host}/integrity/filter:v1"
    volume = running.volume(reference)
    running.kubelet.mount(volume)
    running.kubelet.unmount(volume)
    stop_driver(running)
    seals = tmp_path / "state" / "store" / "seals"
    shutil.rmtree(seals)

    running = start_driver(tmp_path, node)
    try:
        volume = running.volume(reference)
        assert (running.kubelet.mount(volume) / "plugin.wasm").read_bytes() == MODULE
        assert [p.name for p in seals.iterdir()] == [f"{sha256_digest(MODULE).removeprefix('sha256:')}.json"]
        assert proxy.count(BLOBS) == 1
        running.kubelet.unmount(volume)
    finally:
        stop_driver(running)


def test_store_verify_rehashes_everything(proxied_csi: RunningDriver, proxy: fp.FaultProxy, pushed: Pushed) -> None:
    """What a seal cannot see (a rewrite keeping size, mode and owner), `csi-wasm store verify` can."""
    volume = proxied_csi.volume(f"{proxy.host}/integrity/filter:v1")
    proxied_csi.kubelet.mount(volume)
    proxied_csi.kubelet.unmount(volume)
    rewrite(stored(proxied_csi))
    verify = subprocess.run([sys.executable, "-m", "csi_wasm", "store", "verify", "--state-dir",
                             str(proxied_csi.config.state_dir)], capture_output=True, text=True)  # fmt: skip
    assert verify.returncode == 1 and "0 ok, 1 corrupt" in verify.stdout, verify.stdout + verify.stderr
    assert not stored(proxied_csi).exists() and not any((proxied_csi.driver.store.root / "seals").iterdir())


def test_pods_of_a_quarantined_module_unpublish_even_after_a_restart(
    tmp_path: pathlib.Path, proxy: fp.FaultProxy, pushed: Pushed
) -> None:
    """Quarantine removes the module's views; the pods that mounted one keep it (the kernel does), and
    their unpublish must still find it ours, before and after a restart, or kubelet retries for ever."""
    node = NodeConfig(pull=fast_pull_config()).with_insecure([proxy.host])
    running = start_driver(tmp_path, node)
    reference = f"{proxy.host}/integrity/filter:v1"
    early = running.volume(reference)
    running.kubelet.mount(early)
    TAMPERING["grown"](stored(running))
    later = running.volume(reference)
    running.kubelet.mount(later)  # quarantines the grown module, fetches it again
    running.kubelet.close()
    running.server.stop()  # the driver restarts; the mounts stay

    restarted = start_driver(tmp_path, node)
    try:
        assert {r.target_path for r in restarted.driver.records.all()} == {
            str(restarted.kubelet.target_path(v)) for v in (early, later)
        }
        for volume in (early, later):
            restarted.kubelet.unmount(volume)
        assert restarted.mounts_under_kubelet() == []
    finally:
        stop_driver(restarted)
